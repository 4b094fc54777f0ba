"""JSON-RPC / MCP message model and parsing. Pure: no mitmproxy import.

Strict on purpose: the gateway decides on exactly the bytes it forwards, so
anything two JSON parsers could read differently (duplicate keys, BOM, lone
surrogates, NaN) is refused instead of interpreted.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import orjson

# JSON-RPC 2.0 / MCP error codes (mcp_types.jsonrpc agrees).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020          # 2026-07-28: routing header disagrees with body
UNSUPPORTED_PROTOCOL_VERSION = -32022

MAX_DEPTH = 64

PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
KNOWN_VERSIONS = HANDSHAKE_VERSIONS + MODERN_VERSIONS

# Method -> params key mirrored in the Mcp-Name header (and the policy "target").
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

Kind = Literal["request", "notification", "response", "error"]


class McpParseError(Exception):
    """Body cannot be accepted. `code` is the JSON-RPC error code to answer with."""

    def __init__(self, code: int, message: str, msg_id: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id


def _object_at(obj: dict, key: str) -> dict:
    """obj[key] if it is a JSON object, else {} (a malformed field reads as empty)."""
    v = obj.get(key)
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message as the gateway understood it."""

    kind: Kind
    raw: dict = field(repr=False, compare=False)
    id: Any = None
    method: str | None = None

    @property
    def params(self) -> dict:
        return _object_at(self.raw, "params")

    @property
    def result(self) -> Any:
        return self.raw.get("result")

    @property
    def error(self) -> dict | None:
        e = self.raw.get("error")
        return e if isinstance(e, dict) else None

    @property
    def target(self) -> str | None:
        """Tool name (tools/call), prompt name (prompts/get) or resource URI (resources/read)."""
        key = NAME_BEARING_METHODS.get(self.method or "")
        if key is None:
            return None
        v = self.params.get(key)
        return v if isinstance(v, str) else None

    @property
    def tool_name(self) -> str | None:
        return self.target if self.method == "tools/call" else None

    @property
    def arguments(self) -> dict:
        return _object_at(self.params, "arguments")

    @property
    def meta(self) -> dict:
        return _object_at(self.params, "_meta")

    @property
    def protocol_version(self) -> str | None:
        v = self.meta.get(PROTOCOL_VERSION_META_KEY)
        if isinstance(v, str):
            return v
        if self.method == "initialize":
            v = self.params.get("protocolVersion")
            return v if isinstance(v, str) else None
        return None


# Methods a client may send (requests and notifications), per the MCP schema of every
# supported revision. Anything else is refused before policy: an unknown method cannot
# be reasoned about, so it never reaches an upstream (fail closed).
CLIENT_REQUEST_METHODS = frozenset({
    "initialize", "ping", "server/discover",
    "tools/list", "tools/call",
    "resources/list", "resources/templates/list", "resources/read",
    "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel", "subscriptions/listen",
    "tasks/get", "tasks/list", "tasks/cancel", "tasks/result",
})
CLIENT_NOTIFICATION_METHODS = frozenset({
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "notifications/elicitation/complete",
})
# Requests a server may send to the client (on SSE); governed by policy where configured.
SERVER_REQUEST_METHODS = frozenset({"sampling/createMessage", "elicitation/create", "roots/list", "ping"})
LIST_METHODS = {"tools/list": "tools", "resources/list": "resources",
                "resources/templates/list": "resourceTemplates", "prompts/list": "prompts"}


