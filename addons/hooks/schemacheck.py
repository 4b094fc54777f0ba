"""The `argschema` addon: a tools/call's arguments must satisfy the tool's inputSchema before
policy sees them (issue 16; pure logic in addons/core/policy/argschema.py).

The schema is the pinned one when the connection has pins (rules/pins/NAME.yaml), else the
one in the upstream's last tools/list answer seen on that connection. When the gateway has
not seen one yet it asks the upstream itself (one tools/list with the connection's
credential, cached); if that fails the call is refused (-32602). Invalid arguments never
reach the upstream: the caller gets a tool error result (`isError: true`, as MCP 2025-11-25
/ SEP-1303 has servers report input validation failures).
"""
from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, exceptions, http

from addons.hooks.reloading import Watching
from addons.core.connections import ConnectionRegistry
from addons.core.policy import argschema

from addons.core import integrity as ti
from addons.hooks.httputil import json_response
from addons.hooks.responses import readonly
from addons.core.mcpwire import jsonrpc_error
from addons.core.record import ResultSource, get_record
from addons.core.rules import RulesError

log = logging.getLogger("bastion.argschema")
USER_AGENT = "mcp-bastion (argument schemas)"    # on the gateway's own tools/list


class SchemaUnknown(Exception):
    """No schema to validate against (the upstream's tools could not be listed)."""


class ArgSchema(Watching):
    name = "argschema"

    def __init__(self, connections: ConnectionRegistry | None = None, pins: ti.PinStore | None = None) -> None:
        self.registry = connections or ConnectionRegistry()
        self.pins = pins or ti.PinStore()               # shared with the integrity stage
        self.watches = (self.pins.poll,)
        self.book = argschema.SchemaBook()
        self._fetching: dict[str, asyncio.Future] = {}
        self.enabled = True             # bastion_validate_args, read in configure (not per call)

    def load(self, loader) -> None:
        loader.add_option("bastion_validate_args", bool, True,
                          "Validate tools/call arguments against the tool's inputSchema before policy "
                          "(deny rules on typed values rely on it).")

    def configure(self, updated) -> None:
        if "bastion_validate_args" in updated:
            self.enabled = ctx.options.bastion_validate_args
        if "bastion_rules" in updated:
            self.pins.watch(ctx.options.bastion_rules)

    def _pinned(self, connection: str) -> dict | None:
        try:
            return self.pins.get(connection)[0]
        except RulesError as e:
            raise exceptions.OptionsError(f"argschema: {e}") from None   # the pipeline's fail-closed guard refuses the flow

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None or not self.enabled:
            return
        conn = rec.connection
        answers: dict[int, dict] = {}
        for i, m in enumerate(rec.messages):
            if m.method == "tools/list":
                # readonly: later transforms still get the list's text (rec.response_source)
                rec.response_transforms.append(
                    readonly(lambda msg, c=conn, r=rec: self._learn(c, msg, r.response_source)))
            elif m.method == "tools/call":
                answer = await self._refusal(conn, m)
                if answer is not None:
                    answers[i] = answer
        if answers:
            # a batch is refused whole, each call with its own answer (as policy does)
            out = [answers.get(i) or jsonrpc_error(m.id, argschema.INVALID_PARAMS,
                                                   "batch refused: another call in it has invalid arguments")
                   for i, m in enumerate(rec.messages) if m.kind == "request"]
            first = next(iter(answers.values()))
            reason = first["error"]["message"] if "error" in first else first["result"]["content"][0]["text"]
            flow.response = http.Response.make(202, b"") if not out else \
                json_response(200, out if rec.batch else out[0])
            rec.refuse(reason, "argschema")

    async def _refusal(self, conn: str, m) -> dict | None:
        """The gateway's answer to a call it will not forward, or None."""
        name = m.tool_name or ""
        try:
            why = await self._problem(conn, name, m.arguments)
        except SchemaUnknown as e:
            log.warning("refused tools/call %r on %s: %s", name, conn, e)
            return jsonrpc_error(m.id, argschema.INVALID_PARAMS, f"cannot validate the arguments of tool {name}: {e}")
        if why is None:
            return None
        log.warning("refused tools/call %r on %s: %s", name, conn, why)
        return argschema.tool_error(m.id, f"mcp-bastion: invalid arguments for tool {name}: {why}")

    def _learn(self, connection: str, msg: dict, source: ResultSource | None = None) -> dict:
        result = msg.get("result")
        if isinstance(result, dict):
            self.book.learn(connection, result.get("tools"), source.digest() if source is not None else None)
        return msg

    async def _problem(self, connection: str, tool: str, arguments: dict) -> str | None:
        pins = self._pinned(connection)
        if pins is not None:
            if tool not in pins:
                return None              # not reviewed: tool integrity decides (it refuses unpinned look-alikes)
            return argschema.problem(pins[tool]["definition"].get("inputSchema"), arguments, self.book)
        if not self.book.known(connection, tool) and not self.book.listed(connection):
            if not await self._fetch(connection):
                raise SchemaUnknown("no inputSchema known: the gateway could not list the upstream's tools "
                                    "(call tools/list first)")
        if not self.book.known(connection, tool):
            # not a tool the upstream lists: nothing to validate against; the upstream answers
            # it as an unknown tool in its own way (and policy still decides first)
            log.info("tools/call %r on %s: the upstream does not list it, arguments not validated", tool, connection)
            return None
        return argschema.problem(self.book.get(connection, tool), arguments, self.book)

    async def _fetch(self, connection: str) -> bool:
        """One tools/list of our own, shared by concurrent callers; failure leaves it unknown."""
        fut = self._fetching.get(connection)
        if fut is None:
            fut = self._fetching[connection] = asyncio.ensure_future(self._list(connection))
        try:
            tools = await asyncio.shield(fut)
        except Exception as e:  # noqa: BLE001 - any transport failure: the call is refused
            log.warning("cannot list the tools of %s to validate arguments: %s", connection, type(e).__name__)
            return False
        finally:
            self._fetching.pop(connection, None)
        self.book.learn(connection, tools)
        return True

    async def _list(self, connection: str) -> list[dict]:
        from addons.core.mcpclient import list_upstream_tools
        conn = self.registry.get(connection)
        if conn is None:
            raise LookupError(connection)
        if getattr(conn.credential, "kind", "service") != "service":
            # per-user credentials (token exchange, vault): the gateway has no credential of
            # its own to list with; the caller's own tools/list teaches the schemas
            raise PermissionError(f"{connection} has per-user credentials")
        return await asyncio.wait_for(list_upstream_tools(conn, USER_AGENT), 20)
