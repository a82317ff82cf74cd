"""Compile, load, pin and attach the datapath: the only module importing bcc.

(Just over 450 lines: bcc stays in this one module, so everything that
touches a bcc object -- compile, load, pins, attach -- is here.)

    with Datapath("/sys/fs/bpf/merbridge", mesh.get("istio"), cni_mode=True) as dp:
        dp.load()                      # compiles bpf/progs/*.c, creates or reuses the pins
        dp.attach("/sys/fs/cgroup/unified/kubepods")
        dp.maps.local_pods.put("10.0.0.5", PodPolicy())
    # leaving the block closes our fds; the programs stay attached and the maps
    # pinned, so traffic keeps flowing while the daemon restarts.
    dp.detach(); dp.unpin()            # uninstall

The program files are compiled as one bcc object: their texts one after the
other, with the headers they include written in once (bpf/csource.py), and
-D flags from bpf/mesh.py (never by editing C text). They name the maps of
include/maps.h, which bcc opens from MB_PIN_DIR or creates and pins there, so
every object, and every later daemon, shares the same kernel maps. Which
function of which file runs on which hook is bpf/programs.py's table, plus
those of the optional features asked for (FEATURES). Attaching over an
earlier attachment of ours replaces it in place (see sysbpf).
"""
from __future__ import annotations

import ctypes as ct
import os
import socket
import struct
import threading
from importlib.resources import files
from typing import Iterable

from bcc import BPF, BPFAttachType, BPFProgType
from bcc import table as bcc_table
from bcc.libbcc import lib as bcclib

from merbridge.bpf import ambient, csource, sysbpf
from merbridge.bpf import types as t
from merbridge.bpf.maps import MapBackend, Maps
from merbridge.bpf.mesh import MARK_LISTENER_PORT, Mesh
from merbridge.bpf.programs import PROGRAMS, RETIRED, Prog

_PKG = files("merbridge.bpf")
INCLUDE_DIR = str(_PKG / "include")
PROGS_DIR = str(_PKG / "progs")
BPFFS_MAGIC_FS = "bpf"


def _release_compiler_memory() -> None:
    """Give the heap that clang/LLVM left behind back to the kernel.

    Compiling the programs grows glibc's heap by ~60 MB that LLVM frees but
    malloc keeps; a long-running daemon never needs it again (measured: RSS
    183 -> 127 MB after loading everything). A no-op where libc has no
    malloc_trim (not glibc).
    """
    trim = getattr(ct.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class DatapathError(RuntimeError):
    """A load/attach/pin problem, with a message meant for the operator."""


#: hook (programs.Prog.hook) -> bcc's program type and attach type
HOOKS: dict[str, tuple[int, int]] = {
    "cgroup/connect4": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET4_CONNECT),
    "cgroup/connect6": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET6_CONNECT),
    "cgroup/sendmsg4": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_UDP4_SENDMSG),
    "cgroup/sendmsg6": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_UDP6_SENDMSG),
    "cgroup/recvmsg4": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_UDP4_RECVMSG),
    "cgroup/recvmsg6": (BPFProgType.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_UDP6_RECVMSG),
    "cgroup/getpeername4": (BPFProgType.CGROUP_SOCK_ADDR,
                            BPFAttachType.CGROUP_INET4_GETPEERNAME),
    "cgroup/getpeername6": (BPFProgType.CGROUP_SOCK_ADDR,
                            BPFAttachType.CGROUP_INET6_GETPEERNAME),
    "cgroup/getsockname4": (BPFProgType.CGROUP_SOCK_ADDR,
                            BPFAttachType.CGROUP_INET4_GETSOCKNAME),
    "cgroup/getsockname6": (BPFProgType.CGROUP_SOCK_ADDR,
                            BPFAttachType.CGROUP_INET6_GETSOCKNAME),
    "cgroup/sock_release": (BPFProgType.CGROUP_SOCK, BPFAttachType.CGROUP_INET_SOCK_RELEASE),
    "cgroup/getsockopt": (BPFProgType.CGROUP_SOCKOPT, BPFAttachType.CGROUP_GETSOCKOPT),
    "sockops": (BPFProgType.SOCK_OPS, BPFAttachType.CGROUP_SOCK_OPS),
    "sk_msg": (BPFProgType.SK_MSG, BPFAttachType.SK_MSG_VERDICT),
}

