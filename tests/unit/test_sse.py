"""addons/core/mcpwire.py SSEParser: an incremental text/event-stream parser that must give the same
events and the same raw bytes for every way the transport splits the stream.

The MCP SDK client's own SSE decoder (httpx2._sse) is the reference for what a client sees.
"""
from __future__ import annotations


import pytest
from httpx2._sse import _SSEParser as ClientSSEParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.core import mcpwire
from addons.core.mcpwire import McpParseError, SSEEvent, SSEParser, iter_sse_messages
from tests.fuzzing import examples


def stream(eol: str) -> bytes:
    lines = [
        ": comment at the start",
        "retry: 3000",
        "",
        "id: 1",
        "event: message",
        'data: {"jsonrpc":"2.0","id":1,"result":{}}',
        "",
        "data: line one",
        "data:line two",
        "data",
        "id: é2",
        "",
        ": keep-alive",
        "",
        "event: endpoint",
        "data: /messages/?session_id=abc",
        "",
        "id",
        "data: Zürich \u2028 ok",
        "",
    ]
    return eol.join(lines).encode("utf-8") + eol.encode()


EOLS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def summary(events: list[SSEEvent]) -> list[tuple]:
    return [(e.event, e.data, e.id, e.retry) for e in events]


EXPECTED = [
    (None, None, None, "3000"),
    ("message", '{"jsonrpc":"2.0","id":1,"result":{}}', "1", None),
    (None, "line one\nline two\n", "é2", None),
    (None, None, None, None),                       # comment-only block
    ("endpoint", "/messages/?session_id=abc", None, None),
    (None, "Zürich \u2028 ok", "", None),
]


def same_bytes(events: list[SSEEvent], data: bytes) -> bool:
    """The raw bytes of the events are the stream's, except the LF of a final CRLF that
    arrived in a read of its own: the CR before it already ended the line (and was sent)."""
    out = b"".join(e.raw for e in events)
    return out == data or (data.endswith(b"\r\n") and out == data[:-1])


def feed_all(chunks: list[bytes], **kw) -> list[SSEEvent]:
    p = SSEParser(**kw)
    out: list[SSEEvent] = []
    for c in chunks:
        out += p.feed(c)
    out += p.feed(b"", final=True)
    return out


@pytest.mark.parametrize("eol", EOLS)
def test_whole_stream(eol):
    data = stream(EOLS[eol])
    events = feed_all([data])
    assert summary(events) == EXPECTED
    assert b"".join(e.raw for e in events) == data
    assert events[1].type == "message" and events[2].type == "message" and events[4].type == "endpoint"


@pytest.mark.parametrize("eol", EOLS)
def test_every_two_way_split(eol):
    data = stream(EOLS[eol])
    for i in range(len(data) + 1):
        events = feed_all([data[:i], data[i:]])
        assert summary(events) == EXPECTED, i
        assert same_bytes(events, data), i


@pytest.mark.parametrize("eol", EOLS)
def test_every_three_way_split(eol):
    data = stream(EOLS[eol])
    n = len(data)
    for i in range(n + 1):
        for j in range(i, n + 1):
            events = feed_all([data[:i], data[i:j], data[j:]])
            assert summary(events) == EXPECTED, (i, j)
            assert same_bytes(events, data), (i, j)


def test_byte_by_byte_with_mixed_line_endings():
    data = b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\rdata: d\r\r"
    events = feed_all([bytes([b]) for b in data])
    assert summary(events) == [(None, "a\nb\nc", None, None), ("x", "d", None, None)]
    assert b"".join(e.raw for e in events) == data


def test_events_are_returned_as_soon_as_complete():
    p = SSEParser()
    assert p.feed(b"data: 1\n") == []
    ev = p.feed(b"\ndata: 2")
    assert [e.data for e in ev] == ["1"]
    # a trailing CR ends the line at once (a CR-only stream is never held back); an LF
    # arriving next is the second half of that CRLF, not a blank line
    assert [e.data for e in p.feed(b"\n\r")] == ["2"]
    assert p.feed(b"\n") == [] and p.feed(b"data: 3\r") == []
    assert [e.data for e in p.feed(b"\r")] == ["3"]


