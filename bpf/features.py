"""The kernel features the datapath uses, each with the Linux release that
brought it, and a probe of each on the running kernel.

A program type alone says little: a helper is allowed per program type (and
sometimes per attach type), so ``bpf_get_netns_cookie`` works in the cgroup
connect hooks since 5.7 but in sock_ops programs only since 5.15. Each probe
therefore loads a tiny program of the type and expected attach type the
datapath uses, calling the helper it needs; the verifier's "unknown func"
means the kernel lacks it, any other verdict means the helper is there (its
arguments are deliberately left unset, which the verifier checks only after
it found the helper). An attach type alone is probed by loading a program
that just returns 1 with that expected attach type. ``SO_NETNS_COOKIE`` is a
socket option, probed with getsockopt on a fresh socket.

Loading goes through bpf(2) directly (ctypes, no compiler): a probe costs
well under a millisecond on the host, so ``merbridge doctor`` and the daemon's
start can afford all of them. Loading needs CAP_BPF/CAP_SYS_ADMIN.

The versions are mainline releases (the commit that added the helper to that
program type); a distribution kernel may have backported a feature, which is
why the probe, not the version, decides.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
import struct
from dataclasses import dataclass

# enum bpf_prog_type, enum bpf_attach_type, enum bpf_func_id (linux/bpf.h);
# tests/unit/test_features.py checks them against the UAPI header
PROG_SCHED_CLS = 3
PROG_XDP = 6
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25

ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_UDP4_SENDMSG = 14
ATTACH_UDP6_SENDMSG = 15
ATTACH_UDP4_RECVMSG = 19
ATTACH_UDP6_RECVMSG = 20
ATTACH_GETSOCKOPT = 21
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30
ATTACH_INET4_GETSOCKNAME = 31
ATTACH_INET6_GETSOCKNAME = 32

FUNC_SKB_STORE_BYTES = 9
FUNC_L4_CSUM_REPLACE = 11
FUNC_GET_CURRENT_PID_TGID = 14
FUNC_GET_CURRENT_UID_GID = 15
FUNC_GET_SOCKET_COOKIE = 46
FUNC_SOCK_OPS_CB_FLAGS_SET = 59
FUNC_BIND = 64
FUNC_SOCK_HASH_UPDATE = 70
FUNC_MSG_REDIRECT_HASH = 71
FUNC_GET_CURRENT_CGROUP_ID = 80
FUNC_SK_LOOKUP_TCP = 84
FUNC_SKB_PULL_DATA = 39
FUNC_GET_NETNS_COOKIE = 122
FUNC_SK_STORAGE_GET = 107

SO_NETNS_COOKIE = 71  # asm-generic/socket.h

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)   # __NR_bpf
_BPF_PROG_LOAD = 5


@dataclass(frozen=True)
class Feature:
    name: str                 # what the operator reads: "bpf_get_netns_cookie in sock_ops programs"
    since: tuple[int, int]    # the mainline release that brought it
    used_by: str              # which part of merbridge needs it
    prog_type: int = 0        # 0: not a program probe (see kind)
    attach_type: int = 0
    helper: int = 0           # 0: probe the (program type, attach type) alone
    kind: str = "prog"        # "prog" | "sockopt"
    required: bool = True     # False: only an optional mode needs it

    @property
    def release(self) -> str:
        return f"Linux {self.since[0]}.{self.since[1]}"


def _connect(name: str, since: tuple[int, int], helper: int, used_by: str = "connect4/6 "
             "(redirect to the sidecar)", required: bool = True) -> list[Feature]:
    return [Feature(f"{name} in cgroup connect{fam} programs", since, used_by,
                    PROG_CGROUP_SOCK_ADDR, at, helper, required=required)
            for fam, at in (("4", ATTACH_INET4_CONNECT), ("6", ATTACH_INET6_CONNECT))]


def _hook(hook: str, since: tuple[int, int], at4: int, at6: int) -> list[Feature]:
    return [Feature(f"cgroup {hook}{fam} programs (program type cgroup_sock_addr)", since,
                    f"the {hook}4/6 programs", PROG_CGROUP_SOCK_ADDR, at)
            for fam, at in (("4", at4), ("6", at6))]


def _sockops(helper: str, since: tuple[int, int], func: int, why: str) -> Feature:
    return Feature(f"{helper} in sock_ops programs", since, f"sockops ({why})", PROG_SOCK_OPS,
                   helper=func)


#: every kernel feature bpf/progs/*.c and the daemon use, and where
FEATURES: tuple[Feature, ...] = (
    *_connect("program type cgroup_sock_addr", (4, 17), 0),
    *_connect("bpf_bind", (4, 17), FUNC_BIND),
    *_connect("bpf_get_current_uid_gid", (4, 17), FUNC_GET_CURRENT_UID_GID),
    *_connect("bpf_get_socket_cookie", (4, 19), FUNC_GET_SOCKET_COOKIE),
    *_connect("bpf_sk_lookup_tcp", (5, 0), FUNC_SK_LOOKUP_TCP,
              "connect4/6 (the marker / sidecar listener probe)"),
    *_connect("bpf_get_current_pid_tgid", (5, 7), FUNC_GET_CURRENT_PID_TGID),
    *_connect("bpf_get_netns_cookie", (5, 7), FUNC_GET_NETNS_COOKIE),
    *_connect("bpf_get_current_cgroup_id", (5, 7), FUNC_GET_CURRENT_CGROUP_ID,
              "--ambient (ambient4/6 key pods by cgroup id)", required=False),
    *_hook("sendmsg", (4, 18), ATTACH_UDP4_SENDMSG, ATTACH_UDP6_SENDMSG),
    *_hook("recvmsg", (5, 2), ATTACH_UDP4_RECVMSG, ATTACH_UDP6_RECVMSG),
    *_hook("getpeername", (5, 8), ATTACH_INET4_GETPEERNAME, ATTACH_INET6_GETPEERNAME),
    *_hook("getsockname", (5, 8), ATTACH_INET4_GETSOCKNAME, ATTACH_INET6_GETSOCKNAME),
    *_connect("bpf_sk_storage_get", (5, 3), FUNC_SK_STORAGE_GET,
              "connect4/6, dns.c, peername.c (a socket's original destination, "
              "mb_sock_origin)"),
    Feature("program type sock_ops", (4, 13), "sockops (record socket pairs)", PROG_SOCK_OPS),
    _sockops("bpf_sock_ops_cb_flags_set", (4, 16), FUNC_SOCK_OPS_CB_FLAGS_SET,
             "close callbacks clean the pair maps"),
    _sockops("bpf_sock_hash_update", (4, 18), FUNC_SOCK_HASH_UPDATE, "the sk_msg shortcut's sockhash"),
    _sockops("bpf_get_socket_cookie", (4, 19), FUNC_GET_SOCKET_COOKIE,
             "original destination by socket cookie"),
    _sockops("bpf_sk_storage_get", (5, 3), FUNC_SK_STORAGE_GET,
             "the connecting socket's original destination (mb_sock_origin)"),
    _sockops("bpf_get_netns_cookie", (5, 15), FUNC_GET_NETNS_COOKIE,
             "legacy mode learns each pod's IPs by netns"),
    Feature("bpf_msg_redirect_hash in sk_msg programs", (4, 18),
            "sk_msg (local socket shortcut)", PROG_SK_MSG, helper=FUNC_MSG_REDIRECT_HASH),
    Feature("cgroup getsockopt programs (program type cgroup_sockopt)", (5, 3),
            "getsockopt (answer SO_ORIGINAL_DST)", PROG_CGROUP_SOCKOPT, ATTACH_GETSOCKOPT),
    Feature("bpf_get_netns_cookie in cgroup getsockopt programs", (5, 15),
            "getsockopt (SO_ORIGINAL_DST only to the pod that owns the connection)",
            PROG_CGROUP_SOCKOPT, ATTACH_GETSOCKOPT, FUNC_GET_NETNS_COOKIE),
    Feature("program type xdp", (4, 8), "XDP on pod veths (--inbound-hook=xdp)", PROG_XDP),
    *[Feature(f"{name} in sched_cls programs", since, "inbound.c over tc (CNI mode's default "
              "inbound hook)", PROG_SCHED_CLS, helper=func)
      for name, since, func in (("bpf_skb_store_bytes", (4, 1), FUNC_SKB_STORE_BYTES),
                                ("bpf_l4_csum_replace", (4, 1), FUNC_L4_CSUM_REPLACE),
                                ("bpf_skb_pull_data", (4, 9), FUNC_SKB_PULL_DATA))],
    Feature("socket option SO_NETNS_COOKIE", (5, 14),
            "the daemon (keys each CNI pod's mb_netns_pod entry by netns cookie)",
            kind="sockopt"),
)


def floor(features: tuple[Feature, ...] = FEATURES) -> tuple[int, int]:
    """The oldest mainline release with every required feature."""
    return max(f.since for f in features if f.required)


FLOOR = floor()
FLOOR_TEXT = f"{FLOOR[0]}.{FLOOR[1]}"


# ---- probes -------------------------------------------------------------------
def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_EXIT_1 = _insn(0xb7, imm=1) + _insn(0x95)   # r0 = 1; exit


def program(helper: int) -> bytes:
    """``call helper; r0 = 1; exit`` (or just ``r0 = 1; exit``)."""
    return (_insn(0x85, imm=helper) if helper else b"") + _EXIT_1


class _ProgLoadAttr(ct.Structure):
    # the BPF_PROG_LOAD part of union bpf_attr up to expected_attach_type
    # (UAPI, stable; the kernel zero-fills the fields after it)
    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32),
                ("insns", ct.c_uint64), ("license", ct.c_uint64),
                ("log_level", ct.c_uint32), ("log_size", ct.c_uint32), ("log_buf", ct.c_uint64),
                ("kern_version", ct.c_uint32), ("prog_flags", ct.c_uint32),
                ("prog_name", ct.c_char * 16), ("prog_ifindex", ct.c_uint32),
                ("expected_attach_type", ct.c_uint32)]


_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class ProbeError(OSError):
    """The probe itself could not run (no privileges, no bpf(2)): not a verdict."""


def load(prog_type: int, attach_type: int, insns: bytes) -> str | None:
    """Load a program; None when the kernel took it, else the verifier's log
    (or the errno text when the load failed before the verifier ran)."""
    if _SYS_BPF is None:
        raise ProbeError(errno.ENOSYS, f"no bpf(2) number known for {os.uname().machine}")
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(b"GPL")
    log = ct.create_string_buffer(65536)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                         insns=ct.addressof(code), license=ct.addressof(lic),
                         log_level=1, log_size=len(log), log_buf=ct.addressof(log),
                         prog_name=b"mb_probe", expected_attach_type=attach_type)
    fd = _libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, ct.byref(attr), ct.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return None
    err = ct.get_errno()
    if err in (errno.EPERM, errno.ENOSYS):
        raise ProbeError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}")
    text = log.value.decode(errors="replace").strip()
    return text or os.strerror(err)


#: the verifier's words for "no such helper here": "unknown func bpf_x#N"
#: before 6.5, "program of this type cannot use helper bpf_x#N" since;
#: "invalid func" for an id beyond the kernel's helper table
_NO_HELPER = ("unknown func", "invalid func", "cannot use helper")


def helper_present(log: str | None) -> bool:
    """True when the result of loading ``call helper`` says the kernel knows
    the helper in that program/attach type: it loaded, or the verifier got
    past the call's lookup (to its unset arguments, or an unreleased socket)."""
    if log is None:
        return True
    return (not any(m in log for m in _NO_HELPER)) and log != os.strerror(errno.EINVAL)


