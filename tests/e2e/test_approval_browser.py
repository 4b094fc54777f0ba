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


async def test_resume_in_mitmweb_approves(chromium, demo_server, rules_dir, gateway):
    from playwright.async_api import async_playwright

    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}}), web=True)
    ARTIFACTS.mkdir(exist_ok=True)
    dev_token = gw.token("dan", ["dev"])
    async with connect(gw.mcp_url(), dev_token) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"http://127.0.0.1:{gw.web_port}/")
            # mitmweb's own authentication stays on: the approver logs in with web_password
            await page.fill("input[name=token]", gw.web_password)
            await page.click("input[type=submit]")
            row = page.locator("tr", has_text="/mcp/demo")
            deadline = time.monotonic() + 20
            while await row.count() == 0 and time.monotonic() < deadline:
                await page.wait_for_timeout(200)
            assert await row.count() >= 1, "held flow not shown in mitmweb"
            await row.last.click()
            await page.get_by_text("Comment", exact=True).click()
            comment = page.get_by_text("APPROVAL", exact=False)
            await comment.first.wait_for(timeout=10000)
            text = await page.locator("body").inner_text()
            assert "dev-container-needs-approval" in text and "dan" in text and "redis:7" in text
            await page.screenshot(path=str(ARTIFACTS / "approval-held.png"))
            await page.get_by_text("Request", exact=True).first.click()
            shown = await page.locator("body").inner_text()
            assert dev_token not in shown and dev_token[-20:] not in shown  # the token was consumed
            assert not call.done() and launches(demo) == []
            await page.get_by_text("Resume", exact=True).click()
            result = await asyncio.wait_for(call, 20)
            await page.wait_for_timeout(500)
            await page.screenshot(path=str(ARTIFACTS / "approval-resumed.png"))
            await browser.close()
    assert not result.is_error and result.structured_content["image"] == "redis:7"
    assert [l["image"] for l in launches(demo)] == ["redis:7"]