def jsonrpc_error(msg_id: Any, code: int, message: str, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": err}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise McpParseError(PARSE_ERROR, f"duplicate JSON object key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise McpParseError(PARSE_ERROR, f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf, which json.dumps would re-serialise as the invalid `Infinity`
    v = float(text)
    if not math.isfinite(v):
        raise McpParseError(PARSE_ERROR, "number out of range")
    return v


def _check_tree(obj: Any, strings: bool = True) -> None:
    """Depth limit and (with `strings`) lone-surrogate check, iteratively (no recursion
    limit games). Leaves are only looked at when strings must be checked."""
    if not isinstance(obj, (dict, list)):
        if strings and isinstance(obj, str):
            _check_str(obj)
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    containers = (dict, list)
    while stack:
        node, depth = stack.pop()
        if depth >= MAX_DEPTH and node:       # its children would be deeper than the limit
            raise McpParseError(PARSE_ERROR, f"JSON nested deeper than {MAX_DEPTH}")
        if isinstance(node, dict):
            if strings:
                for k in node:
                    _check_str(k)
            values = node.values()
        else:
            values = node
        for v in values:
            if isinstance(v, containers):
                stack.append((v, depth + 1))
            elif strings and isinstance(v, str):
                _check_str(v)


# Lone surrogates can only come from \uD800-\uDFFF escapes: the text was strict UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_str(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise McpParseError(PARSE_ERROR, "JSON string holds a lone surrogate") from None


# strict_loads' fast path: orjson, then two C-speed checks that it read what the stdlib
# path would accept and return. See strict_loads.
_DIGIT_RUNS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))   # digits -> "0", else " "
_LONG_NUMBER = b"0" * 19          # 19+ digits may exceed orjson's 64-bit integers (it gives a float)
_TOO_DEEP = b"\n" + b" " * (2 * MAX_DEPTH)   # a member below the depth limit (_check_tree's rule)

# one decoder for every stdlib parse: json.loads(text, **hooks) builds a new one per call (a fifth of
# a small message's parse time); decode() keeps no state between calls
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                                   parse_float=_finite_float)


def strict_loads(data: bytes | str) -> Any:
    """json.loads that refuses what other parsers could read differently.

    Fast path: orjson parses (it refuses invalid UTF-8, lone surrogates, NaN, infinities and
    trailing data on its own); duplicate keys are then detected by counting: orjson keeps
    one member per key, so its own serialisation has fewer `:` outside strings than the
    input exactly when a key repeats (`:` inside strings is written as is on both sides;
    an input spelling one as \u003a takes the slow path); the depth limit is read off the
    indentation of that serialisation. Inputs with a run of 19+ digits
    (orjson reads integers past 64 bits as floats) and anything orjson refuses go to the
    stdlib path, which decides and words every refusal."""
    try:
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
    except UnicodeEncodeError:                  # a lone surrogate in a str
        raw = None
    if raw is not None and not raw.startswith(b"\xef\xbb\xbf"):
        try:
            obj = orjson.loads(raw)
            # indented: a member at nesting level k starts a line with 2k spaces (strings
            # hold no raw newline), which bounds the depth without walking the tree
            canonical = orjson.dumps(obj, option=orjson.OPT_INDENT_2)
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass
        else:
            if (raw.count(b":") == canonical.count(b":") and b"\\u003" not in raw
                    and _LONG_NUMBER not in raw.translate(_DIGIT_RUNS)):
                if _TOO_DEEP in canonical:
                    raise McpParseError(PARSE_ERROR, f"JSON nested deeper than {MAX_DEPTH}")
                return obj
    return _stdlib_strict_loads(data)


