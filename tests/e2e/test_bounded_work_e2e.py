"""Issue 18, bounded work before a decision: large argument bodies cannot stall other
callers. A caller no rule allows is refused before anything looks at its arguments; a caller
allowed the tool gets at most the scan budget (bastion_scan_limit characters,
bastion_scan_seconds) and is refused past it. Real gateway, real demo server."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

POLICY = """\
rules:
  - name: user-customers
    when: {roles: [e2e-user], tool: get_customer}
    allow: true
  - name: user-commands
    when: {roles: [e2e-user], tool: run_command}
    allow: true
"""
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18"}
BIG = 4 * 1024 * 1024 - 4096        # under bastion_max_body (4 MiB): parsed, then decided


def big_call(i: int) -> bytes:
    # many short words: the blocklist's costliest shape per byte
    text = ("ls -la /tmp; echo $HOME | grep x && cat y " * (BIG // 40))[:BIG]
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                       "params": {"name": "run_command", "arguments": {"command": text}}}).encode()


@pytest.mark.parametrize("attacker_roles", [[], ["e2e-user"]], ids=["no-roles", "allowed-the-tool"])
async def test_legitimate_call_is_fast_while_8_large_bodies_are_refused(stack, attacker_roles):
    demo, gw = stack("stateless", policy=POLICY)
    user = gw.token("alice", ["e2e-user"])
    attacker = gw.token("mallory", attacker_roles)
    bodies = [big_call(100 + i) for i in range(8)]
    legit = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_customer", "arguments": {"id": 1}}}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(gw.mcp_url(), json=legit, headers={**HDRS, "authorization": f"Bearer {user}"})
        assert r.status_code == 200 and "result" in r.text, r.text          # warm: connection, caches

        async def attack(body: bytes) -> httpx.Response:
            return await http.post(gw.mcp_url(), content=body, headers={**HDRS, "authorization": f"Bearer {attacker}"})

        async def legit_call() -> float:
            await asyncio.sleep(0.3)                                        # while the bodies arrive
            t0 = time.monotonic()
            r = await http.post(gw.mcp_url(), json=legit, headers={**HDRS, "authorization": f"Bearer {user}"})
            assert r.status_code == 200 and "result" in r.text, r.text
            return time.monotonic() - t0

        *answers, latency = await asyncio.gather(*(attack(b) for b in bodies), legit_call())
    print(f"\n[bounded work] legitimate call during 8 x 4 MB bodies ({attacker_roles or 'no roles'}): {latency*1000:.0f} ms")
    for a in answers:
        err = a.json()["error"]
        assert err["code"] == -32030, err
        assert ("default deny" in err["message"]) if not attacker_roles else ("too large to check" in err["message"])
    # Without the bound the legitimate call waited 4.1 s (no roles) and 7.5 s (allowed the tool)
    # behind the scans. With it, what is left is parsing the eight bodies on the event loop:
    # 0.1-0.3 s on an idle machine, 1.05 s seen once on a loaded CI run. 2 s still fails the
    # unbounded behaviour by a wide margin without failing on machine load.
    assert latency < 2.0
    assert "ls -la /tmp" not in demo.received_bodies()
