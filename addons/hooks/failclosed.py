"""Fail closed: an exception in any bastion addon refuses the flow instead of letting
mitmproxy log it and carry on (its default), which would forward the request unchecked."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from mitmproxy import hooks, http

from addons.hooks.httputil import json_response
from addons.core.record import get_record
from addons.core.textsafe import get_logger

log = get_logger("bastion.failclosed")

FLOW_HOOKS = frozenset({"requestheaders", "request", "responseheaders", "response"})
FAILED_KEY = "bastion_failclosed_body"


def _fail(flow: Any, addon_name: str, hook: str) -> None:
    log.exception("internal error in %s.%s; flow refused (fail closed)", addon_name, hook)
    if not isinstance(flow, http.HTTPFlow):
        return
    get_record(flow.metadata).refuse(f"internal error in {addon_name}", None)
    body = json_response(502, {"error": "gateway_error", "error_description": "the gateway could not check this request"})
    if flow.response is not None and hook in ("responseheaders", "response") and flow.response.stream:
        # bytes may already be on the wire: cut the stream rather than send unchecked data
        flow.response.stream = lambda data: []   # nothing more (b"" would end a chunked body)
        if flow.killable:
            flow.kill()
        return
    if hook == "responseheaders":
        # mitmproxy still reads the upstream body after this hook and writes it into
        # whatever flow.response is then: discard it and send the 502 body instead.
        payload = body.content or b""
        sent: list[bool] = []

        def discard(data: bytes) -> list[bytes]:
            if sent:
                return []
            sent.append(True)
            return [payload]
        body.stream = discard
        flow.metadata[FAILED_KEY] = payload
    flow.response = body


def _restore(flow: Any) -> None:
    """An upstream response without a body skips streaming and overwrites the 502 body
    set in responseheaders with b"": put it back before the response is sent."""
    payload = flow.metadata.get(FAILED_KEY) if isinstance(flow, http.HTTPFlow) else None
    if payload is not None and flow.response is not None and flow.response.raw_content != payload:
        flow.response = json_response(502, {"error": "gateway_error",
                                            "error_description": "the gateway could not check this request"})


def guard(addon_name: str, hook: str, fn: Callable) -> Callable:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(flow, *a, **kw):
            if hook == "response":
                _restore(flow)
            try:
                return await fn(flow, *a, **kw)
            except Exception:
                _fail(flow, addon_name, hook)
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(flow, *a, **kw):
        if hook == "response":
            _restore(flow)
        try:
            return fn(flow, *a, **kw)
        except Exception:
            _fail(flow, addon_name, hook)
    return wrapper


class FailClosed:
    """Wraps an addon so its flow hooks refuse on exception. Other hooks pass through."""

    def __init__(self, addon: Any):
        self._addon = addon
        self.name = getattr(addon, "name", type(addon).__name__.lower())
        # wrap once: mitmproxy looks hooks up on every event
        for hook in FLOW_HOOKS:
            fn = getattr(addon, hook, None)
            if callable(fn):
                setattr(self, hook, guard(self.name, hook, fn))
        # mitmproxy's traverse() asks every addon for `addons` on every event
        self.addons = getattr(addon, "addons", ())

    def __getattr__(self, item: str) -> Any:
        # only reached for attributes not set above (other hooks, options, commands)
        try:
            return getattr(self._addon, item)
        except AttributeError:
            if item in hooks.all_hooks:
                # mitmproxy looks every hook up on every addon for every event: remember
                # the miss so the next lookup is a plain attribute read, not an exception
                self.__dict__[item] = None
            raise

    def __dir__(self) -> list[str]:
        # mitmproxy collects @command.command methods via dir()
        return sorted(set(dir(self._addon)) | {"name", "wrapped"})

    @property
    def wrapped(self) -> Any:
        return self._addon
