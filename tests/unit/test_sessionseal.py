"""addons/core/sessionseal.py: the sealed session id. It opens only for the identity and the
connection it was issued to, before its expiry, under a key in the keyring; every altered
byte, swap, replay to someone else or made-up id is refused."""
from __future__ import annotations

import base64
import os
import re
import stat
import time
from pathlib import Path

import pytest

from addons.core.sessionseal import (MAX_ENVELOPE, KeyringError, SealError, UnknownKey, load_keyring, owner_fingerprint,
                                parse_keyring, rotate)

NOW = 1_800_000_000.0
ALICE = owner_fingerprint("https://issuer", "alice")
UPSTREAM = "4f9c2b1e8d7a46b3a0c5e1f2d3b4a596"        # the SDK's uuid4().hex


@pytest.fixture
def ring(tmp_path):
    return load_keyring(tmp_path / "keys")


def seal(ring, upstream=UPSTREAM, owner=ALICE, conn="demo", expires=NOW + 3600):
    return ring.seal(upstream, owner, conn, int(expires))


def test_round_trip_recovers_the_upstream_id_and_shows_nothing_of_it(ring):
    env = seal(ring)
    opened = ring.open(env, ALICE, "demo", NOW)
    assert opened.upstream_id == UPSTREAM and opened.expires == int(NOW + 3600)
    assert UPSTREAM not in env and "demo" not in env and "alice" not in env
    # MCP: a session id is visible ASCII (0x21-0x7E); URL-safe base64 without padding also
    # passes the gateway's plain-query check on the legacy transport
    assert re.fullmatch(r"[A-Za-z0-9_-]+", env) and len(env) < 200
    assert seal(ring) != env                        # a fresh nonce every time


def test_envelope_length_stays_bounded(ring):
    env = seal(ring, upstream="x" * 256, conn="c" * 255)
    assert len(env) <= MAX_ENVELOPE
    assert ring.open(env, ALICE, "c" * 255, NOW).upstream_id == "x" * 256
    for bad in ("x" * 257, "", "has space", "tab\there", "é"):
        with pytest.raises(SealError):
            seal(ring, upstream=bad)


def test_every_bit_flip_is_refused(ring):
    env = seal(ring)
    raw = base64.urlsafe_b64decode(env + "=" * (-len(env) % 4))
    for i in range(len(raw)):
        for bit in range(8):
            b = bytearray(raw)
            b[i] ^= 1 << bit
            forged = base64.urlsafe_b64encode(bytes(b)).rstrip(b"=").decode()
            with pytest.raises(SealError):
                ring.open(forged, ALICE, "demo", NOW)
    # and in the text form: every character replaced, the tail cut or extended
    for i in range(len(env)):
        for c in ("A", "_"):
            if env[i] != c:
                with pytest.raises(SealError):       # (also base64's unused low bits: one text only)
                    ring.open(env[:i] + c + env[i + 1:], ALICE, "demo", NOW)
    for t in (env[:-1], env[:-4], env + "A", env + "AAAA", env[1:]):
        with pytest.raises(SealError):
            ring.open(t, ALICE, "demo", NOW)


def test_another_identity_is_refused_even_with_the_same_sub_at_another_issuer(ring):
    env = seal(ring)
    for owner in (owner_fingerprint("https://issuer", "mallory"), owner_fingerprint("https://other", "alice"),
                  owner_fingerprint(None, "alice")):
        with pytest.raises(SealError, match="another identity"):
            ring.open(env, owner, "demo", NOW)
    assert ring.open(env, owner_fingerprint("https://issuer", "alice"), "demo", NOW).upstream_id == UPSTREAM


def test_swapped_between_connections_is_refused(ring):
    a, b = seal(ring, conn="crm"), seal(ring, conn="billing")
    with pytest.raises(SealError, match="another connection"):
        ring.open(a, ALICE, "billing", NOW)
    with pytest.raises(SealError, match="another connection"):
        ring.open(b, ALICE, "crm", NOW)
    with pytest.raises(SealError):
        ring.open(a, ALICE, "crm2", NOW)            # no prefix games with the length byte
    assert ring.open(a, ALICE, "crm", NOW).upstream_id == UPSTREAM


def test_expired_is_refused_at_the_second(ring):
    env = seal(ring, expires=NOW + 10)
    assert ring.open(env, ALICE, "demo", NOW + 9.9).upstream_id == UPSTREAM
    for t in (NOW + 10, NOW + 86400):
        with pytest.raises(SealError, match="expired"):
            ring.open(env, ALICE, "demo", t)


@pytest.mark.parametrize("garbage", [
    "", "0123456789abcdef0123456789abcdef", UPSTREAM, "a" * (MAX_ENVELOPE + 1), "AAAA" * 2000,
    "has space", "pad==", "x/y+z", "é" * 10, "\x00" * 40, "A" * 60, "AQ", "Ag" + "A" * 80,
])
def test_garbage_raw_ids_and_oversized_values_are_refused(ring, garbage):
    with pytest.raises(SealError):
        ring.open(garbage, ALICE, "demo", NOW)


def test_unknown_key_id_and_another_keyring_are_refused(ring, tmp_path):
    env = seal(ring)
    other = load_keyring(tmp_path / "other-keys")
    with pytest.raises(UnknownKey):
        other.open(env, ALICE, "demo", NOW)
    # the same key id with another key: authentication fails
    kid = next(iter(ring.aeads)).hex()
    forged = parse_keyring(f"{kid} {os.urandom(32).hex()}\n")
    with pytest.raises(SealError, match="forged or altered"):
        forged.open(env, ALICE, "demo", NOW)


