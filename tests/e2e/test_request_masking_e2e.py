"""Request-side masking end to end: a held `launch_container` with a password in `env`.
The approval CLI, the admin API, mitmweb's default view of the request body, the audit store
and `replay` show it masked; the upstream receives it as sent once approved."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time

import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT
from tests.e2e.test_approval_browser import ARTIFACTS, MitmwebApi, chromium, open_held_flow  # noqa: F401
from tests.e2e.test_approval_e2e import POLICY, cli, launches, pending


def store_text(gw) -> str:
    """Every byte of the store (journals and segments) plus a full SQL dump of it."""
    raw = "\n".join(p.read_bytes().decode("latin-1") for p in gw.recordings.rglob("*") if p.is_file())
    from addons.core.audit.store import Store
    st = Store(gw.recordings)
    dump = "\n".join(r[0] for r in st.query("SELECT CAST(to_json(e) AS VARCHAR) FROM events e").fetchall())
    st.close()
    return raw + dump


async def test_held_call_with_env_password_is_masked_everywhere_but_upstream(demo_server, rules_dir, gateway):
    password = "Pw-" + secrets.token_urlsafe(18)
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    # the caller also pastes the gateway's service credential into a harmless-looking field
    args = {"image": "postgres:17", "env": {"DB_PASSWORD": password, "PGDATA": "/data"}, "note": demo.token}
    async with connect(gw.mcp_url(), dev) as c, MitmwebApi(gw) as web:
        call = asyncio.create_task(c.call_tool("launch_container", args))
        items = await pending(gw, approver)
        # admin API
        shown = json.dumps(items)
        assert password not in shown and "[MASKED:env]" in shown and "postgres:17" in shown
        # CLI
        listed = cli(gw, "approvals", "--token", approver)
        assert listed.returncode == 0 and password not in listed.stdout and "postgres:17" in listed.stdout
        # mitmweb: the default ("auto") view of the held request body is the masked copy
        held = await web.held_flow()
        assert demo.token not in held["comment"] and "[redacted:known-secret]" in held["comment"]
        assert demo.token not in shown and demo.token not in listed.stdout
        auto = (await web.http.get(f"/flows/{held['id']}/request/content/auto.json")).json()
        text = json.dumps(auto)
        assert password not in text and "[MASKED:env]" in text and "postgres:17" in text, text[:500]
        assert demo.token not in text
        assert auto.get("view_name") == "Bastion masked"
        # ... the Raw view shows what the upstream will receive (documented)
        raw = json.dumps((await web.http.get(f"/flows/{held['id']}/request/content/raw.json")).json())
        assert password in raw
        assert launches(demo) == []
        ok = cli(gw, "approve", items[0]["id"], "--token", approver)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        result = await asyncio.wait_for(call, 20)
    assert not result.is_error
    # the upstream got the real value
    assert launches(demo)[0]["env"] == args["env"]
    assert demo.token in demo.received_bodies()      # the caller's choice: forwarded as sent
    # the store: masked in the request row, a mask row says so; also after rolling to Parquet
    time.sleep(0.3)
    assert password not in store_text(gw)
    gw.proc.stop()
    text = store_text(gw)
    assert password not in text and "[MASKED:env]" in text and demo.token not in text
    from addons.core.audit.store import Store
    st = Store(gw.recordings)
    rows = st.query("SELECT path, type FROM masks WHERE mask_profile = 'requests'").fetchall()
    assert ("$.params.arguments.env.DB_PASSWORD", "env") in rows
    sid = st.query("SELECT session_id FROM messages WHERE tool = 'launch_container' LIMIT 1").fetchone()[0]
    st.close()
    # replay / export / sessions read the store
    for cmd in (["replay", sid], ["sessions"], ["export", sid, "-o", str(gw.recordings.parent / "s.mitm")]):
        r = cli_store(gw, *cmd)
        assert r.returncode == 0 and password not in r.stdout, r.stderr
    assert password.encode() not in (gw.recordings.parent / "s.mitm").read_bytes()
    # the store the gateway wrote verifies (chained journal lines, signed segment)
    v = cli_store(gw, "verify", "--key", str(ROOT / ".secrets" / "audit-signing-key.pem"))
    assert v.returncode == 0 and v.stdout.startswith("OK: 1 instance(s), 1 segment(s)"), v.stdout + v.stderr
    seg = next(gw.recordings.rglob("seg-*.parquet"))
    seg.write_bytes(seg.read_bytes() + b"\0")
    v = cli_store(gw, "verify", "--key", str(ROOT / ".secrets" / "audit-signing-key.pem"))
    assert v.returncode == 1 and f"BROKEN {seg}: segment:" in v.stdout


def cli_store(gw, *args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "addons.cli", *args, "--store", str(gw.recordings)],
                          capture_output=True, text=True, timeout=60)


async def test_ordinary_arguments_are_stored_as_sent(stack):
    """Legitimate use: arguments that are not secrets stay readable in the audit store."""
    demo, gw = stack("json")
    async with connect(gw.mcp_url(), gw.token()) as c:
        await c.call_tool("get_customer", {"id": 42})
        await c.call_tool("echo_text", {"text": "quarterly report for alice@example.com"})
    gw.proc.stop()
    from addons.core.audit.store import Store
    st = Store(gw.recordings)
    got = dict(st.query("SELECT tool, CAST(arguments AS VARCHAR) FROM messages WHERE kind = 'request' "
                        "AND tool IS NOT NULL").fetchall())
    assert json.loads(got["get_customer"]) == {"id": 42}
    assert json.loads(got["echo_text"]) == {"text": "quarterly report for alice@example.com"}


async def test_mitmweb_request_tab_shows_masked_arguments(chromium, demo_server, rules_dir, gateway):  # noqa: F811
    from playwright.async_api import async_playwright

    password = "Pw-" + secrets.token_urlsafe(18)
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    ARTIFACTS.mkdir(exist_ok=True)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7",
                                                                    "env": {"REDIS_PASSWORD": password}}))
        async with async_playwright() as p:
            browser, page = await open_held_flow(p, chromium, gw)
            await page.get_by_text("Request", exact=True).first.click()
            await page.get_by_text("[MASKED:env]", exact=False).first.wait_for(timeout=10000)
            body = await page.locator("body").inner_text()
            assert password not in body and "redis:7" in body
            await page.screenshot(path=str(ARTIFACTS / "approval-masked-request.png"))
            if os.environ.get("README_UPDATE") == "1":       # docs screenshots only on request: a test run
                shutil.copy(ARTIFACTS / "approval-masked-request.png", ROOT / "docs" / "img" / "approval-masked-request.png")   # never edits the checkout
            await browser.close()
        call.cancel()
        with pytest.raises(BaseException):
            await call
    assert launches(demo) == []
