"""Benchmark entry script: `mitmdump -s bench/chain.py` = the real chain of addons/bastion.py.

It is `addons.bastion.build_chain` with `BASTION_SKIP` honoured, plus two things only a
benchmark needs:
- stand-ins for stages whose module does not exist yet in this checkout (identity: verify
  the bench JWT with pyjwt; policy: allow the bench tools and filter tools/list), so the
  harness runs whatever has landed. The report says which stages were stand-ins
  (BENCH_STANDINS is printed to the log at load).
- BENCH_PROFILE=<file>: cProfile the whole mitmdump process, written at shutdown.
- BENCH_HOOKTIMES=<file>: wall time spent inside each addon's flow hooks (count, seconds),
  written as JSON at shutdown: what each stage costs, without a profiler's distortion.
"""
from __future__ import annotations

import fnmatch
import functools
import inspect
import json
import logging
import os
import re
import sys
import time

# The harness runs a copy of this file from its work directory (mitmproxy reloads a script
# whose file changes; editing the checkout must not swap the chain mid-run): BENCH_ROOT.
_ROOT = os.environ.get("BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons.bastion import CHAIN, build_chain  # noqa: E402
from addons.hooks.failclosed import FailClosed  # noqa: E402
from addons.hooks.httputil import refuse_http, refuse_jsonrpc  # noqa: E402
from addons.core.mcpwire import jsonrpc_error  # noqa: E402
from addons.core.record import Decision, Identity, get_record  # noqa: E402
from bench.stages import missing_stages  # noqa: E402

log = logging.getLogger("bench.chain")
ALLOWED_TOOLS = ("get_customer", "query_sql", "stream_report", "tool_00*")
# compiled once: the globs as one regex (fnmatch per tool per call showed in the profile)
ALLOWED_RE = re.compile("|".join(fnmatch.translate(p) for p in ALLOWED_TOOLS))


class StandInIdentity:
    """Verifies the bench JWT (ES256, local key) the way an identity addon would."""

    name = "identity"

    def __init__(self) -> None:
        import jwt
        self._jwt = jwt
        with open(os.environ["BENCH_JWT_PUBLIC"], "rb") as f:
            self._key = f.read()

    def request(self, flow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None:
            return
        auth = flow.request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise ValueError("no bearer")
            claims = self._jwt.decode(token, self._key, algorithms=["ES256"], audience="mcp-bastion",
                                      options={"require": ["exp", "sub"]})
        except Exception:
            refuse_http(flow, 401, "invalid_token", "bearer token missing or invalid",
                        {"www-authenticate": 'Bearer error="invalid_token"'})
            return
        rec.identity = Identity(claims["sub"], tuple(claims.get("roles", ())), claims.get("azp"))


def _filter_list(message: dict) -> dict:
    result = message.get("result")
    if isinstance(result, dict) and isinstance(result.get("tools"), list):
        result["tools"] = [t for t in result["tools"]
                           if isinstance(t, dict) and ALLOWED_RE.match(str(t.get("name")))]
    return message


class StandInPolicy:
    """Allow the bench tools, deny the rest, filter tools/list (until addons/hooks/policy.py exists)."""

    name = "policy"

    def request(self, flow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None or flow.request.method != "POST":
            return
        for m in rec.messages:
            if m.method == "tools/call" and not ALLOWED_RE.match(m.tool_name or ""):
                rec.decisions.append(Decision("deny", rule="bench-standin", reason="tool not allowed", message_id=m.id))
                refuse_jsonrpc(flow, [jsonrpc_error(m.id, -32001, "denied by rule bench-standin")], False,
                               reason="tool not allowed", rule="bench-standin")
                return
            rec.decisions.append(Decision("allow", rule="bench-standin", message_id=m.id))
            if m.method == "tools/list":
                rec.response_transforms.append(_filter_list)


class Profiler:
    """cProfile around the whole process (hooks and mitmproxy's own work alike)."""

    name = "bench_profiler"

    def __init__(self, path: str) -> None:
        import cProfile
        self.path = path
        self.prof = cProfile.Profile()
        self.prof.enable()

    def done(self) -> None:
        self.prof.disable()
        self.prof.dump_stats(self.path)


FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")


class HookTimer:
    """Wraps one chain addon; adds up the time spent in its flow hooks."""

    def __init__(self, addon, table: dict) -> None:
        self._addon = addon
        self.name = addon.name
        self._table = table.setdefault(addon.name, {})

    def __getattr__(self, item):
        attr = getattr(self._addon, item)
        if item not in FLOW_HOOKS or not callable(attr):
            return attr
        is_async = inspect.iscoroutinefunction(attr)
        cell = self._table.setdefault(item, [0, 0.0, is_async])
        if is_async:
            @functools.wraps(attr)
            async def timed_async(*a, **kw):
                t = time.perf_counter()
                try:
                    return await attr(*a, **kw)
                finally:
                    cell[0] += 1
                    cell[1] += time.perf_counter() - t
            return timed_async

        @functools.wraps(attr)
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                cell[0] += 1
                cell[1] += time.perf_counter() - t
        return timed

    def __dir__(self):
        return sorted(set(dir(self._addon)) | {"name"})

    @property
    def wrapped(self):
        return getattr(self._addon, "wrapped", self._addon)


class HookTimes:
    name = "bench_hooktimes"

    def __init__(self, path: str, table: dict) -> None:
        self.path, self.table = path, table

    def done(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.table, f)


def bench_chain() -> list:
    skip = frozenset(s.strip().lower() for s in os.environ.get("BASTION_SKIP", "").split(",") if s.strip())
    missing = missing_stages(CHAIN)
    chain = build_chain(skip | missing)
    names = [a.name for a in chain]
    standins = []
    if "identity" in missing and "identity" not in skip:
        chain.insert(names.index("connections") + 1, FailClosed(StandInIdentity()))
        standins.append("identity")
    names = [a.name for a in chain]
    if "policy" in missing:
        chain.insert(names.index("mcp") + 1, FailClosed(StandInPolicy()))
        standins.append("policy")
    log.warning("BENCH_STANDINS=%s BENCH_CHAIN=%s", ",".join(standins) or "-", ",".join(a.name for a in chain))
    if os.environ.get("BENCH_HOOKTIMES"):
        table: dict = {}
        chain = [HookTimer(a, table) for a in chain] + [HookTimes(os.environ["BENCH_HOOKTIMES"], table)]
    if os.environ.get("BENCH_PROFILE"):
        chain.insert(0, Profiler(os.environ["BENCH_PROFILE"]))
    return chain


addons = bench_chain()
