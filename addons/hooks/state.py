"""The `state` stage: option `bastion_state` (the shared state engine) and the shared limits.

Empty (default): nothing here runs; policy and approval keep their in-process state.
`redis://host:port/db`: this stage opens the engine, watches its health (the
bastion_state_up gauge; one log line per outage, one on recovery), relays pub/sub
decision announcements to the approval stage, and takes the rate-limit / blast-radius
buckets the policy left on the record, atomically across replicas. The engine down ->
a call that needs a bucket is refused (STATE_UNAVAILABLE), never forwarded unchecked.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addons.core.mcpwire import jsonrpc_error
from addons.core.record import Decision, get_record
from addons.core.statestore import Sealer, SharedState, StateUnavailable, bucket_key, open_store
from addons.core.textsafe import get_logger
from addons.hooks.httputil import refuse_jsonrpc, refuse_unavailable

log = get_logger("bastion.state")

HEALTH_EVERY = 1.0      # seconds between pings while the engine is configured
KEY_FILE = "state.key"


def seal_key(path: Path) -> bytes:
    """The replicas' shared seal key: read it, or create it once (O_EXCL: two replicas
    starting together on one key dir end up with the same key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):          # the creator may not have written it yet
        text = path.read_text().strip()
        if text:
            return bytes.fromhex(text)
        time.sleep(0.02)
    raise exceptions.OptionsError(f"bastion_state_key: {path} is empty")


class StateEngine:
    name = "state"

    def __init__(self, state: SharedState) -> None:
        self.state = state
        self._tasks: list[asyncio.Task] = []

    def load(self, loader):
        loader.add_option("bastion_state", str, "",
                          "Shared state engine for several replicas: empty = in-process (one gateway); "
                          "redis://host:port/db = Redis >= 7 / Valkey holds pending approvals and "
                          "rate-limit / blast-radius buckets. Unreachable -> approval-required and "
                          "rate-limited calls are refused, other calls flow.")
        loader.add_option("bastion_state_key", str, "",
                          "File with the hex key that seals shared approval records (same on every replica); "
                          "empty = <bastion_key_dir>/state.key, created on first use.")

    def configure(self, updated):
        if not updated & {"bastion_state", "bastion_state_key", "bastion_key_dir"}:
            return
        try:
            store = open_store(ctx.options.bastion_state)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        sealer = None
        if store is not None:
            key_file = ctx.options.bastion_state_key or str(
                Path(ctx.options.bastion_key_dir if "bastion_key_dir" in ctx.options else ".secrets") / KEY_FILE)
            try:
                sealer = Sealer(seal_key(Path(key_file)))
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"bastion_state_key: {key_file}: {e}") from None
        old = self.state.store
        self.state.store, self.state.sealer, self.state.up = store, sealer, True
        if old is not None:
            try:
                asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:
                pass                 # no loop yet: nothing was opened
        if store is not None:
            log.info("shared state engine: %s", _safe_url(ctx.options.bastion_state))
            self._restart()

    def running(self):
        self._restart()

    def _restart(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                   # configure before the loop runs: running() starts them
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self.state.store is not None:
            self._tasks = [loop.create_task(self._health()), loop.create_task(self._listen())]

    def done(self):
        for t in self._tasks:
            t.cancel()

    async def _health(self) -> None:
        store, failures = self.state.store, 0
        while store is self.state.store:
            try:
                await store.ping()
                failures = 0
                self.state.mark(True)
            except StateUnavailable as e:
                # two missed pings in a row: one can be this process's own stall (startup);
                # a failed take or approval write marks the outage at once
                failures += 1
                if failures >= 2:
                    self.state.mark(False, str(e))
            await asyncio.sleep(HEALTH_EVERY)

    async def _listen(self) -> None:
        """Decision announcements -> the approval stage (which re-reads the sealed record)."""
        store = self.state.store
        while store is self.state.store:
            try:
                async for pid in store.decisions():
                    for cb in list(self.state.listeners):
                        cb(pid)
            except StateUnavailable as e:
                self.state.mark(False, str(e))
                await asyncio.sleep(HEALTH_EVERY / 2)
            # a subscription that ended or broke: subscribe again, and let holders look
            # at their records in case an announcement was missed meanwhile
            for cb in list(self.state.listeners):
                cb("")

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        store = self.state.store
        if flow.response is not None or not rec.shared_takes or store is None:
            return
        for t in rec.shared_takes:
            try:
                wait = await store.take(bucket_key(t.key), t.calls, t.per, t.cost)
            except StateUnavailable as e:
                self.state.mark(False, str(e))
                refuse_unavailable(flow, rec, f"the limit of rule {t.rule}")
                return
            self.state.mark(True)
            if wait > 0:
                why = f"{t.why}; retry after {wait:.1f}s" if t.key[0] == "rate" else t.why
                d = Decision("deny", t.rule, why, message_id=t.message_id, code=t.code)
                rec.decisions = [d if x.message_id == t.message_id else x for x in rec.decisions]
                errors = [jsonrpc_error(m.id, t.code, f"denied by mcp-bastion policy rule {t.rule}: {why}",
                                        {"rule": t.rule}) if m.id == t.message_id else
                          jsonrpc_error(m.id, t.code, "batch refused: another call in it was denied")
                          for m in rec.messages if m.kind == "request"]
                refuse_jsonrpc(flow, errors, rec.batch, 200, reason=f"denied by {t.rule}: {why}", rule=t.rule)
                return


def _safe_url(url: str) -> str:
    """The engine's address without a password (logs)."""
    from urllib.parse import urlsplit
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}{':' + str(p.port) if p.port else ''}{p.path}"