#: optional features: name -> their programs, loaded and attached only when a
#: Datapath is asked for them (and detached by one that is not)
FEATURES: dict[str, tuple[Prog, ...]] = {"ambient": ambient.PROGRAMS}

#: every program of ours, optional and retired ones included (what detach and
#: attached() look for)
ALL_PROGRAMS = PROGRAMS + tuple(p for progs in FEATURES.values() for p in progs) + RETIRED
CGROUP_ATTACH_TYPES = {HOOKS[p.hook][1] for p in ALL_PROGRAMS if p.target == "cgroup"}
OUR_NAMES = {p.func for p in ALL_PROGRAMS}

# ---- the inbound rewrite on pod interfaces (tc or XDP) -----------------------
# bpf/progs/inbound.c is not attached to a cgroup but to pod interfaces, by the
# daemon (pyroute2 in daemon/netns.py, via daemon/podnet.py). Datapath.
# xdp_programs() compiles it with the same cflags, so it shares the pinned
# maps, and keeps both fds open until close(). Not in PROGRAMS: attach() is
# cgroup-only. Compiled lazily: legacy mode never needs it.
XDP_SOURCE = "inbound.c"
XDP_INGRESS = "mb_xdp_ingress"   # on the pod's interface, inside the pod netns
XDP_EGRESS = "mb_xdp_egress"     # on its host-side veth peer
_XDP_LOCK = threading.Lock()     # concurrent CNI ADDs compile it once
# The same source holds the tc programs (--inbound-hook=tc), both for the
# host-side veth peer; one object, its programs loaded as they are needed.
TC_TO_POD = "mb_tc_to_pod"       # clsact egress of the host-side peer
TC_FROM_POD = "mb_tc_from_pod"   # clsact ingress of the host-side peer
# -----------------------------------------------------------------------------


def _in_bpffs(path: str) -> bool:
    path = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4]
            fstype = right.split()[0]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best[1] == BPFFS_MAGIC_FS


class BccBackend:
    """maps.MapBackend over a bcc table (per-CPU values are summed)."""

    def __init__(self, table) -> None:
        self.t = table
        self.percpu = isinstance(table, (bcc_table.PerCpuArray, bcc_table.PerCpuHash))
        self.max_entries = int(table.max_entries)

    def __len__(self) -> int:
        """Entries in use: keys only, no values read (an array is always full)."""
        return sum(1 for _ in self.t)

    def _key(self, key: bytes):
        return self.t.Key.from_buffer_copy(key)

    def _val(self, v) -> bytes:
        if self.percpu:
            return struct.pack("=Q", sum(int(x.value if hasattr(x, "value") else x) for x in v))
        return bytes(v)

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._val(self.t[self._key(key)])
        except KeyError:
            return None

    def put(self, key: bytes, value: bytes) -> None:
        self.t[self._key(key)] = self.t.Leaf.from_buffer_copy(value)

    def delete(self, key: bytes) -> bool:
        try:
            del self.t[self._key(key)]
            return True
        except KeyError:
            return False

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        return [(bytes(k), self._val(v)) for k, v in self.t.items()]


def _maps_of(bpf: BPF, closer=None) -> Maps:
    backends: dict[str, MapBackend] = {name: BccBackend(bpf.get_table(name.encode()))
                                       for name in t.ALL_MAPS if name not in t.SOCKET_MAPS}
    return Maps(backends, closer)


