"""Issue 16 end to end with the shipped rules: allow-listed programs do not become a shell,
the gateway's own files stay unreadable, arguments are typed before policy (real gateway,
demo server, SDK client; the demo's received log and file system prove what got through)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT


@pytest.fixture
def shipped(demo_server, rules_dir, gateway, tmp_path):
    demo = demo_server("json")
    rules = rules_dir(demo)
    gw = gateway(rules)
    return demo, gw, rules, tmp_path


def _calls(demo, tool: str) -> list[dict]:
    out = []
    for r in demo.received():
        try:
            body = json.loads(r["body"])
        except (ValueError, TypeError):
            continue
        for m in body if isinstance(body, list) else [body]:
            if isinstance(m, dict) and m.get("method") == "tools/call" and m["params"].get("name") == tool:
                out.append(m["params"].get("arguments"))
    return out


async def _refused(c, tool: str, args: dict) -> str:
    try:
        r = await c.call_tool(tool, args)
    except Exception as e:  # noqa: BLE001 - the SDK raises its own error type
        return str(e)
    raise AssertionError(f"{tool} {args} was allowed: {r}")


async def test_gateway_files_never_readable_and_nothing_written_or_started(shipped):
    demo, gw, rules, tmp = shipped
    keys = tmp / "keys"
    secret_files = [p for p in keys.rglob("*") if p.is_file()]
    assert secret_files, "the gateway's key directory should hold its keys"
    marker = tmp / "pwned"
    attacks = [
        f"cat {rules}/policy.yaml", f"cat {secret_files[0]}", f"grep -r . {keys}", f"head {ROOT}/.secrets/x",
        f"grep -r key {tmp}/recordings", f"date -f {secret_files[0]}", f"grep -f {secret_files[0]} hello.txt",
        "cat ../../service-token",                   # the demo's own credential next to its data dir
        f"ls {rules}", f"sort --files0-from={rules}/policy.yaml", f"wc --files0-from {rules}/policy.yaml",
        f"cat {ROOT}/rules/../.secrets/demo-service-token", f"stat -c %n {keys}/*",
        # writes anywhere
        f"sort -o {marker} hello.txt", f"sort -o{marker} hello.txt", f"sort --out={marker} hello.txt",
        f"uniq hello.txt {marker}", f"sort -nro {marker} hello.txt", f"sort hello.txt -T {tmp}",
        f"echo x > {marker}", f"ls | tee {marker}",
        # programs outside the allow-list
        f"sort --compress-program=touch -S 1 hello.txt", f"sort --compress-prog=sh hello.txt",
        f"ls | sh", f"ls && touch {marker}", f"ls; touch {marker}", f"echo $(touch {marker})",
        f"ls `touch {marker}`", f"timeout 1 touch {marker}", f"env touch {marker}", f"find . -exec touch {marker} ;",
        f"xargs touch {marker}", "awk 'BEGIN{system(\"id\")}'", f"/tmp/ls", f"./ls", f"LD_PRELOAD={tmp}/x.so ls",
    ]
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        for a in attacks:
            why = await _refused(c, "run_command", {"command": a})
            assert "denied by mcp-bastion policy" in why, (a, why)
        for path in (f"{rules}/policy.yaml", "../../service-token", "/etc/passwd", f"{ROOT}/.secrets/x"):
            why = await _refused(c, "read_file", {"path": path})
            assert "nearest rule dev-files: its path condition does not hold" in why, (path, why)
    assert not marker.exists()
    sent = _calls(demo, "run_command") + _calls(demo, "read_file")
    assert sent == [], sent


async def test_refusals_name_the_option_or_path(shipped):
    demo, gw, rules, tmp = shipped
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        why = await _refused(c, "run_command", {"command": "sort --compress-program=sh hello.txt"})
        assert "option --compress-program of sort runs a program" in why
        why = await _refused(c, "run_command", {"command": f"cat {rules}/policy.yaml"})
        assert f"{rules}/policy.yaml" in why and "outside the read roots" in why


async def test_dev_pipelines_and_reads_inside_the_roots_work(shipped):
    demo, gw, rules, tmp = shipped
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        r = await c.call_tool("run_command", {"command": "grep -c x /etc/hostname || true"})
        assert not r.is_error and r.structured_content["exit_code"] == 0
        r = await c.call_tool("run_command", {"command": "echo hello | wc -c"})
        assert not r.is_error and r.structured_content["output"].strip() == "6"
        r = await c.call_tool("run_command", {"command": "cat hello.txt | sort | uniq -c | wc -l"})
        assert r.structured_content["output"].strip() == "1"
        r = await c.call_tool("run_command", {"command": "grep -n demo ./hello.txt && ls -la ."})
        assert "1:hello from the demo server" in r.structured_content["output"]
        r = await c.call_tool("read_file", {"path": "hello.txt"})
        assert not r.is_error and "hello from the demo server" in r.content[0].text
    assert len(_calls(demo, "run_command")) == 4


@pytest.mark.parametrize("args,why", [
    ({"image": "alpine", "privileged": "yes"}, "$.privileged: must be of type boolean"),
    ({"image": "alpine", "privileged": "true"}, "$.privileged: must be of type boolean"),
    ({"image": "alpine", "privileged": 1}, "$.privileged: must be of type boolean"),
    ({"image": ["alpine"]}, "$.image: must be of type string"),
    ({"privileged": False}, "missing required argument(s) image"),
])
async def test_type_confusion_refused_before_the_upstream(shipped, args, why):
    demo, gw, rules, tmp = shipped
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        # a tool error result the model can read (MCP 2025-11-25, SEP-1303), made by the gateway
        r = await c.call_tool("launch_container", args)
        text = r.content[0].text
        assert r.is_error and why in text and "invalid arguments for tool launch_container" in text, text
        # a well-typed true is still the deny rule's business
        err = await _refused(c, "launch_container", {"image": "alpine", "privileged": True})
        assert "no-privileged-containers" in err
    assert _calls(demo, "launch_container") == []
    assert not (demo.data_dir / "launches.jsonl").exists()
    assert "yes" not in "".join(r["body"] for r in demo.received())


async def test_schema_from_tools_list_and_switch_off(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo), extra_args=("--set", "bastion_validate_args=false"))
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        # validation off: the upstream coerces the string "1" to 1 (what the issue found)
        r = await c.call_tool("get_customer", {"id": "1"})
        assert not r.is_error and r.structured_content["id"] == 1
    gw2 = gateway(rules_dir(demo))
    async with connect(gw2.mcp_url(), gw2.token("ana", ["analyst"])) as c:
        await c.list_tools()
        r = await c.call_tool("get_customer", {"id": "1"})
        assert r.is_error and "$.id: must be of type integer" in r.content[0].text
        assert not (await c.call_tool("get_customer", {"id": 1})).is_error


def test_explain_shows_each_command_and_path(demo_server, rules_dir):
    rules = rules_dir(demo_server("stateless"))
    r = subprocess.run([sys.executable, "-m", "addons.cli", "--rules", str(rules), "explain", "--sub", "dan",
                        "--roles", "dev", "--connection", "demo", "--tool", "run_command", "--args",
                        json.dumps({"command": "grep -c x /etc/hostname | sort -o /tmp/out"})],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    out = r.stdout
    assert "command `grep -c x /etc/hostname`: model ok" in out, out
    assert "read /etc/hostname (operand): ok" in out
    assert "write /tmp/out (-o): /tmp/out: outside the write roots" in out
    assert "decision: DENY" in out and "nearest rule dev-shell: its shell condition does not hold" in out


READ_EVERYTHING = """\
rules:
  - name: read-anything
    when:
      tool: run_command
      shell: {commands: [cat, grep, ls, head], operators: [pipe], paths: {read: ["/**", "./**"]}}
    allow: true
  - name: files-anywhere
    when:
      tool: read_file
      path: {arg: path, roots: ["/**"]}
    allow: true