def _stdlib_strict_loads(data: bytes | str) -> Any:
    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            raise McpParseError(PARSE_ERROR, "UTF-8 byte order mark is not allowed")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise McpParseError(PARSE_ERROR, "body is not valid UTF-8") from None
    else:
        text = data
        if text.startswith("\ufeff"):
            raise McpParseError(PARSE_ERROR, "byte order mark is not allowed")
    try:
        obj = _STRICT_DECODER.decode(text)      # the BOM json.loads would refuse is refused above
    except McpParseError:
        raise
    except (ValueError, RecursionError) as e:
        raise McpParseError(PARSE_ERROR, f"invalid JSON: {str(e)[:120]}") from None
    strings = _SURROGATE_ESCAPE.search(text) is not None
    # fewer brackets in the whole text than the depth limit: nothing can be too deep, so
    # the tree walk (a third of a small message's parse time) is skipped
    if strings or text.count("{") + text.count("[") >= MAX_DEPTH:
        _check_tree(obj, strings=strings)
    return obj


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON of a decoded message, byte for byte what
    json.dumps(ensure_ascii=False, separators=(",", ":")) gives, 5-10x faster (orjson); the
    stdlib takes what orjson refuses (integers beyond 64 bits, lone surrogates)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _valid_id(v: Any) -> bool:
    return (isinstance(v, str) or isinstance(v, int)) and not isinstance(v, bool)


def parse_message(obj: Any, *, direction: str = "c2s") -> Message:
    """Validate one decoded JSON-RPC message. direction c2s = client->server."""
    if not isinstance(obj, dict):
        raise McpParseError(INVALID_REQUEST, "JSON-RPC message must be an object")
    msg_id = obj.get("id") if _valid_id(obj.get("id")) else None
    if obj.get("jsonrpc") != "2.0":
        raise McpParseError(INVALID_REQUEST, 'jsonrpc must be "2.0"', msg_id)
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise McpParseError(INVALID_REQUEST, "method must be a non-empty string", msg_id)
        if "result" in obj or "error" in obj:
            raise McpParseError(INVALID_REQUEST, "a request cannot carry result or error", msg_id)
        if "params" in obj and not isinstance(obj["params"], dict):
            raise McpParseError(INVALID_PARAMS, "params must be an object", msg_id)
        if "id" in obj:
            if not _valid_id(obj["id"]):
                raise McpParseError(INVALID_REQUEST, "id must be a string or an integer", None)
            kind: Kind = "request"
        else:
            kind = "notification"
        msg = Message(kind=kind, raw=obj, id=obj.get("id"), method=method)
        if direction == "c2s":
            _check_client_method(msg)
        return msg
    if "id" not in obj or ("result" in obj) == ("error" in obj):
        raise McpParseError(INVALID_REQUEST, "not a JSON-RPC request, notification or response", msg_id)
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), int) or not isinstance(err.get("message"), str):
            raise McpParseError(INVALID_REQUEST, "error must have an integer code and a string message", msg_id)
        return Message(kind="error", raw=obj, id=obj["id"])
    return Message(kind="response", raw=obj, id=obj["id"])


def _check_client_method(msg: Message) -> None:
    known = CLIENT_REQUEST_METHODS if msg.kind == "request" else CLIENT_NOTIFICATION_METHODS
    if msg.method not in known:
        raise McpParseError(METHOD_NOT_FOUND, f"method {msg.method[:80]!r} is not an MCP {msg.kind} method", msg.id)
    params = msg.params
    key = NAME_BEARING_METHODS.get(msg.method or "")
    if key is not None and not isinstance(params.get(key), str):
        raise McpParseError(INVALID_PARAMS, f"params.{key} must be a string", msg.id)
    if msg.method in ("tools/call", "prompts/get") and "arguments" in params and not isinstance(params["arguments"], dict):
        raise McpParseError(INVALID_PARAMS, "params.arguments must be an object", msg.id)
    if "_meta" in params and not isinstance(params["_meta"], dict):
        raise McpParseError(INVALID_PARAMS, "params._meta must be an object", msg.id)


@dataclass
class ParsedBody:
    messages: list[Message]
    batch: bool


def parse_body(data: bytes, *, direction: str = "c2s") -> ParsedBody:
    """Parse a POSTed body: one JSON-RPC message or (older revisions) a batch."""
    obj = strict_loads(data)
    if isinstance(obj, list):
        if not obj:
            raise McpParseError(INVALID_REQUEST, "empty batch")
        return ParsedBody([parse_message(o, direction=direction) for o in obj], batch=True)
    return ParsedBody([parse_message(obj, direction=direction)], batch=False)


