"""Micro benchmark: known-secret redaction and the audit chain, per unit of work.

    .venv/bin/python bench/secrets_bench.py [--kb 256] [--events 20000]

1. one-pass multi-pattern search: the ahocorasick-rs DFA vs a compiled regex alternation
   of the same variant strings (the secrets of a typical gateway: 3 credentials, issuer key,
   masking key, audit key, a caller token), MB/s over text without secrets.
2. per-message cost of the response transform (JSON pre-check of a tools/call result) and
   of the recorder's line check (encode_redacted), no secret present.
3. per-event cost of sealing a journal line (keyed sha256 chain), and of encode_event alone.
Prints numbers only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402

from addons.core.audit.chain import Chain, chain_key  # noqa: E402
from addons.hooks.recorder import encode_redacted  # noqa: E402
from addons.hooks.redaction import MessageRedactor  # noqa: E402
from addons.core.record import BastionRecord  # noqa: E402
from addons.core.masking.secretscan import (  # noqa: E402
    MIN_FRAGMENT, Secret, SecretIndex, TokenIndexCache, pem_secrets, variants,
)
from addons.core.audit.store import encode_event  # noqa: E402


def gateway_secrets() -> list[Secret]:
    out = [Secret(f"credential {i}", "svc-" + secrets.token_urlsafe(32)) for i in range(3)]
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out += pem_secrets("issuer key", ec_pem) + pem_secrets("audit key", ed_pem)
    out.append(Secret("masking key", secrets.token_hex(32)))
    return out


def words(sec: list[Secret]) -> set[str]:
    w: set[str] = set()
    for s in sec:
        exact, frag = variants(s)
        w |= exact
        for f in frag:
            w.update(f[j:j + MIN_FRAGMENT] for j in range(max(1, len(f) - MIN_FRAGMENT + 1)))
    return w


def per_op(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", type=int, default=256, help="text size for the search comparison")
    ap.add_argument("--events", type=int, default=20000)
    a = ap.parse_args()
    sec = gateway_secrets()
    t = time.perf_counter()
    idx = SecretIndex(sec)
    build_ms = (time.perf_counter() - t) * 1000
    pats = sorted(words(sec))
    text = json.dumps([{"type": "text", "text": secrets.token_urlsafe(90) + " customer 42 balance 12.50"}
                       for _ in range(a.kb * 1024 // 160)])[: a.kb * 1024]
    t = time.perf_counter()
    rx = re.compile("|".join(map(re.escape, pats)))
    rx_build_ms = (time.perf_counter() - t) * 1000
    reps = 5
    data = text.encode()
    t = time.perf_counter()
    for _ in range(reps):
        idx.spans(data)
    ac_s = (time.perf_counter() - t) / reps
    small = text[: 32 * 1024]
    t = time.perf_counter()
    rx.search(small)
    rx_s = (time.perf_counter() - t) * len(text) / len(small)
    print(f"patterns: {len(pats)} variant strings for {len(idx.labels)} secret values")
    print(f"build: automaton {build_ms:.1f} ms, regex alternation {rx_build_ms:.1f} ms")
    print(f"search {a.kb} KiB: automaton {ac_s * 1000:.2f} ms ({len(text) / ac_s / 1e6:.1f} MB/s), "
          f"regex {rx_s * 1000:.1f} ms ({len(text) / rx_s / 1e6:.2f} MB/s, extrapolated from 32 KiB)"
          f" -> {rx_s / ac_s:.0f}x")
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + secrets.token_urlsafe(64)
    cache = TokenIndexCache()
    print(f"caller token index: first build {per_op(lambda: TokenIndexCache().get(token), 200):.0f} us, "
          f"cached {per_op(lambda: cache.get(token), 20000):.2f} us")

    rec = BastionRecord(connection="demo")
    rec.known_secrets = [idx, cache.get(token)]
    msg = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "customer 42: " * 40}],
                                                  "structuredContent": {"rows": [{"id": i, "name": f"n{i}"}
                                                                                 for i in range(20)]}}}
    tr = MessageRedactor(rec)
    size = len(json.dumps(msg))
    print(f"response transform ({size} B tools/call result, no secret): {per_op(lambda: tr(msg), 5000):.1f} us")
    ev = {"ts": time.time(), "instance": "bench", "seq": 1, "kind": "response", "direction": "s2c",
          "session_id": "s", "connection": "demo", "rpc_id": "7", "method": "tools/call", "tool": "t",
          "sub": "alice", "roles": ["dev"], "result": msg["result"]}
    line = encode_event(ev)
    print(f"recorder line ({len(line)} B): encode_event {per_op(lambda: encode_event(ev), a.events):.1f} us, "
          f"+ known-secret check {per_op(lambda: encode_redacted(ev, rec.known_secrets), a.events):.1f} us")
    chain = Chain(chain_key(ed25519.Ed25519PrivateKey.generate()))
    print(f"chain seal per journal line ({len(line)} B): {per_op(lambda: chain.seal(line), a.events):.2f} us")
    short = encode_event({"ts": 1.0, "instance": "bench", "seq": 1, "kind": "decision", "action": "allow"})
    print(f"chain seal per journal line ({len(short)} B): {per_op(lambda: chain.seal(short), a.events):.2f} us")


if __name__ == "__main__":
    main()
