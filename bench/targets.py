"""What the benchmark runs: the upstream, the gateways in front of it, and how to reach each.

Every process gets its own session (process group) and a log file in the work directory;
`Stack.stop()` ends exactly the processes it started.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from addons.cli import launcher
from bench.loadgen import Endpoint

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AIRLOCK_VENV = ROOT / "bench" / ".airlock-venv"
AIRLOCK_VERSION = "0.4.1"
BENCH_TOOLS = ["get_customer", "query_sql", "stream_report"] + [f"tool_{i:03d}" for i in range(10)]
SUB, ROLES = "bench-agent", ["analyst"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 60) -> bool:
    return launcher.wait_port(port, proc, timeout)


@dataclass
class Target:
    """One way to reach the upstream: direct, or through a gateway process."""
    name: str
    label: str
    endpoint: Endpoint
    proc: subprocess.Popen | None = None
    log: Path | None = None
    workloads: tuple[str, ...] | None = None    # None = every workload
    notes: list[str] = field(default_factory=list)

    def applies(self, workload: str) -> bool:
        return self.workloads is None or workload in self.workloads

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Stack:
    """Starts and stops everything; holds the work directory and credentials."""

    def __init__(self, work: Path, upstream_kind: str = "fast", sse_interval_ms: float = 1.0,
                 big_kib: int = 256, many_tools: int = 200) -> None:
        self.work = work
        self.upstream_kind = upstream_kind
        self.sse_interval_ms = sse_interval_ms
        self.big_kib, self.many_tools = big_kib, many_tools
        self.procs: list[subprocess.Popen] = []
        self.targets: dict[str, Target] = {}
        self.info: dict = {"standins": None, "chain": None}
        work.mkdir(parents=True, exist_ok=True)
        self.token_file = work / "service-token"
        self.token_file.write_text("bench-service-" + os.urandom(12).hex())
        self.token_file.chmod(0o600)
        self.service_token = self.token_file.read_text()

    # -- processes ---------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.work / f"{name}.log"
        fh = open(log, "wb")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=str(cwd or ROOT), start_new_session=True)
        fh.close()
        self.procs.append(p)
        return p, log

    def stop(self) -> None:
        # SIGINT: mitmdump runs its `done` hooks (the bench's profile and hook-time files)
        launcher.stop_group(self.procs, signal.SIGINT, grace=10)
        self.procs.clear()

    # -- upstream ----------------------------------------------------------------
    def start_upstream(self) -> None:
        self.up_port = free_port()
        if self.upstream_kind == "demo":
            data = self.work / "demo-data"
            data.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "demo.server", "--host", "127.0.0.1", "--port", str(self.up_port),
                   "--transport", "stateless", "--token-file", str(self.token_file),
                   "--received-log", str(self.work / "demo-received.jsonl"), "--data-dir", str(data),
                   "--many-tools", str(self.many_tools)]
        else:
            cmd = [sys.executable, "-m", "bench.upstream", "--port", str(self.up_port),
                   "--token-file", str(self.token_file), "--big-kib", str(self.big_kib),
                   "--many-tools", str(self.many_tools), "--sse-interval-ms", str(self.sse_interval_ms)]
        p, log = self._spawn("upstream", cmd)
        if not wait_port(self.up_port, p):
            raise RuntimeError(f"upstream did not start; see {log}:\n{_tail(log)}")
        self.upstream_proc = p
        bearer = [("Authorization", f"Bearer {self.service_token}")]
        self.targets["direct"] = Target("direct", "direct (no proxy)",
                                        Endpoint("127.0.0.1", self.up_port, "/mcp", bearer))

    # -- mitmdump ----------------------------------------------------------------
    def _mitmdump(self, port: int, extra: list[str]) -> list[str]:
        return [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1",
                "--mode", f"reverse:http://127.0.0.1:{self.up_port}@{port}",
                "--set", "connection_strategy=lazy", "--set", "flow_detail=0",
                "--set", "termlog_verbosity=warn", *extra]

    def add_bare(self) -> None:
        bearer = [("Authorization", f"Bearer {self.service_token}")]
        for name, label, extra, wls in (
            ("bare", "bare mitmdump (no addons)", [], None),
            # Without streaming mitmproxy holds an SSE body until it ends (#4469); this
            # variant is the streaming floor for the time-to-first-event comparison.
            ("bare-stream", "bare mitmdump, stream_large_bodies=1", ["--set", "stream_large_bodies=1"], ("sse",)),
        ):
            port = free_port()
            p, log = self._spawn(name, self._mitmdump(port, extra))
            self.targets[name] = Target(name, label, Endpoint("127.0.0.1", port, "/mcp", bearer), p, log, wls)

    def prepare_bastion(self) -> None:
        """Rules directory, keys and a caller token for the bastion chain."""
        rules = self.work / "rules"
        if rules.exists():
            shutil.rmtree(rules)
        rules.mkdir()
        for f in (ROOT / "rules").glob("*.yaml"):
            if f.name != "connections.yaml":
                shutil.copy(f, rules / f.name)
        (rules / "connections.yaml").write_text(
            "connections:\n  bench:\n"
            f"    upstream: http://127.0.0.1:{self.up_port}/mcp\n"
            f"    credential:\n      from: file:{self.token_file}\n")
        self.bastion_rules = rules
        self.key_dir = self.work / "keys"
        self.key_dir.mkdir(exist_ok=True, mode=0o700)
        self.bastion_sets = ["--set", f"bastion_rules={rules}",
                             "--set", f"bastion_recordings={self.work / 'recordings'}",
                             "--set", f"bastion_mask_key_file={self.work / 'mask-key'}"]
        self.bastion_env: dict[str, str] = {"BENCH_ROOT": str(ROOT)}
        self.chain_script = self.work / "bench_chain.py"
        shutil.copy(ROOT / "bench" / "chain.py", self.chain_script)
        self.bastion_sets += ["--set", f"bastion_key_dir={self.key_dir}"]
        self.jwt = _mint_with_identity(self.key_dir, self.work)
        write_bench_policy(rules)

    def add_bastion(self, name: str, label: str, skip: list[str], env_extra: dict | None = None,
                    extra: list[str] | None = None) -> Target:
        port = free_port()
        env = {**self.bastion_env, "BENCH_SKIP": ",".join(skip), **(env_extra or {})}
        # each gateway instance needs its own bastion_instance (the recorder locks its journal)
        cmd = self._mitmdump(port, ["-s", str(self.chain_script), *_without(self.bastion_sets, extra or []),
                                    "--set", f"bastion_instance=bench-{name.replace('+', '-')}", *(extra or [])])
        p, log = self._spawn(name, cmd, env)
        t = Target(name, label, Endpoint("127.0.0.1", port, "/mcp/bench", [("Authorization", f"Bearer {self.jwt}")]),
                   p, log)
        self.targets[name] = t
        return t

    def add_lean(self, name: str = "lean") -> Target:
        """The full pipeline on `mcp-bastion serve` (the lean master: five mitmproxy built-ins
        instead of stock mitmdump's ~35), production's own entry point."""
        port = free_port()
        cmd = [str(BIN / "mcp-bastion"), "serve", "--listen-host", "127.0.0.1",
               "--mode", f"reverse:http://127.0.0.1:{self.up_port}@{port}",
               "--set", "connection_strategy=lazy", "--set", "termlog_verbosity=warn", *self.bastion_sets,
               "--set", f"bastion_instance=bench-{name}"]
        p, log = self._spawn(name, cmd, dict(self.bastion_env))
        t = Target(name, "mcp-bastion full pipeline on `mcp-bastion serve` (lean master)",
                   Endpoint("127.0.0.1", port, "/mcp/bench", [("Authorization", f"Bearer {self.jwt}")]), p, log)
        self.targets[name] = t
        return t

    def start_shared_state(self) -> list[str]:
        """A redis-server for the `full+redis` target (scripts/install-redis.sh installs it)
        and a rules directory whose bench rules all carry a (never reached) rate limit:
        every call then takes a shared bucket. Returns the gateway's extra --set args."""
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install-redis.sh")], capture_output=True, text=True,
                           timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"full+redis: {r.stderr.strip() or r.stdout.strip()}")
        port, data = free_port(), self.work / "redis"
        data.mkdir(exist_ok=True)
        p, log = self._spawn("redis", [r.stdout.strip().splitlines()[-1], "--save", "", "--appendonly", "no",
                                       "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)])
        if not wait_port(port, p):
            raise RuntimeError(f"redis-server did not start; see {log}:\n{_tail(log)}")
        rules = self.work / "rules-redis"
        if rules.exists():
            shutil.rmtree(rules)
        shutil.copytree(self.bastion_rules, rules)
        from ruamel.yaml import YAML
        yaml = YAML()
        policy = yaml.load((rules / "policy.yaml").read_text())
        for rule in policy["rules"]:
            rule["rate_limit"] = {"calls": 10**9, "per": 60}
        with open(rules / "policy.yaml", "w") as f:
            yaml.dump(policy, f)
        return ["--set", f"bastion_rules={rules}", "--set", f"bastion_state=redis://127.0.0.1:{port}/0"]

    # -- mcp-airlock ---------------------------------------------------------------
    def add_airlock(self) -> Target | None:
        exe = ensure_airlock()
        if exe is None:
            return None
        port = free_port()
        secret = os.urandom(32).hex()
        policy = self.work / "airlock-policy.yaml"
        policy.write_text(airlock_policy())
        env = {"AIRLOCK_JWT_SECRET": secret, "AIRLOCK_UPSTREAM_AUTH": f"Bearer {self.service_token}",
               "AIRLOCK_ENV": "bench"}
        cmd = [str(exe), "--policy", str(policy), "--upstream", f"http://127.0.0.1:{self.up_port}/mcp",
               "--env", "bench", "--audit", str(self.work / "airlock-audit.jsonl"),
               "--host", "127.0.0.1", "--port", str(port)]
        p, log = self._spawn("airlock", cmd, env, cwd=self.work)
        import jwt
        token = jwt.encode({"sub": SUB, "groups": ROLES, "exp": int(time.time()) + 86400}, secret, algorithm="HS256")
        t = Target("airlock", f"mcp-airlock {AIRLOCK_VERSION}",
                   Endpoint("127.0.0.1", port, "/mcp", [("Authorization", f"Bearer {token}")]), p, log)
        self.targets["airlock"] = t
        return t

    def wait_all(self) -> list[str]:
        """Wait for every gateway; returns the names that did not come up (and drops them)."""
        failed = []
        for name, t in list(self.targets.items()):
            if t.proc is None:
                continue
            if not wait_port(t.endpoint.port, t.proc):
                failed.append(f"{name}: did not start ({t.log}):\n{_tail(t.log)}")
                del self.targets[name]
        time.sleep(1.0)   # mitmdump opens its port before a script's startup error makes it exit
        for name, t in list(self.targets.items()):
            if t.proc is not None and t.proc.poll() is not None:
                failed.append(f"{name}: exited at startup ({t.log}):\n{_tail(t.log)}")
                del self.targets[name]
        return failed

    def chain_info(self) -> dict:
        """Which stages the bastion chain ran (from bench/chain.py's log line)."""
        for t in self.targets.values():
            if t.name == "full" and t.log:
                for line in t.log.read_text(errors="replace").splitlines():
                    if "BENCH_STANDINS=" in line:
                        parts = dict(p.split("=", 1) for p in line.split() if "=" in p and p.startswith("BENCH_"))
                        return {"standins": parts.get("BENCH_STANDINS"), "chain": parts.get("BENCH_CHAIN")}
        return {"standins": None, "chain": None}


def _without(sets: list[str], extra: list[str]) -> list[str]:
    """`--set k=v` pairs of `sets` whose option `extra` sets again (mitmproxy refuses an
    option given twice)."""
    overridden = {v.split("=", 1)[0] for k, v in zip(extra, extra[1:]) if k == "--set"}
    pairs = list(zip(sets[::2], sets[1::2]))
    return [x for k, v in pairs if not (k == "--set" and v.split("=", 1)[0] in overridden) for x in (k, v)]


def _tail(path: Path | None, n: int = 30) -> str:
    if not path or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _mint_with_identity(key_dir: Path, work: Path) -> str:
    """The identity addon's own issuer: mint_token(key_dir, sub, roles, ...)."""
    from addons.core.identity.jwtverify import mint_token as fn
    params = inspect.signature(fn).parameters
    kw = {}
    for k, v in (("ttl", 86400), ("ttl_seconds", 86400)):
        if k in params:
            kw[k] = v
    token = fn(key_dir, SUB, ROLES, **kw)
    return token.decode() if isinstance(token, bytes) else str(token)


def write_bench_policy(rules: Path) -> None:
    """A policy for the bench identity, in the policy addon's language, if it ships a
    bench helper; otherwise the shipped rules/policy.yaml is used as it is."""
    src = ROOT / "bench" / "policy.yaml"
    if src.exists():
        shutil.copy(src, rules / "policy.yaml")


def airlock_policy() -> str:
    """Equivalent policy for mcp-airlock: the same allow-list, read tier (no dry run, no
    confirmation), output cap high enough that the 256 KiB result is not truncated."""
    tools = "\n".join(f"  {t}: {{ tiers: {{ bench: L0 }} }}" for t in BENCH_TOOLS)
    return ("version: 1\nenvironment: bench\noutput: { max_chars: 4000000, chars_per_token: 4 }\n"
            f"tools:\n{tools}\n")


def ensure_airlock() -> Path | None:
    """mcp-airlock in its own virtualenv (bench/.airlock-venv), installed from PyPI once."""
    exe = AIRLOCK_VENV / "bin" / "mcp-airlock"
    if exe.exists():
        return exe
    print(f"bench: installing mcp-airlock {AIRLOCK_VERSION} into {AIRLOCK_VENV} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(AIRLOCK_VENV)], check=True)
        subprocess.run([str(AIRLOCK_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", f"mcp-airlock=={AIRLOCK_VERSION}"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"bench: could not install mcp-airlock ({e}); skipping it", file=sys.stderr)
        return None
    return exe if exe.exists() else None


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("mitmproxy", "mcp", "httpx"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:
            pass
    py = AIRLOCK_VENV / "bin" / "python"
    if py.exists():
        try:
            out["mcp-airlock"] = subprocess.run(
                [str(py), "-c", "from importlib.metadata import version; print(version('mcp-airlock'))"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            pass
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    import platform
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(),
            "os": platform.platform()}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def json_dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
