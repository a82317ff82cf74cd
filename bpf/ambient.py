"""Istio ambient mode's part of the datapath (docs/ambient.md): its programs
and typed handles on its maps.

Its C is bpf/include/ambient.h (the struct and constants, mirrored in
bpf/types.py with the rest of the kernel contract), ambient_maps.h (its maps,
pinned in every build), ambient_connect.h and bpf/progs/ambient4.c,
ambient6.c (the programs, loaded only with ``Datapath(ambient=True)``). The
daemon side is daemon/ambient.py. Never imports bcc.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from merbridge.bpf import types as t
from merbridge.bpf.programs import Prog

if TYPE_CHECKING:
    from merbridge.bpf.maps import MapBackend

#: two more cgroup connect programs, next to connect4/6 (BPF_F_ALLOW_MULTI;
#: neither acts on the other's pods, so their order does not matter).
#: Datapath.attach() without ambient detaches them, so a daemon restarted
#: without --ambient stops it.
PROGRAMS: tuple[Prog, ...] = (
    Prog("ambient4.c", "mb_ambient4", "cgroup/connect4"),
    Prog("ambient6.c", "mb_ambient6", "cgroup/connect6"),
)


class CgroupInfo:
    """mb_cgroup_info: cgroup id -> the pod owning that cgroup. Written by the
    daemon (daemon/ambient.py); read by ambient4.c/ambient6.c."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    @staticmethod
    def _key(cgroup_id: int) -> bytes:
        if not 0 < cgroup_id < 2**64:
            raise ValueError(f"cgroup id {cgroup_id} is outside 1..2^64-1")
        return struct.pack("=Q", cgroup_id)

    @staticmethod
    def encode(in_mesh: bool, ip4: str = "", ip6: str = "", flags: int = 0) -> t.MbCgroupInfo:
        v = t.MbCgroupInfo()
        for field, ip, version in (("ip4", ip4, 4), ("ip6", ip6, 6)):
            if ip:
                raw = t.addr_pack(ip)
                if (raw[:12] == t.V4_MAPPED_PREFIX) != (version == 4):
                    raise ValueError(f"{field} {ip!r} is not an IPv{version} address")
                setattr(v, field, t.MbAddr.from_buffer_copy(raw))
        v.in_mesh = 1 if in_mesh else 0
        v.flags = flags
        return v

    def put(self, cgroup_id: int, in_mesh: bool, ip4: str = "", ip6: str = "",
            flags: int = 0) -> None:
        value = self.encode(in_mesh, ip4, ip6, flags)  # validate before touching the map
        self.b.put(self._key(cgroup_id), bytes(value))

    def get(self, cgroup_id: int) -> t.MbCgroupInfo | None:
        raw = self.b.get(self._key(cgroup_id))
        return None if raw is None else t.MbCgroupInfo.from_buffer_copy(raw)

    def delete(self, cgroup_id: int) -> bool:
        return self.b.delete(self._key(cgroup_id))

    def items(self) -> list[tuple[int, t.MbCgroupInfo]]:
        return [(struct.unpack("=Q", k)[0], t.MbCgroupInfo.from_buffer_copy(v))
                for k, v in self.b.items()]


class AmbientIps:
    """mb_ambient_ips: the IPs of the ambient pods on this node (value 1)."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def put(self, ip: str) -> None:
        self.b.put(t.addr_pack(ip), struct.pack("=I", 1))

    def delete(self, ip: str) -> bool:
        return self.b.delete(t.addr_pack(ip))

    def items(self) -> list[str]:
        return [t.addr_unpack(k) for k, _ in self.b.items()]


def ztunnel_settings(ip4: str = "", ip6: str = "") -> dict[int, int]:
    """The mb_settings values (index -> u64) that hold the ztunnel address;
    an empty address clears its family. ValueError for a wrong family."""
    v4 = v6hi = v6lo = 0
    if ip4:
        raw = t.addr_pack(ip4)
        if raw[:12] != t.V4_MAPPED_PREFIX:
            raise ValueError(f"ztunnel IPv4 {ip4!r} is not an IPv4 address")
        v4 = struct.unpack("=I", raw[12:])[0]   # network order as it lies in memory
    if ip6:
        raw = t.addr_pack(ip6)
        if raw[:12] == t.V4_MAPPED_PREFIX:
            raise ValueError(f"ztunnel IPv6 {ip6!r} is not an IPv6 address")
        v6hi, v6lo = struct.unpack("=QQ", raw)
    return {t.MB_SET_ZTUNNEL_IP4: v4, t.MB_SET_ZTUNNEL_IP6_HI: v6hi,
            t.MB_SET_ZTUNNEL_IP6_LO: v6lo}
