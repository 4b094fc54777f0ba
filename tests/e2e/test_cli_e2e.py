"""Issue 18, CLI and run.sh as a new user meets them: commands follow BASTION_PORT and say
which URL they tried, global options work through ./run.sh, replay's mitmweb stays on
loopback, and the demo client shows the gateway's explanation of a refusal."""
from __future__ import annotations

import os
import subprocess
import sys

from addons.cli.recordings import replay_web_args
from tests.e2e.conftest import ALLOW_ALL_POLICY, ROOT, free_port


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_gateway_commands_follow_bastion_port_and_name_the_url(stack):
    demo, gw = stack("json")
    approver = gw.token("alice", ["approver"])
    ok = run(sys.executable, "-m", "addons.cli", "approvals", "--token", approver, env={"BASTION_PORT": str(gw.port)})
    assert ok.returncode == 0 and "no calls waiting for approval" in ok.stdout, ok.stdout + ok.stderr
    dead = free_port()
    for cmd in (["approvals"], ["approve", "abc"], ["deny", "abc"]):
        r = run(sys.executable, "-m", "addons.cli", *cmd, "--token", approver, env={"BASTION_PORT": str(dead)})
        assert r.returncode == 1 and f"http://127.0.0.1:{dead}/_bastion/approvals" in r.stdout, (cmd, r.stdout)
    r = run(sys.executable, "-m", "addons.cli", "approvals", "--token", "not-a-jwt", env={"BASTION_PORT": str(gw.port)})
    assert r.returncode == 1 and "invalid_token" in r.stdout and f"127.0.0.1:{gw.port}" in r.stdout, r.stdout


def test_demo_client_prints_the_gateways_explanation(stack):
    demo, gw = stack("json")
    r = run(sys.executable, "-m", "demo.client", gw.mcp_url(), "--token", "not-a-jwt", "list")
    assert r.returncode == 2
    assert "gateway answered HTTP 401" in r.stderr and "invalid_token" in r.stderr and gw.mcp_url() in r.stderr, r.stderr


def test_global_options_work_through_run_sh(tmp_path):
    import shutil
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    for argv in (["--rules", str(rules), "check"], [f"--rules={rules}", "check"]):
        r = run("./run.sh", *argv)
        assert r.returncode == 0 and f"{rules}: OK" in r.stdout, (argv, r.stdout, r.stderr)
    (rules / "policy.yaml").write_text(ALLOW_ALL_POLICY + "  - name: anyone\n    approve: {timeout: 5}\n")
    r = run("./run.sh", "--rules", str(rules), "check")
    assert r.returncode == 1 and "policy.yaml:" in r.stdout + r.stderr and "needs approvers" in r.stdout + r.stderr


def test_replay_web_binds_loopback_and_follows_bastion_web_port():
    args = replay_web_args("/tmp/x.mitm", "18123")
    assert args[args.index("--listen-host") + 1] == "127.0.0.1"
    assert "web_host=127.0.0.1" in args and "web_port=18123" in args
