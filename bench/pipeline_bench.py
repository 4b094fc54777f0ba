"""One exchange through the real pipeline, in one process: time per stage hook.

    .venv/bin/python bench/pipeline_bench.py [--workload small|masked|list|sse] [--reps 300] [--pins] [--profile]

The stages are the ones addons/bastion.py builds, run by the same Pipeline mitmproxy loads,
configured as the bench's `full` target is (bench/targets.py: the shipped rules with
bench/policy.yaml, a `bench` connection, a minted caller JWT, a recorder writing to a temp
store). Each repetition drives one request of the workload and the upstream's answer
(bench/upstream.py) through requestheaders, request, responseheaders and response, on one
asyncio loop (for `sse`, the 101 events go through the stream callable the stages install,
timed as `stream.chunks`); nothing is sent anywhere. Prints the median time per stage hook (and per
response transform, which run inside responses.response) and per whole exchange; with
--profile, cProfile's top entries over the same repetitions instead. --pins pins every
upstream tool first (rules/pins/bench.yaml: tool integrity then checks each tool it shows
or calls against its pin). What mitmproxy itself
adds (HTTP parsing, the other addons' dispatch, sockets) is what the multi-process bench
measures on top.
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
from addons.hooks.failclosed import guard  # noqa: E402
from addons.hooks.pipeline import Pipeline  # noqa: E402
from bench.__main__ import EMAIL, SSN  # noqa: E402
from bench.loadgen import WORKLOADS  # noqa: E402
from bench.targets import Stack  # noqa: E402
from bench.upstream import Upstream, big_result, customer_result, tools_list  # noqa: E402

HOOKS = ("requestheaders", "request", "responseheaders", "response")


def upstream_answer(workload: str, stack: Stack) -> bytes | list[bytes]:
    if workload == "sse":
        return list(Upstream("x", 1024, 1, 100, 0).sse_events_bytes(b"1"))
    result = {"small": customer_result, "masked": lambda: big_result(stack.big_kib * 1024),
              "list": lambda: tools_list(stack.many_tools)}[workload]()
    return b'{"jsonrpc":"2.0","id":1,"result":' + json.dumps(result, separators=(",", ":")).encode() + b"}"


def check(workload: str, body: bytes) -> str:
    """The answer is what the full chain must give: masked, filtered, not an error."""
    if workload == "sse":
        if b'"report":"done"' not in body or b"grace.hopper1@example.com" in body:
            raise RuntimeError(f"unexpected stream: {body[-300:]!r}")
        return f"{body.count(b'event: message')} events out"
    msg = json.loads(body)
    if "result" not in msg:
        raise RuntimeError(f"the chain answered with an error: {body[:300]!r}")
    if workload == "list":
        names = [t["name"] for t in msg["result"]["tools"]]
        if len(names) != 13:
            raise RuntimeError(f"unexpected tools/list answer: {names}")
        return f"{len(names)} tools shown"
    ssn, mails = len(SSN.findall(body)), len(EMAIL.findall(body))
    if ssn or mails:
        raise RuntimeError(f"{ssn} SSNs and {mails} e-mail addresses left the chain in clear")
    return f"{len(body)} bytes out, {body.count(b'[MASKED') + body.count(b'[HASH:')} values masked"


class TimedTransform:
    """One response transform of the record, timed (`readonly` read through)."""

    def __init__(self, fn, table: dict) -> None:
        self.fn = fn
        owner = getattr(fn, "__self__", None) or fn
        self.cell = table.setdefault(("transform", getattr(owner, "__qualname__", type(owner).__qualname__)), [])

    @property
    def readonly(self) -> bool:
        return getattr(self.fn, "readonly", False)

    def __call__(self, msg):
        t = time.perf_counter()
        try:
            return self.fn(msg)
        finally:
            self.cell.append(time.perf_counter() - t)


class Exchange:
    """The pipeline in a mitmproxy test context, and one exchange of the workload through it."""

    def __init__(self, work: Path, workload: str, pins: bool = False) -> None:
        stack = Stack(work)
        stack.up_port = 9                         # never connected to: the hooks only name it
        stack.prepare_bastion()
        if pins:                                  # every upstream tool reviewed (mcp-bastion pin)
            write_pins(stack.bastion_rules, "bench", tools_list(stack.many_tools)["tools"])
        self.stack, self.workload = stack, workload
        self.pipeline = Pipeline(build_stages())
        self.body, self.headers = self.request(workload)
        self.answer = upstream_answer(workload, stack)
        self.times: dict[tuple[str, str], list[float]] = {}
        self.totals: list[float] = []
        # each stage hook timed separately, guarded as the Pipeline guards it
        self.calls = {hook: [(s.name, guard(s.name, hook, getattr(s, hook)), inspect.iscoroutinefunction(getattr(s, hook)))
                             for s in self.pipeline.stages if callable(getattr(s, hook, None))] for hook in HOOKS}

    def request(self, workload: str) -> tuple[bytes, tuple]:
        wl = WORKLOADS[workload]
        head, tail = wl.body_parts()
        return head + b"1" + tail, tuple((k.encode(), v.encode()) for k, v in [
            ("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"),
            *wl.routing_headers(), ("Authorization", f"Bearer {self.stack.jwt}")])

    async def prime(self) -> None:
        """One tools/list first, as a client does: the argument-schema stage learns the
        inputSchemas from it (else it would list the upstream's tools itself)."""
        saved = self.body, self.headers, self.answer
        self.body, self.headers = self.request("list")
        self.answer = upstream_answer("list", self.stack)
        try:
            check("list", await self.one(timed=False))
        finally:
            self.body, self.headers, self.answer = saved

    def options(self) -> dict:
        sets = self.stack.bastion_sets
        return {**dict(v.split("=", 1) for k, v in zip(sets[::2], sets[1::2]) if k == "--set"),
                "bastion_instance": f"pipeline-bench-{self.workload}"}

    async def one(self, timed: bool = True) -> bytes:
        f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/bench", content=self.body, headers=self.headers),
                        resp=False)
        t0 = time.perf_counter()
        for hook in HOOKS:
            if hook == "responseheaders":
                if f.response is not None:
                    raise RuntimeError(f"the chain refused the request: {f.response.content[:300]!r}")
                sse = isinstance(self.answer, list)
                f.response = tutils.tresp(content=b"" if sse else self.answer, headers=(
                    (b"content-type", b"text/event-stream" if sse else b"application/json"),))
                if timed:
                    rec = get_record(f.metadata)
                    rec.response_transforms = [TimedTransform(t, self.times) for t in rec.response_transforms]
            for name, fn, is_async in self.calls[hook]:
                t = time.perf_counter()
                if is_async:
                    await fn(f)
                else:
                    fn(f)
                if timed:
                    self.times.setdefault((name, hook), []).append(time.perf_counter() - t)
            if hook == "responseheaders" and callable(f.response.stream):
                t = time.perf_counter()
                out = b"".join(b"".join(f.response.stream(c)) for c in [*self.answer, b""])
                if timed:
                    self.times.setdefault(("stream", "chunks"), []).append(time.perf_counter() - t)
        if timed:
            self.totals.append(time.perf_counter() - t0)
        return out if isinstance(self.answer, list) else f.response.content


