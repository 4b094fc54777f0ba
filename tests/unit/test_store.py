"""Audit store: journal durability, rolling, recovery, torn lines, corrupt segments,
unwritable directory (fail closed + recovery), DuckDB views over several instances."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from addons.core.audit import store
from addons.core.audit.store import (
    Store, StoreUnavailable, StoreWriter, encode_event, enforce_retention, journal_to_segment,
    list_files, recover_dir, recover_store,
)


def ev(seq: int, instance: str = "gw1", **kw) -> dict:
    base = {"ts": 1_700_000_000.0 + seq, "instance": instance, "seq": seq, "kind": "request",
            "session_id": f"s{seq % 3}", "method": "tools/call", "tool": "t", "sub": "alice",
            "roles": ["analyst"], "params": {"name": "t", "arguments": {"i": seq}}}
    base.update(kw)
    return base


@pytest.fixture
def writers():
    made: list[StoreWriter] = []

    def make(root, instance="gw1", **kw) -> StoreWriter:
        w = StoreWriter(Path(root), instance, **kw).start()
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def count(root, sql="SELECT count(*) FROM events") -> int:
    s = Store(root)
    try:
        return s.query(sql).fetchone()[0]
    finally:
        s.close()


def test_commit_future_resolves_after_fsync_and_events_are_queryable_live(tmp_path, writers, monkeypatch):
    synced = []
    real = store._datasync
    monkeypatch.setattr(store, "_datasync", lambda fd: (synced.append(fd), real(fd))[1])
    w = writers(tmp_path, ack="fsync")
    fut = w.submit([encode_event(ev(i)) for i in range(10)], wait=True)
    fut.result(timeout=5)
    assert synced, "the future must only resolve after an fsync"
    lines = w.journal.read_bytes().splitlines()
    assert len(lines) == 10 and json.loads(lines[3])["seq"] == 3
    # readable while the writer holds the journal open
    assert count(tmp_path) == 10


def test_group_commit_batches_many_waiters(tmp_path, writers):
    w = writers(tmp_path)
    futs = [w.submit([encode_event(ev(i))], wait=True) for i in range(2000)]
    for f in futs:
        f.result(timeout=10)
    assert w.stats.events == 2000
    assert w.stats.fsyncs < 2000          # batched, not one fsync per event


def test_journal_rolls_into_parquet_segments_and_close_rolls_the_rest(tmp_path, writers):
    w = writers(tmp_path, roll_events=100, max_batch=50)
    for i in range(350):
        w.submit([encode_event(ev(i))])
    w.submit([], wait=True).result(timeout=5)
    w.close()
    d = tmp_path / "gw1"
    assert not list(d.glob("journal-*.jsonl"))
    segs = sorted(d.glob("seg-*.parquet"))
    assert len(segs) >= 4
    assert count(tmp_path, "SELECT count(DISTINCT seq) FROM events") == 350
    assert count(tmp_path, "SELECT count(*) FROM events") == 350


def test_views_union_segments_and_live_journal_without_double_counting(tmp_path, writers):
    w = writers(tmp_path, roll_events=40, max_batch=40)
    for i in range(100):
        w.submit([encode_event(ev(i))], wait=True).result(timeout=5)
    time.sleep(0.3)  # let the roller finish
    files = list_files(tmp_path)
    assert files.segments and files.journals
    assert count(tmp_path) == 100


def test_journal_with_matching_segment_is_not_listed(tmp_path):
    d = tmp_path / "gw1"
    d.mkdir()
    (d / "journal-00000001.jsonl").write_bytes(encode_event(ev(1)))
    (d / "seg-00000001.parquet").write_bytes(b"")
    files = list_files(tmp_path)
    assert files.journals == []


def test_torn_last_line_is_skipped_with_warning_on_recovery(tmp_path, caplog):
    d = tmp_path / "gw1"
    d.mkdir()
    good = b"".join(encode_event(ev(i)) for i in range(5))
    (d / "journal-00000003.jsonl").write_bytes(good + encode_event(ev(5))[:25])
    with caplog.at_level(logging.WARNING):
        assert recover_dir(d) == 5
    assert "torn last line" in caplog.text
    assert not list(d.glob("journal-*"))
    assert (d / "seg-00000003.parquet").exists()
    assert count(tmp_path, "SELECT list(seq ORDER BY seq) FROM events") == [0, 1, 2, 3, 4]


def test_torn_line_in_live_journal_does_not_break_sql(tmp_path):
    d = tmp_path / "gw1"
    d.mkdir()
    (d / "journal-00000001.jsonl").write_bytes(
        encode_event(ev(1)) + encode_event(ev(2)) + b'{"ts": 17000, "instance": "gw1", "se')
    assert count(tmp_path) == 2
    assert count(tmp_path, "SELECT count(*) FROM messages") == 2


def test_empty_store_has_all_views(tmp_path):
    s = Store(tmp_path)
    for view in store.VIEW_NAMES:
        assert s.query(f"SELECT count(*) FROM {view}").fetchone()[0] == 0
    s.close()


def test_corrupt_segment_is_reported_by_name_and_others_still_query(tmp_path, writers):
    w = writers(tmp_path, instance="gw1")
    w.submit([encode_event(ev(i)) for i in range(10)], wait=True).result(timeout=5)
    w.close()
    w2 = writers(tmp_path, instance="gw2")
    w2.submit([encode_event(ev(i, "gw2")) for i in range(7)], wait=True).result(timeout=5)
    w2.close()
    bad = next((tmp_path / "gw1").glob("seg-*.parquet"))
    bad.write_bytes(b"PAR1 this is not parquet at all")
    s = Store(tmp_path)
    assert s.query("SELECT count(*) FROM events").fetchone()[0] == 7
    assert any(str(bad) in p for p in s.problems)
    s.close()


def test_corrupt_segment_body_found_at_query_time_is_excluded(tmp_path, writers):
    w = writers(tmp_path, instance="gw1")
    w.submit([encode_event(ev(i)) for i in range(50)], wait=True).result(timeout=5)
    w.close()
    w2 = writers(tmp_path, instance="gw2")
    w2.submit([encode_event(ev(i, "gw2")) for i in range(7)], wait=True).result(timeout=5)
    w2.close()
    bad = next((tmp_path / "gw1").glob("seg-*.parquet"))
    data = bytearray(bad.read_bytes())
    # keep the footer (metadata check passes), scramble the column data
    for i in range(4, len(data) // 2):
        data[i] = 0xAB
    bad.write_bytes(bytes(data))
    s = Store(tmp_path)
    got = s.query("SELECT count(*), sum(seq) FROM events").fetchone()
    assert got[0] == 7
    assert any(str(bad) in p for p in s.problems)
    s.close()


def test_several_instances_are_queried_together(tmp_path, writers):
    a = writers(tmp_path, instance="gw-a")
    b = writers(tmp_path, instance="gw-b")
    a.submit([encode_event(ev(i, "gw-a")) for i in range(3)], wait=True).result(timeout=5)
    b.submit([encode_event(ev(i, "gw-b")) for i in range(4)], wait=True).result(timeout=5)
    s = Store(tmp_path)
    rows = s.query("SELECT instance, count(*) FROM events GROUP BY ALL ORDER BY 1").fetchall()
    assert rows == [("gw-a", 3), ("gw-b", 4)]
    s.close()


def test_same_instance_cannot_be_opened_twice(tmp_path, writers):
    writers(tmp_path, instance="gw1")
    w2 = writers(tmp_path, instance="gw1")
    assert not w2.healthy and "locked" in w2.failure


def test_recover_store_recovers_dead_instances_only(tmp_path, writers):
    live = writers(tmp_path, instance="live")
    live.submit([encode_event(ev(1, "live"))], wait=True).result(timeout=5)
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "journal-00000001.jsonl").write_bytes(encode_event(ev(1, "dead")) + encode_event(ev(2, "dead")))
    assert recover_store(tmp_path) == 2
    assert (dead / "seg-00000001.parquet").exists()
    assert live.journal.exists()                 # the running instance's journal is untouched


def test_restart_with_same_instance_recovers_its_leftover_journal(tmp_path, writers):
    d = tmp_path / "gw1"
    d.mkdir()
    (d / "journal-00000004.jsonl").write_bytes(encode_event(ev(1)) + b'{"ts":1,')
    w = writers(tmp_path, instance="gw1")
    assert w.healthy
    assert (d / "seg-00000004.parquet").exists()
    assert w.journal.name == "journal-00000005.jsonl"


def test_crash_between_segment_rename_and_journal_unlink(tmp_path):
    d = tmp_path / "gw1"
    d.mkdir()
    j = d / "journal-00000001.jsonl"
    j.write_bytes(encode_event(ev(1)))
    journal_to_segment(j, d / "seg-00000001.parquet")
    j.write_bytes(encode_event(ev(1)))          # as if the unlink never happened
    recover_dir(d)
    assert not j.exists()
    assert count(tmp_path) == 1


def test_unwritable_store_fails_closed_then_recovers(tmp_path, writers):
    root = tmp_path / "store"
    root.write_text("a file where the directory should be")   # works even as root
    w = writers(root, probe_interval=0.05)
    assert not w.healthy and w.failure
    with pytest.raises(StoreUnavailable):
        w.submit([encode_event(ev(1))], wait=True).result(timeout=5)
    root.unlink()
    root.mkdir()
    deadline = time.time() + 5
    while not w.healthy and time.time() < deadline:
        time.sleep(0.02)
    assert w.healthy
    w.submit([encode_event(ev(2))], wait=True).result(timeout=5)
    assert count(root) == 1


def test_write_ack_releases_before_fdatasync_and_fsync_ack_waits(tmp_path, writers, monkeypatch):
    """ack="write": released once written (the page cache survives SIGKILL), while the group
    fdatasync is still running; ack="fsync": not before fdatasync returns."""
    import threading
    release = threading.Event()
    real = store._datasync

    def slow_sync(fd):
        release.wait(10)
        return real(fd)
    monkeypatch.setattr(store, "_datasync", slow_sync)
    fast = writers(tmp_path / "a", ack="write")
    t0 = time.monotonic()
    fast.submit([encode_event(ev(1))], wait=True).result(timeout=5)
    assert time.monotonic() - t0 < 5 and not release.is_set()
    assert b'"seq":1' in fast.journal.read_bytes().replace(b" ", b"")   # in the file already
    durable = writers(tmp_path / "b", ack="fsync")
    fut = durable.submit([encode_event(ev(2))], wait=True)
    time.sleep(0.3)
    assert not fut.done()                             # still waiting for fdatasync
    release.set()
    fut.result(timeout=5)


def test_write_ack_fails_closed_when_the_background_fsync_fails(tmp_path, writers, monkeypatch):
    w = writers(tmp_path, probe_interval=60, ack="write")
    w.submit([encode_event(ev(1))], wait=True).result(timeout=5)
    monkeypatch.setattr(store, "_datasync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    w.submit([encode_event(ev(2))], wait=True).result(timeout=5)      # written; its fsync fails after
    deadline = time.time() + 5
    while w.healthy and time.time() < deadline:
        time.sleep(0.02)
    assert not w.healthy
    with pytest.raises(StoreUnavailable):
        w.submit([encode_event(ev(3))], wait=True).result(timeout=5)


def test_disk_full_during_write_fails_waiters_and_recovers(tmp_path, writers, monkeypatch):
    w = writers(tmp_path, probe_interval=0.05, ack="fsync")
    w.submit([encode_event(ev(1))], wait=True).result(timeout=5)
    real = store._datasync
    state = {"full": True}

    def fsync(fd):
        if state["full"]:
            raise OSError(28, "No space left on device")
        return real(fd)
    monkeypatch.setattr(store, "_datasync", fsync)
    with pytest.raises(StoreUnavailable, match="No space"):
        w.submit([encode_event(ev(2))], wait=True).result(timeout=5)
    assert not w.healthy
    state["full"] = False
    deadline = time.time() + 5
    while not w.healthy and time.time() < deadline:
        time.sleep(0.02)
        w.submit([], wait=False)
    assert w.healthy
    w.submit([encode_event(ev(3))], wait=True).result(timeout=5)
    seqs = sorted(r[0] for r in Store(tmp_path).query("SELECT seq FROM events").fetchall())
    assert 1 in seqs and 3 in seqs


def test_retention_by_size_and_age(tmp_path):
    d = tmp_path / "gw1"
    d.mkdir()
    for n in range(1, 5):
        (d / f"seg-{n:08d}.parquet").write_bytes(b"x" * 600_000)
    old = d / "seg-00000001.parquet"
    os.utime(old, (time.time() - 10 * 86400, time.time() - 10 * 86400))
    removed = enforce_retention(d, days=7, mb=0)
    assert removed == [old]
    removed = enforce_retention(d, days=0, mb=1)
    assert [p.name for p in removed] == ["seg-00000002.parquet", "seg-00000003.parquet"]
    assert [p.name for p in sorted(d.iterdir())] == ["seg-00000004.parquet"]


def test_invalid_instance_name_rejected(tmp_path):
    with pytest.raises(ValueError):
        StoreWriter(tmp_path, "../escape")


def test_query_survives_a_journal_rolled_after_the_views_were_built(tmp_path):
    d = tmp_path / "gw1"
    d.mkdir()
    j = d / "journal-00000001.jsonl"
    j.write_bytes(b"".join(encode_event(ev(i)) for i in range(4)))
    s = Store(tmp_path)                       # views name the journal
    journal_to_segment(j, d / "seg-00000001.parquet")
    assert not j.exists()
    assert s.query("SELECT count(*) FROM events").fetchone()[0] == 4
    assert s.problems == []
    s.close()


def test_a_badly_damaged_journal_keeps_its_good_events_and_logs_a_summary(tmp_path, caplog):
    d = tmp_path / "gw1"
    d.mkdir()
    lines = [encode_event(ev(i)) if i % 2 == 0 else b"\x00garbage\n" for i in range(20_000)]
    (d / "journal-00000004.jsonl").write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING):
        assert recover_dir(d) == 10_000
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) < 10 and "skipped 10000 unparsable lines" in caplog.text   # not one per line
    assert count(tmp_path, "SELECT count(*) FROM events") == 10_000


async def test_commit_writes_on_the_callers_thread_and_waits_only_in_fsync_mode(tmp_path, writers, monkeypatch):
    """ack="write": commit() returns None with the line already in the journal file (no
    hand-off to a writer thread); ack="fsync": it returns a future that the background
    fdatasync releases; a store that cannot write raises at once."""
    import asyncio
    synced = []
    real = store._datasync
    monkeypatch.setattr(store, "_datasync", lambda fd: (synced.append(fd), real(fd))[1])
    w = writers(tmp_path / "a", ack="write")
    assert w.commit([encode_event(ev(1))]) is None
    assert b'"seq":1' in w.journal.read_bytes()
    d = writers(tmp_path / "b", ack="fsync")
    before = len(synced)
    fut = d.commit([encode_event(ev(2))])
    assert isinstance(fut, asyncio.Future)
    await asyncio.wait_for(fut, 5)
    assert len(synced) > before
    d.close()
    with pytest.raises(StoreUnavailable):
        d.commit([encode_event(ev(3))])


def test_rolled_over_journal_is_synced_before_it_becomes_a_segment(tmp_path, writers, monkeypatch):
    synced = []
    real = store._datasync
    monkeypatch.setattr(store, "_datasync", lambda fd: (synced.append(fd), real(fd))[1])
    w = writers(tmp_path, roll_events=10)
    for i in range(25):
        w.submit([encode_event(ev(i))])
    w.close()
    assert len(synced) >= 3                                  # each of the three journals
    assert not list((tmp_path / "gw1").glob("journal-*.jsonl"))
    assert count(tmp_path, "SELECT count(DISTINCT seq) FROM events") == 25


def test_a_commit_in_a_journal_retired_by_a_failure_is_not_released_when_its_fsync_fails(tmp_path, writers,
                                                                                         monkeypatch):
    """ack="fsync": a commit written to a journal that a later write failure retires still
    waits for that journal's fdatasync; when it fails, the commit fails (never released as
    durable)."""
    import concurrent.futures
    w = writers(tmp_path, ack="fsync", probe_interval=60)
    real, broken = store._datasync, w._fd

    def datasync(fd):      # only the journal the failure retires cannot be synced
        if fd == broken:
            raise OSError(5, "I/O error")
        return real(fd)
    monkeypatch.setattr(store, "_datasync", datasync)
    with w._lock:          # the syncer waits: the journal is retired before it looks
        fut: concurrent.futures.Future = concurrent.futures.Future()
        w._wait_for_sync(w._append([encode_event(ev(1))]), fut)
        w._set_failed("journal write failed: simulated")
    with pytest.raises(StoreUnavailable):
        fut.result(timeout=5)
