"""Micro benchmark: response masking in-process, per message.

    .venv/bin/python bench/masking_bench.py [--reps 30] [--big-kib 256] [--profile]

Builds the bench's two masked `tools/call` answers exactly as bench/upstream.py serves them
(`query_sql`: ~256 KiB of customer rows as JSON text in content[0].text AND as
structuredContent; `get_customer`: ~0.7 KiB), parses each the way the responses addon does
(mcpwire.strict_loads), loads the shipped rules/masking.yaml with the engine's loader and
lets the masking addon plan the request of the bench caller (role analyst, connection bench,
decision of bench/policy.yaml's rule). What is timed is the call the response pipeline
makes per message, MaskTransform(msg); `plan` (the request hook's profile selection) is
timed separately. Medians of --reps repetitions after a warm-up; --profile adds a cProfile
top 15 of the large message. Prints numbers only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addons.core.masking.engine import load_masking  # noqa: E402
from addons.core.mcpwire import parse_body, strict_loads  # noqa: E402
from addons.core.record import BastionRecord, Decision, Identity  # noqa: E402
from addons.hooks.masking import Masking, MaskTransform  # noqa: E402
from bench.loadgen import WORKLOADS  # noqa: E402
from bench.targets import ROLES, SUB  # noqa: E402
from bench.upstream import _response, big_result, customer_result  # noqa: E402

BENCH_CONNECTION = "bench"                       # bench/targets.py: connections.yaml
DECISIONS = {"masked": "bench-sql-read", "small": "bench-tools"}   # bench/policy.yaml


def response_bytes(workload: str, big_kib: int) -> bytes:
    result = big_result(big_kib * 1024) if workload == "masked" else customer_result()
    return _response(b"1", json.dumps(result, separators=(",", ":")).encode())


def request_record(workload: str) -> BastionRecord:
    """The record the earlier stages leave for the bench caller's request (id 1)."""
    head, tail = WORKLOADS[workload].body_parts()
    parsed = parse_body(head + b"1" + tail)
    rec = BastionRecord(connection=BENCH_CONNECTION, identity=Identity(sub=SUB, roles=tuple(ROLES)))
    rec.messages = parsed.messages
    rec.decisions = [Decision("allow", DECISIONS[workload], message_id=1)]
    return rec


def planner(key: bytes) -> Masking:
    m = Masking()
    m.key = key
    m.config = load_masking(ROOT / "rules", key)
    return m


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run(workload: str, big_kib: int, reps: int, masking: Masking) -> tuple[dict, MaskTransform, dict]:
    raw = response_bytes(workload, big_kib)
    plan_t: list[float] = []
    mask_t: list[float] = []
    for i in range(reps + 3):                     # 3 warm-up rounds (regex, caches)
        rec = request_record(workload)
        t0 = time.perf_counter()
        transform = masking.plan(rec)             # the request hook
        t_plan = time.perf_counter() - t0
        assert transform is not None
        msg = strict_loads(raw)                   # a fresh parse, as every response gets
        t1 = time.perf_counter()
        out = transform(msg)                      # the response pipeline, per message
        t2 = time.perf_counter()
        if i >= 3:
            plan_t.append(t_plan)
            mask_t.append(t2 - t1)
    left = clear_values(strict_loads(raw), out)
    if left:
        raise SystemExit(f"{workload}: {len(left)} sensitive values left in clear, e.g. {sorted(left)[0]!r}")
    info = {"bytes": len(raw), "profiles": [p.name for p in transform.default],
            "plan_ms": median_ms(plan_t), "mask_ms": median_ms(mask_t),
            "mask_min_ms": min(mask_t) * 1000, "events": len(rec.masks),
            "masked": sum(e.count for e in rec.masks)}
    return info, transform, msg


def clear_values(msg: dict, out: dict) -> set[str]:
    """The answer's SSNs, e-mails and card numbers still readable in the masked output."""
    sc = msg["result"]["structuredContent"]
    rows = sc["rows"] if "rows" in sc else [sc]
    secrets = {r[k] for r in rows for k in ("ssn", "email", "card_number")}
    dumped = json.dumps(out, ensure_ascii=False)
    return {s for s in secrets if s in dumped}


def profile_top(transform: MaskTransform, msg: dict, n: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        transform(msg)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(n)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per workload (>= 20 advised)")
    ap.add_argument("--big-kib", type=int, default=256, help="size of the masked result (bench default 256)")
    ap.add_argument("--profile", action="store_true", help="cProfile top 15 of the large message")
    a = ap.parse_args(argv)
    masking = planner(b"bench-mask-key-0123456789abcdef")
    for workload in ("masked", "small"):
        info, transform, msg = run(workload, a.big_kib, a.reps, masking)
        print(f"{workload:7s} {info['bytes'] / 1024:7.1f} KiB  profiles={'+'.join(info['profiles'])}  "
              f"mask median {info['mask_ms']:.3f} ms (min {info['mask_min_ms']:.3f})  "
              f"plan median {info['plan_ms'] * 1000:.1f} us  "
              f"{info['masked']} values masked in {info['events']} event paths  (n={a.reps})")
        if a.profile and workload == "masked":
            print(profile_top(transform, msg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