class Datapath:
    """The datapath of one pin directory: the sidecar programs, plus those of
    the optional features asked for (``ambient=True``: FEATURES["ambient"])."""

    def __init__(self, pin_dir: str, mesh: Mesh, cni_mode: bool, debug: bool = False,
                 ambient: bool = False) -> None:
        self.pin_dir = os.path.abspath(pin_dir)
        self.mesh = mesh
        self.cni_mode = cni_mode
        self.debug = debug
        self.ambient = ambient
        self.features = ("ambient",) if ambient else ()
        self.programs = PROGRAMS + tuple(p for f in self.features for p in FEATURES[f])
        self._objs: dict[str, BPF] = {}
        self._fns: dict[str, BPF.Function] = {}
        self._created_dir = False
        self._cgroups: list[str] = []
        self._maps: Maps | None = None

    # ---- build --------------------------------------------------------------
    def cflags(self) -> list[str]:
        m = self.mesh
        return [
            f"-I{INCLUDE_DIR}",
            f'-DMB_PIN_DIR="{self.pin_dir}"',
            f"-DMB_OUT_PORT={m.out_port}", f"-DMB_IN_PORT={m.in_port}",
            f"-DMB_PROXY_UID={m.proxy_uid}", f"-DMB_PROXY_GID={m.proxy_gid}",
            f"-DMB_MESH={m.code}", f"-DMB_CNI_MODE={int(self.cni_mode)}",
            f"-DMB_DNS_PORT={m.dns_port}",
            f"-DMB_DEBUG={int(self.debug)}", f"-DMB_MARK_PORT={MARK_LISTENER_PORT}",
            "-Wno-unused-function",
        ]

    def sources(self) -> list[str]:
        """The files of bpf/progs/ load() compiles: those of our programs, and in
        CNI mode the inbound rewrite's (tc/XDP on pod interfaces)."""
        names = list(dict.fromkeys(p.source for p in self.programs))
        if self.cni_mode and XDP_SOURCE not in names:
            names.append(XDP_SOURCE)
        return names

    def _compile(self, sources: Iterable[str]) -> BPF:
        """One bcc object from files of bpf/progs/, as one text (the caller
        cleans it up). One compile of all of them, not one per file: clang's
        fixed cost (kernel headers, bcc's rewriter) is most of a compile, so
        ten files cost ~4 s as one text and ~20 s as ten (2 cores), and the
        daemon's start -- hence enrolling the pods that started while it was
        down -- waits for it."""
        paths = [os.path.join(PROGS_DIR, s) for s in sources]
        text = csource.assemble_many(paths, INCLUDE_DIR)
        return BPF(text=text.encode(), cflags=self.cflags())

    def load(self) -> "Datapath":
        if self._objs:
            return self
        parent = os.path.dirname(self.pin_dir)
        if not os.path.isdir(self.pin_dir):
            if not os.path.isdir(parent) or not _in_bpffs(parent):
                raise DatapathError(f"{parent} is not a directory on a bpf filesystem "
                                    "(mount -t bpf bpf <dir>)")
            os.mkdir(self.pin_dir, 0o700)
            self._created_dir = True
        elif not _in_bpffs(self.pin_dir):
            raise DatapathError(f"{self.pin_dir} is not on a bpf filesystem")
        check_pinned_layouts(self.pin_dir)
        # maps an older version pinned and this one no longer has: no
        # program of this version uses them (an older one still running
        # keeps its map through its own reference)
        _unpin(self.pin_dir, t.RETIRED_MAPS)
        try:
            sources = self.sources()
            b = self._compile(sources)
            for source in sources:
                self._objs[source] = b
            for p in self.programs:
                prog_type, attach_type = HOOKS[p.hook]
                kw = {"attach_type": attach_type} if p.target == "cgroup" else {}
                self._fns[p.func] = b.load_func(p.func.encode(), prog_type, **kw)
                self._objs[p.func] = b
        except Exception as e:
            self.close()
            raise DatapathError(f"loading the datapath failed: {e}") from e
        _release_compiler_memory()
        # the node's netns is the one the daemon runs in: no hook acts there
        self.maps.settings.set(t.MB_SET_NODE_NETNS, own_netns_cookie())
        return self

    @property
    def maps(self) -> Maps:
        if not self._objs:
            raise DatapathError("load() first")
        if self._maps is None:
            self._maps = _maps_of(next(iter(self._objs.values())))
        return self._maps

    def _sockhash_fd(self) -> int:
        b = self._objs["mb_msg_redir"]
        fd = bcclib.bpf_table_fd(b.module, t.MAP_SOCK_PAIR.encode())
        if fd < 0:
            raise DatapathError("sockhash mb_sock_pair not found")
        return fd

    # ---- tc and XDP: the inbound rewrite on pod interfaces ---------------------
    def _pod_programs(self, names: tuple[str, str], prog_type: int) -> tuple[int, int]:
        """The fds of ``names`` in bpf/progs/inbound.c, loaded on first use (compiled
        by load() in CNI mode, here in legacy mode)."""
        if not self._objs:
            raise DatapathError("load() first")
        with _XDP_LOCK:
            b = self._objs.get(XDP_SOURCE)
            if b is None:
                try:
                    b = self._compile([XDP_SOURCE])   # legacy mode: not in load()
                except Exception as e:
                    raise DatapathError(f"compiling {XDP_SOURCE} failed: {e}") from e
                self._objs[XDP_SOURCE] = b
                _release_compiler_memory()
            for n in names:
                if n not in self._fns:
                    try:
                        self._fns[n] = b.load_func(n.encode(), prog_type)
                    except Exception as e:
                        raise DatapathError(f"loading {n} failed: {e}") from e
        return self._fns[names[0]].fd, self._fns[names[1]].fd

    def xdp_programs(self) -> tuple[int, int]:
        """(ingress fd, egress fd) of the XDP programs in bpf/progs/inbound.c, loaded on first use."""
        return self._pod_programs((XDP_INGRESS, XDP_EGRESS), BPF.XDP)

    def tc_programs(self) -> tuple[int, int]:
        """(to-pod fd, from-pod fd) of the tc programs in bpf/progs/inbound.c, loaded on first use."""
        return self._pod_programs((TC_TO_POD, TC_FROM_POD), BPF.SCHED_CLS)

    # ---- attach ---------------------------------------------------------------
    def attach(self, cgroup_path: str) -> None:
        """Attach every cgroup program to cgroup_path and sk_msg to the sockhash.
        Re-attaching (same or a new process) replaces our earlier programs."""
        if not self._objs:
            self.load()
        fd = _open_cgroup(cgroup_path)
        try:
            for p in self.programs:
                if p.target == "cgroup":
                    sysbpf.attach_replace(fd, self._fns[p.func].fd, HOOKS[p.hook][1], p.func)
            switched_off = [p for f, progs in FEATURES.items() if f not in self.features
                            for p in progs]
            for p in switched_off + list(RETIRED):
                sysbpf.detach_named(fd, HOOKS[p.hook][1], {p.func})
        except OSError as e:
            raise DatapathError(f"attaching to {cgroup_path} failed: {e}") from e
        finally:
            os.close(fd)
        # a map holds one verdict program; attaching swaps it atomically
        BPF.attach_func(self._fns["mb_msg_redir"], self._sockhash_fd(),
                        BPFAttachType.SK_MSG_VERDICT)
        if cgroup_path not in self._cgroups:
            self._cgroups.append(cgroup_path)

    def detach(self, cgroup_path: str | None = None) -> None:
        """Detach our programs from cgroup_path (default: every cgroup attach()ed
        by this object) and the sk_msg program from the sockhash."""
        for path in [cgroup_path] if cgroup_path else list(self._cgroups):
            detach_cgroup(path)
            if path in self._cgroups:
                self._cgroups.remove(path)
        detach_sockhash(self.pin_dir)

    # ---- teardown -----------------------------------------------------------------
    def unpin(self) -> None:
        """Remove our pins, and the pin dir if this object created it or it is empty."""
        remove_pins(self.pin_dir, rmdir=True)

    def close(self) -> None:
        if self._maps is not None:
            self._maps = None
        for b in {id(b): b for b in self._objs.values()}.values():  # load()'s, inbound.c's
            b.cleanup()
        self._objs.clear()
        self._fns.clear()

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- module-level helpers (no programs needed) -----------------------------------
SO_NETNS_COOKIE = 71  # linux/socket.h (5.14+); not in Python's socket module


