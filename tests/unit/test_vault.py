"""The credential vault (addons/core/identity/vault.py): encryption at rest bound to each entry's
metadata, revocation, expiry, key handling and the `mcp-bastion creds` CLI."""
from __future__ import annotations

import io
import json
import os
import stat

import pytest

from addons.core.identity import vault as vm
from addons.cli import main as cli_main
from addons.core.identity.vault import NoEntry, Vault, VaultError, load_key

KEY = b"\x01" * 32


def saved(tmp_path, **entries) -> Vault:
    v = Vault(tmp_path / "creds.vault", KEY)
    for sub, secret in entries.items():
        v.put("demo", sub, secret, now=1000.0)
    v.save()
    return v


def test_roundtrip_encrypted_at_rest_0600(tmp_path):
    saved(tmp_path, alice="alice-secret-123", bob="bob-secret-456")
    raw = (tmp_path / "creds.vault").read_bytes()
    assert b"alice-secret-123" not in raw and b"bob-secret-456" not in raw
    assert stat.S_IMODE((tmp_path / "creds.vault").stat().st_mode) == 0o600
    v = Vault.load(tmp_path / "creds.vault", KEY)
    assert v.lookup("demo", "alice") == "alice-secret-123" and v.lookup("demo", "bob") == "bob-secret-456"
    with pytest.raises(NoEntry) as e:
        v.lookup("demo", "carol")
    assert e.value.why == "none"
    with pytest.raises(NoEntry):
        v.lookup("other", "alice")


def edit(tmp_path, fn) -> None:
    p = tmp_path / "creds.vault"
    doc = json.loads(p.read_text())
    fn(doc["entries"])
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("tamper", [
    lambda es: es[0].update(subject="bob"),            # move alice's secret to bob
    lambda es: es[0].update(connection="prod"),        # or to another connection
    lambda es: es[0].update(expires=None),             # or drop its expiry
    lambda es: es[0].update(kind="api_key"),
])
def test_entries_are_bound_to_their_metadata(tmp_path, tamper):
    v = Vault(tmp_path / "creds.vault", KEY)
    v.put("demo", "alice", "alice-secret", expires=time_in(3600))
    v.save()
    edit(tmp_path, tamper)
    v = Vault.load(tmp_path / "creds.vault", KEY)
    with pytest.raises(VaultError):
        e = next(iter(v.entries.values()))
        v.lookup(e.connection, e.subject)


def time_in(s: float) -> float:
    import time
    return time.time() + s


def test_revoked_and_expired(tmp_path):
    v = saved(tmp_path, alice="a-secret")
    v.put("demo", "bob", "b-secret", expires=2000.0, now=1000.0)
    assert v.lookup("demo", "bob", now=1999.0) == "b-secret"
    with pytest.raises(NoEntry) as e:
        v.lookup("demo", "bob", now=2000.0)
    assert e.value.why == "expired"
    assert v.revoke("demo", "alice") and not v.revoke("demo", "alice") and not v.revoke("demo", "nobody")
    v.save()
    (alice,) = [e for e in json.loads((tmp_path / "creds.vault").read_text())["entries"] if e["subject"] == "alice"]
    assert alice["sealed"] is None and alice["nonce"] is None and alice["revoked"]
    edit(tmp_path, lambda es: es[0].update(revoked=None))     # un-revoking by editing: the secret is gone
    with pytest.raises(NoEntry) as e:
        Vault.load(tmp_path / "creds.vault", KEY).lookup("demo", "alice")
    assert e.value.why == "revoked"


def test_wrong_key_and_bad_files(tmp_path):
    saved(tmp_path, alice="a-secret")
    with pytest.raises(VaultError) as e:
        Vault.load(tmp_path / "creds.vault", b"\x02" * 32).lookup("demo", "alice")
    assert "a-secret" not in str(e.value)
    (tmp_path / "bad.vault").write_text("{not json")
    with pytest.raises(VaultError):
        Vault.load(tmp_path / "bad.vault", KEY)
    (tmp_path / "v2.vault").write_text(json.dumps({"version": 99, "entries": []}))
    with pytest.raises(VaultError):
        Vault.load(tmp_path / "v2.vault", KEY)
    assert Vault.load(tmp_path / "missing.vault", KEY).entries == {}


def test_secrets_must_be_one_header_safe_line(tmp_path):
    v = Vault(tmp_path / "v", KEY)
    for bad in ("", "two\nlines", "tab\there", "caf\u00e9"):
        with pytest.raises(ValueError):
            v.put("demo", "alice", bad)
    with pytest.raises(ValueError):
        v.put("demo", "al ice", "ok")


