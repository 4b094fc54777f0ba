"""The `integrity` addon: tools are what was reviewed (issue 11, docs/integrity.md).

- pinned definitions (rules/pins/<connection>.yaml, `mcp-bastion pin`): a tool whose
  definition no longer matches is hidden from tools/list and its calls are refused;
- look-alike tool names (Cyrillic о in run_cоmmand, zero-width characters) are refused;
- prompt-injection text in tool descriptions and results is marked, stripped or refused;
- results over a connection's output cap are truncated (valid JSON) or refused.
Runs after policy (a denied call never gets here) and registers response transforms, so
JSON bodies and SSE events are covered alike.
"""
from __future__ import annotations

from collections import OrderedDict

from mitmproxy import ctx, http

from addons.hooks.reloading import Watching
from addons.core import integrity as ti
from addons.core.connections import ConnectionRegistry
from addons.hooks.httputil import refuse_message
from addons.core.record import BastionRecord, get_record
from addons.core.textsafe import get_logger

log = get_logger("bastion.integrity")

INTEGRITY_REFUSED = -32036
MAX_DRIFTED = 10_000


class Integrity(Watching):
    name = "integrity"

    def __init__(self, connections: ConnectionRegistry | None = None, pins: ti.PinStore | None = None) -> None:
        self.registry = connections or ConnectionRegistry()
        self.pins = pins or ti.PinStore()
        self.pins.on_repin.append(self._repinned)
        self.watches = (self.pins.poll,)
        # (connection, tool) -> why the tool is not what was pinned (bounded)
        self.drifted: OrderedDict[tuple[str, str], str] = OrderedDict()

    # -- configuration -------------------------------------------------------------------

    def configure(self, updated) -> None:
        if "bastion_rules" in updated:
            self.pins.watch(ctx.options.bastion_rules)

    def check_pins(self) -> None:
        self.pins.poll.check()

    def _repinned(self, connection: str) -> None:
        for key in [k for k in self.drifted if k[0] == connection]:
            del self.drifted[key]                # re-pinned: judge the tools afresh

    def _pin_set(self, connection: str) -> tuple[dict | None, ti.SkeletonIndex]:
        return self.pins.get(connection)

    # -- hooks -----------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None or not rec.messages:
            return
        conn = self.registry.get(rec.connection)
        if conn is None:
            return
        cfg, (pins, index) = conn.integrity, self._pin_set(rec.connection)
        for m in rec.messages:
            if m.method == "tools/list":
                rec.response_transforms.append(
                    lambda msg, c=rec.connection, r=rec: self._tools_list(c, cfg, pins, index, r, msg))
            elif m.method == "tools/call":
                why = self._call_refusal(rec.connection, cfg, pins, index, m.tool_name or "")
                if why:
                    log.warning("refused tools/call %r on %s: %s", m.tool_name, rec.connection, why)
                    refuse_message(flow, m.id, INTEGRITY_REFUSED, f"refused by mcp-bastion tool integrity: {why}",
                                   rule="integrity")
                    return
                rec.response_transforms.append(lambda msg, r=rec: self._result(cfg, r, msg))

    def _call_refusal(self, connection: str, cfg: ti.IntegrityConfig, pins: dict | None, index: ti.SkeletonIndex,
                      name: str) -> str | None:
        twin = ti.lookalike_of(name, index)
        if twin is not None or not ti.plain_name(name):
            return f"tool name {name!r} imitates {twin!r}" if twin else f"tool name {name!r} has unusual characters"
        why = self.drifted.get((connection, name))
        if why:
            return why
        if pins is not None and name not in pins and cfg.require_pins:
            return f"tool {name} is not pinned for this connection"
        return None

    def _tools_list(self, connection: str, cfg: ti.IntegrityConfig, pins: dict | None, index: ti.SkeletonIndex,
                    rec: BastionRecord, msg: dict) -> dict:
        result = msg.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return msg
        kept, hidden = [], []
        for tool in result["tools"]:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            why = self._tool_problem(connection, cfg, pins, index, tool)
            if why is None and cfg.injection != "off":
                tool, why = self._scan_tool(cfg, tool, rec)
            if why is None:
                kept.append(tool)
            else:
                hidden.append(tool["name"])
                log.warning("hid tool %r of %s: %s", tool["name"], connection, why)
        if hidden:
            rec.integrity_hidden.extend(hidden[:100])
        return {**msg, "result": {**result, "tools": kept}}

    def _tool_problem(self, connection: str, cfg: ti.IntegrityConfig, pins: dict | None, index: ti.SkeletonIndex,
                      tool: dict) -> str | None:
        name = tool["name"]
        if not ti.plain_name(name):
            return f"tool name {name!r} has unusual characters"
        if pins is None:
            return None
        twin = ti.lookalike_of(name, index)
        if twin is not None:
            return f"tool name {name!r} imitates pinned tool {twin!r}"
        if name not in pins:
            return "not pinned" if cfg.require_pins else None
        if pins[name]["hash"] != ti.tool_hash(tool):
            why = f"tool {name} changed since it was pinned (run `mcp-bastion pin --diff {connection}`)"
            if (connection, name) not in self.drifted:
                log.error("%s", why)
            self.drifted[(connection, name)] = why
            self.drifted.move_to_end((connection, name))
            while len(self.drifted) > MAX_DRIFTED:
                self.drifted.popitem(last=False)
            return why
        return None

    def _scan_tool(self, cfg: ti.IntegrityConfig, tool: dict, rec: BastionRecord) -> tuple[dict, str | None]:
        text = tool.get("description")
        findings = ti.scan_description(text) if isinstance(text, str) else []
        if not findings:
            return tool, None
        kinds = sorted({f.kind for f in findings})
        rec.injections.append({"tool": tool["name"], "kinds": kinds})
        if cfg.injection == "refuse":
            return tool, f"description looks like an instruction to the model ({', '.join(kinds)})"
        if cfg.injection == "strip":
            tool = {**tool, "description": ti.strip(text, findings)}
        meta = dict(tool.get("_meta") or {})
        meta[ti.META_KEY] = kinds
        return {**tool, "_meta": meta}, None

    def _result(self, cfg: ti.IntegrityConfig, rec: BastionRecord, msg: dict) -> dict:
        result = msg.get("result")
        if not isinstance(result, dict) or "id" not in msg:
            return msg
        if cfg.injection != "off":
            result = self._scan_result(cfg, rec, msg, result)
            if result is None:
                return _error(msg, "the tool result looks like an instruction to the model")
        if cfg.max_output_chars and ti.result_size(result) > cfg.max_output_chars:
            size = ti.result_size(result)
            rec.output_capped = {"size": size, "limit": cfg.max_output_chars, "action": cfg.on_oversize}
            cut = ti.truncate_result(result, cfg.max_output_chars) if cfg.on_oversize == "truncate" else None
            if cut is None:
                return _error(msg, f"the tool result has {size} characters, over this connection's limit "
                                   f"of {cfg.max_output_chars}")
            result = cut
        return msg if result is msg.get("result") else {**msg, "result": result}

    def _scan_result(self, cfg: ti.IntegrityConfig, rec: BastionRecord, msg: dict, result: dict) -> dict | None:
        blocks, kinds = [], set()
        for block in result.get("content") or []:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                findings = ti.scan(block["text"])
                if findings:
                    kinds |= {f.kind for f in findings}
                    if cfg.injection == "strip":
                        block = {**block, "text": ti.strip(block["text"], findings)}
            blocks.append(block)
        if not kinds:
            return result
        rec.injections.append({"result": msg.get("id"), "kinds": sorted(kinds)})
        log.warning("injection-like text in a tool result (%s): %s", cfg.injection, ", ".join(sorted(kinds)))
        if cfg.injection == "refuse":
            return None
        meta = dict(result.get("_meta") or {})
        meta[ti.META_KEY] = sorted(kinds)
        return {**result, "content": blocks, "_meta": meta}


def _error(msg: dict, why: str) -> dict:
    return {"jsonrpc": "2.0", "id": msg.get("id"),
            "error": {"code": INTEGRITY_REFUSED, "message": f"refused by mcp-bastion tool integrity: {why}"}}


# --- CLI: mcp-bastion pin -------------------------------------------------------------------
