"""Closed-loop load generator: raw JSON-RPC over HTTP/1.1 keep-alive.

`concurrency` workers, one keep-alive connection each, every worker sends its next
request as soon as the previous answer is complete. Two clients:

- `raw` (default): an asyncio Protocol that writes prebuilt request bytes and parses
  the response framing (Content-Length or chunked) itself. A few microseconds of
  client CPU per request, so on a 2-core machine the client is not what limits.
- `httpx`: httpx.AsyncClient with keep-alive, for comparison (`--client httpx`).

The client's own CPU time per request is measured for every cell (time.process_time),
so the report can say how much of the machine the client took.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable

PROTOCOL = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {}}


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    tool: str | None = None
    arguments: dict | None = None
    sse: bool = False
    description: str = ""
    meta: tuple = ()          # extra params._meta entries, e.g. (("progressToken", 1),)

    def body_parts(self) -> tuple[bytes, bytes]:
        """JSON-RPC body split around the id, so each request gets its own id cheaply."""
        params: dict = {}
        if self.tool is not None:
            params = {"name": self.tool, "arguments": self.arguments or {}}
        params["_meta"] = {**META, **dict(self.meta)}
        tail = json.dumps({"method": self.method, "params": params}, separators=(",", ":"))
        return b'{"jsonrpc":"2.0","id":', b"," + tail[1:].encode()

    def routing_headers(self) -> list[tuple[str, str]]:
        h = [("MCP-Protocol-Version", PROTOCOL), ("Mcp-Method", self.method)]
        if self.tool is not None:
            h.append(("Mcp-Name", self.tool))
        return h


WORKLOADS = {
    "small": Workload("small", "tools/call", "get_customer", {"id": 1},
                      description="tools/call get_customer: small structured JSON result"),
    "masked": Workload("masked", "tools/call", "query_sql", {"sql": "SELECT * FROM customers"},
                       description="tools/call query_sql: ~256 KiB of customer rows, masked by the gateway"),
    "sse": Workload("sse", "tools/call", "stream_report", {"events": 100}, sse=True, meta=(("progressToken", 1),),
                    description="tools/call stream_report: SSE, 100 progress events then the result"),
    "list": Workload("list", "tools/list",
                     description="tools/list: 206 tools upstream, filtered by policy"),
}


# The same workloads against demo.server (--upstream demo): its query_sql needs a query that
# returns ~256 KiB, and its stream_report sends one progress event per step (50 at most).
DEMO_WORKLOADS = {
    "masked": dict(arguments={"sql": "SELECT c.* FROM customers c CROSS JOIN range(30) r"}),
    "sse": dict(arguments={"steps": 50, "delay": 0.001},
                description="tools/call stream_report: SSE, 50 progress events (the demo's cap) then the result"),
    "list": dict(description="tools/list: the demo's tools + 200 trivial ones, filtered by policy"),
}


@dataclass
class Endpoint:
    host: str
    port: int
    path: str
    headers: list[tuple[str, str]]   # auth etc., on top of the workload's


@dataclass
class CellResult:
    n: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    lat: list[float] = field(default_factory=list)     # request sent -> response complete (s)
    first: list[float] = field(default_factory=list)   # request sent -> first SSE event (s)
    statuses: dict = field(default_factory=dict)
    sample_error: str | None = None
    body_bytes: int = 0
    in_window: int = 0      # completed inside the measured window (what req/s counts)


def _rpc_error(head: bytes) -> bool:
    """A JSON-RPC error answered with HTTP 200 (a policy refusal) is not a successful call."""
    return b'"error"' in head and b'"result"' not in head


def build_head(ep: Endpoint, wl: Workload) -> bytes:
    lines = [f"POST {ep.path} HTTP/1.1", f"Host: {ep.host}:{ep.port}",
             "Content-Type: application/json", "Accept: application/json, text/event-stream"]
    lines += [f"{k}: {v}" for k, v in wl.routing_headers() + ep.headers]
    return ("\r\n".join(lines) + "\r\nContent-Length: ").encode()


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.collect: bytearray | None = None
        self._reset()

    def _reset(self) -> None:
        self.state = 0          # 0 headers, 1 length body, 2 chunked, 3 until close
        self.status = 0
        self.remaining = 0
        self.body_len = 0
        self.first_event: float | None = None
        self.sse = False
        self.tail = b""         # last bytes of the body, to spot an event boundary across chunks
        self.head = b""         # first bytes of the body: a JSON-RPC error shows there
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.state == 3 and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)
        elif self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))

    def request(self, data: bytes) -> asyncio.Future:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def _body(self, chunk: bytes) -> None:
        if len(self.head) < 96:
            self.head += chunk[:96]
        self.body_len += len(chunk)
        if self.collect is not None:
            self.collect += chunk
        if self.sse and self.first_event is None:
            if b"\n\n" in self.tail + chunk or b"\r\n\r\n" in self.tail + chunk:
                self.first_event = time.perf_counter()
            else:
                self.tail = (self.tail + chunk)[-3:]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while True:
            if self.state == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).split(b"\r\n")
                del buf[:end + 4]
                self.status = int(head[0].split(b" ", 2)[1])
                length, chunked = None, False
                for line in head[1:]:
                    k, _, v = line.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        length = int(v)
                    elif k == b"transfer-encoding" and b"chunked" in v.lower():
                        chunked = True
                    elif k == b"content-type" and v.strip().lower().startswith(b"text/event-stream"):
                        self.sse = True
                    elif k == b"connection" and v.strip().lower() == b"close":
                        self.keep_alive = False
                if chunked:
                    self.state, self.remaining = 2, -1
                elif length is not None:
                    self.state, self.remaining = 1, length
                else:
                    self.state = 3
                    self.keep_alive = False
            elif self.state == 1:
                take = min(self.remaining, len(buf))
                if take:
                    self._body(bytes(buf[:take]))
                    del buf[:take]
                    self.remaining -= take
                if self.remaining == 0:
                    return self._done()
                return
            elif self.state == 2:
                if self.remaining == -1:    # expecting a chunk-size line
                    nl = buf.find(b"\r\n")
                    if nl < 0:
                        return
                    size = int(bytes(buf[:nl]).split(b";")[0], 16)
                    del buf[:nl + 2]
                    if size == 0:
                        self.remaining = -2
                    else:
                        self.remaining = size + 2   # data + CRLF
                if self.remaining == -2:     # trailer section until an empty line
                    nl = buf.find(b"\r\n")
                    if nl < 0:
                        return
                    line = bytes(buf[:nl])
                    del buf[:nl + 2]
                    if line == b"":
                        return self._done()
                    continue
                take = min(self.remaining, len(buf))
                if take == 0:
                    return
                part = bytes(buf[:take])
                del buf[:take]
                data_left = self.remaining - 2      # data bytes still due before the chunk's CRLF
                self.remaining -= take
                if data_left > 0:
                    self._body(part[:data_left])
                if self.remaining == 0:
                    self.remaining = -1
            else:
                if buf:
                    self._body(bytes(buf))
                    buf.clear()
                return

    def _done(self) -> None:
        self.state = 4
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(None)


async def _open(ep: Endpoint) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, ep.host, ep.port)
    return proto


async def run_cell(ep: Endpoint, wl: Workload, concurrency: int, duration: float,
                   warmup: float = 0.2, max_requests: int | None = None, client: str = "raw",
                   min_samples: int | None = None, max_extend: float = 4.0) -> CellResult:
    """Run one closed-loop cell.

    A call counts (throughput and latency) when it completes inside the measured window,
    which opens after `warmup` and closes after `duration` - or later, up to
    `max_extend` x duration, until `min_samples` calls (default: one per worker) have
    completed, so a cell whose calls take longer than the window still gets figures.
    Calls still in flight when the window closes are drained but not counted.
    With `max_requests`, the cell instead ends after that many calls (no warm-up rule).
    """
    if client == "httpx":
        return await _run_cell_httpx(ep, wl, concurrency, duration, warmup, max_requests)
    head = build_head(ep, wl)
    pre, post = wl.body_parts()
    res = CellResult()
    counter = [0]
    t_start = time.perf_counter()
    t_measure = t_start + warmup if max_requests is None else t_start
    t_end = t_measure + duration
    t_hard = t_measure + duration * max_extend
    need = concurrency if min_samples is None else min_samples
    closed: list[float] = []      # [time the window closed]

    def stop(now: float) -> bool:
        if closed:
            return True
        if max_requests is not None:
            if res.n + res.errors >= max_requests:
                closed.append(now)
            return bool(closed)
        if now >= t_end and (res.n >= need or now >= t_hard):
            closed.append(now)
            return True
        return False

    async def worker(k: int) -> None:
        conn = await _open(ep)
        try:
            while not stop(time.perf_counter()):
                counter[0] += 1
                body = pre + str(counter[0]).encode() + post
                t0 = time.perf_counter()
                try:
                    if conn.closed:
                        conn = await _open(ep)
                    await conn.request(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                except (ConnectionError, OSError) as e:
                    if t0 >= t_measure and not closed:
                        res.errors += 1
                        res.sample_error = res.sample_error or f"{type(e).__name__}: {e}"
                    conn.transport.close() if conn.transport else None
                    conn = await _open(ep)
                    continue
                t1 = time.perf_counter()
                if not conn.keep_alive:
                    conn.transport.close()
                    conn = await _open(ep)
                if t1 < t_measure or (closed and t1 > closed[0]):
                    continue
                res.statuses[conn.status] = res.statuses.get(conn.status, 0) + 1
                if conn.status != 200 or (not conn.sse and _rpc_error(conn.head)):
                    res.errors += 1
                    res.sample_error = res.sample_error or f"HTTP {conn.status}: {conn.head[:96]!r}"
                    continue
                res.n += 1
                res.body_bytes += conn.body_len
                res.lat.append(t1 - t0)
                if wl.sse:
                    res.first.append((conn.first_event or t1) - t0)
        finally:
            if conn.transport:
                conn.transport.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    res.cpu = time.process_time() - cpu0
    res.wall = (closed[0] if closed else time.perf_counter()) - t_measure
    res.in_window = res.n
    return res


async def _run_cell_httpx(ep: Endpoint, wl: Workload, concurrency: int, duration: float,
                          warmup: float, max_requests: int | None) -> CellResult:
    import httpx
    pre, post = wl.body_parts()
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    headers.update({k: v for k, v in wl.routing_headers() + ep.headers})
    res = CellResult()
    counter = [0]
    url = f"http://{ep.host}:{ep.port}{ep.path}"
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        async def worker() -> None:
            while time.perf_counter() < t_end and (max_requests is None or res.n < max_requests):
                counter[0] += 1
                body = pre + str(counter[0]).encode() + post
                t0 = time.perf_counter()
                first = None
                n = 0
                async with c.stream("POST", url, content=body, headers=headers) as r:
                    async for chunk in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter()
                        n += len(chunk)
                t1 = time.perf_counter()
                if t0 < t_measure:
                    continue
                res.statuses[r.status_code] = res.statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    res.errors += 1
                    continue
                res.n += 1
                if t1 <= t_end:
                    res.in_window += 1
                res.body_bytes += n
                res.lat.append(t1 - t0)
                if wl.sse:
                    res.first.append((first or t1) - t0)

        cpu0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        res.cpu = time.process_time() - cpu0
    res.wall = duration
    if max_requests is not None:
        res.wall, res.in_window = time.perf_counter() - t_measure, res.n
    return res


async def fetch_one(ep: Endpoint, wl: Workload, timeout: float = 30) -> tuple[int, bytes]:
    """One request, returning status and the full body (for the harness's sanity checks)."""
    head = build_head(ep, wl)
    pre, post = wl.body_parts()
    body = pre + b"1" + post
    conn = await _open(ep)
    conn.collect = bytearray()
    try:
        await asyncio.wait_for(conn.request(head + str(len(body)).encode() + b"\r\n\r\n" + body), timeout)
    finally:
        conn.transport.close()
    return conn.status, bytes(conn.collect)
