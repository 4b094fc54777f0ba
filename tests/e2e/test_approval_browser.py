"""Issue 6: an approver resumes a held call in mitmweb with a real (headless) browser."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT
from tests.e2e.test_approval_e2e import POLICY, launches

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-browser.sh")], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "PYTHON": str(Path(os.sys.executable))})
    path = shutil.which("chromium")
    if r.returncode != 0 or path is None:
        pytest.skip(f"BROWSER TEST SKIPPED: chromium/playwright unavailable: {r.stderr.strip() or r.stdout.strip()}")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("BROWSER TEST SKIPPED: playwright could not be imported")
    return path


async def open_held_flow(p, chromium: str, gw):
    """Log into mitmweb as the approver (its own web_password stays on) and select the
    held /mcp/demo flow. Returns (browser, page)."""
    browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"http://127.0.0.1:{gw.web_port}/")
    await page.fill("input[name=token]", gw.web_password)
    await page.click("input[type=submit]")
    row = page.locator("tr", has_text="/mcp/demo")
    deadline = time.monotonic() + 20
    while await row.count() == 0 and time.monotonic() < deadline:
        await page.wait_for_timeout(200)
    assert await row.count() >= 1, "held flow not shown in mitmweb"
    await row.last.click()
    return browser, page


async def test_mitmweb_shows_the_held_call_and_an_identified_approver_approves(chromium, demo_server, rules_dir,
                                                                               gateway):
    from playwright.async_api import async_playwright

    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    ARTIFACTS.mkdir(exist_ok=True)
    dev_token = gw.token("dan", ["dev"])
    async with connect(gw.mcp_url(), dev_token) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))
        async with async_playwright() as p:
            browser, page = await open_held_flow(p, chromium, gw)
            await page.get_by_text("Comment", exact=True).last.click()      # the tab (first: the column)
            comment = page.get_by_text("APPROVAL", exact=False)
            await comment.first.wait_for(timeout=10000)
            text = await page.locator("body").inner_text()
            assert "dev-container-needs-approval" in text and "dan" in text and "redis:7" in text
            await page.screenshot(path=str(ARTIFACTS / "approval-held.png"))
            if os.environ.get("README_UPDATE") == "1":       # docs screenshots only on request: a test run
                shutil.copy(ARTIFACTS / "approval-held.png", ROOT / "docs" / "img" / "approval.png")   # never edits the checkout
            await page.get_by_text("Request", exact=True).first.click()
            shown = await page.locator("body").inner_text()
            assert dev_token not in shown and dev_token[-20:] not in shown  # the token was consumed
            assert not call.done() and launches(demo) == []
            # the shared web password identifies nobody: Resume alone is not an approval
            await page.get_by_text("Resume", exact=True).click()
            await asyncio.sleep(1.0)
            assert not call.done() and launches(demo) == []
            pid = text.split("APPROVAL ", 1)[1].split()[0]
            ok = subprocess.run([os.sys.executable, "-m", "addons.cli", "approve", pid, "--gateway", gw.url,
                                 "--token", gw.token("alice", ["approver"])], capture_output=True, text=True,
                                cwd=ROOT, timeout=30)
            assert ok.returncode == 0 and "approved by alice" in ok.stdout, ok.stdout + ok.stderr
            result = await asyncio.wait_for(call, 20)
            await page.wait_for_timeout(500)
            await page.screenshot(path=str(ARTIFACTS / "approval-resumed.png"))
            await browser.close()
    assert not result.is_error and result.structured_content["image"] == "redis:7"
    assert [l["image"] for l in launches(demo)] == ["redis:7"]


async def login(browser, gw):
    page = await browser.new_page(viewport={"width": 1600, "height": 900})
    await page.goto(f"http://127.0.0.1:{gw.web_port}/")
    await page.fill("input[name=token]", gw.web_password)
    await page.click("input[type=submit]")
    return page


async def wait_rows(page, text: str, n: int, timeout: float = 20) -> None:
    rows = page.locator("tr", has_text=text)
    deadline = time.monotonic() + timeout
    while await rows.count() < n and time.monotonic() < deadline:
        await page.wait_for_timeout(200)
    assert await rows.count() >= n, f"{n} row(s) with {text!r} not shown in mitmweb"


async def command(page, line: str) -> None:
    """Type a command into mitmweb's command bar (opened once from the Options menu)."""
    bar = page.locator(".command-input input, .command input").first
    if not await bar.count() or not await bar.is_visible():
        await page.get_by_text("Options", exact=True).first.click()
        await page.get_by_text("Display Command Bar", exact=True).click()
        await page.keyboard.press("Escape")
    await bar.click()
    await bar.fill(line)
    await bar.press("Enter")


