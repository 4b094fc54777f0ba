"""End-to-end harness: real demo MCP server, real mitmdump/mitmweb with the bastion addons,
real SDK clients, all on 127.0.0.1 with free ports. Logs are printed when a test fails;
every process group is killed at teardown."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import free_port  # noqa: F401 - re-exported for tests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self._fh = open(self.log, "ab")
        self.popen = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, **(self.env or {})}, start_new_session=True)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_port(self, port: int, timeout: float = 30.0, marker: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.text()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    if marker is None or marker in self.text():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready on port {port}:\n{self.text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        if hasattr(self, "_fh"):
            self._fh.close()


@dataclass
class DemoServer:
    proc: Proc
    port: int
    transport: str
    token: str
    token_file: Path
    data_dir: Path
    received_log: Path

    @property
    def path(self) -> str:
        return "/sse" if self.transport == "legacy" else "/mcp"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def received(self) -> list[dict]:
        if not self.received_log.exists():
            return []
        return [json.loads(l) for l in self.received_log.read_text().splitlines() if l.strip()]

    def received_bodies(self) -> str:
        return "\n".join(r["body"] for r in self.received())

    def client_requests(self) -> list[dict]:
        """What reached the upstream on a client's behalf: not the gateway's own tools/list
        (addons/hooks/schemacheck.py learns argument schemas with it, carrying no client data)."""
        from addons.hooks.schemacheck import USER_AGENT
        return [r for r in self.received()
                if ("user-agent", USER_AGENT) not in [tuple(h) for h in r.get("headers", [])]]

    def clear_received(self) -> None:
        if self.received_log.exists():
            self.received_log.write_text("")

    def log_text(self) -> str:
        return self.proc.text()


@dataclass
class Gateway:
    proc: Proc
    port: int
    rules: Path
    key_dir: Path
    recordings: Path
    web_port: int | None = None
    web_password: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mcp_url(self, connection: str = "demo") -> str:
        return f"{self.url}/mcp/{connection}"

    def log_text(self) -> str:
        return self.proc.text()

    def token(self, sub: str = "e2e", roles: tuple[str, ...] | list[str] = ("e2e-all",), **kw: Any) -> str:
        from addons.core.identity.jwtverify import mint_token
        return mint_token(self.key_dir, sub, roles=tuple(roles), **kw)


@pytest.fixture
def procs(request):
    started: list[Proc] = []
    yield started
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for p in reversed(started):
        p.stop()
        if failed:
            sys.stderr.write(f"\n----- {p.name} log -----\n{p.text()[-6000:]}\n")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def demo_server(tmp_path, procs):
    return demo_starter(tmp_path, procs)


def demo_starter(tmp_path: Path, procs: list):
    """start(transport, many_tools, name, token_env) -> DemoServer, its process in `procs`."""
    from demo.tokens import ensure_token

    def start(transport: str = "json", many_tools: int = 0, name: str = "demo",
              token_env: str | None = None, args: tuple[str, ...] = (), port: int | None = None) -> DemoServer:
        """token_env: read the service token from this environment variable instead of the file
        (the file then holds a different token, so a test can tell which one was used).
        args: extra demo.server flags (--rug-pull, --inject, --big-output N); port: reuse a
        port (a restarted server under the same connection)."""
        d = tmp_path / f"demo-{name}-{transport}"
        d.mkdir(parents=True, exist_ok=True)
        token_file = ensure_token(d / "service-token")
        token, env, extra = token_file.read_text().strip(), None, []
        if token_env:
            token = "demo-env-" + secrets.token_urlsafe(24)
            env, extra = {token_env: token}, ["--token-env", token_env]
        port = port or free_port()
        p = Proc(f"demo-{transport}", [sys.executable, "-m", "demo.server", "--host", "127.0.0.1", "--port", str(port),
                                       "--transport", transport, "--token-file", str(token_file), *extra,
                                       "--data-dir", str(d / "data"), "--received-log", str(d / "received.jsonl"),
                                       "--many-tools", str(many_tools), *args], d / "server.log", env=env).start()
        procs.append(p)
        p.wait_port(port, marker="READY")
        return DemoServer(p, port, transport, token, token_file, d / "data", d / "received.jsonl")
    return start


@pytest.fixture
def mcp_client():
    """connect(url, token=None, *, legacy=False, mode=None, headers=None, **client_kw) -> async context
    manager yielding an initialised official-SDK Client (Streamable HTTP, or legacy HTTP+SSE with
    legacy=True). mode defaults to "auto" (Streamable HTTP) / "legacy" (HTTP+SSE)."""
    from demo.client import connect
    return connect


ALLOW_ALL_POLICY = """\
# test policy: the e2e-all role may do anything (blocklist still applies)
rules:
  - name: e2e-allow-all
    when:
      roles: [e2e-all]
    allow: true
