"""The hook side of hot reload: a stage whose rules files are watched (core.rules.RulesWatch)
polls them while mitmproxy runs. Stages list their watches in `self.watches`."""
from __future__ import annotations

from addons.core.rules import RulesWatch


class Watching:
    watches: tuple[RulesWatch, ...] = ()

    def running(self) -> None:
        for w in self.watches:
            w.start()              # idempotent: a watch two stages share polls once

    def done(self) -> None:
        for w in self.watches:
            w.stop()

    def check_reload(self) -> None:
        """What the poll does, now (tests; `mcp-bastion` commands that reload at once)."""
        for w in self.watches:
            w.check()
