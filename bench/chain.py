"""Benchmark entry script: `mitmdump -s bench/chain.py` = the pipeline of addons/bastion.py.

A bench-only variant builder (production has no switch to leave stages out):
- BENCH_SKIP=masking,recorder: the same pipeline without those stages (what each costs).
- BENCH_PROFILE=<file>: cProfile the whole mitmdump process, written at shutdown.
- BENCH_HOOKTIMES=<file>: wall time spent inside each addon's flow hooks (count, seconds),
  written as JSON at shutdown: what each stage costs, without a profiler's distortion.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import time

# The harness runs a copy of this file from its work directory (mitmproxy reloads a script
# whose file changes; editing the checkout must not swap the chain mid-run): BENCH_ROOT.
_ROOT = os.environ.get("BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons.bastion import build_stages  # noqa: E402
from addons.hooks.pipeline import Pipeline  # noqa: E402

log = logging.getLogger("bench.chain")


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
    skip = frozenset(s.strip().lower() for s in os.environ.get("BENCH_SKIP", "").split(",") if s.strip())
    stages = [s for s in build_stages() if s.name not in skip]
    log.warning("BENCH_STANDINS=- BENCH_CHAIN=%s", ",".join(s.name for s in stages))
    chain: list = [Profiler(os.environ["BENCH_PROFILE"])] if os.environ.get("BENCH_PROFILE") else []
    if os.environ.get("BENCH_HOOKTIMES"):
        table: dict = {}
        chain += [Pipeline([HookTimer(s, table) for s in stages]), HookTimes(os.environ["BENCH_HOOKTIMES"], table)]
    else:
        chain.append(Pipeline(stages))
    return chain


addons = bench_chain()
