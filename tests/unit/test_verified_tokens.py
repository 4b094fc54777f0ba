"""The verified-token cache: one signature check per token, never past exp, bounded,
per audience, holding no token; revocation still applies on every call."""
from __future__ import annotations

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.core.identity import jwtverify as jv
from addons.hooks.identity import Identity
from addons.core.record import get_record


def test_cache_respects_exp_leeway_ttl_audience_and_bound():
    c = jv.VerifiedTokens(max_entries=3, ttl=60)
    claims = {"sub": "a", "exp": 1000}
    c.put("tok", None, claims, now=900)
    assert c.get("tok", None, leeway=30, now=950) is claims
    assert c.get("tok", "other-aud", leeway=30, now=950) is None       # audience is part of the key
    assert c.get("tok", None, leeway=30, now=1031) is None              # past exp + leeway
    c.put("tok", None, {"sub": "a", "exp": 10_000}, now=0)
    assert c.get("tok", None, leeway=0, now=59) is not None
    assert c.get("tok", None, leeway=0, now=61) is None                 # ttl: key rotations honoured
    for i in range(10):
        c.put(f"t{i}", None, {"exp": 10_000}, now=0)
    assert len(c) == 3                                                  # bounded
    assert all("t9" not in repr(k) for k in c._d)                       # hashes, never tokens


@pytest.fixture
def ident(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_key_dir=str(tmp_path / "keys"))
        yield a, tctx, tmp_path / "keys"


def _flow(token: str):
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/demo", content=b"{}"))
    f.request.headers["authorization"] = f"Bearer {token}"
    get_record(f.metadata).connection = "demo"
    return f


async def test_signature_checked_once_per_token_and_revocation_still_applies(ident, monkeypatch, tmp_path):
    a, tctx, keys = ident
    calls = []
    real = jv.decode
    monkeypatch.setattr(jv, "decode", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    tok = jv.mint_token(keys, "job-1")
    for _ in range(5):
        f = _flow(tok)
        await a.request(f)
        assert f.response is None and get_record(f.metadata).identity.sub == "job-1"
    assert len(calls) == 1
    rev = tmp_path / "revoked.yaml"
    rev.write_text("- sub: job-1\n")
    tctx.configure(a, bastion_revoked=str(rev))
    f = _flow(tok)
    await a.request(f)
    assert f.response is not None and f.response.status_code == 401
    # a tampered token is not a cache hit
    f = _flow(tok[:-2] + ("AA" if not tok.endswith("AA") else "BB"))
    await a.request(f)
    assert f.response is not None and f.response.status_code == 401
