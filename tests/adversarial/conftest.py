"""Adversarial suite: raw HTTP against a real gateway (mitmdump + the bastion chain) in
front of the real demo server. One gateway per module; every case asserts the refusal
and that the upstream received nothing for it."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Proc, demo_starter, gateway_starter, pytest_runtest_makereport, rules_maker  # noqa: F401

POLICY = """\
rules:
  - name: user-customers
    when: {roles: [e2e-user], tool: get_customer}
    allow: true
  - name: user-read-sql
    when: {roles: [e2e-user], tool: query_sql, sql: {arg: sql, class: [read]}}
    allow: true
"""
VERSION = "2025-06-18"


@dataclass
class Adv:
    demo: Any
    gw: Any
    token: str

    @property
    def url(self) -> str:
        return self.gw.mcp_url()

    def headers(self, token: str | None = ..., **extra: str) -> dict[str, str]:
        h = {"content-type": "application/json", "accept": "application/json, text/event-stream",
             "mcp-protocol-version": VERSION}
        tok = self.token if token is ... else token
        if tok:
            h["authorization"] = f"Bearer {tok}"
        h.update({k.replace("_", "-"): v for k, v in extra.items()})
        return h

    def post(self, body: bytes | str | dict | list, headers: dict | None = None, path: str | None = None,
             **kw: Any) -> httpx.Response:
        data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        with httpx.Client(timeout=20) as c:
            return c.post(path and f"{self.gw.url}{path}" or self.url, content=data,
                          headers=self.headers() if headers is None else headers, **kw)

    def raw(self, chunks: list[bytes], pause: float = 0.0) -> bytes:
        """Send raw bytes over one TCP connection (chunk by chunk); return the whole answer."""
        with socket.create_connection(("127.0.0.1", self.gw.port), timeout=20) as s:
            for c in chunks:
                s.sendall(c)
                if pause:
                    time.sleep(pause)
            out = b""
            while True:
                try:
                    b = s.recv(65536)
                except TimeoutError:
                    return out                     # idle after an answer (keep-alive)
                if not b:
                    return out
                out += b
                s.settimeout(1.0)


def call(tool: str, args: dict | None = None, msg_id: Any = 1) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": args or {}}}


def jsonrpc_error(resp: httpx.Response) -> dict:
    body = resp.json()
    return body["error"] if isinstance(body, dict) else body


def _stack(tmp_path_factory, transport: str, names: tuple[str, ...] = ("demo",)):
    """names: connections to the one demo server (several: the same upstream under two names)."""
    procs: list[Proc] = []
    tmp = tmp_path_factory.mktemp(f"adversarial-{transport}")
    try:
        demo = demo_starter(tmp, procs)(transport)
        gw = gateway_starter(tmp, procs)(rules_maker(tmp)(*[demo] * len(names), names=names,
                                                          **{"policy.yaml": POLICY}))
        yield Adv(demo, gw, gw.token("mallory", ["e2e-user"]))
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def adv(tmp_path_factory):
    """Streamable HTTP (stateless demo server)."""
    yield from _stack(tmp_path_factory, "stateless")


@pytest.fixture(scope="module")
def adv_legacy(tmp_path_factory):
    """The legacy HTTP+SSE transport (connection with transport: sse)."""
    yield from _stack(tmp_path_factory, "legacy")


@pytest.fixture(scope="module")
def adv_sessions(tmp_path_factory):
    """Streamable HTTP with sessions (stateful demo server), reachable as connection `demo`
    and as `crm`: one upstream under two names."""
    yield from _stack(tmp_path_factory, "json", names=("demo", "crm"))


@pytest.fixture
def upstream(request):
    """The demo server's received log, cleared before the case; `upstream.nothing()` after."""
    name = next((n for n in ("adv_legacy", "adv_sessions") if n in request.fixturenames), "adv")
    adv = request.getfixturevalue(name)
    adv.demo.clear_received()

    class Upstream:
        def received(self) -> list[dict]:
            # on the clients' behalf: not the gateway's own tools/list (argument schemas)
            return adv.demo.client_requests()

        def nothing(self) -> None:
            got = self.received()
            assert got == [], f"upstream received {len(got)} request(s): {[r.get('body', '')[:200] for r in got]}"

        def bodies(self) -> str:
            return adv.demo.received_bodies()
    return Upstream()
