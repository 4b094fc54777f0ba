"""The `masking` addon: pick the masking profile(s) for a request and register a transform
that masks every JSON-RPC message of its response (JSON body or SSE event, applied by the
`responses` addon). The masking itself is pure and lives in addons/core/masking/engine.py.

Runs after identity, policy and approval: the profile depends on who calls (roles, sub,
client), through which connection, which tool - and on the policy decision, which may name
a profile itself. Rules come from rules/masking.yaml and are reloaded on change.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.core.mcpwire import id_key
from addons.core.masking.engine import MaskConfig, MaskError, Profile, load_masking, mask_message, mask_value
from addons.core.privatefiles import private_dir, write_private
from addons.core.record import BastionRecord, get_record
from addons.core.rules import RulesError, RulesWatch, rules_files
from addons.core.textsafe import get_logger

log = get_logger("bastion.masking")

KEY_BYTES = 32


def load_or_create_key(path: str | os.PathLike) -> bytes:
    """The gateway secret for keyed hashes. Created (0600, directory 0700) when missing."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        private_dir(p.parent)
        if write_private(p, (secrets.token_hex(KEY_BYTES) + "\n").encode(), overwrite=False):
            log.info("created masking key %s", p)   # else another instance created it first
        return load_or_create_key(p)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        key = f.read().strip()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("masking key %s is readable by group/others; chmod 600 it", p)
    if len(key) < 16:
        raise ValueError(f"masking key {p} is shorter than 16 bytes")
    return key


class MaskTransform:
    """Response transform for one request: masks each JSON-RPC message with the profiles
    chosen for it and notes what was masked on the record.

    `readonly` is re-set after every call: True when that message came back unchanged, so
    the pipeline forwards the original bytes instead of re-serialising (see
    responses.transform_message, which reads the attribute after calling)."""

    def __init__(self, rec: BastionRecord, default: list[Profile], by_id: dict[Any, list[Profile]]):
        self.rec = rec
        self.default = default
        self.by_id = by_id
        self.readonly = True

    def profiles_for(self, msg: dict) -> list[Profile]:
        if self.by_id and ("result" in msg or "error" in msg):
            mid = msg.get("id")
            if isinstance(mid, (str, int)) and not isinstance(mid, bool):
                return self.by_id.get(id_key(mid), self.default)
        return self.default

    def __call__(self, msg: dict) -> dict:
        self.readonly = True
        out = msg
        try:
            for prof in self.profiles_for(msg):
                out, events = mask_message(prof, out)
                if events:
                    self.rec.add_masks(events)
        except MaskError:
            raise
        except RecursionError:
            raise MaskError("response nested too deeply") from None
        self.readonly = out is msg
        return out

    def mask_text(self, text: str) -> str:
        """A text outside any JSON-RPC message (an SSE id field), masked with every profile."""
        for prof in self.default:
            text, events = mask_value(prof, text, root="$sse")
            if events:
                self.rec.add_masks(events)
        return text if isinstance(text, str) else str(text)


class Masking:
    name = "masking"

    def __init__(self) -> None:
        self.config: MaskConfig | None = None
        self.key: bytes = b""
        self._watch = RulesWatch(self._reload)

    def load(self, loader) -> None:
        loader.add_option("bastion_mask_key_file", str, ".secrets/mask-key",
                          "Secret for keyed-hash masking ([HASH:...]); created 0600 when missing.")

    def configure(self, updated) -> None:
        if "bastion_mask_key_file" in updated:
            try:
                self.key = load_or_create_key(ctx.options.bastion_mask_key_file)
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"bastion_mask_key_file: {e}") from None
        if "bastion_rules" in updated or "bastion_mask_key_file" in updated:  # hashes follow the key
            rules = ctx.options.bastion_rules
            try:
                self._load(rules)
            except RulesError as e:
                raise exceptions.OptionsError(f"masking: {e}") from None
            self._watch.watch(lambda: rules_files(rules, "masking"))

    def _load(self, rules_dir: str) -> None:
        self.config = load_masking(rules_dir, self.key)
        log.info("masking: %d profile(s) (%s), %d selector(s), default %s",
                 len(self.config.profiles), ", ".join(self.config.profiles), len(self.config.selectors),
                 self.config.default)

    def running(self) -> None:
        self._watch.start()
        from mitmproxy import contentviews
        from addons.hooks.maskview import MaskedRequestView
        contentviews.add(MaskedRequestView(lambda: self.config))

    def done(self) -> None:
        self._watch.stop()

    def check_reload(self) -> bool:
        """Reload rules/masking.yaml if it changed; a broken file keeps the last good rules."""
        return bool(self._watch.check())

    def _reload(self) -> bool:
        try:
            self._load(ctx.options.bastion_rules)
        except RulesError as e:
            log.error("masking rules reload rejected, keeping the last good rules: %s", e)
            return False
        return True

    # --- per request ---------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # every flow, refused or not: what the store, replay and mitmweb show of arguments
        if self.config is not None:
            get_record(flow.metadata).request_mask = self.config.mask_request

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None:
            return
        if self.config is None:
            raise RuntimeError("masking rules not loaded")  # fail closed (the pipeline's guard)
        transform = self.plan(rec)
        if transform is None:
            return
        rec.mask_required = True
        rec.response_transforms.append(transform)
        rec.mask_text = transform.mask_text

    def plan(self, rec: BastionRecord) -> MaskTransform | None:
        """Profiles for every message of this request; None when nothing is to be masked."""
        cfg = self.config
        assert cfg is not None
        ident = rec.identity
        roles = ident.roles if ident else ()
        sub = ident.sub if ident else None
        client = ident.client_id if ident else None

        def chosen(msg, decision) -> list[Profile]:
            named = getattr(decision, "mask_profile", None) if decision is not None else None
            if named:
                prof = cfg.profiles.get(named)
                if prof is not None:
                    return [prof]
                log.warning("policy named unknown masking profile %r; using %s", named, cfg.default)
                return [cfg.profiles[cfg.default]]
            # not a tools/call (resources/read, prompts/get, ...): no tool, so every profile
            # this caller could get applies (never less masking than a tool selector gives)
            return cfg.select(rec.connection, msg.tool_name, roles, sub, client)

        by_id: dict[Any, list[Profile]] = {}
        union: list[Profile] = []
        for i, msg in enumerate(rec.messages):
            decision = rec.decisions[i] if i < len(rec.decisions) else None
            picked = chosen(msg, decision)
            if decision is not None and not decision.mask_profile:
                decision.mask_profile = "+".join(p.name for p in picked)   # for the audit
            profs = [p for p in picked if not p.empty]
            if msg.kind == "request" and isinstance(msg.id, (str, int)):
                by_id[id_key(msg.id)] = profs
            union += [p for p in profs if p not in union]
        if not rec.messages:
            # GET stream (server notifications, legacy SSE responses): the tool is unknown,
            # so every profile this caller could get applies
            picked = cfg.select(rec.connection, None, roles, sub, client)
            rec.mask_profiles = tuple(p.name for p in picked)
            union = [p for p in picked if not p.empty]
        if not union:
            return None
        return MaskTransform(rec, union, by_id if len(by_id) > 1 else {})