"""


@pytest.fixture
def rules_dir(tmp_path):
    return rules_maker(tmp_path)


def rules_maker(tmp_path: Path):
    """make(demo, **files) -> a copy of the repo's rules/ with connections for the given demo
    server(s) and any file overridden, e.g. make(demo, **{"policy.yaml": text})."""

    def make(*servers: DemoServer, names: tuple[str, ...] = (), **files: str) -> Path:
        d = tmp_path / f"rules-{len(list(tmp_path.glob('rules-*')))}"
        shutil.copytree(ROOT / "rules", d, ignore=shutil.ignore_patterns("connections.yaml"))
        conns = {}
        for i, s in enumerate(servers):
            name = names[i] if i < len(names) else ("demo" if i == 0 else f"demo{i}")
            conns[name] = {"upstream": s.url, "credential": {"from": f"file:{s.token_file}"}}
            if s.transport == "legacy":
                conns[name]["transport"] = "sse"
        (d / "connections.yaml").write_text(json.dumps({"connections": conns}, indent=2))
        for fname, text in files.items():
            (d / fname).write_text(text)
        return d
    return make


@pytest.fixture
def gateway(tmp_path, procs):
    return gateway_starter(tmp_path, procs)


def gateway_starter(tmp_path: Path, procs: list):
    def start(rules: Path, extra_args: tuple[str, ...] = (), web: bool = False, env: dict | None = None,
              key_dir: Path | None = None, recordings: Path | None = None, port: int | None = None,
              pre_scripts: tuple[str, ...] = (), serve: bool = False) -> Gateway:
        port = port or free_port()
        key_dir = key_dir or tmp_path / "keys"
        recordings = recordings or tmp_path / "recordings"
        tool = "mitmweb" if web else "mcp-bastion" if serve else "mitmdump"
        if serve:      # the lean master: the pipeline is built in, no scripts
            head = [str(BIN / tool), "serve"]
        else:
            head = [str(BIN / tool), *[a for sc in pre_scripts for a in ("-s", sc)],
                    "-s", str(ROOT / "addons" / "bastion.py")]
        cmd = [*head, "--listen-host", "127.0.0.1", "--mode", f"reverse:http://127.0.0.1:1@{port}",
               "--set", f"bastion_rules={rules}",
               "--set", "connection_strategy=lazy", "--set", "termlog_verbosity=info"]
        if has_module("addons.hooks.identity"):
            cmd += ["--set", f"bastion_key_dir={key_dir}"]
        if has_module("addons.hooks.recorder"):
            cmd += ["--set", f"bastion_recordings={recordings}"]
        web_port = web_password = None
        if web:
            web_port, web_password = free_port(), "e2e-approver-password"
            cmd += ["--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
                    "--set", "web_open_browser=false", "--set", f"web_password={web_password}"]
        cmd += list(extra_args)
        p = Proc(tool, cmd, tmp_path / f"{tool}-{port}.log", env=env).start()
        procs.append(p)
        p.wait_port(port, marker="listening at")
        if web_port is not None:
            p.wait_port(web_port)        # mitmweb's UI may come up after the proxy listener
        if has_module("addons.hooks.identity"):
            # the embedded issuer creates its key on load; wait for it so tests can mint tokens
            deadline = time.monotonic() + 10
            while not any(key_dir.glob("*.pem")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return Gateway(p, port, rules, key_dir, recordings, web_port, web_password)
    return start


@pytest.fixture
def stack(demo_server, rules_dir, gateway):
    """Most e2e tests: one demo server (transport of choice) behind a gateway with the
    allow-all test policy. Returns (demo, gw)."""

    def start(transport: str = "json", policy: str | None = ALLOW_ALL_POLICY, **files: str):
        demo = demo_server(transport)
        if policy is not None:
            files = {"policy.yaml": policy, **files}
        gw = gateway(rules_dir(demo, **files))
        return demo, gw
    return start
