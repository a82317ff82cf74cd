"""ctypes mirrors of bpf/include/merbridge.h and ambient.h, map names, and
address helpers.

Each class here must match one struct in ``bpf/include/merbridge.h`` (or, for
ambient mode, ``ambient.h``) field for field; ``tests/unit/test_layout.py`` compiles the header with gcc and compares
sizes, offsets and constants, so a drifted mirror fails a test instead of
corrupting a map. Standard library only: this module is imported by the
daemon and by unit tests without bcc.
"""
from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
from typing import Iterable

# ---- constants mirrored from merbridge.h ----------------------------------
MB_MAX_CONNS = 65535
MB_MAX_PODS = 4096
MB_N_SETTINGS = 16
MB_N_COUNTERS = 32
MB_MAX_PORTS = 32
MB_MAX_CIDRS = 16
MB_SO_ORIGINAL_DST = 80
MB_PAGE_SIZE = 4096
MB_SKMSG_MAX_QUEUE_DEFAULT = 4 << 20

MB_ORIGIN_F_REDIRECT = 0x01
MB_ORIGIN_F_LEARN = 0x02
MB_ORIGIN_F_INBOUND = 0x04
MB_ORIGIN_F_XDP = 0x08
MB_ORIGIN_F_DNS = 0x10

MB_POD_F_INCLUDE_IN_ALL = 0x01
MB_POD_F_INCLUDE_OUT_ALL = 0x02
MB_POD_F_DNS_CAPTURE = 0x04
MB_DNS_SERVER_PORT = 53

MB_SET_SKMSG_OFF = 0
MB_SET_SKMSG_MAX_QUEUE = 1
MB_SET_LEGACY_SEQ = 2
MB_SET_NODE_NETNS = 3

# ---- constants mirrored from ambient.h (ambient mode, docs/ambient.md) -----
MB_MAX_CGROUPS = 4096
MB_AMBIENT_OUT_PORT = 15001
MB_AMBIENT_IN_PORT = 15006
MB_CG_F_ZTUNNEL = 0x01
MB_SET_ZTUNNEL_IP4 = 12
MB_SET_ZTUNNEL_IP6_HI = 13
MB_SET_ZTUNNEL_IP6_LO = 14

#: counter index -> name (``MB_C_<NAME>`` in merbridge.h, lower case here)
COUNTERS: dict[int, str] = {
    0: "redirect_out",
    1: "redirect_in",
    2: "bypass_not_mesh",
    3: "bypass_proxy",
    4: "bypass_loopback",
    5: "bypass_policy",
    6: "bypass_passthrough",
    7: "bind_pod_ip",
    8: "bind_failed",
    9: "legacy_dst",
    10: "pair_recorded",
    11: "sockhash_add",
    12: "sockhash_failed",
    13: "learned_ip",
    14: "getsockopt_answer",
    15: "getsockopt_miss",
    16: "getsockopt_large",
    17: "msg_redirect",
    18: "msg_pass",
    19: "msg_backpressure",
    20: "pair_deleted",
    21: "msg_peer_missing",
    22: "getsockopt_nat",
    23: "dns_captured",
}
#: first counter index reserved for bpf/progs/inbound.c (24..31)
MB_C_XDP_FIRST = 24
MB_C_XDP_NEW_FLOW = 24
MB_C_XDP_BYPASS_POLICY = 25
MB_C_XDP_FLOW_FAIL = 26
MB_C_XDP_RST_DELETE = 27
MB_C_IN_ESTABLISHED = 28
MB_C_IN_CONFLICT = 29
MB_C_IN_CLOSED = 30
#: inbound.c's counters (index -> name), kept apart from COUNTERS, whose slots
#: all lie below MB_C_XDP_FIRST
XDP_COUNTERS: dict[int, str] = {
    MB_C_XDP_NEW_FLOW: "xdp_new_flow",
    MB_C_XDP_BYPASS_POLICY: "xdp_bypass_policy",
    MB_C_XDP_FLOW_FAIL: "xdp_flow_fail",
    MB_C_XDP_RST_DELETE: "xdp_rst_delete",
    MB_C_IN_ESTABLISHED: "in_established",
    MB_C_IN_CONFLICT: "in_conflict",
    MB_C_IN_CLOSED: "in_closed",
}

