"""CPU the gateway process spends per call, from /proc (user + system time), under load.

    .venv/bin/python bench/cpu_bench.py [--targets bare,lean,full] [--workload small] [--concurrency 16]
                                       [--duration 4] [--rounds 2]

Throughput ratios on a 2-core machine mix the gateway's cost with the load generator's and the
upstream's (all on the same cores); the process's own CPU time per call does not. Targets are
started by the same harness as `python -m bench` and measured in turn, round after round.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.__main__ import parse_args, run_cell, start_stack  # noqa: E402
from bench.loadgen import WORKLOADS  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


async def measure(stack, names: list[str], workload: str, concurrency: int, duration: float, rounds: int) -> dict:
    per_call: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = stack.targets[name]
            await run_cell(t.endpoint, WORKLOADS[workload], concurrency, 0.5, warmup=0.3)
            before = cpu_seconds(t.proc.pid)
            res = await run_cell(t.endpoint, WORKLOADS[workload], concurrency, duration, warmup=0.0)
            per_call[name].append((cpu_seconds(t.proc.pid) - before) / max(res.n, 1) * 1e6)
    return per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="bare,lean,full")
    p.add_argument("--workload", default="small", choices=sorted(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    names = args.targets.split(",")
    if "direct" in names:
        p.error("direct has no gateway process")
    a = parse_args(["--targets", args.targets, "--workloads", args.workload])
    stack, failed = start_stack(a, Path(tempfile.mkdtemp(prefix="bastion-cpu-")), names)
    try:
        if failed:
            sys.exit("\n".join(failed))
        per_call = asyncio.run(measure(stack, names, args.workload, args.concurrency, args.duration, args.rounds))
    finally:
        stack.stop()
    base = statistics.median(per_call[names[0]])
    print(f"gateway process CPU per call, {args.workload}, c={args.concurrency}, median of {args.rounds} "
          f"x {args.duration:g} s (µs; added = over {names[0]}):")
    for n in names:
        med = statistics.median(per_call[n])
        print(f"  {n:12s} {med:8.0f}   added {med - base:+8.0f}   runs: {', '.join(f'{v:.0f}' for v in per_call[n])}")


if __name__ == "__main__":
    main()