def test_cr_only_stream_byte_by_byte_dispatches_each_event_on_its_last_byte():
    data = b"data: a\r\rid: 7\revent: message\rdata: b\r\r"
    p, got = SSEParser(), []
    for i in range(len(data)):
        evs = p.feed(data[i:i + 1])
        got += [(i, e.data, e.id) for e in evs]
    assert got == [(8, "a", None), (len(data) - 1, "b", "7")]


def test_extra_lines_are_flagged_for_a_checked_stream():
    evs = feed_all([b": c\ndata: x\n\nretry: soon\ndata: y\n\nfoo: bar\ndata: z\n\nid: 1\nretry: 5\ndata: w\n\n"])
    assert [(e.data, e.extra, e.retry) for e in evs] == [("x", True, None), ("y", True, None), ("z", True, None),
                                                         ("w", False, "5")]


def test_long_line_in_many_reads_is_scanned_once():
    p = SSEParser()
    assert p.feed(b"data: ") == []
    for _ in range(2000):
        assert p.feed(b"x" * 1000) == []
    assert p._scan == 2_000_006
    assert [len(e.data) for e in p.feed(b"\n\n")] == [2_000_000]


def test_final_unterminated_block_kept():
    events = feed_all([b"data: a\n\ndata: b"])
    assert summary(events) == [(None, "a", None, None), (None, "b", None, None)]
    assert b"".join(e.raw for e in events) == b"data: a\n\ndata: b"
    events = feed_all([b"data: a\n\nevent: x\ndata: b\r"])
    assert summary(events)[1] == ("x", "b", None, None)
    assert events[1].raw == b"event: x\ndata: b\r"
    events = feed_all([b": only a comment"])
    assert summary(events) == [(None, None, None, None)] and events[0].raw == b": only a comment"
    assert feed_all([b""]) == []


def test_blank_lines_are_kept_as_raw_keepalives():
    events = feed_all([b"\n\n\r\n"])
    assert all(e.data is None and e.event is None for e in events)
    assert b"".join(e.raw for e in events) == b"\n\n\r\n"


def test_field_parsing_details():
    ev = feed_all([b"data:  two spaces\nevent:\nid: a\x00b\nunknown: x\nretry\n\n"])[0]
    assert ev.data == " two spaces"       # only one leading space is removed
    assert ev.event == "" and ev.type == "message"
    assert ev.id is None                   # ids with NUL are ignored (WHATWG)
    ev = feed_all([b"data\n\n"])[0]
    assert ev.data == ""
    ev = feed_all([b"data:\ndata:\n\n"])[0]
    assert ev.data == "\n"


def test_bom_only_at_stream_start():
    ev = feed_all([b"\xef\xbb\xbfdata: x\n\n"])
    assert ev[0].data == "x" and ev[0].raw.startswith(b"\xef\xbb\xbf")
    # anywhere else a BOM is part of the field name (so the field is ignored), as in clients
    ev = feed_all([b": c\n\xef\xbb\xbfdata: x\n\n"])
    assert ev[0].data is None
    ev = feed_all([b"\n\xef\xbb\xbfdata: x\n\n"])
    assert all(e.data is None for e in ev)


def test_invalid_utf8_refused():
    for bad in (b"data: \xff\n\n", b"data: \xc3\n\n", b"event: \xed\xa0\x80\ndata: x\n\n"):
        with pytest.raises(McpParseError) as ei:
            feed_all([bad])
        assert ei.value.code == mcpwire.PARSE_ERROR
    # a multi-byte character split across chunks is fine
    data = "data: é€😀\n\n".encode()
    for i in range(len(data)):
        assert feed_all([data[:i], data[i:]])[0].data == "é€😀"


