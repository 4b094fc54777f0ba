"""mitmweb as the approval console: what the approval addon changes in mitmweb's own web app.

Resume All (mitmweb's button and its POST /flows/resume) resumes every intercepted flow at
once; for a held MCP call a resume is an approval, so Resume All would approve every held
call without anybody looking at them. The route is taken over (tornado's add_handlers puts
a rule before mitmweb's own) by one that resumes only flows that are not waiting for
approval; each held call still needs its own decision.
"""
from __future__ import annotations

from typing import Any, Callable

from mitmproxy import flow as mflow

from addons.textsafe import get_logger

log = get_logger("bastion.approval")

DEFAULT_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time")
# the flow list an approver needs: the held call's resume button, who/what/rule/deadline (comment)
APPROVAL_COLUMNS = ("icon", "method", "path", "status", "quickactions", "comment", "time")


def install(master: Any, held: Callable[[mflow.Flow], bool]) -> bool:
    """Take over mitmweb's Resume All; False when `master` is not mitmweb."""
    try:
        from mitmproxy.tools.web import app as webapp
    except ImportError:                      # mitmdump without the web extras
        return False
    application = getattr(master, "app", None)
    if not isinstance(application, webapp.Application):
        return False

    class ResumeAllButHeld(webapp.RequestHandler):
        """POST /flows/resume: mitmweb's handler, minus the calls waiting for approval."""

        def post(self) -> None:
            kept = 0
            for f in self.view:
                if not f.intercepted:
                    continue
                if held(f):
                    kept += 1
                    continue
                f.resume()
                self.view.update([f])
            if kept:
                log.warning("Resume All left %d call(s) waiting for approval: approve each one "
                            "(its resume button, or bastion.approve @focus)", kept)

    application.add_handlers(r".*", [(r"/flows/resume", ResumeAllButHeld)])
    return True


def approval_columns(current: Any) -> list[str] | None:
    """The flow-list columns to switch to, or None when the operator chose their own."""
    return list(APPROVAL_COLUMNS) if tuple(current) == DEFAULT_COLUMNS else None
