"""The few bpf(2) operations bcc 0.26 does not offer, through the system libbpf.

bcc attaches a cgroup program with plain flags; to run next to other users of
the same cgroup and to REPLACE our own program atomically on a reload (no
moment without interception, no duplicates after a crash), we need
BPF_PROG_QUERY and BPF_F_ALLOW_MULTI | BPF_F_REPLACE. Those come from
libbpf.so.1 (the library bcc itself links) via ctypes. Standard library only.
"""
from __future__ import annotations

import ctypes as ct
import ctypes.util
import os
from dataclasses import dataclass

BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4


class BpfError(OSError):
    pass


class _AttachOpts(ct.Structure):
    # libbpf's struct bpf_prog_attach_opts as of 1.1; later fields are
    # optional (libbpf checks .sz), so this prefix works with newer ones.
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint), ("replace_prog_fd", ct.c_int)]


_lib: ct.CDLL | None = None


def _libbpf() -> ct.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        _lib = ct.CDLL(name, use_errno=True)
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret < -1 else ct.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class Attached:
    attach_type: int
    prog_id: int
    name: str
    flags: int


def prog_name(prog_id: int) -> str:
    """The kernel's (15-character) name of a loaded program, '' if gone."""
    lib = _libbpf()
    fd = lib.bpf_prog_get_fd_by_id(ct.c_uint(prog_id))
    if fd < 0:
        return ""
    try:
        info = ct.create_string_buffer(256)
        ln = ct.c_uint(256)
        _check(lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(ln)), "bpf_obj_get_info_by_fd")
        return info.raw[64:80].split(b"\0", 1)[0].decode()  # bpf_prog_info.name
    finally:
        os.close(fd)


def query(target_fd: int, attach_type: int) -> list[Attached]:
    """Programs attached to a cgroup (or sockmap) fd for one attach type."""
    lib = _libbpf()
    flags = ct.c_uint(0)
    ids = (ct.c_uint * 64)()
    cnt = ct.c_uint(64)
    ret = lib.bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt))
    _check(ret, f"bpf_prog_query(type {attach_type})")
    return [Attached(attach_type, ids[i], prog_name(ids[i]), flags.value)
            for i in range(cnt.value)]


def attach_replace(target_fd: int, prog_fd: int, attach_type: int, name: str) -> None:
    """Attach prog to a cgroup; atomically replace our own earlier program named
    `name` if present, and drop any further duplicates of it."""
    lib = _libbpf()
    current = query(target_fd, attach_type)
    ours = [a for a in current if a.name == name]
    opts = _AttachOpts(sz=ct.sizeof(_AttachOpts))
    old_fd = -1
    if ours and not ours[0].flags & BPF_F_ALLOW_MULTI:
        opts.flags = ours[0].flags          # exclusive attachment: same flags replace it
    elif ours:
        old_fd = lib.bpf_prog_get_fd_by_id(ct.c_uint(ours[0].prog_id))
        opts.flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if old_fd >= 0 else 0)
        opts.replace_prog_fd = max(old_fd, 0)
    else:
        opts.flags = BPF_F_ALLOW_MULTI
    try:
        _check(lib.bpf_prog_attach_opts(prog_fd, target_fd, attach_type, ct.byref(opts)),
               f"attach {name}")
    finally:
        if old_fd >= 0:
            os.close(old_fd)
    for extra in ours[1:]:
        detach_id(target_fd, extra.prog_id, attach_type)


def detach_id(target_fd: int, prog_id: int, attach_type: int) -> None:
    lib = _libbpf()
    fd = lib.bpf_prog_get_fd_by_id(ct.c_uint(prog_id))
    if fd < 0:
        return
    try:
        _check(lib.bpf_prog_detach2(fd, target_fd, attach_type), f"detach prog {prog_id}")
    finally:
        os.close(fd)


def detach_named(target_fd: int, attach_type: int, names: set[str]) -> int:
    """Detach every program with one of `names`; returns how many."""
    n = 0
    for a in query(target_fd, attach_type):
        if a.name in names:
            detach_id(target_fd, a.prog_id, attach_type)
            n += 1
    return n


def obj_get(path: str) -> int:
    """Open a pinned object; the caller closes the fd."""
    return _check(_libbpf().bpf_obj_get(path.encode()), f"open pin {path}")
