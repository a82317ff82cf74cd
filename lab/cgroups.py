"""Child cgroups of the cgroup v2 mount for labs and tests, made and removed here.

The safety rules (docs/design.md): programs attach only to cgroups we create
below the cgroup v2 mount, never to the mount itself, and we remove only what
we made -- killing by PID whatever of ours still runs in it.
"""
from __future__ import annotations

import os
import signal
import time

from merbridge.daemon.config import find_cgroup2_mount

#: the cgroup v2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
#: host); labs and tests make their ``mbt-*`` cgroups below it and never attach
#: to it. None without a cgroup2 mount.
CGROUP_ROOT = find_cgroup2_mount()


class CgroupError(RuntimeError):
    pass


def make_cgroup(name: str, parent: str | None = None) -> str:
    """mkdir ``parent/name`` (``parent``: the cgroup v2 mount by default) and return
    its path; it must not exist yet (never adopt a stranger's)."""
    parent = parent or CGROUP_ROOT
    if not parent:
        raise CgroupError("no cgroup v2 mount in /proc/mounts "
                          "(mount -t cgroup2 none /sys/fs/cgroup)")
    if not name or "/" in name or name in (".", ".."):
        raise CgroupError(f"bad cgroup name {name!r}")
    path = os.path.join(parent, name)
    os.mkdir(path)
    return path


def remove_cgroup(path: str, timeout: float = 5) -> None:
    """rmdir a cgroup we made, children first, killing (SIGKILL, by PID) whatever
    still runs in it: only our processes run there. Missing is fine."""
    if not os.path.isdir(path):
        return
    for child in os.scandir(path):
        if child.is_dir(follow_symlinks=False):
            remove_cgroup(child.path, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = f.read().split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
