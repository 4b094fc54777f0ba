"""`./run.sh` as a new user runs it: starts, prints the endpoint and how to get a token,
a client call succeeds, Ctrl-C stops the gateway and the demo server with no orphan."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import ROOT, free_port
from tests.e2e.procs import start_run_sh


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if str(pid) in line.split()[1:3]}


def test_run_sh_starts_serves_and_stops_cleanly(tmp_path):
    port, demo_port = free_port(), free_port()
    env = {**os.environ, "BASTION_PORT": str(port), "DEMO_PORT": str(demo_port)}
    p, banner = start_run_sh(ROOT, env, tmp_path / "run.log")
    try:
        assert f"http://127.0.0.1:{port}/mcp/demo" in banner and "run.sh token --sub" in banner
        token = subprocess.run(["./run.sh", "token", "--sub", "newuser", "--roles", "analyst"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout.strip()
        assert token.count(".") == 2
        call = subprocess.run([sys.executable, "-m", "demo.client", f"http://127.0.0.1:{port}/mcp/demo",
                               "--token", token, "call", "get_customer", '{"id": 1}'],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert call.returncode == 0, call.stderr
        assert "[MASKED:ssn]" in call.stdout
        kids = _children(p.pid)
        assert len(kids) >= 2            # the demo server and the gateway
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the foreground group
        assert p.wait(20) in (0, 130, -2)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    time.sleep(0.5)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in open(f"/proc/{k}/status").read()]
    assert alive == [], f"orphans left: {alive}"