"""


async def test_gateway_files_stay_unreadable_whatever_the_roots(stack, tmp_path):
    """Rules that allow reading `/**`: the gateway's keys, rules, recordings and the
    connection's credential file are still refused (learnt from the running options)."""
    demo, gw = stack("json", policy=READ_EVERYTHING)
    key = next(p for p in (tmp_path / "keys").rglob("*") if p.is_file())
    targets = [key, gw.rules / "policy.yaml", gw.rules, tmp_path / "keys", demo.token_file, ROOT / ".secrets",
               ROOT / "rules" / "policy.yaml"]
    async with connect(gw.mcp_url(), gw.token("eve", ["e2e-all"])) as c:
        for t in targets:
            for cmd in (f"cat {t}", f"grep -r . {t}", f"head -c 10 {t} | cat"):
                why = await _refused(c, "run_command", {"command": cmd})
                assert "never readable" in why, (cmd, why)
        why = await _refused(c, "run_command", {"command": f"ls {tmp_path}"})     # would list into keys/
        assert "never readable" in why
        r = await c.call_tool("run_command", {"command": "cat /etc/hostname | head -c 200"})
        assert not r.is_error and r.structured_content["exit_code"] == 0
        why = await _refused(c, "read_file", {"path": str(key)})
        assert "never readable" in why
    assert "keys" not in "".join(r["body"] for r in demo.received() if "run_command" in r["body"])


async def test_type_confusion_answered_on_the_legacy_event_stream(stack):
    """Legacy HTTP+SSE: the gateway's tool error reaches the caller on its event stream."""
    import asyncio
    demo, gw = stack("legacy", policy=READ_EVERYTHING + """\
  - name: get-customers
    when: {tool: get_customer}
    allow: true
""")
    async with connect(gw.mcp_url(), gw.token("eve", ["e2e-all"]), legacy=True, timeout=15) as c:
        r = await asyncio.wait_for(c.call_tool("get_customer", {"id": "7"}), 10)
        assert r.is_error and "$.id: must be of type integer" in r.content[0].text
        ok = await c.call_tool("get_customer", {"id": 1})
        assert not ok.is_error
    assert '"7"' not in "".join(r["body"] for r in demo.received())
