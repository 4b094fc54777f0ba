"""An initialised official-SDK MCP client for a URL (the gateway's own CLI commands that
talk MCP, the demo client and the tests)."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


@asynccontextmanager
async def connect(url: str, token: str | None = None, *, legacy: bool = False, mode: str | None = None,
                  headers: dict[str, str] | None = None, timeout: float = 30.0,
                  http_errors: list[tuple[int, str]] | None = None, **client_kw: Any) -> AsyncIterator[Client]:
    """An initialised SDK Client talking to `url` with `Authorization: Bearer token`.

    mode: the SDK's ConnectMode; default "auto" on Streamable HTTP and "legacy" (initialize
    handshake) on the legacy HTTP+SSE transport, where clients of that era live. "auto" also
    works there: the SDK then speaks 2026-07-28 over the SSE stream.
    http_errors: collects (status, body) of every HTTP error answer (Streamable HTTP), which
    the SDK reports without the body, e.g. the gateway's invalid_token explanation."""
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if legacy:
        transport = sse_client(url, headers=hdrs, timeout=timeout)
        async with Client(transport, mode=mode or "legacy", **client_kw) as c:
            yield c
        return
    async def keep_error(response: httpx2.Response) -> None:
        if http_errors is not None and response.status_code >= 400:
            await response.aread()              # error answers are small JSON, never streams
            http_errors.append((response.status_code, response.text[:2000]))

    async with httpx2.AsyncClient(headers=hdrs, timeout=httpx2.Timeout(timeout, read=timeout * 2),
                                  event_hooks={"response": [keep_error]}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode or "auto", **client_kw) as c:
            yield c


async def list_upstream_tools(conn, user_agent: str = "mcp-bastion pin") -> list[dict]:
    """Every tool the connection's upstream lists (all pages), with its service credential;
    the gateway's own lists (pins, argument schemas) say so in User-Agent."""
    headers = {conn.credential.header: conn.secret} if conn.credential is not None and conn.secret else {}
    headers["User-Agent"] = user_agent           # the upstream's logs can tell the gateway's own lists
    url = f"{conn.origin}{conn.path}"
    async with connect(url, legacy=conn.transport == "sse", headers=headers) as c:
        tools, cursor = [], None
        while True:
            page = await c.list_tools(cursor=cursor) if cursor else await c.list_tools()
            tools += [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in page.tools]
            cursor = getattr(page, "next_cursor", None) or getattr(page, "nextCursor", None)
            if not cursor:
                return tools