# ---- map names (maps.h, ambient_maps.h); each is also the pin file name ------
MAP_SOCK_ORIGIN = "mb_sock_origin"
MAP_PAIR_ORIG_DST = "mb_pair_orig_dst"
MAP_SOCK_PAIR = "mb_sock_pair"
MAP_LOCAL_PODS = "mb_local_pods"
MAP_MARK_POD_IPS = "mb_mark_pod_ips"
MAP_NETNS_IP = "mb_netns_ip"
MAP_SETTINGS = "mb_settings"
MAP_COUNTERS = "mb_counters"
MAP_SKMSG_BUDGET = "mb_skmsg_budget"
MAP_NETNS_POD = "mb_netns_pod"
MAP_IN_PENDING = "mb_in_pending"
MAP_CGROUP_INFO = "mb_cgroup_info"     # ambient mode
MAP_AMBIENT_IPS = "mb_ambient_ips"     # ambient mode
ALL_MAPS = (MAP_SOCK_ORIGIN, MAP_PAIR_ORIG_DST, MAP_SOCK_PAIR, MAP_LOCAL_PODS,
            MAP_MARK_POD_IPS, MAP_NETNS_IP, MAP_SETTINGS, MAP_COUNTERS, MAP_SKMSG_BUDGET,
            MAP_NETNS_POD, MAP_IN_PENDING, MAP_CGROUP_INFO, MAP_AMBIENT_IPS)
#: maps only the kernel can walk (a sockhash holds sockets; an sk_storage map's
#: entries live in the sockets): pinned and unpinned, never opened as a table
SOCKET_MAPS = (MAP_SOCK_PAIR, MAP_SOCK_ORIGIN)
#: pins of maps earlier versions had: removed at load and with the others
RETIRED_MAPS = ("mb_cookie_orig_dst", "mb_sock_peer")


class MbAddr(ct.Structure):
    """Must match struct mb_addr in bpf/include/merbridge.h (16 bytes, network order)."""
    _fields_ = [("ip", ct.c_uint32 * 4)]

    @classmethod
    def of(cls, ip: str | bytes) -> "MbAddr":
        return cls.from_buffer_copy(ip if isinstance(ip, bytes) else addr_pack(ip))

    def __str__(self) -> str:
        return addr_unpack(bytes(self))


class MbOrigin(ct.Structure):
    """Must match struct mb_origin in bpf/include/merbridge.h."""
    _fields_ = [("addr", MbAddr), ("pid", ct.c_uint32), ("port", ct.c_uint16),
                ("flags", ct.c_uint16)]

    @property
    def port_host(self) -> int:
        return socket.ntohs(self.port)


class MbInFlow(ct.Structure):
    """Must match struct mb_in_flow in bpf/include/merbridge.h (network order)."""
    _fields_ = [("ack", ct.c_uint32), ("port", ct.c_uint16), ("flags", ct.c_uint16)]


MB_IN_F_HALF_OPEN = 0x01
MB_IN_F_CLOSING = 0x02


class MbPair(ct.Structure):
    """Must match struct mb_pair in bpf/include/merbridge.h (ports in network order)."""
    _fields_ = [("sip", MbAddr), ("dip", MbAddr), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16)]

    @classmethod
    def of(cls, sip: str, sport: int, dip: str, dport: int) -> "MbPair":
        return cls(MbAddr.of(sip), MbAddr.of(dip), socket.htons(sport), socket.htons(dport))

    def __str__(self) -> str:
        return (f"{self.sip}:{socket.ntohs(self.sport)} -> "
                f"{self.dip}:{socket.ntohs(self.dport)}")


class MbPodIps(ct.Structure):
    """Must match struct mb_pod_ips in bpf/include/merbridge.h (0s: none of that
    family). Value of mb_mark_pod_ips and mb_netns_ip."""
    _fields_ = [("ip4", MbAddr), ("ip6", MbAddr)]

    @classmethod
    def of(cls, ips: Iterable[str]) -> "MbPodIps":
        """At most one IPv4 and one IPv6 address, at least one. ValueError otherwise."""
        v = cls()
        for ip in ips:
            raw = addr_pack(ip)
            field = "ip4" if raw.startswith(V4_MAPPED_PREFIX) else "ip6"
            if any(getattr(v, field).ip):
                raise ValueError(f"pod IPs: two {'IPv4' if field == 'ip4' else 'IPv6'} "
                                 f"addresses ({getattr(v, field)}, {ip}); one per family")
            setattr(v, field, MbAddr.from_buffer_copy(raw))
        if not any(v.ip4.ip) and not any(v.ip6.ip):
            raise ValueError("pod IPs: at least one address is needed")
        return v

    def ips(self) -> tuple[str, ...]:
        """The addresses held, IPv4 first."""
        return tuple(str(a) for a in (self.ip4, self.ip6) if any(a.ip))


