"""Entry point of the Python ``merbridge-cni``, and the builder of its zipapp.

The node normally runs the static executable (``cni/static``), which needs
nothing from the node and runs the same skel and plugin inside the daemon
(``inprocess.py``); the zipapp below is the fallback the daemon installs when
no static build is found (it needs python3 on the node).

``main()`` wires the real process I/O into the skel. ``build_zipapp(dest)``
writes a self-contained executable (a zipapp with only ``merbridge/cni/*.py``
and ``#!/usr/bin/env -S python3 -IS``) that the daemon's install-cni copies
into the node's CNI bin directory: the runtime executes it with the host's
python3, outside our venv, isolated (-I: no PYTHON* variables, no user or
current directory on sys.path) and without ``site`` (-S: the plugin needs only
the standard library, and skipping site saves ~8 ms on every pod start).
``env -S`` is GNU coreutils 8.30 or newer (every current distribution).
"""
from __future__ import annotations

import os
import sys

ABOUT = "merbridge-cni: chained CNI plugin of merbridge (forwards to the node daemon)"


class _LazyPlugin:
    """Imports the plugin (protocol, dataclasses, ...) only when a command needs it,
    so VERSION answers with the skel alone."""

    def __getattr__(self, name: str):
        from .plugin import Plugin
        plugin = Plugin()
        self.__dict__.update((m, getattr(plugin, m)) for m in
                             ("add", "delete", "check", "status", "gc", "configure_log"))
        return getattr(plugin, name)


def main() -> None:
    from . import skel

    # fd 0/1/2 may be closed by a careless runtime: Python then sets sys.std* to None
    stdin = sys.stdin.buffer if sys.stdin is not None else open(os.devnull, "rb")
    stdout = sys.stdout.buffer if sys.stdout is not None else open(os.devnull, "wb")
    stderr = sys.stderr.buffer if sys.stderr is not None else open(os.devnull, "wb")
    code = skel.Dispatcher(os.environ.get, stdin, stdout, stderr, about=ABOUT).run(_LazyPlugin())
    sys.exit(code)


INTERPRETER = "/usr/bin/env -S python3 -IS"


def build_zipapp(dest_path: str, interpreter: str = INTERPRETER) -> str:
    """Write the node executable to ``dest_path`` (mode 0755, atomically); return the path.

    Sources are compiled to unchecked-hash .pyc next to the .py files: zipimport
    uses them when the node's python matches ours and falls back to source
    otherwise, so start-up stays fast without tying the file to one version.
    """
    import py_compile
    import shutil
    import tempfile
    import zipapp

    src = os.path.dirname(os.path.abspath(__file__))
    dest_path = os.path.abspath(dest_path)
    with tempfile.TemporaryDirectory(prefix="mb-cni-zipapp-") as tmp:
        # no merbridge/__init__.py: "merbridge" stays a namespace package
        pkg = os.path.join(tmp, "stage", "merbridge", "cni")
        os.makedirs(pkg)
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):
                shutil.copyfile(os.path.join(src, name), os.path.join(pkg, name))
                py_compile.compile(
                    os.path.join(pkg, name), cfile=os.path.join(pkg, name[:-3] + ".pyc"),
                    dfile=f"merbridge/cni/{name}", doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        out = os.path.join(tmp, "merbridge-cni")
        zipapp.create_archive(os.path.join(tmp, "stage"), out, interpreter=interpreter,
                              main="merbridge.cni.main:main")
        os.chmod(out, 0o755)
        part = f"{dest_path}.tmp-{os.getpid()}"
        shutil.copyfile(out, part)
        os.chmod(part, 0o755)
        os.replace(part, dest_path)
    return dest_path