def netns_cookie_of(sock: socket.socket) -> int:
    """The cookie of the network namespace sock was created in (what
    bpf_get_netns_cookie() says there)."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def own_netns_cookie() -> int:
    """The cookie of the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return netns_cookie_of(s)


def _open_cgroup(path: str) -> int:
    if not os.path.isfile(os.path.join(path, "cgroup.procs")):
        raise DatapathError(f"{path} is not a cgroup v2 directory")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def attached(cgroup_path: str) -> list[sysbpf.Attached]:
    """Our programs attached to cgroup_path (one entry per program)."""
    fd = _open_cgroup(cgroup_path)
    try:
        return [a for at in CGROUP_ATTACH_TYPES for a in sysbpf.query(fd, at)
                if a.name in OUR_NAMES]
    finally:
        os.close(fd)


def detach_cgroup(cgroup_path: str) -> int:
    """Detach every program of ours from cgroup_path; returns how many."""
    fd = _open_cgroup(cgroup_path)
    try:
        return sum(sysbpf.detach_named(fd, at, OUR_NAMES) for at in CGROUP_ATTACH_TYPES)
    finally:
        os.close(fd)


def detach_sockhash(pin_dir: str) -> int:
    path = os.path.join(pin_dir, t.MAP_SOCK_PAIR)
    if not os.path.exists(path):
        return 0
    fd = sysbpf.obj_get(path)
    try:
        return sysbpf.detach_named(fd, BPFAttachType.SK_MSG_VERDICT, OUR_NAMES)
    finally:
        os.close(fd)


