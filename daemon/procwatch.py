"""Which cgroup is a process in, and which processes appear on the node.

Ambient mode (``daemon/ambient.py``) keys pods by cgroup id, so it must learn
about a pod's cgroups as soon as a process runs in them, without any CNI call.
Two pieces live here, standard library only:

* cgroup helpers: a process's cgroup v2 directory (the ``0::`` line of
  ``/proc/PID/cgroup`` resolved against the cgroup2 mount), its cgroup id
  (the directory's inode number, which is what ``bpf_get_current_cgroup_id``
  returns on 64-bit kernels), and the pod UID in a cgroup path.
* ``ProcessWatcher``: the kernel's process events connector (netlink,
  ``NETLINK_CONNECTOR``/``CN_IDX_PROC``). It reports every ``exec`` and
  ``exit`` on the node, in the initial PID namespace. ``exec`` is the event
  that matters: container runtimes move the container's first process into
  its cgroup and then exec the entrypoint, so the exec happens in the final
  cgroup (a fork still runs in the parent's cgroup). Needs root in the initial
  network namespace. When the connector cannot be used (another network
  namespace, no CAP_NET_ADMIN), ``start`` returns False and the caller falls
  back to rescanning the cgroup tree periodically; so does a receive-buffer
  overflow (ENOBUFS: events were lost), which is reported as a ``lost`` event.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import select
import socket
import struct
import threading
from typing import Callable

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")       # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")        # idx, val, seq, ack, len, flags
_PROC_EVENT = struct.Struct("=IIQ")       # what, cpu, timestamp_ns
_EXEC = struct.Struct("=ii")              # process_pid, process_tgid
_EXIT = struct.Struct("=ii")              # process_pid, process_tgid (then codes)

#: a pod UID as kubelet writes it into cgroup names: with '-' (cgroupfs
#: driver: pod<uid>) or '_' (systemd driver: kubepods-...-pod<uid>.slice)
_UID = re.compile(r"([0-9a-f]{8})[-_]([0-9a-f]{4})[-_]([0-9a-f]{4})[-_]([0-9a-f]{4})[-_]([0-9a-f]{12})")


def normalize_uid(uid: str) -> str:
    """A pod UID in the 8-4-4-4-12 form with '-', lower case ('' if not a UUID)."""
    m = _UID.fullmatch(uid.strip().lower().replace("-", "_"))
    return "-".join(m.groups()) if m else ""


def uids_in_path(path: str) -> list[str]:
    """Pod UIDs named by the components of a cgroup path, outermost first."""
    out = []
    for part in path.lower().split("/"):
        for m in _UID.finditer(part):
            out.append("-".join(m.groups()))
    return out


def proc_cgroup(pid: int, mount: str, proc: str = "/proc") -> str | None:
    """The absolute cgroup v2 directory of ``pid`` (None if it is gone or has
    no cgroup v2 line)."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].removesuffix(" (deleted)").strip("/")
            return os.path.join(mount, rel) if rel else mount
    return None


def cgroup_id(path: str) -> int | None:
    """The kernel's id of a cgroup v2 directory: its inode number."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class ProcessWatcher:
    """Reports ``("exec", pid)``, ``("exit", pid)`` and ``("lost", 0)`` to a
    callback, from a daemon thread. ``start()`` -> False when unsupported."""

    def __init__(self, callback: Callable[[str, int], None]) -> None:
        self.callback = callback
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            log.warning("process events unavailable (netlink connector: %s)", exc)
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, CN_IDX_PROC))
            self._send(sock, PROC_CN_MCAST_LISTEN)
        except OSError as exc:
            sock.close()
            log.warning("process events unavailable (%s); falling back to rescans", exc)
            return False
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="proc-events", daemon=True)
        self._thread.start()
        return True

    @staticmethod
    def _send(sock: socket.socket, op: int) -> None:
        body = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        waitables: list[socket.socket | int] = [sock, self._wake_r]
        while True:
            ready, _, _ = select.select(waitables, [], [])
            if self._wake_r in ready:
                return
            try:
                data = sock.recv(65536)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._emit("lost", 0)
                    continue
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                log.error("process events stopped: %s", exc)
                self._emit("lost", 0)
                return
            for kind, pid in parse(data):
                self._emit(kind, pid)

    def _emit(self, kind: str, pid: int) -> None:
        try:
            self.callback(kind, pid)
        except Exception:
            log.exception("process event %s %d", kind, pid)

    def stop(self) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._thread = None
        sock = self._sock
        if sock is not None:   # open while the thread ran
            try:
                self._send(sock, PROC_CN_MCAST_IGNORE)
            except OSError:
                pass
            sock.close()
        self._sock = None
        os.close(self._wake_r)
        os.close(self._wake_w)


def parse(data: bytes) -> list[tuple[str, int]]:
    """Netlink datagram(s) from the connector -> [(exec|exit, tgid)]; other
    events (fork, uid, ...) and thread exits are left out."""
    out: list[tuple[str, int]] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if length >= _NLMSGHDR.size + _CN_MSG.size + _PROC_EVENT.size:
            idx, _val, _seq, _ack, _ln, _fl = _CN_MSG.unpack_from(data, body)
            ev = body + _CN_MSG.size
            what = _PROC_EVENT.unpack_from(data, ev)[0]
            arg = ev + _PROC_EVENT.size
            if idx == CN_IDX_PROC and arg + 8 <= off + length:
                pid, tgid = _EXEC.unpack_from(data, arg)
                if what == PROC_EVENT_EXEC:
                    out.append(("exec", tgid))
                elif what == PROC_EVENT_EXIT and pid == tgid:
                    out.append(("exit", tgid))
        off += (length + 3) & ~3
    return out
