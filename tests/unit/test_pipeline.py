"""addons/hooks/pipeline.py: one `bastion` addon runs every stage in order, fails closed per
stage while the later stages still run, awaits a held flow without blocking others, and
registers the stages' options and commands with mitmproxy."""
from __future__ import annotations

import asyncio

import pytest
from mitmproxy.test import taddons, tflow

from addons.core.record import get_record
from addons.hooks.pipeline import Pipeline
from tests.unit.test_failclosed import INTERNAL, WithCommands, assert_502


class Stage:
    def __init__(self, name, log, fail=(), hold: asyncio.Event | None = None):
        self.name, self.log, self.fail, self.hold = name, log, set(fail), hold

    async def request(self, flow):
        self.log.append((self.name, flow.id, get_record(flow.metadata).refusal))
        if self.hold is not None and flow.metadata.get("hold"):
            await self.hold.wait()
        if "request" in self.fail:
            raise RuntimeError(INTERNAL)

    def response(self, flow):
        self.log.append((self.name, "response"))
        if "response" in self.fail:
            raise RuntimeError(INTERNAL)


async def test_stages_run_in_order_and_an_exception_refuses_while_later_stages_still_run():
    log: list = []
    p = Pipeline([Stage("a", log), Stage("boom", log, fail=("request",)), Stage("c", log)])
    f = tflow.tflow()
    with taddons.context(p):
        await p.request(f)
    assert_502(f)
    assert [e[0] for e in log] == ["a", "boom", "c"]
    assert log[0][2] is None and log[2][2] == "internal error in boom"   # the recorder-like stage sees it


async def test_an_exception_in_a_sync_response_stage_refuses():
    log: list = []
    p = Pipeline([Stage("a", log), Stage("boom", log, fail=("response",))])
    f = tflow.tflow(resp=True)
    with taddons.context(p):
        p.response(f)
    assert_502(f)
    assert log == [("a", "response"), ("boom", "response")]


async def test_a_held_flow_does_not_block_another():
    log: list = []
    release = asyncio.Event()
    p = Pipeline([Stage("hold", log, hold=release), Stage("after", log)])
    held, other = tflow.tflow(), tflow.tflow()
    held.metadata["hold"] = True
    with taddons.context(p):
        task = asyncio.ensure_future(p.request(held))
        await asyncio.sleep(0)
        await asyncio.wait_for(p.request(other), 5)        # goes through while the first waits
        assert ("after", other.id, None) in log and ("after", held.id, None) not in log
        release.set()
        await asyncio.wait_for(task, 5)
    assert ("after", held.id, None) in log


def test_hooks_no_stage_implements_are_absent():
    p = Pipeline([Stage("a", [])])
    assert callable(p.request) and not hasattr(p, "responseheaders") and not hasattr(p, "tcp_message")


def test_stage_options_commands_and_lifecycle_reach_mitmproxy():
    inner = WithCommands()
    p = Pipeline([inner])
    with taddons.context(p) as tctx:
        assert tctx.master.commands.execute("bastion.testcmd hello") == "got hello"
        assert tctx.options.bastion_test_option == 3
        tctx.configure(p, bastion_test_option=5)
        assert any("bastion_test_option" in u for u in inner.configured)
        p.running()
        assert inner.running_called
        f = tflow.tflow()
        p.request(f)                                         # WithCommands.request raises
        assert_502(f)


def test_two_stages_with_one_name_are_refused():
    with pytest.raises(ValueError):
        Pipeline([Stage("a", []), Stage("a", [])])


def test_the_approval_commands_are_registered_through_the_pipeline():
    from addons import bastion
    with taddons.context(bastion.Bastion()) as tctx:
        names = set(tctx.master.commands.commands)
    cmds = {getattr(getattr(bastion.Approval, n), "command_name", None) for n in dir(bastion.Approval)} - {None}
    assert cmds and cmds <= names