def test_max_event_size():
    small = b"data: " + b"x" * 80 + b"\n\n"          # 88 bytes
    assert feed_all([small], max_event=100)[0].data == "x" * 80
    assert feed_all([small * 50], max_event=100)[0].data == "x" * 80    # many small events are fine
    big = b"data: " + b"x" * 200 + b"\n\n"
    # refused however the transport happens to split it
    for chunks in ([big], [big[:50], big[50:]], [bytes([b]) for b in big], [big[:150], big[150:]]):
        with pytest.raises(McpParseError, match="larger"):
            feed_all(chunks, max_event=100)
    # an endless line without a newline is refused once it passes the limit (bounded memory)
    p = SSEParser(max_event=100)
    p.feed(b"data: " + b"y" * 50)
    with pytest.raises(McpParseError):
        p.feed(b"y" * 60)


def test_buffer_stays_bounded_by_one_event():
    p = SSEParser()
    for i in range(2000):
        p.feed(b"data: %d\n\n" % i)
    assert len(p._buf) == 0


def test_encode_round_trips_through_the_parser():
    ev = SSEEvent(event="message", id="7", retry="100", data='{"a":1}\nsecond')
    again = feed_all([ev.encode()])[0]
    assert (again.event, again.id, again.retry, again.data) == ("message", "7", "100", '{"a":1}\nsecond')
    assert SSEEvent(data="").encode() == b"data: \n\n"


def test_iter_sse_messages():
    ev = feed_all([b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'])[0]
    assert list(iter_sse_messages(ev)) == [{"jsonrpc": "2.0", "id": 1, "result": {}}]
    ev = feed_all([b'data: [{"a":1},{"b":2}]\n\n'])[0]
    assert list(iter_sse_messages(ev)) == [{"a": 1}, {"b": 2}]
    for raw in (b"event: endpoint\ndata: /x\n\n", b"id: 1\ndata:\n\n", b": c\n\n"):
        assert list(iter_sse_messages(feed_all([raw])[0])) == []
    with pytest.raises(McpParseError):
        list(iter_sse_messages(feed_all([b'data: {"a":1,"a":2}\n\n'])[0]))


# --- property: random events, random chunking ---------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)


@st.composite
def sse_streams(draw):
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    n = draw(st.integers(1, 6))
    lines: list[str] = []
    expected = []
    for _ in range(n):
        if draw(st.booleans()):
            lines.append(":" + draw(text))
        event = draw(st.one_of(st.none(), st.from_regex(r"[a-z]{1,8}", fullmatch=True)))
        if event is not None:
            lines.append(f"event: {event}")
        if draw(st.booleans()):
            lines.append(f"id: {draw(st.from_regex(r'[a-z0-9]{0,6}', fullmatch=True))}")
        data_lines = draw(st.lists(text, min_size=1, max_size=3))
        lines += [f"data: {d}" for d in data_lines]
        lines.append("")
        expected.append((event or "message", "\n".join(data_lines)))
    data = eol.join(lines).encode("utf-8") + eol.encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return data, chunks, expected


def client_events(data: bytes) -> list[tuple[str, str]]:
    p = ClientSSEParser()
    evs = list(p.decode(data.decode("utf-8"))) + list(p.flush())
    return [(e.event, e.data) for e in evs]


@settings(max_examples=examples(400), suppress_health_check=[HealthCheck.too_slow])
@given(sse_streams())
def test_property_any_chunking_same_events_and_bytes(case):
    data, chunks, expected = case
    events = feed_all(chunks)
    assert same_bytes(events, data)
    got = [(e.type, e.data) for e in events if e.data is not None]
    assert got == expected
    # the gateway sees exactly the events the SDK client will dispatch
    assert got == client_events(data)


@settings(max_examples=examples(300))
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_property_arbitrary_bytes_never_crash_and_keep_bytes(data, cuts):
    cuts = sorted(c for c in cuts if c <= len(data))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    try:
        events = feed_all(chunks)
    except McpParseError:
        with pytest.raises(McpParseError):
            feed_all([data])          # refusal does not depend on the chunking
        return
    assert same_bytes(events, data)
    assert summary(events) == summary(feed_all([data]))
