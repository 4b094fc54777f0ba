"""`./run.sh` and `./run.sh web`: the demo MCP server and the gateway on loopback.

Starts both as child process groups, prints how to get a token and connect, and stops
both on Ctrl-C / SIGTERM (no orphans).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 30.0) -> bool:
    """True once 127.0.0.1:port accepts a connection; False if `proc` exits or time runs out.
    (The launcher, the bench and the e2e fixtures all wait this way.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_group(procs: list[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal each process group (started with start_new_session=True), give them `grace`
    seconds together, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run.sh")
    ap.add_argument("--web", action="store_true", help="run under mitmweb (approval console)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("BASTION_PORT", "8080")))
    ap.add_argument("--demo-port", type=int, default=int(os.environ.get("DEMO_PORT", "8931")))
    ap.add_argument("--web-port", type=int, default=int(os.environ.get("BASTION_WEB_PORT", "8081")))
    ap.add_argument("--rules", default=os.environ.get("BASTION_RULES", "rules"))
    args, extra = ap.parse_known_args(argv)
    os.chdir(ROOT)
    os.environ["DEMO_PORT"] = str(args.demo_port)  # rules/connections.yaml: ${DEMO_PORT:-8931}
    secrets = ROOT / ".secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    from demo.tokens import ensure_token
    token_file = ensure_token(secrets / "demo-service-token")
    bindir = Path(sys.executable).parent
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo.server", "--host", "127.0.0.1", "--port", str(args.demo_port),
         "--transport", "json", "--token-file", str(token_file),
         "--data-dir", str(ROOT / "recordings" / "demo-data"),
         "--received-log", str(ROOT / "recordings" / "demo-data" / "received.jsonl")],
        start_new_session=True)
    procs = [demo]
    # the approval console needs mitmweb; otherwise the lean master (`mcp-bastion serve`)
    tool = "mitmweb" if args.web else "mcp-bastion serve"
    head = ([str(bindir / "mitmweb"), "-s", str(ROOT / "addons" / "bastion.py")] if args.web
            else [str(bindir / "mcp-bastion"), "serve"])
    cmd = [*head, "--listen-host", "127.0.0.1",
           "--mode", f"reverse:http://127.0.0.1:{args.demo_port}@{args.port}",
           "--set", f"bastion_rules={args.rules}", "--set", "connection_strategy=lazy"]
    if args.web:
        cmd += ["--set", f"web_port={args.web_port}", "--set", "web_host=127.0.0.1",
                "--set", "web_open_browser=false"]
    gw = None
    try:
        if not wait_port(args.demo_port, demo):
            print(f"run.sh: demo MCP server did not start on port {args.demo_port}", file=sys.stderr)
            return 1
        gw = subprocess.Popen(cmd + extra, start_new_session=True)
        procs.append(gw)
        if not wait_port(args.port, gw) or gw.poll() is not None:
            print(f"run.sh: gateway did not start on port {args.port}", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{args.port}/mcp/demo"
        print(f"""
mcp-bastion is running ({tool}) — Ctrl-C stops the gateway and the demo server.

  endpoint      {url}
  demo server   http://127.0.0.1:{args.demo_port}/mcp (only the gateway holds its credential)
  rules         {args.rules}/
{f"  approvals UI  http://127.0.0.1:{args.web_port}/  (token printed by mitmweb above)" if args.web else ""}
Get a token for an identity (the gateway's embedded issuer):
  TOKEN=$(./run.sh token --sub alice --roles analyst)
Call a tool:
  .venv/bin/python -m demo.client {url} --token "$TOKEN" call get_customer '{{"id": 1}}'
""", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.3)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(procs)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
