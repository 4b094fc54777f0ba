"""Pure parts of identity: claim paths, roles, revocation files, the embedded issuer's key
and tokens, algorithm allow-lists, and the `mcp-bastion token` CLI."""
from __future__ import annotations

import stat
import threading
import time

import jwt
import pytest

from addons.core.identity import jwtverify as jv
from addons.cli import main as cli_main
from addons.core.record import Identity
from addons.core.rules import RulesError


def test_claim_path_and_roles():
    claims = {"roles": ["a", "b", "a"], "realm_access": {"roles": ["x"]}, "scope": "r w",
              "https://example.com/groups": ["g"], "n": 5}
    assert jv.roles_from(claims, "roles") == ("a", "b")
    assert jv.roles_from(claims, "realm_access.roles") == ("x",)
    assert jv.roles_from(claims, "scope") == ("r", "w")
    assert jv.roles_from(claims, "https://example.com/groups") == ("g",)
    assert jv.roles_from(claims, "missing.path") == ()
    with pytest.raises(jv.TokenError):
        jv.roles_from(claims, "n")
    with pytest.raises(jv.TokenError):
        jv.roles_from({"roles": [1]}, "roles")


def test_identity_from_claims():
    i = jv.identity_from({"sub": "s", "iss": "i", "client_id": "c", "jti": "j", "roles": ["r"]})
    assert i == Identity("s", ("r",), "c", "j", "i")
    assert jv.identity_from({"sub": "s", "iss": "i", "azp": "a", "client_id": "c"}).client_id == "a"


def test_parse_algorithms():
    assert jv.parse_algorithms("") == jv.ASYMMETRIC_ALGS
    assert jv.parse_algorithms("ES256, RS256") == {"ES256", "RS256"}
    for bad in ("none", "HS256", "HS512", "ES256,none"):
        with pytest.raises(ValueError):
            jv.parse_algorithms(bad)


def test_check_shape():
    jv.check_shape("a.b.c")
    for bad in ("a.b", "a.b.c.d", "a b.c.d", "x" * 9000 + ".b.c", "a.b.c\n"):
        with pytest.raises(jv.TokenError):
            jv.check_shape(bad)


@pytest.mark.parametrize("text, jtis, subs", [
    ("- jti: abc\n- sub: job-7\n  reason: leaked\n", {"abc"}, {"job-7"}),
    ("revoked:\n  - {jti: abc}\n", {"abc"}, set()),
    ("- jti:abc\n- sub:bob\n- plainjti\n", {"abc", "plainjti"}, {"bob"}),
    ("jti:abc\nsub:bob  # cut off 2025-01-02\n", {"abc"}, {"bob"}),
    ("", set(), set()),
    ("# nothing yet\n", set(), set()),
])
def test_revocation_formats(tmp_path, text, jtis, subs):
    p = tmp_path / "revoked.yaml"
    p.write_text(text)
    r = jv.load_revocations(p)
    assert r.jtis == jtis and r.subs == subs


@pytest.mark.parametrize("text", ["- {user: bob}\n", "- {jti: a, sub: b}\n", "a: 1\n", "- [1, 2]\n", "- {jti: [x\n",
                                  "jti:abc\nsome thing with spaces\n"])
def test_revocation_errors(tmp_path, text):
    p = tmp_path / "revoked.yaml"
    p.write_text(text)
    with pytest.raises(RulesError):
        jv.load_revocations(p)


def test_revocation_check():
    r = jv.Revocations(frozenset({"j1"}), frozenset({"bad"}))
    assert r.check(Identity("ok", token_id="j1"))
    assert r.check(Identity("bad", token_id="j2"))
    assert r.check(Identity("ok", token_id="j2")) is None


def test_local_key_created_once_private(tmp_path):
    d = tmp_path / "k"
    p = jv.ensure_local_key(d)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    before = p.read_bytes()
    assert jv.ensure_local_key(d).read_bytes() == before
    assert [x.name for x in d.iterdir()] == [jv.LOCAL_KEY_FILE]


def test_local_key_creation_race(tmp_path):
    d = tmp_path / "race"
    out = []
    threads = [threading.Thread(target=lambda: out.append(jv.ensure_local_key(d).read_bytes())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 1
    assert [x.name for x in d.iterdir()] == [jv.LOCAL_KEY_FILE]


def test_mint_and_verify_roundtrip(tmp_path):
    tok = jv.mint_token(tmp_path, "alice", roles=["r1"], ttl=60, aud="a1", client_id="c1", team="x")
    cfg = jv.VerifyConfig(issuer=jv.LOCAL_ISSUER, audience="a1")
    kid = jv.peek_header(tok, cfg)
    src = jv.local_key_source(tmp_path)
    claims = jv.decode(tok, src.cached(kid), cfg)
    assert claims["team"] == "x" and claims["exp"] - claims["iat"] == 60
    assert jv.identity_from(claims) == Identity("alice", ("r1",), "c1", claims["jti"], jv.LOCAL_ISSUER)
    jwks = jv.local_jwks(tmp_path)
    assert jwks["keys"][0]["kid"] == kid and "d" not in jwks["keys"][0]


def test_cli_token(tmp_path, capsys):
    rc = cli_main(["token", "--sub", "ci-job-42", "--roles", "deployer, reader", "--ttl", "120",
                   "--aud", "https://gw/mcp/x", "--client-id", "github-actions", "--key-dir", str(tmp_path / "k")])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    tok = out.strip()
    assert out == tok + "\n" and tok.count(".") == 2
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims["sub"] == "ci-job-42" and claims["roles"] == ["deployer", "reader"]
    assert claims["aud"] == "https://gw/mcp/x" and claims["client_id"] == "github-actions"
    assert claims["exp"] - claims["iat"] == 120 and claims["iss"] == jv.LOCAL_ISSUER
    assert abs(claims["iat"] - time.time()) < 5


def test_cli_token_rejects_bad_ttl(tmp_path, capsys):
    assert cli_main(["token", "--sub", "x", "--ttl", "0", "--key-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().out == ""


def test_public_key_sources(tmp_path):
    """PEM public key, certificate or private key; Ed25519 -> EdDSA only; garbage refused."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pub").write_bytes(ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    src = jv.LocalKeySource.from_pem(tmp_path / "ed.pub")
    assert src.cached(None).algorithms == {"EdDSA"}
    now = int(time.time())
    tok = jwt.encode({"iss": "i", "sub": "s", "aud": "a", "iat": now, "exp": now + 60}, ed, "EdDSA")
    cfg = jv.VerifyConfig(issuer="i", audience="a")
    assert jv.decode(tok, src.cached(jv.peek_header(tok, cfg)), cfg)["sub"] == "s"

    k = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1)).sign(k, hashes.SHA384()))
    (tmp_path / "idp.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert jv.LocalKeySource.from_pem(tmp_path / "idp.crt").cached(None).algorithms == {"ES384"}

    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nc2VjcmV0\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError):
        jv.LocalKeySource.from_pem(tmp_path / "junk.pem")