async def run(args, work: Path) -> None:
    ex = Exchange(work, args.workload, args.pins)
    with taddons.context(ex.pipeline) as tctx:
        tctx.configure(ex.pipeline, **{k: v for k, v in ex.options().items() if k in tctx.options})
        if hasattr(ex.pipeline, "running"):
            out = ex.pipeline.running()
            if inspect.isawaitable(out):
                await out
        await ex.prime()
        what = check(args.workload, await ex.one(timed=False))
        for _ in range(10):                        # warm-up: first-use caches, imports
            await ex.one(timed=False)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.reps):
                await ex.one(timed=False)
            prof.disable()
            for key in ("cumulative", "tottime"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(25)
                print(s.getvalue())
        else:
            for _ in range(args.reps):
                await ex.one()
            print(f"{args.workload}: {WORKLOADS[args.workload].tool or WORKLOADS[args.workload].method}, {what}; "
                  f"median of {args.reps} repetitions (µs)")
            for (name, hook), ts in sorted(ex.times.items(), key=lambda kv: -statistics.median(kv[1])):
                med = statistics.median(ts) * 1e6
                if med >= 1:
                    print(f"  {name + '.' + hook:48s} {med:9.1f}")
            print("  (transforms run inside responses.response)")
            print(f"  {'total (every hook)':48s} {statistics.median(ex.totals) * 1e6:9.1f}")
        if hasattr(ex.pipeline, "done"):
            out = ex.pipeline.done()
            if inspect.isawaitable(out):
                await out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("small", "masked", "list", "sse"), default="small")
    p.add_argument("--reps", type=int, default=300, help="repetitions (>= 50)")
    p.add_argument("--profile", action="store_true", help="cProfile instead of the per-hook table")
    p.add_argument("--pins", action="store_true", help="pin every upstream tool (integrity checks each one)")
    args = p.parse_args()
    if args.reps < 50:
        p.error("--reps must be at least 50")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
        asyncio.run(run(args, Path(work)))


if __name__ == "__main__":
    main()
