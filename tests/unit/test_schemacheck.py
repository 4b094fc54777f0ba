"""addons/hooks/schemacheck.py through mitmproxy's test helpers: pinned schemas win, schemas are
learnt from tools/list answers, an unknown schema that cannot be fetched refuses the call,
and the option switches it off."""
from __future__ import annotations

import json

from mitmproxy.test import taddons

from addons.core import integrity as ti
from addons.hooks.connections import Router
from addons.hooks.schemacheck import ArgSchema
from tests.unit.test_policy import flow, tool_call

TOOL = {"name": "launch_container", "description": "Launch.",
        "inputSchema": {"type": "object", "properties": {"image": {"type": "string"},
                                                         "privileged": {"type": "boolean"}}, "required": ["image"]}}


def _conns(tmp_path):
    # port 9 (discard): nothing answers there, so the gateway's own tools/list fails
    (tmp_path / "connections.yaml").write_text("connections:\n  demo:\n    upstream: http://127.0.0.1:9/mcp\n")


async def _call(addon, args, tmp_path, **opts):
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for k, v in opts.items():
            setattr(tctx.options, k, v)
        f, rec = flow(tool_call("launch_container", args))
        await addon.request(f)
    if f.response is None:
        return None
    body = json.loads(f.response.content)
    if "error" in body:
        return body["error"]
    assert body["result"]["isError"] is True                 # a tool error result (SEP-1303)
    return {"code": "tool-error", "message": body["result"]["content"][0]["text"]}


async def test_pinned_schema_refuses_type_confusion(tmp_path):
    _conns(tmp_path)
    ti.write_pins(tmp_path, "demo", [TOOL])
    addon = ArgSchema()
    err = await _call(addon, {"image": "alpine", "privileged": "yes"}, tmp_path)
    assert err["code"] == "tool-error" and "$.privileged: must be of type boolean" in err["message"]
    assert "yes" not in err["message"]
    assert await _call(addon, {"image": "alpine", "privileged": True}, tmp_path) is None


async def test_schema_learnt_from_a_tools_list_answer(tmp_path):
    _conns(tmp_path)
    addon = ArgSchema()
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, rec = flow({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        await addon.request(f)
        (transform,) = rec.response_transforms
        msg = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [TOOL]}}
        assert transform(msg) == msg                     # the answer itself is untouched
    err = await _call(addon, {"privileged": False}, tmp_path)
    assert "missing required argument(s) image" in err["message"]
    # a tool the upstream does not list: nothing to validate, the upstream answers it
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, _ = flow(tool_call("no_such_tool", {"x": 1}))
        await addon.request(f)
    assert f.response is None


async def test_no_schema_and_no_upstream_list_refuses(tmp_path):
    _conns(tmp_path)
    err = await _call(ArgSchema(), {"image": "alpine"}, tmp_path)
    assert err["code"] == -32602 and "could not list the upstream's tools" in err["message"]


async def test_validation_can_be_switched_off(tmp_path):
    _conns(tmp_path)
    assert await _call(ArgSchema(), {"image": 5}, tmp_path, bastion_validate_args=False) is None


async def test_a_batch_is_refused_whole_each_call_with_its_reason(tmp_path):
    _conns(tmp_path)
    ti.write_pins(tmp_path, "demo", [TOOL])
    addon = ArgSchema()
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, _ = flow([tool_call("launch_container", {"image": "a"}, 1),
                     tool_call("launch_container", {"image": "a", "privileged": "yes"}, 2)])
        await addon.request(f)
    answers = {e["id"]: e for e in json.loads(f.response.content)}
    assert answers[2]["result"]["isError"] and "$.privileged" in answers[2]["result"]["content"][0]["text"]
    assert answers[1]["error"]["code"] == -32602 and "another call in it" in answers[1]["error"]["message"]


async def test_switching_validation_back_on_applies_to_the_next_call(tmp_path):
    """The stage keeps bastion_validate_args from configure: each change must reach it."""
    _conns(tmp_path)
    ti.write_pins(tmp_path, "demo", [TOOL])
    addon = ArgSchema()
    answers = []
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for on in (False, True):
            tctx.options.bastion_validate_args = on
            f, _ = flow(tool_call("launch_container", {"image": 5}))
            await addon.request(f)
            answers.append(f.response is not None)
    assert answers == [False, True]