class MbNetnsPod(ct.Structure):
    """Must match struct mb_netns_pod in bpf/include/merbridge.h."""
    _fields_ = [("ips", MbPodIps), ("mark", ct.c_uint32), ("pad", ct.c_uint32)]


class MbCidr(ct.Structure):
    """Must match struct mb_cidr in bpf/include/merbridge.h."""
    _fields_ = [("net", MbAddr), ("prefixlen", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class MbPodConfig(ct.Structure):
    """Must match struct mb_pod_config in bpf/include/merbridge.h (ports in host order)."""
    _fields_ = [
        ("status_port", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("n_include_in_ports", ct.c_uint8),
        ("n_exclude_in_ports", ct.c_uint8),
        ("n_include_out_ports", ct.c_uint8),
        ("n_exclude_out_ports", ct.c_uint8),
        ("n_include_out_cidrs", ct.c_uint8),
        ("n_exclude_out_cidrs", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("include_in_ports", ct.c_uint16 * MB_MAX_PORTS),
        ("exclude_in_ports", ct.c_uint16 * MB_MAX_PORTS),
        ("include_out_ports", ct.c_uint16 * MB_MAX_PORTS),
        ("exclude_out_ports", ct.c_uint16 * MB_MAX_PORTS),
        ("include_out_cidrs", MbCidr * MB_MAX_CIDRS),
        ("exclude_out_cidrs", MbCidr * MB_MAX_CIDRS),
        ("proxy_uid", ct.c_uint32),
        ("proxy_gid", ct.c_uint32),
    ]


class MbCgroupInfo(ct.Structure):
    """Must match struct mb_cgroup_info in bpf/include/ambient.h."""
    _fields_ = [("ip4", MbAddr), ("ip6", MbAddr), ("in_mesh", ct.c_uint32),
                ("flags", ct.c_uint32)]


#: mirror class -> C struct name, for the layout tests
MIRRORS: dict[str, type[ct.Structure]] = {
    "mb_addr": MbAddr, "mb_origin": MbOrigin, "mb_pair": MbPair,
    "mb_cidr": MbCidr, "mb_pod_config": MbPodConfig, "mb_netns_pod": MbNetnsPod,
    "mb_pod_ips": MbPodIps, "mb_in_flow": MbInFlow, "mb_cgroup_info": MbCgroupInfo,
}

#: map -> mirror of its struct value (maps.h, ambient_maps.h).
#: loader.check_pinned_layouts refuses a pin whose value size is not this
#: build's (bcc would reuse it and the verifier refuse the programs with a bare
#: EACCES); tests/unit/test_layout.py checks that every struct-valued map of
#: those headers is here.
MAP_VALUES: dict[str, type[ct.Structure]] = {
    MAP_SOCK_ORIGIN: MbOrigin, MAP_PAIR_ORIG_DST: MbOrigin,
    MAP_LOCAL_PODS: MbPodConfig, MAP_MARK_POD_IPS: MbPodIps, MAP_NETNS_IP: MbPodIps,
    MAP_NETNS_POD: MbNetnsPod, MAP_IN_PENDING: MbInFlow,
    MAP_CGROUP_INFO: MbCgroupInfo,
}


# ---- addresses ---------------------------------------------------------------
#: the first 12 bytes of an IPv4 address in the 16-byte form (::ffff:a.b.c.d)
V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def addr_pack(ip: str) -> bytes:
    """'10.0.0.1' -> ::ffff:10.0.0.1 as 16 bytes; IPv6 as is. ValueError if invalid."""
    a = ipaddress.ip_address(ip.strip())
    if a.version == 4:
        return V4_MAPPED_PREFIX + a.packed
    return a.packed


def addr_unpack(raw: bytes) -> str:
    """16 bytes -> '10.0.0.1' for IPv4-mapped, else the IPv6 text form."""
    if len(raw) != 16:
        raise ValueError(f"address must be 16 bytes, got {len(raw)}")
    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped) if a.ipv4_mapped is not None else str(a)
