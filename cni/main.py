"""Entry point of the Python ``merbridge-cni``.

The node normally runs the static executable (``cni/static``), which needs
nothing from the node and runs the same skel and plugin inside the daemon
(``inprocess.py``); this entry point runs in the zipapp (``zipapp.py``) the
daemon installs when no static build is found (it needs python3 on the node).

``main()`` wires the real process I/O into the skel.
"""
from __future__ import annotations

import os
import sys

ABOUT = "merbridge-cni: chained CNI plugin of merbridge (forwards to the node daemon)"


class _LazyPlugin:
    """Imports the plugin (protocol, dataclasses, ...) only when a command needs it,
    so VERSION answers with the skel alone."""

    def __getattr__(self, name: str):
        from merbridge.cni.plugin import Plugin
        plugin = Plugin()
        self.__dict__.update((m, getattr(plugin, m)) for m in
                             ("add", "delete", "check", "status", "gc", "configure_log"))
        return getattr(plugin, name)


def main() -> None:
    from merbridge.cni import skel

    # fd 0/1/2 may be closed by a careless runtime: Python then sets sys.std* to None
    stdin = sys.stdin.buffer if sys.stdin is not None else open(os.devnull, "rb")
    stdout = sys.stdout.buffer if sys.stdout is not None else open(os.devnull, "wb")
    stderr = sys.stderr.buffer if sys.stderr is not None else open(os.devnull, "wb")
    code = skel.Dispatcher(os.environ.get, stdin, stdout, stderr, about=ABOUT).run(_LazyPlugin())
    sys.exit(code)