# --- 2026-07-28 routing headers -------------------------------------------------

MCP_METHOD_HEADER = "mcp-method"
MCP_NAME_HEADER = "mcp-name"
MCP_PROTOCOL_VERSION_HEADER = "mcp-protocol-version"
MCP_PARAM_PREFIX = "mcp-param-"
_ROUTING = (MCP_METHOD_HEADER, MCP_NAME_HEADER, MCP_PROTOCOL_VERSION_HEADER)


def check_routing_headers(fields: list[tuple[str, str]], parsed: ParsedBody) -> McpParseError | None:
    """The upstream may route on these headers, so they must say exactly what the body says.

    `fields` are the raw header lines (a folded mapping would hide duplicates).
    Mcp-Param-* values are verified separately against the tool schema
    (see `check_param_headers`), here only for duplicates.
    """
    seen: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        if key in _ROUTING or key.startswith(MCP_PARAM_PREFIX):
            if key in seen:
                return McpParseError(HEADER_MISMATCH, f"header {name} appears more than once")
            seen[key] = value
    routing_present = any(k in seen for k in (MCP_METHOD_HEADER, MCP_NAME_HEADER)) or any(
        k.startswith(MCP_PARAM_PREFIX) for k in seen)
    if not routing_present:
        return None
    if parsed.batch:
        return McpParseError(HEADER_MISMATCH, "routing headers cannot describe a batch")
    msg = parsed.messages[0]
    if seen.get(MCP_METHOD_HEADER) != msg.method:
        return McpParseError(HEADER_MISMATCH, "Mcp-Method header does not match the body's method", msg.id)
    key = NAME_BEARING_METHODS.get(msg.method or "")
    if key is not None:
        if decode_header_value(seen.get(MCP_NAME_HEADER)) != msg.params.get(key):
            return McpParseError(HEADER_MISMATCH, "Mcp-Name header does not match the body", msg.id)
    elif MCP_NAME_HEADER in seen:
        return McpParseError(HEADER_MISMATCH, "Mcp-Name header on a method that names nothing", msg.id)
    if msg.method != "tools/call" and any(k.startswith(MCP_PARAM_PREFIX) for k in seen):
        return McpParseError(HEADER_MISMATCH, "Mcp-Param-* headers are only valid on tools/call", msg.id)
    version = msg.meta.get(PROTOCOL_VERSION_META_KEY)
    if version is not None and seen.get(MCP_PROTOCOL_VERSION_HEADER) != version:
        return McpParseError(HEADER_MISMATCH, "MCP-Protocol-Version header does not match params._meta", msg.id)
    return None


_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