async def test_approver_works_from_the_flow_list(chromium, demo_server, rules_dir, gateway):
    """Who, which tool, rule and deadline in the list; Resume All leaves held calls held;
    the row's resume button approves; bastion.deny/approve @focus act on the selected flow;
    denied calls show DENIED. Screenshots go to docs/img for docs/approval.md."""
    from playwright.async_api import async_playwright

    demo = demo_server("json")
    # console approvals (one trusted operator): the row's resume and bastion.approve approve
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 120}}), web=True,
                 extra_args=("--set", "bastion_web_approvals=console"))
    ARTIFACTS.mkdir(exist_ok=True)
    img = ROOT / "docs" / "img"
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c1, \
            connect(gw.mcp_url(), gw.token("dina", ["dev"])) as c2, \
            connect(gw.mcp_url(), gw.token("dora", ["dev"])) as c3, async_playwright() as p:
        calls = {}
        for name, c in (("dan", c1), ("dina", c2), ("dora", c3)):        # dora's is the newest flow
            calls[name] = asyncio.create_task(c.call_tool("launch_container", {"image": f"{name}:1"}))
            await asyncio.sleep(0.3)
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = await login(browser, gw)
        await wait_rows(page, "HELD", 3)
        row = lambda who: page.locator("tr", has_text=f" {who} -> launch_container")  # noqa: E731
        text = await row("dina").inner_text()
        assert "HELD" in text and "until" in text and "dev-container-needs-approval" in text, text
        await page.wait_for_timeout(300)
        await page.screenshot(path=str(img / "approval-list.png"))
        # Resume All: every held call stays held
        await page.get_by_text("Resume All", exact=True).first.click()
        await page.wait_for_timeout(1000)
        assert not any(t.done() for t in calls.values()) and launches(demo) == []
        # the row's resume button approves that call only
        await row("dan").hover()                          # mitmweb shows the row's quick actions on hover
        await row("dan").locator(".col-quickactions a").click()
        assert not (await asyncio.wait_for(calls["dan"], 20)).is_error
        assert not calls["dina"].done() and not calls["dora"].done()
        # select dina's (not the newest) flow; @focus is that flow
        await row("dina").locator("td.col-path").click()
        await command(page, 'bastion.deny @focus "not today"')
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(calls["dina"], 20)
        assert "approval denied" in str(e.value) and "not today" in str(e.value)
        assert not calls["dora"].done()
        await row("dora").locator("td.col-path").click()
        await command(page, "bastion.approve @focus")
        assert not (await asyncio.wait_for(calls["dora"], 20)).is_error
        await wait_rows(page, "DENIED -32033", 1)
        await page.wait_for_timeout(300)
        assert "DENIED -32033" in await row("dina").inner_text()
        badge = row("dina").locator(".status-badge")
        assert "bastion-refused" in (await badge.get_attribute("class")) and "-32033" in await badge.get_attribute("title")
        assert "bastion-refused" not in (await row("dora").locator(".status-badge").get_attribute("class"))
        await page.locator(".flow-table").click(position={"x": 400, "y": 400})
        await page.keyboard.press("Escape")                # deselect: the list at full width
        await page.wait_for_timeout(300)
        await page.screenshot(path=str(img / "approval-decided.png"))
        await browser.close()
    assert sorted(l["image"] for l in launches(demo)) == ["dan:1", "dora:1"]


class MitmwebApi:
    """mitmweb's REST API as the UI uses it: bearer token (web_password) plus tornado's
    double-submit XSRF check (the same value as cookie and header)."""

    def __init__(self, gw):
        import httpx
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.web_port}", timeout=10,
                                      headers={"authorization": f"Bearer {gw.web_password}"})

    async def __aenter__(self):
        r = await self.http.get("/flows")
        assert r.status_code == 200, r.status_code
        xsrf = os.urandom(16).hex()
        self.http.cookies.set("_mitmproxy_xsrf", xsrf)
        self.http.headers["x-xsrftoken"] = xsrf
        return self

    async def __aexit__(self, *exc):
        await self.http.aclose()

    async def held_flow(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flows = (await self.http.get("/flows")).json()
            held = [f for f in flows if f.get("intercepted") and "APPROVAL" in f.get("comment", "")]
            if held:
                return held[-1]
            await asyncio.sleep(0.1)
        raise AssertionError("no held flow in mitmweb")


async def test_kill_in_mitmweb_denies_with_a_jsonrpc_error(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c, MitmwebApi(gw) as web:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "killed:1"}))
        held = await web.held_flow()
        r = await web.http.post(f"/flows/{held['id']}/kill")
        assert r.status_code == 200, r.text
        with pytest.raises(Exception) as e:          # an MCP error, not a dropped connection
            await asyncio.wait_for(call, 20)
        assert "approval denied" in str(e.value) and "killed in mitmweb" in str(e.value)
        # the session is still usable afterwards
        assert (await c.call_tool("run_command", {"command": "true"})).is_error is False
    assert launches(demo) == []


async def test_deny_command_from_the_command_bar(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c, MitmwebApi(gw) as web:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "cmd:1"}))
        held = await web.held_flow()
        r = await web.http.post("/commands/bastion.deny",
                                json={"arguments": [f"~comment {held['comment'].splitlines()[0].split()[-1]}", "ask on Monday"]})
        assert r.status_code == 200 and "error" not in r.json(), r.text
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(call, 20)
        assert "approval denied" in str(e.value) and "ask on Monday" in str(e.value)
    assert launches(demo) == []


async def test_resume_all_leaves_held_calls_held(demo_server, rules_dir, gateway):
    """mitmweb's Resume All (POST /flows/resume) must not approve held calls: each one needs
    its own decision. The flow's own resume still approves (console approvals)."""
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True,
                 extra_args=("--set", "bastion_web_approvals=console"))
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c, MitmwebApi(gw) as web:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "all:1"}))
        held = await web.held_flow()
        r = await web.http.post("/flows/resume")
        assert r.status_code == 200, r.text
        await asyncio.sleep(1.0)
        assert not call.done() and launches(demo) == []
        still = await web.held_flow(timeout=2)
        assert still["id"] == held["id"] and still["intercepted"]
        assert "Resume All left 1 call(s) waiting for approval" in gw.log_text()
        r = await web.http.post(f"/flows/{held['id']}/resume")
        assert r.status_code == 200, r.text
        result = await asyncio.wait_for(call, 20)
    assert not result.is_error and [l["image"] for l in launches(demo)] == ["all:1"]
