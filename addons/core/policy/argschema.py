"""tools/call arguments checked against the tool's inputSchema (pure, `jsonschema`).

Servers built on typed SDKs coerce what they receive (pydantic turns "yes" into True), so a
deny rule `privileged equals true` would miss `"privileged": "yes"` that the server then
runs as true. Validating against the schema the tool declared first makes the value the
policy sees the value the server uses. Messages name the argument and the constraint,
never the value (they are logged and recorded).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from jsonschema import exceptions as js_exceptions, validators

from addons.core.listcache import LearnedLists

INVALID_PARAMS = -32602          # JSON-RPC "Invalid params": no schema to validate against


def tool_error(msg_id: Any, text: str) -> dict:
    """A Tool Execution Error (`isError: true`): how MCP (2025-11-25, SEP-1303) reports
    arguments that fail a tool's inputSchema, so the model can read why and retry."""
    # resultType: required from 2026-07-28 on, an ignored extra field before it
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}], "isError": True,
                                                        "resultType": "complete"}}
MAX_TOOLS = 10_000


class SchemaBook:
    """inputSchema per (connection, tool) as last seen in tools/list; bounded (oldest out)."""

    def __init__(self, max_tools: int = MAX_TOOLS) -> None:
        self._schemas: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._listed: set[str] = set()            # connections whose tools/list was seen
        self._validators: dict[int, tuple[dict, Any]] = {}   # id -> (schema, compiled validator)
        self._learned = LearnedLists()            # the tools/list result they came from, per connection
        self.max = max_tools

    def learn(self, connection: str, tools: Any, digest: bytes | None = None) -> None:
        """`digest`: of the exact text of the list result (ResultSource), when known; the
        result last learned for this connection, again, changes nothing (and keeps the
        compiled validators)."""
        if not isinstance(tools, list) or self._learned.seen(connection, digest):
            return
        self._listed.add(connection)
        for t in tools:
            if isinstance(t, dict) and isinstance(t.get("name"), str):
                key = (connection, t["name"])
                self._schemas[key] = t.get("inputSchema")
                self._schemas.move_to_end(key)
        if len(self._schemas) > self.max:
            self._learned.forget()                # schemas of some listed tools are about to go
        while len(self._schemas) > self.max:
            self._schemas.popitem(last=False)
        self._validators.clear()
        self._learned.learned(connection, digest)

    def listed(self, connection: str) -> bool:
        return connection in self._listed

    def known(self, connection: str, tool: str) -> bool:
        return (connection, tool) in self._schemas

    def get(self, connection: str, tool: str) -> Any:
        return self._schemas.get((connection, tool))

    def validator(self, schema: dict) -> Any:
        cached = self._validators.get(id(schema))
        if cached is not None and cached[0] is schema:     # an id can be reused once freed
            return cached[1]
        v = _validator(schema)
        if len(self._validators) >= self.max:
            self._validators.clear()
        self._validators[id(schema)] = (schema, v)
        return v


def problem(schema: Any, arguments: Any, book: SchemaBook | None = None) -> str | None:
    """Why `arguments` do not satisfy `schema`, or None. An unusable schema is a problem too."""
    if not isinstance(schema, dict):
        return "the tool declares no usable inputSchema"
    try:
        v = book.validator(schema) if book is not None else _validator(schema)
    except js_exceptions.SchemaError as e:
        return f"the tool's inputSchema is invalid ({e.message[:120]})"
    err = js_exceptions.best_match(v.iter_errors(arguments))
    return None if err is None else describe(err)


def _validator(schema: dict) -> Any:
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def describe(err: js_exceptions.ValidationError) -> str:
    where = err.json_path
    kind, want = err.validator, err.validator_value
    if kind == "type":
        return f"{where}: must be of type {' or '.join(want) if isinstance(want, list) else want}"
    if kind == "required":
        missing = [r for r in want if isinstance(err.instance, dict) and r not in err.instance]
        return f"{where}: missing required argument(s) {', '.join(map(str, missing))}"
    if kind == "additionalProperties":
        extra = sorted(k for k in err.instance if k not in (err.schema.get("properties") or {}))[:5] \
            if isinstance(err.instance, dict) else []
        return f"{where}: argument(s) not in the tool's schema: {', '.join(map(str, extra))}"[:200]
    return f"{where}: fails {kind} {json.dumps(want, default=str)[:80]}"
