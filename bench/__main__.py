"""`./run.sh bench` = `python -m bench`: gateway benchmarks, interleaved, in one run.

    python -m bench [--quick] [--duration S] [--rounds N] [--concurrency 1,16,64]
                    [--workloads small,masked,sse,list] [--targets ...] [--upstream fast|demo]
    python -m bench --memory [--calls 200000]     RSS of the gateway over N recorded calls
    python -m bench --profile [--duration S]      cProfile of the full chain, top costs

See bench/README.md. Results: bench/RESULTS.md, bench/results.png, bench/results.json
(a --quick run writes to bench/out/ unless --out is given).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import loadgen, report, targets
from bench.loadgen import WORKLOADS, run_cell
from bench.stats import Agg

HERE = Path(__file__).resolve().parent
PROGRESS_CR, PROGRESS_END = ("\r", "") if sys.stderr.isatty() else ("", "\n")

# name -> (label, stages left out (BENCH_SKIP, bench/chain.py), extra mitmdump args)
BASTION_VARIANTS = {
    "full": ("mcp-bastion full chain", [], []),
    "rec-meta": ("full chain, recorder without bodies (bastion_record_bodies=false)", [],
                 ["--set", "bastion_record_bodies=false"]),
    "no-masking": ("full chain − masking", ["masking"], []),
    "no-recorder": ("full chain − recorder", ["recorder"], []),
    "core": ("full chain − masking − recorder", ["masking", "recorder"], []),
    # the shared state engine: a real redis-server (started by the bench) and a rate limit
    # on every bench rule, so each call pays one atomic bucket take (extra args at start)
    "full+redis": ("full chain, bastion_state=redis:// and a rate limit on every rule", [], []),
}
ALL_TARGETS = ["direct", "bare", "bare-stream", *BASTION_VARIANTS, "lean", "airlock"]
QUICK_TARGETS = ["direct", "bare", "bare-stream", "full", "lean", "core", "airlock"]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="./run.sh bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 1 s cells (< 3 min); writes bench/out/")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 5, quick 1)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds per cell before measuring (default 0.3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated (default 1,16,64)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    ap.add_argument("--targets", default=None,
                    help=f"subset of {','.join(ALL_TARGETS)} (default all; --quick: {','.join(QUICK_TARGETS)})")
    ap.add_argument("--upstream", choices=("fast", "demo"), default="fast",
                    help="fast: bench/upstream.py (near-zero cost, default); demo: demo.server --transport stateless")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw", help="load generator client")
    ap.add_argument("--sse-interval-ms", type=float, default=1.0, help="gap between the upstream's SSE events")
    ap.add_argument("--big-kib", type=int, default=256, help="size of the masked result")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny workload sizes, few requests")
    ap.add_argument("--out", type=Path, default=None, help="where to write RESULTS.md, results.png, results.json")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    ap.add_argument("--memory", action="store_true", help="RSS of the full chain over --calls recorded calls")
    ap.add_argument("--calls", type=int, default=200_000, help="--memory: calls in total (sampled every 10k)")
    ap.add_argument("--profile", action="store_true", help="cProfile the full chain and print the top costs")
    ap.add_argument("--work", type=Path, default=None, help="keep processes' logs and data here (default: temp dir)")
    a = ap.parse_args(argv)
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.workloads = [w for w in a.workloads.split(",") if w.strip()]
    if a.targets is None:
        a.targets = ",".join(QUICK_TARGETS if a.quick else ALL_TARGETS)
    a.targets = [t for t in a.targets.split(",") if t.strip()]
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    for t in a.targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t}")
    if a.duration is None:
        a.duration = 1.0 if (a.quick or a.tiny) else 5.0
    if a.rounds is None:
        a.rounds = 1 if (a.quick or a.tiny) else 3
    if a.warmup is None:
        a.warmup = 0.1 if a.tiny else 0.2 if a.quick else 0.3
    if a.tiny:
        a.big_kib, a.sse_interval_ms = 8, 0.0
    if a.upstream == "demo":
        import dataclasses
        for name, change in loadgen.DEMO_WORKLOADS.items():
            WORKLOADS[name] = dataclasses.replace(WORKLOADS[name], **change)
    if a.out is None:
        a.out = HERE / "out" if (a.quick or a.tiny) else HERE
    return a


# -- sanity checks: every target answers every workload correctly before timing ----------
SSN = re.compile(rb"\b\d{3}-\d{2}-\d{4}\b")
EMAIL = re.compile(rb"[a-z.]+\d*@(mail\.)?example\.(com|org)")


def verify(target: str, wl: str, status: int, body: bytes) -> tuple[bool, str]:
    if status != 200:
        return False, f"HTTP {status}: {body[:200]!r}"
    if wl == "sse":
        events = body.count(b"\ndata:") + body.startswith(b"data:") + body.count(b"event: message")
        if b"text" not in body and b"result" not in body:
            return False, "no result in stream"
        n = body.count(b"event: message") or body.count(b"data:")
        return True, f"{n} SSE events" if n else "answered as one JSON body (stream not passed through)"
    try:
        obj = json.loads(body)
    except ValueError:
        return False, "not JSON"
    if "result" not in obj:
        return False, f"no result: {body[:200]!r}"
    if wl == "list":
        return True, f"{len(obj['result'].get('tools', []))} of the upstream's tools listed"
    if wl == "masked":
        ssn, mails = len(SSN.findall(body)), len(EMAIL.findall(body))
        masked = body.count(b"[MASKED") + body.count(b"[HASH:")
        if masked:
            return True, f"{len(body) // 1024} KiB, {masked} values masked, {ssn} SSNs / {mails} e-mails in clear"
        return True, f"{len(body) // 1024} KiB, not masked ({ssn} SSNs, {mails} e-mails in clear)"
    return True, f"{len(body)} B"


async def check_all(stack: targets.Stack, workloads: list[str]) -> dict:
    checks = {}
    for name, t in list(stack.targets.items()):
        for wl in workloads:
            if not t.applies(wl):
                continue
            try:
                status, body = await loadgen.fetch_one(t.endpoint, WORKLOADS[wl])
                ok, note = verify(name, wl, status, body)
            except Exception as e:  # noqa: BLE001 - reported, target dropped for that workload
                ok, note = False, f"{type(e).__name__}: {e}"
            checks[f"{name}|{wl}"] = {"ok": ok, "note": note}
    return checks


# -- the run -------------------------------------------------------------------------------
def start_stack(a, work: Path, wanted: list[str], full_env: dict | None = None) -> tuple[targets.Stack, list[str]]:
    stack = targets.Stack(work, a.upstream, a.sse_interval_ms, a.big_kib, 20 if a.tiny else 200)
    stack.start_upstream()
    if "bare" in wanted or "bare-stream" in wanted:
        stack.add_bare()
        for n in ("bare", "bare-stream"):
            if n not in wanted and n in stack.targets:
                stack.targets[n].workloads = ()
    if any(t in BASTION_VARIANTS or t == "lean" for t in wanted):
        stack.prepare_bastion()
        if "lean" in wanted:
            stack.add_lean()
        for name, (label, skip, extra) in BASTION_VARIANTS.items():
            if name in wanted:
                if name == "full+redis":
                    extra = stack.start_shared_state()
                stack.add_bastion(name, label, skip, full_env if name == "full" else None, extra)
    if "airlock" in wanted:
        stack.add_airlock()
    if "direct" not in wanted:
        stack.targets["direct"].workloads = ()
    failed = stack.wait_all()
    return stack, failed


async def measure(a, stack: targets.Stack, checks: dict) -> dict:
    order = [t for t in ALL_TARGETS if t in stack.targets]
    aggs: dict[str, Agg] = {}
    cells = [(wl, c) for wl in a.workloads for c in a.concurrency]
    total = sum(1 for wl, c in cells for t in order
                if stack.targets[t].applies(wl) and checks.get(f"{t}|{wl}", {}).get("ok"))
    done = 0
    t0 = time.monotonic()
    for rnd in range(a.rounds):
        for wl, c in cells:
            # rotate the order every round and cell so no target always runs first or last
            k = (rnd + cells.index((wl, c))) % len(order)
            for t in order[k:] + order[:k]:
                if not stack.targets[t].applies(wl) or not checks.get(f"{t}|{wl}", {}).get("ok"):
                    continue
                duration = a.duration * (2 if wl == "sse" and not (a.quick or a.tiny) else 1)
                r = await run_cell(stack.targets[t].endpoint, WORKLOADS[wl], c, duration,
                                   warmup=a.warmup, client=a.client,
                                   max_requests=20 if a.tiny else None)
                aggs.setdefault(f"{t}|{wl}|{c}", Agg()).add(r)
                done += 1
                print(f"{PROGRESS_CR}  round {rnd + 1}/{a.rounds}  {done}/{total * a.rounds} cells  "
                      f"{t:12} {wl:6} c={c:<3} {r.in_window / r.wall if r.wall else 0:8.0f}/s  "
                      f"[{time.monotonic() - t0:5.0f} s]", end=PROGRESS_END, file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {k: v.summary() for k, v in aggs.items()}, order


async def client_check(stack: targets.Stack, duration: float) -> dict:
    """raw vs httpx against the direct path: how much client CPU one request costs."""
    out = {}
    ep = stack.targets["direct"].endpoint
    for client in ("raw", "httpx"):
        r = await run_cell(ep, WORKLOADS["small"], 16, duration, warmup=0.2, client=client)
        out[client] = {"rps": r.in_window / r.wall if r.wall else 0, "cpu_us": r.cpu / r.n * 1e6 if r.n else None,
                       "cpu_share": r.cpu / r.wall if r.wall else None}
    return out


def run_main(a) -> int:
    work = a.work or Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    started = time.monotonic()
    print(f"bench: work dir {work}", file=sys.stderr)
    stack, failed = start_stack(a, work, a.targets)
    try:
        for f in failed:
            print(f"bench: target {f}", file=sys.stderr)
        if failed:
            print("bench: fix the target(s) above or leave them out with --targets", file=sys.stderr)
        checks = asyncio.run(check_all(stack, a.workloads))
        for k, v in checks.items():
            if not v["ok"]:
                print(f"bench: {k} excluded: {v['note']}", file=sys.stderr)
        cells, order = asyncio.run(measure(a, stack, checks))
        clients = asyncio.run(client_check(stack, 0.5 if (a.quick or a.tiny) else 2.0)) if "direct" in stack.targets else {}
        info = stack.chain_info()
    finally:
        stack.stop()
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": targets.machine(), "versions": targets.versions(),
        "rounds": a.rounds, "duration": a.duration, "warmup": a.warmup, "concurrency": a.concurrency,
        "workloads": a.workloads, "workload_desc": {w: WORKLOADS[w].description for w in a.workloads},
        "upstream": a.upstream, "client": a.client, "sse_interval_ms": a.sse_interval_ms, "big_kib": a.big_kib,
        "target_order": order, "target_labels": {n: t.label for n, t in stack.targets.items()},
        "checks": checks, "cells": cells, "clients": clients, "chain": info, "failed": failed,
        "elapsed_s": round(time.monotonic() - started, 1), "quick": a.quick, "tiny": a.tiny,
    }
    print(report.console(results))
    print(f"\nclient check (small, c=16, direct): " + ", ".join(
        f"{k} {v['rps']:.0f} req/s, {v['cpu_us'] or 0:.0f} µs CPU/req" for k, v in clients.items()))
    print(report.targets_summary(results))
    print(f"\nbench: {results['elapsed_s']} s in total")
    if not a.no_write:
        a.out.mkdir(parents=True, exist_ok=True)
        targets.json_dump(results, a.out / "results.json")
        chart_ok = report.chart(results, a.out / "results.png")
        from bench.results_md import write_results_md
        write_results_md(a.out)
        print(f"bench: wrote {a.out / 'RESULTS.md'}" + (f", {a.out / 'results.png'}" if chart_ok else ""))
    return 0 if all(v["ok"] for v in checks.values()) and not failed else 1


# -- memory ----------------------------------------------------------------------------------
def run_memory(a) -> int:
    work = a.work or Path(tempfile.mkdtemp(prefix="bastion-bench-mem-"))
    stack, failed = start_stack(a, work, ["full"])
    samples = []
    try:
        if failed:
            print("\n".join(failed), file=sys.stderr)
            return 1
        t = stack.targets["full"]
        step = max(1, min(10_000, a.calls // 20))
        c = 16

        async def go():
            status, body = await loadgen.fetch_one(t.endpoint, WORKLOADS["small"])
            ok, note = verify("full", "small", status, body)
            if not ok:
                raise RuntimeError(f"full chain refuses the small workload: {note}")
            samples.append({"calls": 0, "rss_mib": targets.rss_kib(t.pid) / 1024, "t": 0.0})
            done, t0 = 0, time.monotonic()
            while done < a.calls:
                r = await run_cell(t.endpoint, WORKLOADS["small"], c, 3600, warmup=0, max_requests=step)
                done += r.n
                if r.errors:
                    print(f"\nbench: {r.errors} errors ({r.sample_error})", file=sys.stderr)
                if r.errors > r.n:
                    raise RuntimeError(f"the gateway is failing calls: {r.sample_error}")
                samples.append({"calls": done, "rss_mib": targets.rss_kib(t.pid) / 1024,
                                "t": round(time.monotonic() - t0, 1), "rps": r.n / r.wall if r.wall else 0})
                print(f"{PROGRESS_CR}  {done}/{a.calls} calls  RSS {samples[-1]['rss_mib']:.1f} MiB  "
                      f"{samples[-1]['rps']:.0f} req/s", end=PROGRESS_END, file=sys.stderr, flush=True)
            print(file=sys.stderr)
        asyncio.run(go())
        rec_dir = work / "recordings"
        rec_bytes = sum(f.stat().st_size for f in rec_dir.rglob("*") if f.is_file()) if rec_dir.exists() else 0
    finally:
        stack.stop()
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    per10k = growth / max(1, (last["calls"] - first["calls"])) * 10_000
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "calls": last["calls"],
           "samples": samples, "growth_mib_after_first_sample": growth, "growth_mib_per_10k": per10k,
           "rss_start_mib": samples[0]["rss_mib"], "rss_end_mib": last["rss_mib"],
           "recordings_mib": rec_bytes / 2**20, "chain": stack.chain_info()}
    print(f"RSS {res['rss_start_mib']:.1f} MiB idle -> {samples[1]['rss_mib'] if len(samples) > 1 else 0:.1f} MiB "
          f"after {samples[1]['calls'] if len(samples) > 1 else 0} calls -> {last['rss_mib']:.1f} MiB after "
          f"{last['calls']} calls: {growth:+.1f} MiB ({per10k:+.2f} MiB per 10k calls); "
          f"recordings {res['recordings_mib']:.1f} MiB")
    if not a.no_write:
        a.out.mkdir(parents=True, exist_ok=True)
        targets.json_dump(res, a.out / "memory.json")
        from bench.results_md import write_results_md
        write_results_md(a.out)
    return 0


# -- profile -----------------------------------------------------------------------------------
def run_profile(a) -> int:
    """Two passes over the full chain: per-addon hook wall time (no profiler), then cProfile."""
    import io
    import pstats
    work = a.work or Path(tempfile.mkdtemp(prefix="bastion-bench-prof-"))
    prof, hooks = work / "full.prof", work / "hooktimes.json"
    text = []
    for env in ({"BENCH_HOOKTIMES": str(hooks)}, {"BENCH_PROFILE": str(prof)}):
        stack, failed = start_stack(a, work, ["full"], full_env=env)
        calls: dict[str, int] = {}
        try:
            if failed:
                print("\n".join(failed), file=sys.stderr)
                return 1
            t = stack.targets["full"]

            async def go():
                for wl in a.workloads:
                    r = await run_cell(t.endpoint, WORKLOADS[wl], 16, a.duration, warmup=0.2)
                    calls[wl] = r.n
                    print(f"  {'cProfile' if 'BENCH_PROFILE' in env else 'hook timer'}: {wl}: {r.n} calls, "
                          f"{r.in_window / r.wall:.0f}/s", file=sys.stderr)
            asyncio.run(go())
        finally:
            stack.stop()   # SIGINT: mitmdump runs `done`, which writes the files
        if "BENCH_HOOKTIMES" in env and hooks.exists():
            table = json.loads(hooks.read_text())
            n = sum(calls.values())
            text.append(f"Time inside each addon's hooks, workloads {','.join(a.workloads)} at c=16, "
                        f"{n} calls in all (µs per call, averaged over every call of the mix):\n")
            text.append("(async hooks: wall time from call to return, awaits included = latency the hook adds "
                        "to the flow, not CPU; sync hooks: CPU on the event loop)\n")
            text.append(f"{'addon':14} {'hook':22} {'invocations':>11} {'µs/invocation':>14} {'µs/call':>9}")
            rows = [(ad, hk + (" (async)" if v[2:] and v[2] else ""), v[0], v[1])
                    for ad, hs in table.items() for hk, v in hs.items() if v[0]]
            for ad, hk, c, s_ in sorted(rows, key=lambda r: -r[3]):
                text.append(f"{ad:14} {hk:22} {c:11d} {s_ / max(c, 1) * 1e6:14.1f} {s_ / max(n, 1) * 1e6:9.1f}")
            sync_total = sum(r[3] for r in rows if "(async)" not in r[1])
            text.append(f"{'sync hooks, all addons':37} {'':11} {'':14} {sync_total / max(n, 1) * 1e6:9.1f}\n")
    if prof.exists():
        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.strip_dirs().sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(45)
        text.append(buf.getvalue())
    out = "\n".join(text)
    print(out)
    if not a.no_write:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "profile.txt").write_text(out)
        print(f"bench: wrote {a.out / 'profile.txt'} (raw: {prof})")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if a.memory:
        return run_memory(a)
    if a.profile:
        return run_profile(a)
    return run_main(a)


if __name__ == "__main__":
    sys.exit(main())
