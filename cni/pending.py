"""Remembered ADDs: what a fail-open ADD leaves behind when the daemon cannot serve it.

One file per container, ``<pendingDir>/<container id>.json``, holding the
invocation itself (``protocol.ExecRequest``: the ``CNI_*`` variables and the
stdin the runtime gave the plugin). The daemon replays each one through the
same skel and plugin when it is back (``inprocess.replay``) and removes it;
a DEL of the container removes it too. Written atomically (a hidden temporary
file, then rename), so a reader sees a whole record or none. The container id
was checked by the skel (``[A-Za-z0-9][A-Za-z0-9_.-]*``), so it is a safe file
name. The static executable (``cni/static``) writes the same files.
"""
from __future__ import annotations

import os

SUFFIX = ".json"


def path(pending_dir: str, container_id: str) -> str:
    return os.path.join(pending_dir, container_id + SUFFIX)


def remember(pending_dir: str, container_id: str, data: bytes) -> str:
    """Write the record of ``container_id`` (mode 0600, dir 0700); its path."""
    os.makedirs(pending_dir, mode=0o700, exist_ok=True)
    final = path(pending_dir, container_id)
    tmp = os.path.join(pending_dir, f".{container_id}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


def forget(pending_dir: str, container_id: str) -> bool:
    """Remove the record of ``container_id``; True if there was one."""
    try:
        os.unlink(path(pending_dir, container_id))
        return True
    except FileNotFoundError:
        return False


def entries(pending_dir: str) -> list[tuple[str, str]]:
    """``(container id, path)`` of every record, oldest first."""
    try:
        names = [e for e in os.scandir(pending_dir)
                 if e.name.endswith(SUFFIX) and not e.name.startswith(".") and e.is_file()]
    except FileNotFoundError:
        return []
    names.sort(key=lambda e: (e.stat().st_mtime_ns, e.name))
    return [(e.name[:-len(SUFFIX)], e.path) for e in names]
