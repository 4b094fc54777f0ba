"""`mcp-bastion serve`: the gateway on a lean mitmproxy master.

Stock mitmdump loads ~35 built-in addons and runs every hook of every flow through all of
them; the gateway needs five. This master loads only those, then the bastion pipeline
(addons/bastion.py). `mitmdump -s addons/bastion.py` and `mitmweb -s addons/bastion.py`
keep working unchanged (mitmweb for the approval console). docs/performance.md lists the
built-ins and why each is needed.
"""
from __future__ import annotations

import argparse
import sys

# mitmproxy built-ins the gateway needs (added in lean_master_class), and why
# (docs/performance.md keeps this list):
#   core         the core options and commands (mode, listen_host/port, connection_strategy, ...)
#   proxyserver  the listener and the proxy itself (reverse mode)
#   next_layer   picks the protocol layer for each connection (HTTP/1, HTTP/2)
#   tlsconfig    TLS towards https upstreams and, with certificates, towards clients
#   errorcheck   exits with a message when the startup configuration fails
#   termlog      (added by the master) the log on the terminal


def lean_master_class():
    from mitmproxy import exceptions, hooks, master
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig

    from addons.bastion import Bastion

    class LeanMaster(master.Master):
        def __init__(self, options, loop=None, with_termlog: bool = True) -> None:
            super().__init__(options, event_loop=loop, with_termlog=with_termlog)
            self.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                            errorcheck.ErrorCheck())

        async def run(self) -> None:
            # added once the command line is applied (as mitmdump loads -s scripts): the
            # deferred --set bastion_* values are set when its options register
            bastion = Bastion()
            self.addons.add(bastion)
            # as mitmproxy's script loader does for a script: configure with every option
            try:
                await self.addons.invoke_addon(bastion, hooks.ConfigureHook(set(self.options.keys())))
            except exceptions.OptionsError as e:      # a bad rules file, key or option: refuse to start
                print(f"mcp-bastion serve: {e}", file=sys.stderr)
                sys.exit(1)
            await super().run()

    return LeanMaster


def make_parser(opts) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcp-bastion serve",
                                description="Run the gateway on a lean mitmproxy master (same options as "
                                            "mitmdump -s addons/bastion.py; no -s: the pipeline is built in).")
    p.add_argument("--version", action="store_true")
    p.add_argument("--options", action="store_true", help="show all options and their defaults")
    p.add_argument("--commands", action="store_true", help="show all commands")
    p.add_argument("--set", type=str, dest="setoptions", default=[], action="append", metavar="option[=value]",
                   help="set an option (bastion_rules=rules, connection_strategy=lazy, ...)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_const", const="debug")
    for name in ("mode", "listen_host", "listen_port", "termlog_verbosity"):
        opts.make_parser(p, name)
    return p


def add_cli(sub) -> None:
    # listed for `mcp-bastion --help`; addons/cli/__init__.main hands `serve`'s arguments to
    # mitmproxy's own option handling untouched (they are mitmproxy options, not ours)
    sub.add_parser("serve", help="run the gateway on a lean mitmproxy master (mitmdump options; docs/performance.md)")


def main(argv: list[str] | None = None) -> int:
    from mitmproxy.tools.main import run
    run(lean_master_class(), make_parser, sys.argv[1:] if argv is None else argv)
    return 0
