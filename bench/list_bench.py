"""tools/list through the real chain, in one process: time per stage hook.

    .venv/bin/python bench/list_bench.py [--reps 200] [--many-tools 200] [--pins] [--profile]

The stages are the ones addons/bastion.py builds (build_stages(), each wrapped by
FailClosed), configured as the bench's `full` target is (bench/targets.py: the shipped
rules with bench/policy.yaml, a `bench` connection, a minted caller JWT). Each repetition
drives one `tools/list` request and the upstream's answer (bench/upstream.py: 206 tools, of
which the policy lets the caller see 13) through every stage's requestheaders, request,
responseheaders and response hooks, in pipeline order, on one asyncio loop; nothing is
sent anywhere. Prints the median time per stage hook and per whole exchange; --pins pins
every upstream tool first (rules/pins/bench.yaml: integrity then hashes each tool shown);
--profile prints cProfile's top 20 (cumulative) over the same repetitions instead.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from addons.bastion import build_stages  # noqa: E402
from addons.core.integrity import write_pins  # noqa: E402
from addons.core.record import get_record  # noqa: E402
from addons.hooks.failclosed import FailClosed  # noqa: E402
from bench.loadgen import WORKLOADS  # noqa: E402
from bench.targets import Stack  # noqa: E402
from bench.upstream import PROTOCOL, tools_list  # noqa: E402

HOOKS = ("requestheaders", "request", "responseheaders", "response")


class TimedTransform:
    """One response transform of the record, timed (`readonly` read through: the
    responses stage reads it after each call)."""

    def __init__(self, fn, table: dict) -> None:
        self.fn = fn
        owner = getattr(fn, "__self__", None) or fn
        self.label = "transform " + getattr(owner, "__qualname__", type(owner).__qualname__)
        self.cell = table.setdefault(("", self.label), [])

    @property
    def readonly(self) -> bool:
        return getattr(self.fn, "readonly", False)

    def __call__(self, msg):
        t = time.perf_counter()
        try:
            return self.fn(msg)
        finally:
            self.cell.append(time.perf_counter() - t)


class ListExchange:
    """The chain, loaded in a mitmproxy test context, and one tools/list exchange through it."""

    def __init__(self, work: Path, many_tools: int, pins: bool = False) -> None:
        stack = Stack(work, many_tools=many_tools)
        stack.up_port = 9                         # never connected to: the hooks only name it
        stack.prepare_bastion()
        if pins:                                  # every upstream tool reviewed (mcp-bastion pin)
            write_pins(stack.bastion_rules, "bench", tools_list(many_tools)["tools"])
        self.stack = stack
        self.chain = [FailClosed(s) for s in build_stages()]
        wl = WORKLOADS["list"]
        head, tail = wl.body_parts()
        self.body = head + b"1" + tail
        self.headers = [(k.encode(), v.encode()) for k, v in
                        [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"),
                         *wl.routing_headers(), ("Authorization", f"Bearer {stack.jwt}")]]
        result = json.dumps(tools_list(many_tools), separators=(",", ":")).encode()
        self.answer = b'{"jsonrpc":"2.0","id":1,"result":' + result + b"}"
        self.times: dict[tuple[str, str], list[float]] = {}
        self.totals: list[float] = []          # every hook of one exchange
        self.unrecorded: list[float] = []      # the same without the recorder's hooks (its I/O varies most)

    def options(self) -> dict:
        sets = self.stack.bastion_sets
        opts = dict(v.split("=", 1) for k, v in zip(sets[::2], sets[1::2]) if k == "--set")
        return {**opts, "bastion_instance": "list-bench"}

    async def one(self, timed: bool = True) -> bytes:
        f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/bench", content=self.body,
                                        headers=tuple(self.headers)), resp=False)
        total = recording = 0.0
        for hook in HOOKS:
            if hook == "responseheaders":
                if f.response is not None:
                    raise RuntimeError(f"the chain refused the request: {f.response.content[:300]!r}")
                f.response = tutils.tresp(content=self.answer, headers=((b"content-type", b"application/json"),))
                if timed:
                    rec = get_record(f.metadata)
                    rec.response_transforms = [TimedTransform(t, self.times) for t in rec.response_transforms]
            for a in self.chain:
                fn = getattr(a, hook, None)
                if fn is None:
                    continue
                t = time.perf_counter()
                out = fn(f)
                if inspect.isawaitable(out):
                    await out
                dt = time.perf_counter() - t
                total += dt
                recording += dt if a.name == "recorder" else 0.0
                if timed:
                    self.times.setdefault((a.name, hook), []).append(dt)
        if timed:
            self.totals.append(total)
            self.unrecorded.append(total - recording)
        return f.response.content


def check(body: bytes) -> int:
    """The answer is the filtered list: what the policy lets the caller see, nothing else."""
    msg = json.loads(body)
    names = [t["name"] for t in msg["result"]["tools"]]
    allowed = {"get_customer", "query_sql", "stream_report"} | {n for n in names if n.startswith("tool_00")}
    if set(names) != allowed or len(names) != 13:
        raise RuntimeError(f"unexpected tools/list answer: {names}")
    return len(names)


async def lifecycle(chain: list, hook: str) -> None:
    """mitmproxy's `running` / `done` for every stage (the recorder starts and stops its writer)."""
    for a in chain:
        fn = getattr(a, hook, None)
        if fn is not None:
            out = fn()
            if inspect.isawaitable(out):
                await out


async def run(args, work: Path) -> None:
    ex = ListExchange(work, args.many_tools, args.pins)
    with taddons.context(*ex.chain) as tctx:
        # options are global: configuring them through one addon reaches every stage
        tctx.configure(ex.chain[0], **{k: v for k, v in ex.options().items() if k in tctx.options})
        await lifecycle(ex.chain, "running")
        kept = check(await ex.one(timed=False))    # warm-up (first-use caches, imports)
        for _ in range(5):
            await ex.one(timed=False)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.reps):
                await ex.one(timed=False)
            prof.disable()
            for order in ("cumulative", "tottime"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(order).print_stats(20)
                print(s.getvalue())
        else:
            for _ in range(args.reps):
                await ex.one()
            check(await ex.one(timed=False))
            print(f"tools/list, {args.many_tools + 6} tools upstream, {kept} shown; MCP {PROTOCOL}; "
                  f"median of {args.reps} repetitions (µs)")
            rows = sorted(ex.times.items(), key=lambda kv: -statistics.median(kv[1]))
            for (name, hook), ts in rows:
                med = statistics.median(ts) * 1e6
                if med >= 1:
                    print(f"  {(name + '.' + hook).lstrip('.'):44s} {med:9.1f}")
            print("  (transforms run inside responses.response)")
            print(f"  {'total (every hook)':44s} {statistics.median(ex.totals) * 1e6:9.1f}")
            print(f"  {'total without the recorder':44s} {statistics.median(ex.unrecorded) * 1e6:9.1f}")
        await lifecycle(ex.chain, "done")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=200, help="repetitions (>= 50)")
    p.add_argument("--many-tools", type=int, default=200, help="trivial tools on top of the demo's 6")
    p.add_argument("--pins", action="store_true", help="pin every upstream tool (integrity checks each shown one)")
    p.add_argument("--profile", action="store_true", help="cProfile top 20 instead of the per-hook table")
    args = p.parse_args()
    if args.reps < 50:
        p.error("--reps must be at least 50")
    with tempfile.TemporaryDirectory(prefix="list-bench-") as work:
        asyncio.run(run(args, Path(work)))


if __name__ == "__main__":
    main()
