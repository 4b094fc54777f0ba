"""mitmweb as the approval console: what the approval addon changes in mitmweb's own web app.

Resume All (mitmweb's button and its POST /flows/resume) resumes every intercepted flow at
once; for a held MCP call a resume is an approval, so Resume All would approve every held
call without anybody looking at them. The route is taken over (tornado's add_handlers puts
a rule before mitmweb's own) by one that resumes only flows that are not waiting for
approval; each held call still needs its own decision.

`@focus` in mitmweb's command bar means the server's view focus, which the browser never
moves (the selection lives in the page), so `bastion.approve @focus` acted on some other
flow. The page gets one small script (same origin, as mitmweb's CSP requires) that tells
the gateway which flow is selected whenever mitmweb writes the selection into its URL, and
widens the Comment column (150 px in mitmweb) so the held call's summary line is readable.
"""
from __future__ import annotations

from typing import Any, Callable

from mitmproxy import flow as mflow

from addons.core.textsafe import get_logger

log = get_logger("bastion.approval")

DEFAULT_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time")
# the flow list an approver needs: the held call's resume button, who/what/rule/deadline (comment)
# (mitmweb always adds its quickactions column: the row's resume button, shown on hover)
APPROVAL_COLUMNS = ("icon", "method", "path", "status", "comment", "time")


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

    class IndexWithFocus(webapp.IndexHandler):
        """mitmweb's page, plus the script that keeps @focus on the selected flow."""

        def get(self) -> None:
            page = self.render_string("../index.html")
            self.finish(page.replace(b"</body>", b'<script src="./bastion/console.js"></script></body>', 1))

        post = get  # login form, as mitmweb's own

    class ConsoleScript(webapp.RequestHandler):
        def get(self) -> None:
            self.set_header("content-type", "application/javascript")
            self.set_header("cache-control", "no-store")
            self.write(CONSOLE_JS)

    class Focus(webapp.RequestHandler):
        """POST /bastion/focus/<flow id>: the view's focus (what @focus names) = that flow."""

        def post(self, flow_id: str) -> None:
            self.view.focus.flow = self.flow

    application.add_handlers(r".*", [(r"/flows/resume", ResumeAllButHeld), (r"/", IndexWithFocus),
                                     (r"/bastion/console\.js", ConsoleScript),
                                     (r"/bastion/focus/(?P<flow_id>[0-9a-f\-]+)", Focus)])
    return True


# mitmweb writes the selection into the URL (#/flows/<id>/<tab>) with history.replaceState
CONSOLE_JS = """(() => {
  const style = document.createElement("style");
  style.textContent = ".flow-table .col-comment { width: 55%; }" +
    " .flow-table .status-badge.bastion-refused { background-color: #c9302c; }";
  document.head.appendChild(style);
  // a refused approval is an HTTP 200 carrying a JSON-RPC error (as MCP answers errors):
  // its status badge turns red and says so, instead of a green 200
  const REFUSED = /^(DENIED|EXPIRED|CANCELLED) (-\\d+)/;
  const mark = () => {
    for (const row of document.querySelectorAll(".flow-table tr")) {
      const m = (row.querySelector("td.col-comment")?.textContent || "").match(REFUSED);
      const badge = row.querySelector("td.col-status .status-badge");
      if (!badge) continue;
      badge.classList.toggle("bastion-refused", !!m);
      if (m) badge.title = `HTTP 200 with JSON-RPC error ${m[2]} (${m[1].toLowerCase()})`;
    }
  };
  new MutationObserver(mark).observe(document.body, {childList: true, subtree: true, characterData: true});
  let last = null;
  const sync = () => {
    const m = location.hash.match(/^#\\/flows\\/([0-9a-f-]+)/);
    if (!m || m[1] === last) return;
    last = m[1];
    const xsrf = (document.cookie.match(/(?:^|; )_mitmproxy_xsrf=([^;]*)/) || [])[1] || "";
    fetch("./bastion/focus/" + m[1], {method: "POST", credentials: "same-origin",
                                      headers: {"X-XSRFToken": decodeURIComponent(xsrf)}});
  };
  const replace = history.replaceState.bind(history);
  history.replaceState = (...args) => { replace(...args); sync(); };
  addEventListener("hashchange", sync);
  sync();
})();
"""


def approval_columns(current: Any) -> list[str] | None:
    """The flow-list columns to switch to, or None when the operator chose their own."""
    return list(APPROVAL_COLUMNS) if tuple(current) == DEFAULT_COLUMNS else None
