"""Recorder benchmark: what the audit writer sustains, and what recording adds per call.

    .venv/bin/python bench/recorder_bench.py [--events 200000] [--calls 5000] [--concurrency 64] [--gateway]

1. writer, fire-and-forget: events/s appended + fsynced in batches (no one waits).
2. writer, group commit: N concurrent waiters, each waits for its own fsync (what hooks do).
3. recorder hooks: a realistic tools/call (request + decision + masked JSON response)
   through the Recorder's request and response hooks on one asyncio loop at the given
   concurrency; per-call latency with recording vs the same loop without the recorder.
4. --gateway: real mitmdump + upstream (tests/e2e harness), the same chain with and
   without the recorder, interleaved in one run: calls/s and added latency per call.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.core.audit.store import StoreWriter, encode_event  # noqa: E402


def sample_event(i: int) -> dict:
    return {"ts": time.time(), "instance": "bench", "seq": i, "kind": "response", "direction": "s2c", "via": "json",
            "session_id": "bench-session", "connection": "demo", "rpc_id": str(i), "method": "tools/call",
            "tool": "lookup_customer", "sub": "alice", "roles": ["support"], "client_id": "bench",
            "result": {"content": [{"type": "text", "text": "customer 42: [email], balance 1200.50 " * 4}]},
            "latency_ms": 3.2}


def bench_writer(root: Path, n: int) -> dict:
    lines = [encode_event(sample_event(i)) for i in range(n)]
    size = sum(map(len, lines)) / n
    w = StoreWriter(root, "bench-ff").start()
    t = time.perf_counter()
    for line in lines:
        w.submit([line])
    w.submit([], wait=True).result(60)
    dt = time.perf_counter() - t
    fsyncs = w.stats.fsyncs
    t2 = time.perf_counter()
    w.close()
    roll = time.perf_counter() - t2
    return {"events": n, "avg_event_bytes": round(size), "seconds": round(dt, 3),
            "events_per_s": round(n / dt), "fsyncs": fsyncs, "final_roll_to_parquet_s": round(roll, 3)}


def bench_group_commit(root: Path, n: int, concurrency: int) -> dict:
    line = encode_event(sample_event(0))
    w = StoreWriter(root, "bench-gc").start()
    lat: list[float] = []

    async def worker(k: int) -> None:
        for _ in range(k):
            t = time.perf_counter()
            await asyncio.wrap_future(w.submit([line, line, line], wait=True))   # ~3 events per hook
            lat.append(time.perf_counter() - t)

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - t
    dt = asyncio.run(main())
    fsyncs = w.stats.fsyncs
    w.close()
    commits = len(lat)
    return {"commits": commits, "concurrency": concurrency, "events_per_s": round(3 * commits / dt),
            "commits_per_s": round(commits / dt), "fsyncs": fsyncs,
            "commit_p50_ms": round(statistics.median(lat) * 1000, 3),
            "commit_p99_ms": round(sorted(lat)[int(len(lat) * 0.99)] * 1000, 3)}


async def bench_hooks(root: Path, calls: int, concurrency: int, record: bool, sync: str = "write") -> dict:
    from mitmproxy.test import taddons, tflow, tutils
    from addons.core import mcpwire
    from addons.core.record import Decision, Identity, MaskEvent, get_record
    from addons.hooks.recorder import Recorder

    r = Recorder()
    lat: list[float] = []
    with taddons.context(r) as tctx:
        tctx.configure(r, bastion_recordings=str(root), bastion_instance=f"bench-hooks-{int(record)}",
                       bastion_audit_sync=sync)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": "lookup_customer", "arguments": {"customer_id": 42}}}).encode()
        result = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "[email] " * 20}]}}
        rbody = json.dumps(result).encode()

        async def one() -> None:
            req = tutils.treq(method=b"POST", path=b"/mcp/demo", content=body,
                              headers=((b"content-type", b"application/json"), (b"authorization", b"Bearer x"),
                                       (b"mcp-session-id", b"s1")))
            f = tflow.tflow(req=req)
            rec = get_record(f.metadata)
            rec.connection = "demo"
            rec.identity = Identity("alice", ("support",), "bench")
            rec.messages = mcpwire.parse_body(body).messages
            rec.decisions.append(Decision("allow", rule="r", mask_profile="pii", message_id=1))
            t = time.perf_counter()
            if record:
                await r.request(f)
            await asyncio.sleep(0)               # the upstream round trip would be here
            f.response = tutils.tresp(content=rbody, headers=((b"content-type", b"application/json"),))
            rec.response_messages.append(result)
            rec.masks.append(MaskEvent("$..text", "email", 20))
            if record:
                r.responseheaders(f)
                await r.response(f)
            lat.append(time.perf_counter() - t)

        async def worker(k: int) -> None:
            for _ in range(k):
                await one()
        t = time.perf_counter()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        dt = time.perf_counter() - t
        r.done()
    lat.sort()
    return {"recording": record, "sync": sync, "calls": len(lat), "calls_per_s": round(len(lat) / dt),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 3)}


async def _load(url: str, calls: int, concurrency: int) -> dict:
    import httpx
    from tests.e2e.test_recording_e2e import HEADERS, response_of, tool_call
    lat: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker(ids: list[int]) -> None:
            for i in ids:
                t = time.perf_counter()
                r = await client.post(url, json=tool_call(i), headers=HEADERS)
                assert r.status_code == 200 and response_of(r, i), r.text[:200]
                lat.append(time.perf_counter() - t)
        ids = list(range(1, calls + 1))
        t = time.perf_counter()
        await asyncio.gather(*(worker(ids[k::concurrency]) for k in range(concurrency)))
        dt = time.perf_counter() - t
    lat.sort()
    return {"calls": len(lat), "calls_per_s": round(len(lat) / dt), "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2)}


def bench_gateway(base: Path, calls: int, concurrency: int, rounds: int = 2) -> tuple[dict, dict]:
    """Real mitmdump + upstream, same chain with and without the recorder, same run.
    Half the upstream answers are SSE (2 events), half JSON."""
    import subprocess
    from tests.e2e.test_recording_e2e import UPSTREAM_APP, UPSTREAM_TOKEN, Gateway, free_port, stop, wait_port
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (base / "upstream.py").write_text(UPSTREAM_APP)
    up = subprocess.Popen([sys.executable, str(base / "upstream.py"), str(port)],
                          env={**os.environ, "UPSTREAM_TOKEN": UPSTREAM_TOKEN}, start_new_session=True)
    gws = []
    try:
        wait_port(port, up)
        (base / "on").mkdir()
        (base / "off").mkdir()
        on = Gateway(base / "on", port).start("bench-on")
        off = Gateway(base / "off", port).start("bench-off", env={"E2E_NO_RECORDER": "1"})
        gws = [on, off]
        on.open_session()                             # the gateway only accepts sessions it saw opened
        off.open_session()
        asyncio.run(_load(on.url, 200, 8))            # warm up both
        asyncio.run(_load(off.url, 200, 8))
        res_off, res_on = [], []
        for _ in range(rounds):                       # interleave to share machine noise
            res_off.append(asyncio.run(_load(off.url, calls // 2, concurrency)))
            res_on.append(asyncio.run(_load(on.url, calls // 2, concurrency)))
        pick = lambda rs: min(rs, key=lambda r: r["p50_ms"])  # noqa: E731
        return pick(res_off), pick(res_on)
    finally:
        for g in gws:
            g.stop()
        stop(up)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--calls", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--gateway", action="store_true", help="also measure through real mitmdump processes")
    ap.add_argument("--gateway-calls", type=int, default=4000)
    ap.add_argument("--gateway-concurrency", default="1,16", help="comma-separated client concurrencies")
    ap.add_argument("--dir", default=None, help="store directory (default: a temp dir on the same disk as the repo)")
    a = ap.parse_args()
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="recbench-", dir=Path(__file__).resolve().parent))
    try:
        print("writer fire-and-forget:", json.dumps(bench_writer(base / "ff", a.events)))
        print("writer group commit:   ", json.dumps(bench_group_commit(base / "gc", a.calls * 4, a.concurrency)))
        for c in sorted({1, a.concurrency}):
            calls = a.calls if c > 1 else max(500, a.calls // 4)
            off = asyncio.run(bench_hooks(base / f"h0-{c}", calls, c, record=False))
            print(f"hooks c={c}, recording off:  ", json.dumps(off))
            for sync in ("fsync", "write"):          # bastion_audit_sync: what the response waits for
                on = asyncio.run(bench_hooks(base / f"h1-{c}-{sync}", calls, c, record=True, sync=sync))
                print(f"hooks c={c}, recording on ({sync}): ", json.dumps(on))
                print(f"hooks c={c}, {sync}: added per call (p50): {on['p50_ms'] - off['p50_ms']:.3f} ms")
        for c in (int(x) for x in a.gateway_concurrency.split(",")) if a.gateway else ():
            calls = a.gateway_calls if c > 1 else max(200, a.gateway_calls // 8)
            off, on = bench_gateway(base / f"gw{c}", calls, c)
            print(f"gateway c={c}, recorder off: ", json.dumps(off))
            print(f"gateway c={c}, recorder on:  ", json.dumps(on))
            print(f"gateway c={c}: added per call p50 {on['p50_ms'] - off['p50_ms']:.2f} ms, "
                  f"throughput {on['calls_per_s']} vs {off['calls_per_s']} calls/s")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
