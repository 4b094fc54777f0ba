"""Process helpers shared by the e2e harnesses (conftest fixtures and the self-contained
masking/recording harnesses): free loopback ports, waiting for a port, stopping a group."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

from addons.cli import launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    if not launcher.wait_port(port, proc, timeout):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        raise RuntimeError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (started with start_new_session=True), then SIGKILL."""
    launcher.stop_group([proc], signal.SIGTERM, grace=10)


def start_run_sh(cwd, env: dict, log_path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`./run.sh` (the demo stack) in its own process group; returns it once it printed its
    endpoint banner, and the banner. Output goes to log_path."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(["./run.sh"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while "endpoint" not in (text := open(log_path).read()) and time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"./run.sh exited with {p.returncode}:\n{text}")
        time.sleep(0.2)
    return p, text