#: map -> value size of this build, for every struct-valued map (bcc reuses
#: a pin whatever its sizes, and the programs then fail the verifier with a
#: bare EACCES)
PINNED_VALUE_SIZES = {name: ct.sizeof(cls) for name, cls in t.MAP_VALUES.items()}


def check_pinned_layouts(pin_dir: str) -> None:
    """DatapathError if a map pinned in pin_dir (by an older build) holds
    values of another size than this build's struct."""
    for name, want in PINNED_VALUE_SIZES.items():
        path = os.path.join(pin_dir, name)
        if not os.path.exists(path):
            continue
        fd = sysbpf.obj_get(path)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        finally:
            os.close(fd)
        got = int(info.get("value_size", "0"))
        if got != want:
            raise DatapathError(
                f"{path} was pinned by another merbridge version ({got}-byte values, this "
                f"one needs {want}): detach and unpin the old datapath (or remove the pins "
                f"under {pin_dir}) before loading this one")


def _unpin(pin_dir: str, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(pin_dir, name))
        except FileNotFoundError:
            pass


def remove_pins(pin_dir: str, rmdir: bool = True) -> None:
    _unpin(pin_dir, t.ALL_MAPS + t.RETIRED_MAPS)
    if rmdir:
        try:
            os.rmdir(pin_dir)
        except (FileNotFoundError, OSError):
            pass


def open_maps(pin_dir: str) -> Maps:
    """Typed handles on the maps pinned in pin_dir, without loading programs.
    Raises DatapathError if the datapath is not installed there, or was
    pinned by a version whose map values differ."""
    missing = [n for n in t.ALL_MAPS if not os.path.exists(os.path.join(pin_dir, n))]
    if missing:
        raise DatapathError(f"no datapath pinned in {pin_dir} (missing {', '.join(missing)})")
    check_pinned_layouts(pin_dir)
    cflags = [f"-I{INCLUDE_DIR}", f'-DMB_PIN_DIR="{os.path.abspath(pin_dir)}"',
              "-Wno-unused-function"]
    # the declarations alone: maps.h compiled as the program text
    text = csource.assemble(os.path.join(INCLUDE_DIR, "maps.h"), INCLUDE_DIR)
    b = BPF(text=text.encode(), cflags=cflags)
    return _maps_of(b, closer=b.cleanup)
