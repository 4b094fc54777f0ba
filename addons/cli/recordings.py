"""`mcp-bastion` commands of addons.hooks.recorder (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from mitmproxy import http
from addons.core import mcpwire
from addons.core.audit.store import (
    Store,
)
from addons.cli import add_gateway_arg
from addons.core.textsafe import esc


def add_cli(sub) -> None:
    p = sub.add_parser("sql", help="run SQL over the audit store (works while gateways are recording)",
                       description="Views: events, sessions, messages, decisions, refusals, approvals, masks, "
                                   "exchanges. See docs/audit.md.")
    p.add_argument("query", help="SQL statement, e.g. \"SELECT * FROM sessions\"")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _store_arg(p)
    p.set_defaults(func=cli_sql)

    p = sub.add_parser("sessions", help="list recorded sessions")
    p.add_argument("--limit", type=int, default=50)
    _store_arg(p)
    p.set_defaults(func=cli_sessions)

    p = sub.add_parser("replay", help="print a readable timeline of a recorded session")
    p.add_argument("session", help="session id (or a unique prefix)")
    p.add_argument("--width", type=int, default=160, help="truncate payloads to this many characters")
    p.add_argument("--web", action="store_true", help="open the session's (redacted) flows in mitmweb instead")
    _store_arg(p)
    p.set_defaults(func=cli_replay)

    p = sub.add_parser("resend", help="re-send a recorded session's requests through a gateway to a TEST connection",
                       description="Opt-in client replay. Only connections marked `options: {test: true}` in "
                                   "connections.yaml are accepted as targets; requests go through the gateway, so "
                                   "identity, policy, masking and recording apply again.")
    p.add_argument("session", help="session id (or a unique prefix)")
    p.add_argument("--connection", required=True, help="target connection (must have options: {test: true})")
    add_gateway_arg(p)
    p.add_argument("--token", default=os.environ.get("BASTION_TOKEN"), help="bearer token (default: $BASTION_TOKEN)")
    _store_arg(p)
    p.set_defaults(func=cli_resend)

    p = sub.add_parser("export", help="a session as a (redacted) mitmproxy flow file, or the store as JSON lines "
                                      "/ OCSF for a SIEM",
                       description="--format mitm (default): one session as a flow file for mitmweb -r. "
                                   "--format jsonl | ocsf: every event of the store (or of one session) as JSON "
                                   "lines, raw or as OCSF API Activity (class 6003) events.")
    p.add_argument("session", nargs="?", help="session id (or a unique prefix); optional for jsonl / ocsf")
    p.add_argument("-o", "--output", help="output file (mitm: required; jsonl / ocsf: default stdout)")
    p.add_argument("--format", choices=("mitm", "jsonl", "ocsf"), default="mitm")
    _store_arg(p)
    p.set_defaults(func=cli_export)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("BASTION_RECORDINGS", "recordings"),
                   help="audit store directory (default: $BASTION_RECORDINGS or recordings)")


def _open(args) -> Store | None:
    if not Path(args.store).is_dir():
        print(f"error: no audit store at {args.store}", file=sys.stderr)
        return None
    st = Store(args.store)
    return st


def _open_session(args) -> tuple[Store, str] | int:
    """The store and the session args.session names (a unique prefix), or the exit code."""
    st = _open(args)
    if st is None:
        return 2
    sid = resolve_session(st, args.session)
    return 1 if sid is None else (st, sid)


def _report(st: Store) -> None:
    for p in st.problems:
        print(f"warning: {p} (skipped)", file=sys.stderr)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def render(columns: list[str], rows: list[tuple], fmt: str, max_width: int = 60) -> str:
    # recorded values are caller-chosen: no raw control or escape characters reach a terminal
    if fmt == "json":
        return esc(json.dumps([dict(zip(columns, r)) for r in rows], ensure_ascii=False, default=str, indent=1),
                   json_text=True) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([esc(c) for c in columns])
        w.writerows([[esc(_cell(v)) for v in r] for r in rows])
        return buf.getvalue()
    columns = [esc(c) for c in columns]
    cells = [[esc(_cell(v)) for v in r] for r in rows]
    cells = [[c if len(c) <= max_width else c[:max_width - 1] + "…" for c in r] for r in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(columns), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def cli_sql(args) -> int:
    import duckdb
    st = _open(args)
    if st is None:
        return 2
    try:
        cur = st.query(args.query)
        columns = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if cur.description else []
    except duckdb.Error as e:
        _report(st)
        print(f"error: {e}", file=sys.stderr)
        return 1
    _report(st)
    sys.stdout.write(render(columns, rows, args.format))
    return 0


def cli_sessions(args) -> int:
    st = _open(args)
    if st is None:
        return 2
    cur = st.query("SELECT session_id, started, ended, subs, connections, requests, tool_calls, refusals, "
                   "denied, approvals, masked FROM sessions ORDER BY started DESC LIMIT ?", [args.limit])
    cols = [d[0] for d in cur.description]
    rows = [tuple(_short_time(v) for v in r) for r in cur.fetchall()]
    _report(st)
    sys.stdout.write(render(cols, rows, "table", max_width=48))
    return 0


def _short_time(v: Any) -> Any:
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return v


def resolve_session(st: Store, prefix: str) -> str | None:
    ids = [r[0] for r in st.query("SELECT DISTINCT session_id FROM events WHERE session_id = ? "
                                  "OR starts_with(session_id, ?)", [prefix, prefix]).fetchall()]
    if prefix in ids:
        return prefix
    if len(ids) == 1:
        return ids[0]
    if not ids:
        print(f"error: no session {prefix!r}", file=sys.stderr)
    else:
        print(f"error: {prefix!r} matches {len(ids)} sessions; give more characters", file=sys.stderr)
    return None


def session_events(st: Store, session: str) -> list[dict]:
    return _event_dicts(st.query("SELECT * FROM events WHERE session_id = ? ORDER BY ts, instance, seq", [session]))


def store_events(st: Store) -> list[dict]:
    return _event_dicts(st.query("SELECT * FROM events ORDER BY ts, instance, seq"))


def _event_dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    out = []
    for r in cur.fetchall():
        d = dict(zip(cols, r))
        for k in ("params", "result", "error", "approval", "req_headers", "resp_headers"):
            if isinstance(d.get(k), str):
                try:
                    d[k] = json.loads(d[k])
                except ValueError:
                    pass
        out.append(d)
    return out


def _clip(v: Any, width: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)
    return s if len(s) <= width else s[:width - 1] + "…"


def format_timeline(events: list[dict], width: int = 160) -> str:
    """Readable replay of one session (pure)."""
    if not events:
        return "(no events)\n"
    first = events[0]
    t0 = first["ts"]
    subs = sorted({e["sub"] for e in events if e.get("sub")})
    roles = sorted({r for e in events for r in (e.get("roles") or [])})
    clients = sorted({e["client_id"] for e in events if e.get("client_id")})
    out = [
        f"session    {first['session_id']}{'  (synthetic: stateless client)' if first.get('session_synthetic') else ''}",
        f"identity   {', '.join(subs) or '(unauthenticated)'}  roles={','.join(roles) or '-'}"
        f"  client={','.join(clients) or '-'}",
        f"connection {', '.join(sorted({e['connection'] for e in events if e.get('connection')})) or '-'}"
        f"   instance(s) {', '.join(sorted({e['instance'] for e in events if e.get('instance')}))}",
        f"started    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0))}.{int(t0 % 1 * 1000):03d} UTC"
        f"   events {len(events)}",
        "",
    ]
    for e in events:
        rel = f"+{e['ts'] - t0:9.3f}s"
        kind = e["kind"]
        what = " ".join(x for x in (e.get("method"), e.get("target")) if x)
        lat = f"  ({e['latency_ms']:.1f} ms)" if e.get("latency_ms") is not None else ""
        if kind in ("request", "notification") and e["direction"] == "c2s":
            args = (e.get("params") or {}).get("arguments") if isinstance(e.get("params"), dict) else None
            line = f"→ {kind:<12} {what}" + (f" id={e['rpc_id']}" if e.get("rpc_id") else "")
            if args:
                line += f"  args {_clip(args, width)}"
        elif kind in ("request", "notification"):
            line = f"⇠ server {kind:<5} {e.get('method') or ''}" + (
                f"  {_clip(e['params'], width)}" if e.get("params") else "")
        elif kind == "response":
            line = f"← result       {what} id={e.get('rpc_id')}{lat}" + (
                f"  {_clip(e['result'], width)}" if e.get("result") is not None else "")
            if e["direction"] == "c2s":
                line = "→ client result " + line[16:]
        elif kind == "error":
            err = e.get("error") or {}
            line = f"← error        {what} id={e.get('rpc_id')}{lat}  {err.get('code', e.get('error_code'))}: " \
                   f"{_clip(err.get('message', ''), width)}"
        elif kind == "decision":
            line = f"  decision     {(e.get('action') or '').upper()} {what}" + (
                f"  rule={e['rule']}" if e.get("rule") else "  (default)") + (
                f"  reason: {e['reason']}" if e.get("reason") else "")
        elif kind == "approval":
            line = f"  approval     {e.get('approval_outcome') or '?'} {what}" + (
                f" by {e['approver']}" if e.get("approver") else "") + lat
        elif kind == "refusal":
            line = f"✗ refused      {e.get('status') or ''} {e.get('reason') or ''}" + (
                f"  rule={e['rule']}" if e.get("rule") else "")
        elif kind == "mask":
            line = f"  masked       {e.get('mask_type')} ×{e.get('mask_count')} at {e.get('mask_path')}"
        elif kind == "http":
            line = f"  http         {e.get('http_method') or ''} {e.get('path') or ''} → {e.get('status') or '-'}" \
                   f"{lat}  {e.get('request_bytes') or 0}B/{e.get('response_bytes') or 0}B" + (
                       f"  {e['note']}" if e.get("note") else "")
        else:
            line = f"  {kind}"
        out.append(f"{rel}  {line}")
    return "\n".join(esc(line) for line in out) + "\n"


def cli_replay(args) -> int:
    opened = _open_session(args)
    if isinstance(opened, int):
        return opened
    st, sid = opened
    _report(st)
    if args.web:
        import shutil
        import tempfile
        fd, path = tempfile.mkstemp(prefix="bastion-replay-", suffix=".mitm")
        os.close(fd)
        n = write_flow_file(build_flows(session_events(st, sid)), path)
        st.close()
        web = shutil.which("mitmweb") or str(Path(sys.executable).parent / "mitmweb")
        port = os.environ.get("BASTION_WEB_PORT") or "8081"
        print(f"opening {n} flow(s) of session {sid} in mitmweb at http://127.0.0.1:{port}/ ({path})",
              file=sys.stderr)
        # loopback only, both the console and mitmweb's (unused) proxy listener
        os.execv(web, [web, *replay_web_args(path, port)])
    sys.stdout.write(format_timeline(session_events(st, sid), args.width))
    return 0


def replay_web_args(path: str, web_port: str) -> list[str]:
    return ["-r", path, "--set", "web_host=127.0.0.1", "--set", f"web_port={web_port}",
            "--set", "web_open_browser=false", "--listen-host", "127.0.0.1", "--mode", "regular@0"]


def build_flows(events: list[dict]) -> list[http.HTTPFlow]:
    """Rebuild one mitmproxy flow per recorded HTTP exchange (redacted, masked bodies)."""
    from mitmproxy import connection

    by_flow: dict[str, list[dict]] = {}
    for e in events:
        by_flow.setdefault(e.get("flow_id") or f"{e['instance']}:{e['seq']}", []).append(e)
    flows = []
    for fid, evs in by_flow.items():
        hx = next((e for e in evs if e["kind"] == "http"), None)
        first = evs[0]
        t_start = first["ts"]
        t_end = (hx or evs[-1])["ts"]
        c2s = [e for e in evs if e["direction"] == "c2s"]
        s2c = [e for e in evs if e["direction"] == "s2c"]
        req_body = _jsonrpc_body(c2s)
        headers = dict((hx or {}).get("req_headers") or {})
        headers.pop("content-length", None)
        req = http.Request.make((hx or {}).get("http_method") or "POST",
                                f"http://gateway{(hx or {}).get('path') or '/mcp/' + (first.get('connection') or '')}",
                                req_body, headers)
        req.timestamp_start, req.timestamp_end = t_start, t_start
        peer = (first.get("client_addr") or "127.0.0.1:0").rsplit(":", 1)
        client = connection.Client(peername=(peer[0], int(peer[1]) if peer[1].isdigit() else 0),
                                   sockname=("127.0.0.1", 0), timestamp_start=t_start)
        client.id = first.get("client_conn") or client.id
        server = connection.Server(address=(first.get("connection") or "upstream", 0))
        f = http.HTTPFlow(client, server)
        f.request = req
        if hx is not None and hx.get("status") is not None:
            rh = dict(hx.get("resp_headers") or {})
            rh.pop("content-length", None)
            rh.pop("transfer-encoding", None)
            sse = any(e.get("via") == "sse" for e in s2c)
            body = _sse_body(s2c) if sse else _jsonrpc_body(s2c)
            f.response = http.Response.make(int(hx["status"]), body, rh)
            f.response.timestamp_start, f.response.timestamp_end = t_end, t_end
        elif hx is not None and hx.get("note"):
            from mitmproxy.flow import Error
            f.error = Error(hx["note"], t_end)
        notes = []
        for e in evs:
            if e["kind"] == "decision":
                notes.append(f"decision {e.get('action')} rule={e.get('rule') or '(default)'} {e.get('reason') or ''}")
            elif e["kind"] == "approval":
                notes.append(f"approval {e.get('approval_outcome')} by {e.get('approver') or '?'}")
            elif e["kind"] == "refusal":
                notes.append(f"refused: {e.get('reason')}")
                f.marked = ":no_entry:"
            elif e["kind"] == "mask":
                notes.append(f"masked {e.get('mask_type')} x{e.get('mask_count')} at {e.get('mask_path')}")
        ident = next((e for e in evs if e.get("sub")), None)
        if ident:
            notes.insert(0, f"identity {ident['sub']} roles={','.join(ident.get('roles') or [])}")
        f.comment = "\n".join(esc(n) for n in notes)   # recorded values are caller-chosen
        f.metadata["bastion_recorded"] = {"session_id": first.get("session_id"), "instance": first.get("instance"),
                                          "flow_id": fid}
        f.live = False
        flows.append(f)
    return flows


def _rpc_id(v: str | None) -> Any:
    if v is None:
        return None
    return int(v) if re.fullmatch(r"-?\d{1,18}", v) else v


def _message(e: dict) -> dict:
    m: dict[str, Any] = {"jsonrpc": "2.0"}
    if e.get("rpc_id") is not None:
        m["id"] = _rpc_id(e["rpc_id"])
    if e["kind"] in ("request", "notification"):
        m["method"] = e.get("method")
        if e.get("params") is not None:
            m["params"] = e["params"]
    elif e["kind"] == "error":
        m["error"] = e.get("error") or {"code": e.get("error_code"), "message": "(not recorded)"}
    else:
        m["result"] = e.get("result")
    return m


def _jsonrpc_body(evs: list[dict]) -> bytes:
    msgs = [_message(e) for e in evs if e["kind"] in ("request", "notification", "response", "error")]
    if not msgs:
        return b""
    return json.dumps(msgs[0] if len(msgs) == 1 else msgs, ensure_ascii=False).encode()


def _sse_body(evs: list[dict]) -> bytes:
    return b"".join(mcpwire.SSEEvent(event="message", data=json.dumps(_message(e), ensure_ascii=False)).encode()
                    for e in evs if e["kind"] in ("request", "notification", "response", "error"))


def write_flow_file(flows: list[http.HTTPFlow], path: str) -> int:
    from mitmproxy import io as mio
    with open(path, "wb") as fh:
        w = mio.FlowWriter(fh)
        for f in flows:
            w.add(f)
    return len(flows)


def cli_export(args) -> int:
    if args.format == "mitm" and not (args.session and args.output):
        print("error: --format mitm needs a session and -o FILE", file=sys.stderr)
        return 2
    st = _open(args)
    if st is None:
        return 2
    sid = resolve_session(st, args.session) if args.session else None
    if args.session and sid is None:
        return 1
    _report(st)
    if args.format != "mitm":
        from addons.core.audit.export import export_lines
        rows = session_events(st, sid) if sid else store_events(st)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        n = 0
        try:
            for line in export_lines(rows, args.format):
                out.write(line)
                n += 1
        finally:
            if args.output:
                out.close()
        print(f"exported {n} event(s) as {args.format}", file=sys.stderr)
        return 0
    n = write_flow_file(build_flows(session_events(st, sid)), args.output)
    print(f"wrote {n} flow(s) of session {sid} to {args.output} (open with: mitmweb -r {args.output})")
    return 0


def test_connection_problem(rules_dir: str, name: str) -> str | None:
    """Why `name` may not be a resend target (None = it may). Reads only names and options,
    never credentials."""
    from addons.core.rules import RulesError, load_yaml, rules_files, to_plain
    try:
        for f in rules_files(rules_dir, "connections"):
            if not f.exists():
                continue
            conns = (to_plain(load_yaml(f)) or {}).get("connections") or {}
            if name in conns:
                opts = (conns[name] or {}).get("options") or {}
                if opts.get("test") is True:
                    return None
                return f"connection {name!r} is not marked as a test connection (options: {{test: true}} in {f})"
    except RulesError as e:
        return str(e)
    return f"no connection {name!r} in {rules_dir}"


def resend_messages(events: list[dict]) -> list[dict]:
    """The client->server messages of a session, in order, as they were sent."""
    out = []
    for e in events:
        if e.get("direction") != "c2s" or e["kind"] not in ("request", "notification"):
            continue
        if e.get("params") is None and e.get("method") not in ("ping", "notifications/initialized"):
            raise ValueError("this session was recorded without bodies (bastion_record_bodies=false)")
        out.append(_message(e))
    return out


def resend(messages: list[dict], url: str, token: str | None, transport=None, out=sys.stdout) -> int:
    """POST each message; a new Mcp-Session-Id from initialize is used for the rest."""
    import httpx
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    failures = 0
    with httpx.Client(timeout=60, transport=transport) as client:
        for m in messages:
            r = client.post(url, json=m, headers=headers)
            if r.headers.get("mcp-session-id"):
                headers["mcp-session-id"] = r.headers["mcp-session-id"]
            if m.get("method") == "initialize" and r.status_code == 200:
                version = ((_first_response(r) or {}).get("result") or {}).get("protocolVersion")
                if version:
                    headers["mcp-protocol-version"] = version
            resp = _first_response(r)
            status = "error" if r.status_code >= 400 or (resp and "error" in resp) else "ok"
            failures += status == "error"
            detail = _clip((resp or {}).get("error") or (resp or {}).get("result") or r.text, 120)
            out.write(esc(f"{m.get('method')} {m.get('params', {}).get('name', '') if isinstance(m.get('params'), dict) else ''}"
                          f" -> HTTP {r.status_code} {status} {detail}") + "\n")
    return 1 if failures else 0


def _first_response(r) -> dict | None:
    ctype = r.headers.get("content-type", "")
    try:
        if ctype.startswith("text/event-stream"):
            for ev in mcpwire.SSEParser().feed(r.content, final=True):
                for obj in mcpwire.iter_sse_messages(ev):
                    if isinstance(obj, dict) and ("result" in obj or "error" in obj):
                        return obj
            return None
        obj = r.json()
        return obj if isinstance(obj, dict) else None
    except (ValueError, mcpwire.McpParseError):
        return None


def cli_resend(args) -> int:
    problem = test_connection_problem(args.rules, args.connection)
    if problem:
        print(f"error: refusing to resend: {problem}", file=sys.stderr)
        return 2
    opened = _open_session(args)
    if isinstance(opened, int):
        return opened
    st, sid = opened
    try:
        messages = resend_messages(session_events(st, sid))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = f"{args.gateway.rstrip('/')}/mcp/{args.connection}"
    print(f"re-sending {len(messages)} message(s) of session {sid} to {url}", file=sys.stderr)
    import httpx
    try:
        return resend(messages, url, args.token)
    except httpx.HTTPError as e:
        print(f"error: gateway unreachable at {url} ({type(e).__name__}); is it running? "
              "(--gateway, $BASTION_GATEWAY or $BASTION_PORT)", file=sys.stderr)
        return 2
