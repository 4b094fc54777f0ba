"""The mcp-bastion pipeline: `mitmdump -s addons/bastion.py` (or `mitmweb -s …`).

Built once, here: the state the stages share (the connection registry, the pin store)
and the stages in their order — route, verify, parse, decide, hold, rewrite responses,
record, and only then point the request at its upstream with the service credential.
Each stage gets what it uses through its constructor; none looks another up at run time.
mitmproxy sees one addon, the Pipeline, which runs the stages in order and fails closed per
stage: an exception refuses the flow. docs/architecture.md explains the order, the per-flow
record and where each rule is enforced.
"""
from __future__ import annotations

import os
import sys

# mitmproxy loads this file as a script; make the package importable from a checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons.core.connections import ConnectionRegistry  # noqa: E402
from addons.core.integrity import PinStore  # noqa: E402
from addons.core.statestore import SharedState  # noqa: E402
from addons.hooks.approval import Approval  # noqa: E402
from addons.hooks.connections import Injector, Router  # noqa: E402
from addons.hooks.identity import Identity  # noqa: E402
from addons.hooks.integrity import Integrity  # noqa: E402
from addons.hooks.legacyrefusal import LegacyRefusals  # noqa: E402
from addons.hooks.masking import Masking  # noqa: E402
from addons.hooks.mcpflow import McpParser  # noqa: E402
from addons.hooks.metrics import Metrics  # noqa: E402
from addons.hooks.pipeline import Pipeline  # noqa: E402
from addons.hooks.policy import Policy  # noqa: E402
from addons.hooks.recorder import Recorder  # noqa: E402
from addons.hooks.redaction import SecretRedaction  # noqa: E402
from addons.hooks.responses import ResponseRewriter  # noqa: E402
from addons.hooks.schemacheck import ArgSchema  # noqa: E402
from addons.hooks.state import StateEngine  # noqa: E402


def build_stages() -> list:
    """Every stage, in order, sharing one connection registry, one pin store and one state engine."""
    connections = ConnectionRegistry()      # the Router loads and reloads it; the rest read it
    pins = PinStore()                        # rules/pins/*.yaml: integrity and argument schemas
    state = SharedState()                    # bastion_state: in-process, or Redis shared by replicas
    masking = Masking()
    approval = Approval(masking_config=lambda: masking.config, state=state)   # approvers see masked arguments
    recorder = Recorder(connections)
    return [
        Router(connections),
        Identity(connections),
        McpParser(),
        ArgSchema(connections, pins),
        Policy(connections, approvals=True, state=state),
        StateEngine(state),                  # shared buckets the policy left (bastion_state)
        Integrity(connections, pins),
        approval,
        masking,
        ResponseRewriter(connections),
        SecretRedaction(),
        Metrics(live=(approval.live_metrics, recorder.live_metrics, state.live_metrics)),
        recorder,
        LegacyRefusals(),
        Injector(connections),
    ]


class Bastion(Pipeline):
    """The one addon mitmproxy loads from this script: every stage of build_stages() (or the
    given ones), run in order by addons/hooks/pipeline.py."""

    def __init__(self, stages: list | None = None) -> None:
        super().__init__(build_stages() if stages is None else stages)


addons = [Bastion()]