def _why(log: str) -> str:
    lines = log.splitlines()
    return next((line for line in lines if any(m in line for m in _NO_HELPER)),
                lines[-1] if lines else log)


def probe_sockopt() -> str | None:
    """None when SO_NETNS_COOKIE answers, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            return e.strerror or str(e)
    return None


def probe(feature: Feature) -> str | None:
    """None when the running kernel has ``feature``, else the kernel's answer.
    Raises ProbeError when probing is impossible (no privileges)."""
    if feature.kind == "sockopt":
        return probe_sockopt()
    if feature.helper:
        log = load(feature.prog_type, feature.attach_type, program(feature.helper))
        return None if helper_present(log) else _why(log or "")
    log = load(feature.prog_type, feature.attach_type, program(0))
    return None if log is None else _why(log)


def probe_all(features: tuple[Feature, ...] = FEATURES) -> dict[Feature, str | None]:
    return {f: probe(f) for f in features}


# ---- the verdict, as the operator reads it ----------------------------------
def missing(results: dict[Feature, str | None], *, required_only: bool = True) -> list[Feature]:
    return [f for f, why in results.items() if why is not None and (f.required or not required_only)]


def describe(f: Feature) -> str:
    """``bpf_get_netns_cookie in sock_ops programs (Linux 5.15), needed by ...``"""
    return f"{f.name} ({f.release}), needed by {f.used_by}"


def refusal(release: str, lacking: list[Feature]) -> str:
    """The one message doctor and the daemon print when the kernel lacks
    required features: each missing one with the release that brought it."""
    if not lacking:
        return ""
    newest = max(f.since for f in lacking)
    head = (f"kernel {release} lacks {len(lacking)} feature{'s' if len(lacking) > 1 else ''} "
            f"merbridge needs: ")
    return (head + "; ".join(describe(f) for f in sorted(lacking, key=lambda f: (f.since, f.name)))
            + f". Use Linux {newest[0]}.{newest[1]} or newer (merbridge's floor is "
            f"Linux {FLOOR_TEXT}), or a kernel that backports these.")