def decode_header_value(value: str | None) -> str | None:
    """The 2026-07-28 `=?base64?…?=` header encoding (same rules as the SDK's codec)."""
    if value is None:
        return None
    m = _B64_SENTINEL.fullmatch(value)
    if m is None:
        return value
    payload = m.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def param_header_map(input_schema: Any) -> dict[str, tuple[str, ...]]:
    """Lower-cased `mcp-param-<token>` -> argument path, from a tool's inputSchema.

    Only the pure `properties` chain counts, as in the SDK (`x-mcp-header`).
    """
    out: dict[str, tuple[str, ...]] = {}
    stack: list[tuple[tuple[str, ...], Any]] = [((), input_schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if path and isinstance(token, str):
            out[MCP_PARAM_PREFIX + token.lower()] = path
        props = node.get("properties")
        if isinstance(props, dict) and len(path) < 16:
            stack.extend(((*path, k), v) for k, v in props.items())
    return out


def _render_scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


_CANONICAL_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def _header_matches(value: Any, rendered: str, decoded: str | None) -> bool:
    """As the SDK server compares: an integral number also matches its canonical decimal
    spellings ("10" and "10.0" both mirror 10 or 10.0; the SDK client renders 10.0 as "10.0")."""
    if decoded is None:
        return False
    if (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) \
            and not isinstance(value, bool) and _CANONICAL_DECIMAL.fullmatch(decoded):
        whole, _, fraction = decoded.partition(".")
        return not fraction.strip("0") and len(whole) < 4000 and int(whole) == int(value)
    return decoded == rendered


def check_param_headers(fields: list[tuple[str, str]], msg: Message,
                        header_map: dict[str, tuple[str, ...]] | None) -> McpParseError | None:
    """Every Mcp-Param-* header must mirror its argument; unknown schema + headers = refuse."""
    present = {n.lower(): v for n, v in fields if n.lower().startswith(MCP_PARAM_PREFIX)}
    if header_map is None:
        if present:
            return McpParseError(HEADER_MISMATCH, "Mcp-Param-* headers for a tool whose schema the gateway "
                                 "has not seen; list tools first", msg.id)
        return None
    for key in present:
        if key not in header_map:
            return McpParseError(HEADER_MISMATCH, f"{key} is not declared by the tool's schema", msg.id)
    for key, path in header_map.items():
        node: Any = msg.arguments
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        rendered = _render_scalar(node) if node is not None else None
        raw = present.get(key)
        if rendered is None:
            if raw is not None:
                return McpParseError(HEADER_MISMATCH, f"{key} header without a matching argument", msg.id)
            continue
        if raw is None:
            # The client omitted a header its argument requires; the upstream will refuse it.
            continue
        if not _header_matches(node, rendered, decode_header_value(raw)):
            return McpParseError(HEADER_MISMATCH, f"{key} header does not match the body", msg.id)
    return None


# --- Server-Sent Events --------------------------------------------------------

MAX_SSE_EVENT = 8 * 1024 * 1024


@dataclass
class SSEEvent:
    """One dispatched SSE event. `raw` holds its exact bytes (incl. the blank line)
    so an unchanged event is forwarded byte for byte."""

    raw: bytes = b""
    event: str | None = None
    data: str | None = None          # None when the block had no data field
    id: str | None = None
    retry: str | None = None
    # the block had lines encode() does not reproduce: comments, unknown fields, a retry
    # that is not digits, an id holding NUL (a client ignores them; a checked stream drops them)
    extra: bool = False

    @property
    def type(self) -> str:
        return self.event or "message"

    def encode(self) -> bytes:
        """Serialise with LF line endings (used only when the event was changed)."""
        out: list[str] = []
        if self.event is not None:
            out.append(f"event: {self.event}")
        if self.id is not None:
            out.append(f"id: {self.id}")
        if self.retry is not None:
            out.append(f"retry: {self.retry}")
        if self.data is not None:
            out.extend(f"data: {line}" for line in self.data.split("\n"))
        return ("\n".join(out) + "\n\n").encode("utf-8")


class SSEParser:
    """Incremental text/event-stream parser that survives any chunk boundary.

    feed() returns the events completed by this chunk; feed(b"", final=True) at the
    end returns a trailing unterminated block, if any (kept raw so nothing is lost).
    """

    def __init__(self, max_event: int = MAX_SSE_EVENT):
        self._buf = bytearray()
        self._pos = 0             # scan position in _buf for the current event
        self._cur = SSEEvent()
        self._data: list[str] = []
        self._start = 0           # start of the current event in _buf
        self._max = max_event
        self._first_line = True   # a BOM may start the stream (WHATWG), nowhere else
        self._scan = 0            # _buf[_pos:_scan] holds no CR or LF (resume the search there)
        self._skip_lf = False     # the last read ended in CR: an LF first in the next is its pair
        self._stray_lf = False    # the current block starts with such an LF (not a blank line)

    @property
    def pending(self) -> bool:
        """Part of an event is buffered (the next event completed will hold earlier bytes)."""
        return len(self._buf) > self._start

    def feed(self, chunk: bytes, final: bool = False) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        while True:
            line_end, next_pos = self._find_eol(final)
            if line_end < 0:
                break
            line = bytes(self._buf[self._pos:line_end])
            self._pos = next_pos
            if not line:
                self._first_line = False
                ev = self._dispatch()
                if ev is not None:
                    events.append(ev)
                continue
            self._field(line)
        if self._pos - self._start > self._max or len(self._buf) - self._start > self._max:
            raise McpParseError(PARSE_ERROR, f"SSE event larger than {self._max} bytes")
        if final and self._stray_lf and len(self._buf) - self._start == 1:
            return events  # the LF of the stream's last CRLF: its CR already ended the line
        if final and self._start < len(self._buf):
            # unterminated last block: dispatch what it had
            if self._pos < len(self._buf):
                self._field(bytes(self._buf[self._pos:]))
                self._pos = len(self._buf)
            ev = self._dispatch()
            if ev is not None:
                events.append(ev)
        return events

    def _find_eol(self, final: bool) -> tuple[int, int]:
        buf, i = self._buf, self._pos
        if self._skip_lf and i < len(buf):
            # a CRLF split across reads: the CR already ended the line (WHATWG), so a CR-only
            # stream is never held back waiting for a byte that may not come
            self._skip_lf = False
            if buf[i] == 0x0A:
                self._stray_lf = i == self._start
                i = self._pos = i + 1
        start = max(i, self._scan)
        n_idx = buf.find(b"\n", start)
        # look for CR only before the next LF: a full-buffer scan per line is quadratic
        r_idx = buf.find(b"\r", start, n_idx if n_idx >= 0 else len(buf))
        if r_idx >= 0:
            if r_idx + 1 < len(buf):
                return r_idx, r_idx + (2 if buf[r_idx + 1] == 0x0A else 1)
            self._skip_lf = not final
            return r_idx, r_idx + 1
        if n_idx >= 0:
            return n_idx, n_idx + 1
        self._scan = len(buf)      # a long line arriving in many reads is scanned once
        return -1, -1

    def _field(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise McpParseError(PARSE_ERROR, "SSE stream is not valid UTF-8") from None
        if self._first_line:
            self._first_line = False
            text = text.removeprefix("\ufeff")
        if text.startswith(":"):
            self._cur.extra = True
            return
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._cur.event = value
        elif name == "id" and "\x00" not in value:
            self._cur.id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._cur.retry = value
        else:
            self._cur.extra = True

    def _dispatch(self) -> SSEEvent | None:
        ev = self._cur
        ev.raw = bytes(self._buf[self._start:self._pos])
        if len(ev.raw) > self._max:
            # also when the whole event arrived in one read: the limit must not depend on chunking
            raise McpParseError(PARSE_ERROR, f"SSE event larger than {self._max} bytes")
        if self._data:
            ev.data = "\n".join(self._data)
        self._cur, self._data = SSEEvent(), []
        # drop consumed bytes so the buffer stays bounded by one event
        del self._buf[:self._pos]
        self._pos = self._start = self._scan = 0
        self._stray_lf = False
        if not ev.raw.strip(b"\r\n"):
            return None if not ev.raw else SSEEvent(raw=ev.raw)  # keep blank keep-alive bytes
        return ev


def iter_sse_messages(ev: SSEEvent) -> Iterator[Any]:
    """JSON-RPC payload(s) of a `message` event (data may hold one message or a batch)."""
    if ev.data is None or ev.type != "message" or not ev.data.strip():
        return
    obj = strict_loads(ev.data)
    if isinstance(obj, list):
        yield from obj
    else:
        yield obj


def id_key(msg_id: Any) -> str:
    """A JSON-RPC id as a dictionary key that keeps its type: 7 and "7" are different
    requests (a string id must never pick up the transforms of a number id)."""
    return f"{type(msg_id).__name__}:{msg_id}"
