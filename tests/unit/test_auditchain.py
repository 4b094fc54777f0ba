"""Tamper evidence (addons/core/audit/chain.py + store): chains, signed manifests, `verify`."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from addons import cli
from addons.core.audit.chain import (
    Chain, check_lines, load_or_create_signing_key, load_verify_key, manifest_path, public_pem, unseal,
    verify_store,
)
from addons.core.audit.store import Sealing, Store, StoreWriter, encode_event, enforce_retention


@pytest.fixture
def key(tmp_path) -> Path:
    p = tmp_path / "secrets" / "audit.pem"
    load_or_create_signing_key(p)
    return p


def write(root: Path, key: Path, n: int, instance: str = "gw-a", close: bool = True, start: int = 0) -> StoreWriter:
    w = StoreWriter(root, instance, sealing=Sealing(load_or_create_signing_key(key))).start()
    fut = w.submit([encode_event({"ts": time.time(), "seq": start + i, "kind": "request", "method": f"m{start + i}"})
                    for i in range(n)], wait=True)
    fut.result(10)
    if close:
        w.close()
    return w


def verify(root: Path, key: Path):
    pub, ck = load_verify_key(key)
    return verify_store(root, pub, ck)


def test_clean_store_verifies_and_chain_continues_across_restarts(tmp_path, key):
    root = tmp_path / "rec"
    write(root, key, 5)
    write(root, key, 3, start=5)               # second run of the same instance: chain continues
    write(root, key, 2, instance="gw-b")
    rep = verify(root, key)
    assert rep.problems == [] and rep.instances == 2 and rep.segments == 3 and rep.rows == 10
    assert cli.main(["verify", "--store", str(root), "--key", str(key)]) == 0
    # rows keep their chain value and the store still queries
    st = Store(root)
    assert st.query("SELECT count(*) FROM events WHERE chain IS NOT NULL").fetchone()[0] == 10


def test_live_journal_verifies(tmp_path, key):
    root = tmp_path / "rec"
    w = write(root, key, 4, close=False)
    try:
        assert verify(root, key).problems == []
    finally:
        w.close()


def _journal(root: Path) -> Path:
    return next(root.rglob("journal-*.jsonl"))


@pytest.mark.parametrize("tamper,line", [
    ("edit", 2), ("remove", 2), ("reorder", 2), ("append", 5), ("append_forged", 5), ("insert", 2),
])
def test_tampered_journal_names_the_line(tmp_path, key, tamper, line, capsys):
    root = tmp_path / "rec"
    w = write(root, key, 4, close=False)
    try:
        j = _journal(root)
        lines = j.read_bytes().splitlines(keepends=True)
        if tamper == "edit":
            lines[1] = lines[1].replace(b'"m1"', b'"mX"')
        elif tamper == "remove":
            del lines[1]
        elif tamper == "reorder":
            lines[1], lines[2] = lines[2], lines[1]
        elif tamper == "append":        # a line copied from elsewhere, with its own chain value
            lines.append(lines[0])
        elif tamper == "append_forged":  # chain recomputed with plain sha256 (no key): still caught
            fake = Chain(b"attacker-has-no-key", unseal(lines[-1])[1])
            lines.append(fake.seal(encode_event({"ts": time.time(), "seq": 99, "kind": "request"})))
        elif tamper == "insert":
            lines.insert(1, lines[3])
        j.write_bytes(b"".join(lines))
        rep = verify(root, key)
        assert len(rep.problems) == 1
        p = rep.problems[0]
        assert p.file == j and p.record == f"line {line}", p
        assert cli.main(["verify", "--store", str(root), "--key", str(key)]) == 1
        assert f"{j}: line {line}" in capsys.readouterr().out
    finally:
        w.close()


def test_tampered_journal_is_still_flagged_after_rolling(tmp_path, key):
    root = tmp_path / "rec"
    w = write(root, key, 4, close=False)
    j = _journal(root)
    j.write_bytes(j.read_bytes().replace(b'"m2"', b'"mX"'))
    w.close()                                   # rolled into a signed segment: the manifest says so
    rep = verify(root, key)
    assert len(rep.problems) == 1 and "journal line 3" in rep.problems[0].record


def test_replaced_segment(tmp_path, key):
    root = tmp_path / "rec"
    write(root, key, 3)
    write(root, key, 3, start=3)
    segs = sorted(root.rglob("seg-*.parquet"))
    segs[1].write_bytes(segs[0].read_bytes())    # a valid Parquet file, but not the one signed
    rep = verify(root, key)
    assert [(p.file, p.record) for p in rep.problems] == [(segs[1], "segment")]
    assert "sha256" in rep.problems[0].reason


def test_removed_middle_segment_and_copied_manifest(tmp_path, key):
    root = tmp_path / "rec"
    for i in range(3):
        write(root, key, 2, start=2 * i)
    segs = sorted(root.rglob("seg-*.parquet"))
    segs[1].unlink()
    rep = verify(root, key)
    assert rep.problems[0].file == segs[1] and "missing" in rep.problems[0].reason
    manifest_path(segs[1]).unlink()            # hide it better: the chain link still breaks
    rep = verify(root, key)
    assert rep.problems[0].file == segs[2] and rep.problems[0].record == "chain link"


def test_forged_manifest_signature(tmp_path, key):
    root = tmp_path / "rec"
    write(root, key, 3)
    seg = next(root.rglob("seg-*.parquet"))
    mf = manifest_path(seg)
    m = json.loads(mf.read_text())
    m["rows"] = 2
    mf.write_text(json.dumps(m))                # edited, old signature
    rep = verify(root, key)
    assert rep.problems[0].file == mf and "signature" in rep.problems[0].reason
    # re-signed with another key: also refused
    from addons.core.audit.chain import sign_manifest
    mf.write_text(json.dumps(sign_manifest(m, ed25519.Ed25519PrivateKey.generate())))
    assert "signature" in verify(root, key).problems[0].reason


def test_public_key_checks_segments_not_journals(tmp_path, key):
    root = tmp_path / "rec"
    write(root, key, 3)
    pub_file = tmp_path / "audit.pub"
    pub_file.write_bytes(public_pem(load_or_create_signing_key(key).public_key()))
    w = write(root, key, 2, close=False, start=3)
    try:
        pub, ck = load_verify_key(pub_file)
        assert ck is None
        rep = verify_store(root, pub, ck)
        assert rep.problems == [] and rep.segments == 1 and rep.unverified_journals == 1
    finally:
        w.close()


def test_retention_keeps_a_signed_manifest(tmp_path, key):
    root = tmp_path / "rec"
    write(root, key, 2)
    write(root, key, 2, start=2)
    d = root / "gw-a"
    old = sorted(d.glob("seg-*.parquet"))[0]
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    enforce_retention(d, days=5, mb=0, sealing=Sealing(load_or_create_signing_key(key)))
    assert not old.exists() and manifest_path(old).exists()
    rep = verify(root, key)
    assert rep.problems == [] and rep.retired == 1


def test_chain_tolerates_torn_last_line(tmp_path):
    c = Chain(b"k")
    lines = [c.seal(encode_event({"ts": 1, "i": i})) for i in range(3)]
    data = b"".join(lines) + b'{"ts":2,"kind":"req'
    assert check_lines(data.split(b"\n"), b"k", "0" * 64).broken_line is None


def test_files_are_private_whatever_the_umask(tmp_path, key):
    old = os.umask(0o000)
    try:
        root = tmp_path / "rec"
        write(root, key, 2)
        w = write(root, key, 1, close=False, start=2)
        try:
            for p in [root, *root.rglob("*")]:
                mode = stat.S_IMODE(p.stat().st_mode)
                assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
        finally:
            w.close()
        k2 = tmp_path / "fresh" / "k.pem"
        load_or_create_signing_key(k2)
        assert stat.S_IMODE(k2.stat().st_mode) == 0o600 and stat.S_IMODE(k2.parent.stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_anchor_file_gets_each_manifest_digest(tmp_path, key):
    import hashlib
    from addons.core.audit.chain import _payload
    anchor_file = tmp_path / "worm" / "anchor.jsonl"
    anchor_file.parent.mkdir()
    for i in range(2):
        w = StoreWriter(tmp_path / "rec", "gw-a",
                        sealing=Sealing(load_or_create_signing_key(key), str(anchor_file))).start()
        w.submit([encode_event({"ts": time.time(), "seq": i, "kind": "request"})], wait=True).result(10)
        w.close()
    lines = [json.loads(x) for x in anchor_file.read_text().splitlines()]
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "rec" / "gw-a").glob("*.manifest.json"))]
    assert [x["segment"] for x in lines] == [m["segment"] for m in manifests]
    assert [x["manifest_sha256"] for x in lines] == [hashlib.sha256(_payload(m)).hexdigest() for m in manifests]
    assert lines[-1]["last_hash"] == manifests[-1]["last_hash"]


def test_crash_between_manifest_and_segment_rename_recovers(tmp_path, key):
    from addons.core.audit.chain import last_chain_value
    from addons.core.audit.store import journal_to_segment
    root = tmp_path / "rec"
    write(root, key, 2)
    d = root / "gw-a"
    sealing = Sealing(load_or_create_signing_key(key))
    c = Chain(sealing.chain_key, last_chain_value(d))
    lines = b"".join(c.seal(encode_event({"ts": 1.0, "seq": 2 + i, "kind": "request"})) for i in range(3))
    j, seg = d / "journal-00000002.jsonl", d / "seg-00000002.parquet"
    j.write_bytes(lines)
    journal_to_segment(j, seg, sealing=sealing)
    seg.unlink()                    # crashed after writing the manifest, before the rename
    j.write_bytes(lines)
    journal_to_segment(j, seg, sealing=sealing)      # recovery rolls it again
    assert verify(root, key).problems == []


def test_anchor_catches_deleted_newest_segment_and_resealing(tmp_path, key, capsys):
    root, anchor_file = tmp_path / "rec", tmp_path / "anchor.jsonl"
    for i in range(3):
        w = StoreWriter(root, "gw-a", sealing=Sealing(load_or_create_signing_key(key), str(anchor_file))).start()
        w.submit([encode_event({"ts": time.time(), "seq": i, "kind": "request"})], wait=True).result(10)
        w.close()
    args = ["verify", "--store", str(root), "--key", str(key), "--anchor", str(anchor_file)]
    assert cli.main(args) == 0
    newest = sorted((root / "gw-a").glob("seg-*.parquet"))[-1]
    newest.unlink()
    manifest_path(newest).unlink()
    assert verify(root, key).problems == []          # without the anchor nothing disagrees
    capsys.readouterr()
    assert cli.main(args) == 1
    assert f"BROKEN {manifest_path(newest)}: manifest: missing, but anchored" in capsys.readouterr().out
