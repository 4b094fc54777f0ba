"""One mitmproxy addon that runs the gateway's stages in order.

mitmproxy dispatches every event (about ten per HTTP exchange, `update` included) to every
addon it knows, walking nested `addons` lists and looking each hook up by name each time.
Here each hook is resolved once, at construction, into one callable that runs the stages'
implementations in order: dispatching an exchange's four HTTP hooks to fifteen stages costs
60 us, against 146-156 us with the stages as nested child addons. Flow hooks are guarded per stage
(addons/hooks/failclosed.py): an exception refuses the flow and the later stages still run,
so the recorder and the metrics see the refusal. Async hooks are awaited inside the flow's
own task, so an approval hold does not block other flows. Options and commands of every
stage are registered when mitmproxy loads the pipeline.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

from mitmproxy import addonmanager, ctx, hooks  # noqa: F401 - addonmanager defines the load hook
from mitmproxy.proxy import layers, server_hooks  # noqa: F401 - they define the flow and server hooks

from addons.hooks.failclosed import FLOW_HOOKS, guard


def _sequence(calls: list[Callable]) -> Callable:
    """One callable running `calls` in order: a coroutine function when any of them is."""
    if len(calls) == 1:
        return calls[0]
    if not any(inspect.iscoroutinefunction(c) for c in calls):
        def run(*args: Any) -> None:
            for c in calls:
                c(*args)
        return run
    plan = tuple((c, inspect.iscoroutinefunction(c)) for c in calls)

    async def run_async(*args: Any) -> None:
        for c, is_async in plan:
            if is_async:
                await c(*args)
            else:
                c(*args)
    return run_async


def stage_name(stage: Any) -> str:
    return getattr(stage, "name", type(stage).__name__.lower())


class Pipeline:
    """Runs `stages` in order for every mitmproxy hook any of them implements."""

    name = "bastion"

    def __init__(self, stages: Sequence[Any]):
        self.stages = tuple(stages)
        names = [stage_name(s) for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"two stages with one name: {names}")
        for hook in hooks.all_hooks:
            calls = []
            for stage, name in zip(self.stages, names):
                fn = getattr(stage, hook, None)
                if callable(fn):
                    calls.append(guard(name, hook, fn) if hook in FLOW_HOOKS else fn)
            if hook == "load":
                calls.append(self._collect_commands)
            if calls:
                # set once: mitmproxy looks every hook up on every addon for every event
                setattr(self, hook, _sequence(calls))

    def _collect_commands(self, loader: Any) -> None:
        # stages are not mitmproxy addons of their own: their @command.command methods (the
        # approval commands mitmweb's UI calls) are registered here, under their own names
        for stage in self.stages:
            ctx.master.commands.collect_commands(stage)

    def stage(self, name: str) -> Any:
        """A stage by name (tests, benchmarks); stages get what they need at construction."""
        return next(s for s in self.stages if stage_name(s) == name)