def test_key_sources(tmp_path, monkeypatch):
    p = tmp_path / "k" / "vault.key"
    key = load_key(f"file:{p}", create=True)
    assert len(key) == 32 and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert load_key(f"file:{p}") == key
    os.chmod(p, 0o644)
    with pytest.raises(VaultError, match="chmod 600"):
        load_key(f"file:{p}")
    with pytest.raises(VaultError, match="cannot read"):
        load_key(f"file:{tmp_path}/absent.key")
    monkeypatch.setenv("VKEY", vm._b64(KEY))
    assert load_key("env:VKEY") == KEY
    monkeypatch.setenv("VKEY", "short")
    with pytest.raises(VaultError, match="32 bytes"):
        load_key("env:VKEY")
    with pytest.raises(VaultError):
        load_key("kms:whatever")


def test_cli_set_list_revoke_never_prints_secrets(tmp_path, monkeypatch, capsys):
    vault, key = tmp_path / "s" / "c.vault", tmp_path / "s" / "v.key"
    base = ["creds", "--vault", str(vault), "--key", f"file:{key}"]
    monkeypatch.setattr("sys.stdin", io.StringIO("alice-upstream-secret\n"))
    assert cli_main([*base, "set", "--connection", "demo", "--subject", "alice", "--expires-in", "3600"]) == 0
    (tmp_path / "bob.txt").write_text("bob-upstream-secret")
    assert cli_main([*base, "set", "--connection", "demo", "--subject", "bob", "--kind", "api_key",
                     "--secret-file", str(tmp_path / "bob.txt")]) == 0
    assert cli_main([*base, "list"]) == 0
    assert cli_main([*base, "revoke", "--connection", "demo", "--subject", "alice"]) == 0
    assert cli_main([*base, "revoke", "--connection", "demo", "--subject", "alice"]) == 1
    assert cli_main([*base, "list", "--connection", "demo"]) == 0
    out = capsys.readouterr()
    assert "secret" not in out.out + out.err
    lines = [l for l in out.out.splitlines() if l.startswith("demo")]
    assert len(lines) == 4 and "api_key" in out.out
    v = Vault.load(vault, load_key(f"file:{key}"))
    assert v.lookup("demo", "bob") == "bob-upstream-secret"
    with pytest.raises(NoEntry):
        v.lookup("demo", "alice")
    monkeypatch.setattr("sys.stdin", io.StringIO("two\nlines\n"))
    assert cli_main([*base, "set", "--connection", "demo", "--subject", "carol"]) == 1


def test_oauth_entries(tmp_path):
    v = Vault(tmp_path / "v", KEY)
    with pytest.raises(ValueError):
        v.put("demo", "alice", "access", "oauth")                        # needs a refresh token
    with pytest.raises(ValueError):
        v.put("demo", "alice", "access", "token", refresh_token="rt")    # only oauth has one
    v.put("demo", "alice", "access-1", "oauth", expires=1100.0, now=1000.0, refresh_token="rt-1")
    assert v.lookup("demo", "alice", now=1050.0) == "access-1"
    with pytest.raises(NoEntry):                                           # within the refresh margin
        v.lookup("demo", "alice", now=1050.0, margin=60)
    assert v.refresh_token("demo", "alice") == "rt-1" and v.refresh_token("demo", "bob") is None
    v.put("demo", "bob", "k", now=1000.0)
    assert v.lookup("demo", "bob", now=5000.0, margin=60) == "k" and v.refresh_token("demo", "bob") is None
    v.revoke("demo", "alice")
    assert v.refresh_token("demo", "alice") is None


def test_cli_oauth_entry_with_refresh_token_file(tmp_path, monkeypatch, capsys):
    vault, key = tmp_path / "c.vault", tmp_path / "v.key"
    (tmp_path / "rt").write_text("refresh-token-value\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("access-token-value\n"))
    base = ["creds", "--vault", str(vault), "--key", f"file:{key}"]
    assert cli_main([*base, "set", "--connection", "demo", "--subject", "alice", "--kind", "oauth",
                     "--refresh-token-file", str(tmp_path / "rt"), "--expires-in", "60"]) == 0
    v = Vault.load(vault, load_key(f"file:{key}"))
    assert v.lookup("demo", "alice") == "access-token-value" and v.refresh_token("demo", "alice") == "refresh-token-value"
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert cli_main([*base, "set", "--connection", "demo", "--subject", "bob", "--kind", "oauth"]) == 1
    out = capsys.readouterr()
    assert "token-value" not in out.out + out.err
