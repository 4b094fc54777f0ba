"""Issue 4 acceptance with real processes: the demo MCP server behind mitmdump running the
bastion chain; the SDK client with a token from the embedded issuer works, without one it
gets 401 + WWW-Authenticate naming the RFC 9728 metadata (which validates), the caller's
token never reaches the upstream, and a gateway pointed at a loopback JWKS/OIDC provider
follows its key rotation and revocations."""
from __future__ import annotations

import hashlib
import json
import re
import time

import httpx
import pytest

from demo.client import connect
from tests.e2e.conftest import ALLOW_ALL_POLICY
from tests.unit.test_identity_jwks import AUD, FakeIdP

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def fp(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def validate_rfc9728(doc: dict, resource: str) -> None:
    """RFC 9728 section 2: resource (REQUIRED, equal to the URL it was derived from);
    authorization_servers as the MCP authorization spec requires; optional fields typed."""
    assert doc["resource"] == resource
    assert isinstance(doc["authorization_servers"], list) and doc["authorization_servers"]
    assert all(isinstance(s, str) and s for s in doc["authorization_servers"])
    assert doc.get("bearer_methods_supported", ["header"]) == ["header"]  # never query / body
    assert isinstance(doc.get("resource_name", ""), str)
    assert "://" in doc["resource"] and "#" not in doc["resource"] and "?" not in doc["resource"]


async def test_sdk_client_with_valid_token(stack):
    demo, gw = stack("json")
    token = gw.token("alice", ["e2e-all"])
    async with connect(gw.mcp_url(), token) as c:
        tools = await c.list_tools()
        assert "get_customer" in {t.name for t in tools.tools}
        res = await c.call_tool("get_customer", {"id": 2})
        assert not res.is_error
    received = demo.received()
    assert received
    # token passthrough is impossible: only the service credential reached the upstream
    assert {v for r in received for k, v in r["headers"] if k.lower() == "authorization"} == {fp(f"Bearer {demo.token}")}
    assert token not in json.dumps(received) and fp(f"Bearer {token}") not in json.dumps(received)
    assert token not in gw.log_text()


async def test_without_token_401_and_metadata(stack):
    demo, gw = stack("json")
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.post(gw.mcp_url(), json=INIT, headers=HDRS)
        assert r.status_code == 401
        www = r.headers["www-authenticate"]
        m = re.fullmatch(r'Bearer resource_metadata="([^"]+)"', www)
        assert m, www
        meta_url = m.group(1)
        assert meta_url == f"{gw.url}/.well-known/oauth-protected-resource/mcp/demo"
        assert r.json()["error"] == "unauthorized"
        doc = (await h.get(meta_url)).json()
        validate_rfc9728(doc, f"{gw.url}/mcp/demo")
        assert doc["authorization_servers"] == ["mcp-bastion-local"]
        root = await h.get(f"{gw.url}/.well-known/oauth-protected-resource")
        validate_rfc9728(root.json(), gw.url)
        # a bad token: invalid_token; an expired one too; a query token: 400
        r = await h.post(gw.mcp_url(), json=INIT, headers={**HDRS, "authorization": "Bearer a.b.c"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        expired = gw.token("alice", ["e2e-all"], iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
        r = await h.post(gw.mcp_url(), json=INIT, headers={**HDRS, "authorization": f"Bearer {expired}"})
        assert r.status_code == 401
        good = gw.token("alice", ["e2e-all"])
        r = await h.post(gw.mcp_url() + f"?access_token={good}", json=INIT, headers=HDRS)
        assert r.status_code == 400
        assert good not in gw.log_text()
    # the SDK client without a token fails
    with pytest.raises(Exception):
        async with connect(gw.mcp_url(), None, timeout=5) as c:
            await c.list_tools()
    assert demo.received() == [], "an unauthenticated request reached the upstream"
    assert "refused" in gw.log_text()


async def test_jwks_provider_rotation_and_revocation(demo_server, rules_dir, gateway, tmp_path):
    idp = FakeIdP()
    try:
        demo = demo_server("json")
        revoked = tmp_path / "revoked.yaml"
        revoked.write_text("[]\n")
        gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY.replace("roles: [e2e-all]", "roles: [reader]")}),
                     extra_args=("--set", f"bastion_oidc_issuer={idp.issuer}", "--set", f"bastion_audience={AUD}",
                                 "--set", "bastion_roles_claim=realm_access.roles",
                                 "--set", "bastion_jwks_cooldown=0", "--set", f"bastion_revoked={revoked}"))
        tok = idp.token(sub="job-1")
        async with connect(gw.mcp_url(), tok) as c:
            assert not (await c.call_tool("get_customer", {"id": 1})).is_error
        old = idp.keys[0][0]
        new = idp.rotate("rsa")
        async with connect(gw.mcp_url(), idp.token(new, sub="job-2")) as c:
            assert not (await c.call_tool("get_customer", {"id": 1})).is_error
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.post(gw.mcp_url(), json=INIT, headers={**HDRS, "authorization": f"Bearer {idp.token(old)}"})
            assert r.status_code == 401
            # cut job-3 off without a restart
            tok3 = idp.token(new, sub="job-3")
            r = await h.post(gw.mcp_url(), json=INIT, headers={**HDRS, "authorization": f"Bearer {tok3}"})
            assert r.status_code == 200
            revoked.write_text("- sub: job-3\n")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                r = await h.post(gw.mcp_url(), json=INIT, headers={**HDRS, "authorization": f"Bearer {tok3}"})
                if r.status_code == 401:
                    break
                time.sleep(0.2)
            assert r.status_code == 401
            # the provider goes down: cached keys keep working, unknown keys fail closed
            idp.stop()
            r = await h.post(gw.mcp_url(), json=INIT,
                             headers={**HDRS, "authorization": f"Bearer {idp.token(new, sub='job-4')}"})
            assert r.status_code == 200
            unknown = idp.rotate()
            r = await h.post(gw.mcp_url(), json=INIT,
                             headers={**HDRS, "authorization": f"Bearer {idp.token(unknown, sub='job-5')}"})
            assert r.status_code == 503
        assert "unavailable" in gw.log_text()
    finally:
        try:
            idp.stop()
        except Exception:
            pass
