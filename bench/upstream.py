"""A fast MCP upstream for benchmarks: `python -m bench.upstream --port P --token-file F`.

Speaks just enough of MCP 2026-07-28 (stateless Streamable HTTP) to answer the bench
workloads, from precomputed bytes, on a raw asyncio protocol: the point is that the
upstream costs (almost) nothing, so what the figures show is the gateway. Its tools
mirror the demo server's (`get_customer`, `query_sql`, `stream_report`, `tool_NNN`)
with the same sensitive fields (email, ssn, card_number, billing.api_token), so the
shipped masking rules have real work to do.

  get_customer   small structured JSON result (~0.6 KiB)
  query_sql      ~256 KiB of customer rows, as JSON text and structuredContent
  stream_report  text/event-stream: N progress notifications then the result, one
                 event per chunk, `--sse-interval-ms` apart (first one at once)
  tools/list     the demo tools plus `--many-tools` trivial ones

Requests without `Authorization: Bearer <token>` get 401, like the demo server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

PROTOCOL = "2026-07-28"


def fake_customer(i: int, rnd: random.Random) -> dict:
    first = rnd.choice(["ada", "grace", "alan", "edsger", "barbara", "ken", "dennis", "radia"])
    last = rnd.choice(["lovelace", "hopper", "turing", "dijkstra", "liskov", "thompson", "ritchie", "perlman"])
    return {
        "id": i,
        "name": f"{first.title()} {last.title()}",
        "email": f"{first}.{last}{i}@example.com",
        "ssn": f"{rnd.randint(100, 899):03d}-{rnd.randint(10, 99):02d}-{rnd.randint(1000, 9999):04d}",
        "card_number": "4111 1111 1111 1111" if i % 2 else "5500 0000 0000 0004",
        "notes": f"prefers phone; backup contact {last}{i}@mail.example.org, account opened {2010 + i % 14}",
    }


def tool_result(data: object) -> dict:
    return {"content": [{"type": "text", "text": json.dumps(data)}], "structuredContent": data}


def customer_result() -> dict:
    c = fake_customer(1, random.Random(1))
    c["billing"] = {"plan": "gold", "api_token": "sk_live_PLANTEDbench0000000000000000"}
    return tool_result(c)


def big_result(target_bytes: int) -> dict:
    """Rows appear twice (text + structuredContent), so aim each half at target/2."""
    rnd = random.Random(7)
    rows: list[dict] = []
    size = 0
    while size < target_bytes // 2:
        r = fake_customer(len(rows) + 1, rnd)
        rows.append(r)
        size += len(json.dumps(r)) + 2
    return tool_result({"columns": list(rows[0]), "rows": rows, "row_count": len(rows)})


def tools_list(many: int) -> dict:
    demo = [
        ("get_customer", {"id": {"type": "integer"}}),
        ("query_sql", {"sql": {"type": "string"}}),
        ("stream_report", {"events": {"type": "integer"}}),
        ("run_command", {"command": {"type": "string"}}),
        ("launch_container", {"image": {"type": "string"}, "privileged": {"type": "boolean"}}),
        ("read_file", {"path": {"type": "string"}}),
    ]
    tools = [{"name": n, "description": f"demo tool {n}", "inputSchema": {"type": "object", "properties": p}}
             for n, p in demo]
    tools += [{"name": f"tool_{i:03d}", "description": f"trivial tool number {i}; returns its argument",
               "inputSchema": {"type": "object", "properties": {"x": {"type": "integer"}}}}
              for i in range(many)]
    # ttlMs / cacheScope / resultType: required in 2026-07-28 list results (the SDK client the gateway
    # uses to learn argument schemas refuses a list without them)
    return {"tools": tools, "ttlMs": 0, "cacheScope": "private", "resultType": "complete"}


def _response(rid: bytes, result_json: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + rid + b',"result":' + result_json + b"}"


def _http(status: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Upstream:
    def __init__(self, token: str, big_bytes: int, many_tools: int, sse_events: int, sse_interval: float):
        self.auth = b"bearer " + token.encode().lower()
        self.sse_events, self.sse_interval = sse_events, sse_interval
        enc = lambda o: json.dumps(o, separators=(",", ":")).encode()  # noqa: E731
        self.results = {
            "get_customer": enc(customer_result()),
            "query_sql": enc(big_result(big_bytes)),
            "tools/list": enc(tools_list(many_tools)),
            "server/discover": enc({"supportedVersions": [PROTOCOL], "capabilities": {"tools": {}},
                                    "serverInfo": {"name": "bench-upstream", "version": "1"}}),
            "_trivial": enc(tool_result({"ok": True})),
        }
        self.report = enc(tool_result({"report": "done", "sections": sse_events}))

    def answer(self, headers: dict[bytes, bytes], body: bytes) -> bytes | tuple:
        if headers.get(b"authorization", b"").lower() != self.auth:
            return _http(b"401 Unauthorized", b'{"error":"invalid_token"}')
        try:
            msg = json.loads(body)
        except ValueError:
            return _http(b"400 Bad Request", b'{"error":"parse"}')
        if "id" not in msg:
            return b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
        rid = json.dumps(msg["id"]).encode()
        method = msg.get("method")
        if method == "tools/call":
            name = (msg.get("params") or {}).get("name")
            if name == "stream_report":
                return ("sse", rid)
            res = self.results.get(name) or self.results["_trivial"]
        else:
            res = self.results.get(method)
            if res is None:
                err = b'{"jsonrpc":"2.0","id":' + rid + b',"error":{"code":-32601,"message":"method not found"}}'
                return _http(b"200 OK", err)
        return _http(b"200 OK", _response(rid, res))

    def sse_events_bytes(self, rid: bytes):
        for i in range(1, self.sse_events + 1):
            note = {"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": i, "total": self.sse_events,
                               "message": f"section {i}: owner grace.hopper{i}@example.com"}}
            yield b"event: message\ndata: " + json.dumps(note, separators=(",", ":")).encode() + b"\n\n"
        yield b"event: message\ndata: " + _response(rid, self.report) + b"\n\n"


class Conn(asyncio.Protocol):
    def __init__(self, up: Upstream):
        self.up = up
        self.buf = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + n:
                return
            body = bytes(self.buf[end + 4:end + 4 + n])
            del self.buf[:end + 4 + n]
            out = self.up.answer(headers, body)
            if isinstance(out, tuple):
                self.busy = True
                asyncio.ensure_future(self._stream(out[1]))
                return
            self.transport.write(out)

    async def _stream(self, rid: bytes) -> None:
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n")
        first = True
        for ev in self.up.sse_events_bytes(rid):
            if not first and self.up.sse_interval > 0:
                await asyncio.sleep(self.up.sse_interval)
            first = False
            if t.is_closing():
                return
            t.write(b"%x\r\n%s\r\n" % (len(ev), ev))
        t.write(b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self._process()


async def serve(args) -> None:
    token = Path(args.token_file).read_text().strip()
    up = Upstream(token, args.big_kib * 1024, args.many_tools, args.sse_events, args.sse_interval_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(up), args.host, args.port, backlog=1024)
    print(f"bench upstream on http://{args.host}:{args.port}/mcp", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--big-kib", type=int, default=256)
    ap.add_argument("--many-tools", type=int, default=200)
    ap.add_argument("--sse-events", type=int, default=100)
    ap.add_argument("--sse-interval-ms", type=float, default=1.0)
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