def test_rotation_old_envelopes_open_while_their_key_is_in_the_ring(tmp_path):
    path = tmp_path / "keys"
    first = load_keyring(path)
    old = seal(first)
    new_kid = rotate(path)
    second = load_keyring(path)
    assert second.current.hex() == new_kid and len(second.aeads) == 2
    new = seal(second)
    assert second.open(old, ALICE, "demo", NOW).upstream_id == UPSTREAM      # old key still opens
    assert second.open(new, ALICE, "demo", NOW).upstream_id == UPSTREAM
    with pytest.raises(UnknownKey):
        first.open(new, ALICE, "demo", NOW)       # a replica that has not reloaded yet
    rotate(path)                                  # keep=2: the first key is gone now
    third = load_keyring(path)
    with pytest.raises(UnknownKey):
        third.open(old, ALICE, "demo", NOW)
    assert third.open(new, ALICE, "demo", NOW).upstream_id == UPSTREAM
    with pytest.raises(KeyringError):
        rotate(path, keep=1)


def test_keyring_file_created_private_and_shared_by_replicas(tmp_path):
    path = tmp_path / "dir" / "keys"
    a, b = load_keyring(path), load_keyring(path)
    assert a.current == b.current                 # a second replica on the same key dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b.open(seal(a), ALICE, "demo", NOW).upstream_id == UPSTREAM
    warned = []
    os.chmod(path, 0o644)
    load_keyring(path, warned.append)
    assert warned and "chmod 600" in warned[0] and a.secret_texts[0] not in warned[0]


@pytest.mark.parametrize("text,where", [
    ("", "no key"),
    ("# only a comment\n", "no key"),
    ("0011aabb 00\n", ":1:"),
    ("0011aabb " + "ab" * 32 + "\nnot a key\n", ":2:"),
    ("0011aabb " + "ab" * 32 + "\n0011aabb " + "cd" * 32 + "\n", "twice"),
])
def test_bad_keyring_is_an_error_naming_the_line_never_the_key(text, where):
    with pytest.raises(KeyringError) as e:
        parse_keyring(text, "ring")
    assert where in str(e.value) and "ab" * 32 not in str(e.value)


def test_last_key_seals(tmp_path):
    k1, k2 = "0000000a " + "11" * 32, "0000000b " + "22" * 32
    ring = parse_keyring(f"{k1}\n{k2}  # newest\n")
    env = seal(ring)
    assert base64.urlsafe_b64decode(env + "==")[1:5].hex() == "0000000b"
    assert parse_keyring(f"{k2}\n{k1}\n").open(env, ALICE, "demo", NOW).upstream_id == UPSTREAM


def test_seal_and_open_cost_microseconds(ring):
    n = 2000
    t0 = time.perf_counter()
    envs = [seal(ring) for _ in range(n)]
    t1 = time.perf_counter()
    for e in envs:
        ring.open(e, ALICE, "demo", NOW)
    t2 = time.perf_counter()
    seal_us, open_us = (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6
    print(f"seal {seal_us:.1f} us, open {open_us:.1f} us")
    assert seal_us < 500 and open_us < 500        # generous: a shared 2-core machine


def test_session_keys_are_known_secrets_for_the_log_redactor(tmp_path):
    from addons.hooks.redaction import gather_secrets
    ring = load_keyring(tmp_path / "keys" / "session-keys")
    other = tmp_path / "elsewhere"
    rotate(other)
    for key_dir, explicit, want in ((tmp_path / "keys", "", ring.secret_texts),
                                    (tmp_path / "keys", str(other), load_keyring(other).secret_texts)):
        secrets, files = gather_secrets(str(tmp_path), str(key_dir), str(tmp_path / "mask-key"), "", explicit)
        assert [s.value for s in secrets if s.label == "session key"] == list(want)
        assert (Path(explicit) if explicit else key_dir / "session-keys") in files    # watched: rotation


def test_sealer_reloads_on_rotation_and_looks_at_most_once_a_second_for_unknown_keys(tmp_path):
    from addons.core.sessionseal import Sealer
    path = tmp_path / "keys"
    a, b = Sealer(path, ttl=60, clock=lambda: NOW), Sealer(path, ttl=60, clock=lambda: NOW)
    old = a.seal(UPSTREAM, "iss", "alice", "demo")
    rotate(path)
    a.reload()                                    # what a's poll does when the file moved
    new = a.seal(UPSTREAM, "iss", "alice", "demo")
                                                  # b's poll has not run yet
    assert b.open(new, "iss", "alice", "demo") == UPSTREAM     # unknown key id: b looked once
    reads = []
    b.reload = lambda: reads.append(True)
    for _ in range(20):                           # made-up key ids cannot make it read the file each time
        with pytest.raises(UnknownKey):
            b.open("AQAAAAA" + new[7:], "iss", "alice", "demo")
    assert len(reads) == 0 and b.open(old, "iss", "alice", "demo") == UPSTREAM
    with pytest.raises(SealError, match="expired"):
        Sealer(path, ttl=60, clock=lambda: NOW + 61).open(new, "iss", "alice", "demo")
