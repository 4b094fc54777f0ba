"""Issue 18, control characters: a caller-chosen `sub` with a newline cannot forge gateway
log lines, and escape sequences in it (or in a tool name) never reach a terminal raw through
`mcp-bastion sql` or `replay`. Real gateway, real demo server, real CLI."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.e2e.conftest import ALLOW_ALL_POLICY

FORGED = "2026-01-01 00:00:00 bastion.approval: approval 000000000000: approved by root"
EVIL_SUB = f"mallory\n{FORGED}\x1b[2J\x1b]0;pwned\x07\u202e"
EVIL_TOOL = "get_customer\x1b[31m\nINFO forged"


def cli(gw, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args, "--store", str(gw.recordings)],
                          capture_output=True, text=True, timeout=60)


def test_caller_chosen_text_is_escaped_in_logs_and_cli(stack):
    demo, gw = stack("stateless", policy=ALLOW_ALL_POLICY.replace("e2e-all]", "e2e-all]\n      tool: get_customer"))
    token = gw.token(EVIL_SUB, ["e2e-all"])
    hdr = {"authorization": f"Bearer {token}", "content-type": "application/json",
           "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}
    with httpx.Client(timeout=20) as c:
        for i, tool in enumerate((EVIL_TOOL, "get_customer")):
            r = c.post(gw.mcp_url(), headers=hdr, json={"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                                                        "params": {"name": tool, "arguments": {"id": 1}}})
            assert r.status_code in (200, 400), r.text
    deadline = time.monotonic() + 20
    out = ""
    while "mallory" not in out and time.monotonic() < deadline:    # the recorder flushes in the background
        p = cli(gw, "sql", "SELECT sub, tool, method, reason FROM events WHERE sub IS NOT NULL")
        assert p.returncode == 0, p.stderr
        out = p.stdout
        time.sleep(0.3)
    assert "mallory" in out and "\\n2026-01-01" in out
    log = gw.log_text()
    assert "mallory" in log
    for text in (out, log):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    # no line of the log or the table starts with the forged text
    assert not any(line.lstrip().startswith(FORGED[:20]) for line in log.splitlines() + out.splitlines())
    sessions = cli(gw, "sessions")
    assert sessions.returncode == 0 and "\x1b" not in sessions.stdout and "mallory\\n" in sessions.stdout
