"""Known-secret redaction end to end: the demo server (`--leak-secrets`) echoes the
gateway's own secrets — its service credential, the issuer signing key, the masking key and
the caller's token — in results, errors, keys, log notifications (SSE events, also split in
two) in every encoding. None may reach the client, and none may be in any file of the store.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from demo.server import LEAK_ENCODINGS, encode_leak
from tests.e2e.conftest import ALLOW_ALL_POLICY, ROOT

PLACES = ("result", "error", "rpc_error", "notify", "split", "key")


class RawClient:
    """Raw JSON-RPC over Streamable HTTP, so the test sees the exact bytes the client gets."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.headers = {"authorization": f"Bearer {token}", "content-type": "application/json",
                        "accept": "application/json, text/event-stream"}
        self.http = httpx.Client(timeout=30)
        self.n = 0

    def post(self, method: str, params: dict | None = None, notify: bool = False) -> httpx.Response:
        msg: dict = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self.n += 1
            msg["id"] = self.n
        r = self.http.post(self.url, json=msg, headers=self.headers)
        if r.headers.get("mcp-session-id"):
            self.headers["mcp-session-id"] = r.headers["mcp-session-id"]
        return r

    def start(self) -> None:
        r = self.post("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                     "clientInfo": {"name": "leak-test", "version": "1"}})
        assert r.status_code == 200, r.text
        self.headers["mcp-protocol-version"] = "2025-06-18"
        self.post("notifications/initialized", notify=True)


def forms(value: str, core: str | None = None) -> set[str]:
    """What must never be seen: the value, each encoding the server uses, and the halves of
    `core` (the secret part: a JWT's header and claims are not, only its signature is)."""
    out = {value, *(encode_leak(value, e) for e in LEAK_ENCODINGS if e != "pem_line")}
    out.add(base64.b64encode(value.encode()).decode())
    out.add(json.dumps(value)[1:-1])
    for line in value.splitlines():
        if len(line) >= 40 and not line.startswith("-----"):
            out.add(line)
    # the halves the server sends in separate events
    for e in LEAK_ENCODINGS:
        t = encode_leak(core or value, e)
        out |= {t[:len(t) // 2][-24:], t[len(t) // 2:][:24]}
    return {f for f in out if len(f) >= 16}


def leaked(text: str, secrets: dict[str, set[str]]) -> list[str]:
    return [f"{name}: {f[:12]}…" for name, fs in secrets.items() for f in fs if f in text]


@pytest.mark.parametrize("transport", ["sse", "json"])
def test_gateway_secrets_never_reach_client_or_store(demo_server, rules_dir, gateway, transport):
    demo = demo_server(transport, args=("--leak-secrets",))
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}))
    token = gw.token()
    sources = {
        "service credential": f"file:{demo.token_file}",
        "issuer key": f"file:{gw.key_dir / 'issuer-key.pem'}",
        "masking key": f"file:{ROOT / '.secrets' / 'mask-key'}",
        "caller token": f"value:{token}",
    }
    values = {
        "service credential": demo.token_file.read_text().strip(),
        "issuer key": (gw.key_dir / "issuer-key.pem").read_text().strip(),
        "masking key": (ROOT / ".secrets" / "mask-key").read_text().strip(),
        "caller token": token,
    }
    secrets = {k: forms(v, v.rsplit(".", 1)[1] if k == "caller token" else None) for k, v in values.items()}
    c = RawClient(gw.mcp_url(), token)
    c.start()
    seen = []
    calls = 0
    for name, src in sources.items():
        encs = LEAK_ENCODINGS if name == "issuer key" else [e for e in LEAK_ENCODINGS if e != "pem_line"]
        for enc in encs:
            for where in PLACES:
                r = c.post("tools/call", {"name": "leak", "arguments": {"source": src, "encoding": enc,
                                                                       "where": where}})
                calls += 1
                assert r.status_code == 200, r.text
                # the call really went through: the tool answered (result or tool error)
                assert "here it is" in r.text or "upstream failure" in r.text or "done" in r.text \
                    or "as a key" in r.text, (name, enc, where, r.text[:300])
                bad = leaked(r.text, secrets)
                if bad:
                    seen.append((name, enc, where, bad))
    assert not seen, seen[:5]
    # the upstream really sent them (the redaction, not the server, hid them)
    received = demo.received_bodies()
    assert token in received            # the caller chose to send its own token as an argument
    # audit: each redaction is a known-secret mask row; nothing in any store file
    journals = list(gw.recordings.rglob("journal-*.jsonl"))
    assert journals
    text = "\n".join(p.read_text(errors="replace") for p in gw.recordings.rglob("*") if p.is_file()
                     and p.suffix != ".parquet")
    assert not leaked(text, secrets)
    assert '"mask_type":"known-secret"' in text
    # ... nor in the gateway's log (which names what it redacted, by label)
    assert not leaked(gw.log_text(), secrets) and "redacted known secret" in gw.log_text()
    gw.proc.stop()
    from addons.core.audit.store import Store
    st = Store(gw.recordings)
    rows = st.query("SELECT CAST(to_json(e) AS VARCHAR) FROM events e").fetchall()
    dump = "\n".join(r[0] for r in rows)
    assert dump and not leaked(dump, secrets)
    n = st.query("SELECT count(*) FROM masks WHERE type = 'known-secret'").fetchone()[0]
    assert n >= calls // 2
    for p in gw.recordings.rglob("*"):
        if p.is_file():
            assert not leaked(p.read_bytes().decode("latin-1"), secrets), p


def test_ordinary_results_unchanged(demo_server, rules_dir, gateway):
    """Legitimate use: values that are not the gateway's secrets pass untouched."""
    demo = demo_server("sse", args=("--leak-secrets",))
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}))
    c = RawClient(gw.mcp_url(), gw.token())
    c.start()
    harmless = "an-ordinary-value-0123456789abcdef"
    for enc in ("raw", "base64url", "hex"):
        r = c.post("tools/call", {"name": "leak", "arguments": {"source": f"value:{harmless}", "encoding": enc}})
        assert encode_leak(harmless, enc) in r.text
    assert "redacted known secret" not in gw.log_text()


def test_token_in_url_not_logged_or_recorded(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}))
    token = gw.token()
    sig = token.rsplit(".", 1)[1]
    r = httpx.post(f"{gw.mcp_url()}/{token}?api_key=plain-key-value-123&jwt={token}", json={},
                   headers={"authorization": f"Bearer {token}"})
    assert r.status_code in (400, 404)
    gw.proc.stop()
    files = "\n".join(p.read_bytes().decode("latin-1") for p in Path(gw.recordings).rglob("*") if p.is_file())
    for text in (gw.log_text(), files):
        assert sig not in text and "plain-key-value-123" not in text
