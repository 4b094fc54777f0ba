"""A misbehaving MCP upstream for fault-injection tests; the path picks the misbehaviour.

  /garbage    200 application/json, body is not JSON
  /html       200 text/html error page carrying a secret
  /truncated  200 application/json, JSON cut in the middle
  /reset      200 text/event-stream, one event, then the connection is reset
  /slow       answers correctly after 1.5 s
  /close      closes the connection without answering
  /sse-bytes  200 text/event-stream: comment, progress, id'd result events (each carrying the
              secret), written one byte per chunk, a pause before the last event, then the end
  /sse-cr     the same with CR-only line endings
Run: python -m tests.e2e.bad_upstream PORT
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys

SECRET = "123-45-6789"


def _http(status: str, ctype: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = next((int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:")), 0)
    body = json.loads(await reader.readexactly(length) or b"{}")
    rid = body.get("id")
    ok = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": f"ssn {SECRET}"}]}})
    if path.startswith("/garbage"):
        writer.write(_http("200 OK", "application/json", f"<<not json {SECRET}>>".encode()))
    elif path.startswith("/html"):
        writer.write(_http("200 OK", "text/html", f"<h1>oops</h1><p>ssn {SECRET}</p>".encode()))
    elif path.startswith("/truncated"):
        writer.write(_http("200 OK", "application/json", ok.encode()[: len(ok) // 2]))
    elif path.startswith("/slow"):
        await asyncio.sleep(1.5)
        writer.write(_http("200 OK", "application/json", ok.encode()))
    elif path.startswith("/reset"):
        ev = f"event: message\ndata: {json.dumps({'jsonrpc': '2.0', 'method': 'notifications/message', 'params': {'level': 'info', 'data': 'x'}})}\n\n"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(ev):x}\r\n{ev}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST on close
        writer.close()
        return
    elif path.startswith("/sse-"):
        await _sse_byte_by_byte(writer, rid, "\r" if path.startswith("/sse-cr") else "\n")
        return
    elif path.startswith("/close"):
        writer.close()
        return
    await writer.drain()
    writer.close()


def sse_events(rid, eol: str) -> list[str]:
    """The events /sse-* sends; every one carries SECRET somewhere a client could read it."""
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": f"ssn {SECRET}"}}
    ok = {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": f"ssn {SECRET}"}]}}
    blocks = [[f": keep-alive {SECRET}"],
              [f": {SECRET}", f"id: {SECRET}", "event: message", f"data: {json.dumps(note)}"],
              ["retry: 500", f"x-extra: {SECRET}"],
              ["id: evt-2", "event: message", f"data: {json.dumps(ok)}"]]
    return [eol.join(b) + eol + eol for b in blocks]


async def _sse_byte_by_byte(writer: asyncio.StreamWriter, rid, eol: str) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    events = sse_events(rid, eol)
    for i, ev in enumerate(events):
        if i == len(events) - 1:
            await asyncio.sleep(1.0)      # the client must still be waiting: nothing ended the body
        for b in ev.encode():
            writer.write(b"1\r\n" + bytes([b]) + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.0005)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


def start(tmp_path, procs: list) -> int:
    """Run this upstream for a test (its process joins `procs`); returns its port."""
    from tests.e2e.conftest import Proc, free_port
    port = free_port()
    p = Proc("bad-upstream", [sys.executable, "-m", "tests.e2e.bad_upstream", str(port)], tmp_path / "bad.log").start()
    procs.append(p)
    p.wait_port(port, marker="READY")
    return port


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
