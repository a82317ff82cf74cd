"""The zipapp of the Python ``merbridge-cni``: the fallback the daemon installs
when no static executable (``cni/static``) is found.

``build_zipapp(dest)`` writes a self-contained executable (a zipapp with only
``merbridge/cni/*.py`` and ``#!/usr/bin/env -S python3 -IS``, entry point
``main.main``) that the daemon's install-cni copies into the node's CNI bin
directory: the runtime executes it with the host's python3, outside our venv,
isolated (-I: no PYTHON* variables, no user or current directory on sys.path)
and without ``site`` (-S: the plugin needs only the standard library, and
skipping site saves ~8 ms on every pod start). ``env -S`` is GNU coreutils
8.30 or newer (every current distribution).

A module of its own so that the daemon, which builds the file, imports it
without the plugin's entry point (docs/design.md's import rules).
"""
from __future__ import annotations

import os

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
