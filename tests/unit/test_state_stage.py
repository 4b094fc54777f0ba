"""Policy + the state stage with a shared engine (MemoryStore through the protocol; the
Redis implementation is tested against a real redis-server in test_statestore.py and e2e):
bucket takes move to the engine, an unavailable engine refuses, unlimited rules flow."""
from __future__ import annotations

import json

from mitmproxy.test import taddons

from addons.core.statestore import MemoryStore, Sealer, SharedState, StateUnavailable
from addons.hooks.httputil import STATE_UNAVAILABLE
from addons.hooks.connections import Router
from addons.hooks.policy import RATE_LIMITED, Policy
from addons.hooks.state import StateEngine
from tests.unit.test_policy import error_of, flow, tool_call, write

RULES = ("rules:\n  - {name: lim, when: {tool: t}, allow: true, rate_limit: {calls: 2, per: 60}}\n"
         "  - {name: free, when: {tool: u}, allow: true}\n")


class DownStore(MemoryStore):
    async def take(self, key, calls, per, cost=1):
        raise StateUnavailable("ConnectionError: refused")


async def through(tmp_path, store, body):
    state = SharedState(store=store, sealer=Sealer(b"k" * 32))
    policy, stage = Policy(approvals=True, state=state), StateEngine(state)
    with taddons.context(Router(policy.registry), policy) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        out = []
        for b in body:
            f, rec = flow(b)
            policy.request(f)
            await stage.request(f)
            out.append((f, rec))
    return out, state, policy


async def test_shared_buckets_are_taken_by_the_engine_not_in_process(tmp_path):
    write(tmp_path, RULES)
    store = MemoryStore()
    out, state, policy = await through(tmp_path, store, [tool_call("t")] * 3)
    assert [error_of(f) for f, _ in out[:2]] == [None, None]
    err = error_of(out[2][0])
    assert err["code"] == RATE_LIMITED and "rate limit of 2 calls per 60s exceeded" in err["message"]
    assert out[2][1].decisions[0].action == "deny"          # the audit sees the refusal
    assert policy.limiter.buckets == {} and len(store.buckets) == 1


async def test_engine_down_refuses_limited_calls_only(tmp_path):
    write(tmp_path, RULES)
    out, state, _ = await through(tmp_path, DownStore(), [tool_call("t"), tool_call("u"), tool_call("t")])
    (limited, _), (free, _), (again, _) = out
    assert error_of(limited)["code"] == STATE_UNAVAILABLE
    assert "shared state engine is unavailable" in error_of(limited)["message"]
    assert error_of(free) is None                              # needs no engine: flows
    assert error_of(again)["code"] == STATE_UNAVAILABLE
    assert state.live_metrics()["bastion_state_up"] == 0.0


async def test_embedded_default_is_unchanged(tmp_path):
    write(tmp_path, RULES)
    policy = Policy(approvals=True)
    with taddons.context(Router(policy.registry), policy) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        results = []
        for _ in range(3):
            f, rec = flow(tool_call("t"))
            policy.request(f)
            assert rec.shared_takes == []
            results.append(error_of(f))
    assert results[:2] == [None, None] and results[2]["code"] == RATE_LIMITED
    assert json.dumps(results[2]).count("rate limit") == 1
