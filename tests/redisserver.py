"""A real redis-server for the shared-state tests (bastion_state=redis://…): installed by
scripts/install-redis.sh when missing, started on a free loopback port with a temp dir and
no persistence. When it cannot be installed or started the test fails with the reason."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import free_port, stop, wait_port

ROOT = Path(__file__).resolve().parents[1]


def redis_binary() -> str:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install-redis.sh")], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "PYTHON": sys.executable})
    if r.returncode != 0:
        pytest.fail(f"redis-server unavailable: {r.stderr.strip() or r.stdout.strip()}", pytrace=False)
    return r.stdout.strip().splitlines()[-1]


class RedisServer:
    """One redis-server process; stop() and start() again on the same port (an outage)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.dir, self.port = binary, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "a")
        self.proc = subprocess.Popen([self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--dir", str(self.dir)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            wait_port(self.port, self.proc, timeout=20)
        except RuntimeError as e:
            pytest.fail(f"redis-server did not start: {e}: {(self.dir / 'redis.log').read_text()[-2000:]}",
                        pytrace=False)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(redis_binary(), tmp_path / "redis").start()
    yield server
    server.stop()
