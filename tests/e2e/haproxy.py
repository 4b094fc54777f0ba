"""A real HAProxy (Debian package) on a free loopback port, round-robin, no stickiness, in
front of gateway replicas. Installed by scripts/install-haproxy.sh when missing; a test
that cannot get it fails with the reason (never skips)."""
from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, Proc
from tests.e2e.procs import free_port

HEALTH_PATH = "/.well-known/oauth-protected-resource"   # served by every replica, no token needed


def haproxy_binary() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "install-haproxy.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"HAProxy is needed and could not be installed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().splitlines()[-1]


def config(port: int, backends: list[int], stats_port: int, balance: str = "roundrobin") -> str:
    servers = "\n".join(f"    server gw{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return f"""\
global
    maxconn 512

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s
    # a request whose replica is gone (connection refused or reset before an answer) is
    # sent again, to another replica
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend mcp
    bind 127.0.0.1:{port}
    default_backend mcp_bastion

frontend stats
    bind 127.0.0.1:{stats_port}
    http-request return status 200 content-type text/plain lf-string "up=%[nbsrv(mcp_bastion)]"

backend mcp_bastion
    balance {balance}
    option httpchk GET {HEALTH_PATH}
    http-check expect status 200
    default-server inter 200ms fastinter 100ms downinter 500ms fall 1 rise 2
{servers}
"""


def start_haproxy(procs: list, backends: list[int], workdir: Path | None = None, balance: str = "roundrobin") -> int:
    """HAProxy balancing round-robin (or `balance`, e.g. "source") over 127.0.0.1:<backends>;
    its process joins `procs` (stopped at teardown). Returns the port it listens on, once
    every backend is up."""
    binary = haproxy_binary()
    d = Path(workdir or tempfile.mkdtemp(prefix="haproxy-"))
    d.mkdir(parents=True, exist_ok=True)
    port, stats = free_port(), free_port()
    cfg = d / f"haproxy-{port}.cfg"
    cfg.write_text(config(port, backends, stats, balance))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected its configuration:\n{check.stdout}{check.stderr}")
    p = Proc("haproxy", [binary, "-db", "-f", str(cfg)], d / f"haproxy-{port}.log").start()
    procs.append(p)
    p.wait_port(port)
    deadline = time.monotonic() + 20
    while True:
        if servers_up(stats) == len(backends):
            return port
        if time.monotonic() > deadline:
            raise RuntimeError(f"haproxy: not every backend came up ({servers_up(stats)}/{len(backends)}):\n"
                               f"{p.text()[-3000:]}")
        time.sleep(0.1)


def servers_up(stats_port: int) -> int:
    try:
        r = httpx.get(f"http://127.0.0.1:{stats_port}/", timeout=2)
        return int(r.text.strip().partition("=")[2])
    except (httpx.HTTPError, ValueError):
        return -1
