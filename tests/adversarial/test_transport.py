"""The legacy HTTP+SSE transport as a way around the Streamable HTTP checks, and answers
that try to carry secrets back."""
from __future__ import annotations

import json
import queue
import threading

import httpx
import pytest

from tests.adversarial.conftest import call


class Stream:
    """A legacy SSE session held open in a thread: its endpoint and the messages it gets."""

    def __init__(self, adv, token: str):
        self.adv, self.events, self.endpoint = adv, queue.Queue(), None
        self._ready = threading.Event()
        self._stop = False
        self._t = threading.Thread(target=self._run, args=(token,), daemon=True)
        self._t.start()
        assert self._ready.wait(10), "no endpoint event"

    def _run(self, token: str) -> None:
        try:
            self._read(token)
        except httpx.HTTPError:
            pass               # the stream ends when the test (or the gateway) goes away

    def _read(self, token: str) -> None:
        with httpx.Client(timeout=httpx.Timeout(30, read=60)) as c:
            with c.stream("GET", self.adv.url, headers={"authorization": f"Bearer {token}",
                                                        "accept": "text/event-stream"}) as r:
                event = None
                for line in r.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                        if event == "endpoint":
                            self.endpoint = data
                            self._ready.set()
                        else:
                            self.events.put(json.loads(data))

    def post(self, body: dict, token: str | None = None, path: str | None = None) -> httpx.Response:
        h = {"content-type": "application/json", "authorization": f"Bearer {token or self.adv.token}"}
        with httpx.Client(timeout=10) as c:
            return c.post(f"{self.adv.gw.url}{path or self.endpoint}", content=json.dumps(body), headers=h)

    def answer(self, msg_id, timeout: float = 10) -> dict:
        while True:
            m = self.events.get(timeout=timeout)
            if m.get("id") == msg_id:
                return m

    def close(self) -> None:
        self._stop = True


INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "adv", "version": "1"}}}


@pytest.fixture
def session(adv_legacy, upstream):
    s = Stream(adv_legacy, adv_legacy.token)
    s.post(INIT)
    s.answer(0)
    s.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    adv_legacy.demo.clear_received()
    yield s
    s.close()


def test_denied_call_on_the_legacy_endpoint(adv_legacy, upstream, session):
    session.post(call("run_command", {"command": "id"}, msg_id=7))
    err = session.answer(7)
    assert err["error"]["code"] == -32030
    bodies = [json.loads(r["body"]) for r in upstream.received() if r["body"]]
    assert bodies == [{"jsonrpc": "2.0", "id": 7, "method": "ping"}]     # only the carrier


def test_blocklisted_argument_on_the_legacy_endpoint(adv_legacy, upstream, session):
    session.post(call("query_sql", {"sql": "SELECT 1 -- \u002fdev/tcp/1.2.3.4/9"}, msg_id=8))
    assert "blocklist" in session.answer(8)["error"]["message"]
    assert "/dev/tcp" not in upstream.bodies()


def test_allowed_call_on_the_legacy_endpoint_is_legitimate(adv_legacy, upstream, session):
    session.post(call("get_customer", {"id": 1}, msg_id=9))
    res = session.answer(9)
    assert "result" in res and "[MASKED:ssn]" in json.dumps(res)


def test_someone_elses_legacy_session(adv_legacy, upstream, session):
    other = adv_legacy.gw.token("eve", ["e2e-user"])
    r = session.post(call("get_customer", {"id": 1}, msg_id=10), token=other)
    assert r.status_code == 404
    upstream.nothing()


@pytest.mark.parametrize("query", ["", "?session_id=", "?session_id=nonexistent", "?session_id=a&session_id=b",
                                   "?session_id=x%26y"])
def test_legacy_endpoint_without_a_valid_session(adv_legacy, upstream, session, query):
    path = session.endpoint.split("?")[0] + query
    r = session.post(call("run_command", {"command": "id"}, msg_id=11), path=path)
    assert r.status_code in (400, 404), (query, r.status_code, r.text)
    assert "run_command" not in upstream.bodies()


def test_unannounced_legacy_path(adv_legacy, upstream, session):
    r = session.post(call("run_command", {"command": "id"}, msg_id=12), path="/mcp/demo/messages2/?session_id=x")
    assert r.status_code == 404
    upstream.nothing()


def test_secrets_in_an_unexpected_column_are_masked(adv, upstream):
    """No field rule names `comment`: the detectors still find what is in it."""
    r = adv.post(call("query_sql", {"sql": "SELECT 'card 4111 1111 1111 1111, ssn 123-45-6789, key "
                                           "AKIAIOSFODNN7EXAMPLE, mail alice@example.com' AS comment"}))
    assert r.status_code == 200 and "result" in r.text, r.text
    for secret in ("4111 1111 1111 1111", "123-45-6789", "AKIAIOSFODNN7EXAMPLE", "alice@example.com"):
        assert secret not in r.text, secret


def test_secret_reflected_in_an_error_is_masked(adv, upstream):
    """The server's validation error echoes the input; the error is masked like a result."""
    r = adv.post(call("get_customer", {"id": "123-45-6789 4111111111111111"}))
    assert r.status_code == 200
    assert "123-45-6789" not in r.text and "4111111111111111" not in r.text, r.text
