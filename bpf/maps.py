"""Typed handles on the datapath's pinned maps.

The loader hands each map in as a ``MapBackend`` (bytes in, bytes out); this
module encodes and decodes the structs of ``bpf/types.py`` on top of it. It
never imports bcc, so unit tests drive it with ``DictBackend`` and the daemon
uses the same code against the kernel.

    maps.local_pods.put("10.0.0.5", PodPolicy(...))   # PolicyTooLarge on overflow
    maps.mark_pod_ips.put(7, "10.0.0.5", "fd00::5")     # one IP per family
    maps.pair_orig_dst.delete_ip("10.0.0.5")
    maps.counters()["redirect_out"]
"""
from __future__ import annotations

import functools
import socket
import struct
from typing import Iterable, Iterator, Protocol, Sized

from merbridge.bpf import ambient
from merbridge.bpf import types as t
from merbridge.bpf.policy import Cidr, PodPolicy


class PolicyTooLarge(ValueError):
    """A PodPolicy does not fit struct mb_pod_config's bounded lists."""


class MapBackend(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> bool: ...
    def items(self) -> Iterable[tuple[bytes, bytes]]: ...


class DictBackend:
    """An in-memory MapBackend for tests (and a model of the semantics)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[bytes(key)] = bytes(value)

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        return list(self.data.items())


# ---- policy encoding ------------------------------------------------------
def _ports(name: str, ports: Iterable[int], limit: int) -> list[int]:
    out = sorted(set(ports))
    if len(out) > limit:
        raise PolicyTooLarge(f"{name}: {len(out)} ports, the datapath holds at most {limit}"
                             " (MB_MAX_PORTS in bpf/include/merbridge.h)")
    for p in out:
        if not 0 < p < 65536:
            raise PolicyTooLarge(f"{name}: port {p} is outside 1..65535")
    return out


def _cidrs(name: str, cidrs: Iterable[Cidr], limit: int) -> list[Cidr]:
    out = list(dict.fromkeys(cidrs))
    if len(out) > limit:
        raise PolicyTooLarge(f"{name}: {len(out)} CIDRs, the datapath holds at most {limit}"
                             " (MB_MAX_CIDRS in bpf/include/merbridge.h)")
    for net, plen in out:
        if len(net) != 16 or not 0 <= plen <= 128:
            raise PolicyTooLarge(f"{name}: bad CIDR ({net!r}, {plen}); want 16 bytes and 0..128")
    return out


def _masked(net: bytes, plen: int) -> bytes:
    n = int.from_bytes(net, "big")
    mask = ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1) if plen else 0
    return (n & mask).to_bytes(16, "big")


def encode_policy(policy: PodPolicy) -> t.MbPodConfig:
    """PodPolicy -> struct mb_pod_config. Raises PolicyTooLarge (a ValueError)."""
    c = t.MbPodConfig()
    if not 0 <= policy.status_port < 65536:
        raise PolicyTooLarge(f"status_port {policy.status_port} is outside 0..65535")
    c.status_port = policy.status_port
    c.flags = ((t.MB_POD_F_INCLUDE_IN_ALL if policy.include_inbound_all else 0)
               | (t.MB_POD_F_INCLUDE_OUT_ALL if policy.include_outbound_all else 0)
               | (t.MB_POD_F_DNS_CAPTURE if policy.dns_capture else 0))
    for name in ("proxy_uid", "proxy_gid"):
        value = getattr(policy, name)
        if not 0 <= value < 2 ** 32:
            raise PolicyTooLarge(f"{name} {value} is outside 0..{2 ** 32 - 1}")
        setattr(c, name, value)
    for field, src in (("include_in_ports", policy.include_inbound_ports),
                       ("exclude_in_ports", policy.exclude_inbound_ports),
                       ("include_out_ports", policy.include_outbound_ports),
                       ("exclude_out_ports", policy.exclude_outbound_ports)):
        ports = _ports(field, src, t.MB_MAX_PORTS)
        setattr(c, "n_" + field, len(ports))
        arr = getattr(c, field)
        for i, p in enumerate(ports):
            arr[i] = p
    for field, cidr_src in (("include_out_cidrs", policy.include_outbound_cidrs),
                            ("exclude_out_cidrs", policy.exclude_outbound_cidrs)):
        cidrs = _cidrs(field, cidr_src, t.MB_MAX_CIDRS)
        setattr(c, "n_" + field, len(cidrs))
        arr = getattr(c, field)
        for i, (net, plen) in enumerate(cidrs):
            arr[i].net = t.MbAddr.from_buffer_copy(_masked(net, plen))
            arr[i].prefixlen = plen
    return c


@functools.lru_cache(maxsize=4096)
def policy_value(policy: PodPolicy) -> bytes:
    """The bytes ``mb_local_pods`` holds for ``policy``, encoded once per
    distinct policy (PodPolicy is frozen and hashable): checking a pod's
    policy against the datapath's limits before any write and writing it for
    each of the pod's IPs is one encoding. Raises PolicyTooLarge."""
    return bytes(encode_policy(policy))


def decode_policy(c: t.MbPodConfig) -> PodPolicy:
    """struct mb_pod_config -> PodPolicy (inverse of encode_policy)."""
    def ports(field: str) -> frozenset[int]:
        return frozenset(getattr(c, field)[: getattr(c, "n_" + field)])

    def cidrs(field: str) -> tuple[Cidr, ...]:
        arr = getattr(c, field)
        return tuple((bytes(arr[i].net), arr[i].prefixlen)
                     for i in range(getattr(c, "n_" + field)))

    return PodPolicy(
        include_inbound_all=bool(c.flags & t.MB_POD_F_INCLUDE_IN_ALL),
        include_inbound_ports=ports("include_in_ports"),
        exclude_inbound_ports=ports("exclude_in_ports"),
        include_outbound_all=bool(c.flags & t.MB_POD_F_INCLUDE_OUT_ALL),
        include_outbound_cidrs=cidrs("include_out_cidrs"),
        exclude_outbound_cidrs=cidrs("exclude_out_cidrs"),
        include_outbound_ports=ports("include_out_ports"),
        exclude_outbound_ports=ports("exclude_out_ports"),
        status_port=c.status_port,
        dns_capture=bool(c.flags & t.MB_POD_F_DNS_CAPTURE),
        proxy_uid=c.proxy_uid,
        proxy_gid=c.proxy_gid,
    )


# ---- handles ------------------------------------------------------------------
class LocalPods:
    """mb_local_pods: pod IP -> policy. Written by the daemon."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def put(self, ip: str, policy: PodPolicy) -> None:
        value = policy_value(policy)  # validate before touching the map
        self.b.put(t.addr_pack(ip), value)

    def get(self, ip: str) -> PodPolicy | None:
        raw = self.b.get(t.addr_pack(ip))
        return None if raw is None else decode_policy(t.MbPodConfig.from_buffer_copy(raw))

    def delete(self, ip: str) -> bool:
        return self.b.delete(t.addr_pack(ip))

    def items(self) -> list[tuple[str, PodPolicy]]:
        return [(t.addr_unpack(k), decode_policy(t.MbPodConfig.from_buffer_copy(v)))
                for k, v in self.b.items()]


class _PodIpsValues:
    """A map of integer keys (packed as ``key_format``) to struct mb_pod_ips.
    ``items`` gives each entry's first IP (IPv4 first), ``all_items`` all."""
    key_format = "=I"

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def all_items(self) -> list[tuple[int, tuple[str, ...]]]:
        return [(struct.unpack(self.key_format, k)[0], t.MbPodIps.from_buffer_copy(v).ips())
                for k, v in self.b.items()]

    def items(self) -> list[tuple[int, str]]:
        return [(key, ips[0]) for key, ips in self.all_items()]


class MarkPodIps(_PodIpsValues):
    """mb_mark_pod_ips: marker listener SO_MARK -> the pod's IPs, at most one
    per family (struct mb_pod_ips). Written by the daemon.

    ``get``/``items`` give a pod's first IP (IPv4 first), ``ips``/
    ``all_items`` every IP it has."""

    @staticmethod
    def _key(key: int) -> bytes:
        if not 0 <= key < 2**32:
            raise ValueError(f"mark {key} is outside 0..2^32-1")
        return struct.pack("=I", key)

    def put(self, key: int, *ips: str) -> None:
        """ValueError (map untouched) without an IP or with two of one family."""
        value = t.MbPodIps.of(ips)
        self.b.put(self._key(key), bytes(value))

    def ips(self, key: int) -> tuple[str, ...] | None:
        raw = self.b.get(self._key(key))
        return None if raw is None else t.MbPodIps.from_buffer_copy(raw).ips()

    def get(self, key: int) -> str | None:
        ips = self.ips(key)
        return None if ips is None else ips[0]

    def delete(self, key: int) -> bool:
        return self.b.delete(self._key(key))


class PairOrigDst:
    """mb_pair_orig_dst: connecting 4-tuple -> original destination."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def raw_items(self) -> Iterator[tuple[bytes, t.MbOrigin]]:
        for k, v in self.b.items():
            yield k, t.MbOrigin.from_buffer_copy(v)

    def items(self) -> list[tuple[t.MbPair, t.MbOrigin]]:
        return [(t.MbPair.from_buffer_copy(k), o) for k, o in self.raw_items()]

    def put(self, pair: t.MbPair, origin: t.MbOrigin) -> None:
        self.b.put(bytes(pair), bytes(origin))

    def delete(self, pair: t.MbPair) -> bool:
        return self.b.delete(bytes(pair))

    def delete_ip(self, ip: str) -> int:
        """Remove every entry whose tuple or origin mentions ip; returns the count."""
        raw = t.addr_pack(ip)
        doomed = [k for k, o in self.raw_items()
                  if raw in (k[0:16], k[16:32], bytes(o.addr))]
        return sum(self.b.delete(k) for k in doomed)


class InPending:
    """mb_in_pending: inbound flows (bpf/progs/inbound.c) that are not established,
    half-open or closing; same key as mb_pair_orig_dst."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def items(self) -> list[tuple[t.MbPair, t.MbInFlow]]:
        return [(t.MbPair.from_buffer_copy(k), t.MbInFlow.from_buffer_copy(v))
                for k, v in self.b.items()]

    def put(self, pair: t.MbPair, flow: t.MbInFlow) -> None:
        self.b.put(bytes(pair), bytes(flow))

    def delete_ip(self, ip: str) -> int:
        """Remove every flow whose tuple mentions ip; returns the count."""
        raw = t.addr_pack(ip)
        doomed = [k for k, _ in self.b.items() if raw in (k[0:16], k[16:32])]
        return sum(self.b.delete(k) for k in doomed)


class NetnsIp(_PodIpsValues):
    """mb_netns_ip (legacy mode feedback): netns cookie -> the pod IPs sockops
    learned so far, at most one per family (struct mb_pod_ips). ``items``
    gives each netns' first IP (IPv4 first), ``all_items`` all of them."""
    key_format = "=Q"

    def put(self, cookie: int, *ips: str) -> None:
        """Written by the legacy daemon for a pod whose proxy has its own UID/GID
        (legacy.LegacyPods._seed). ValueError without an IP or with two of one family."""
        self.b.put(struct.pack(self.key_format, cookie), bytes(t.MbPodIps.of(ips)))


class NetnsPod:
    """mb_netns_pod (CNI mode): netns cookie -> (pod IPs, mark), the daemon's
    record of a pod's netns, the only way connect4/6 and getsockopt know a
    netns is a pod (docs/security.md). ``items`` gives each entry's first IP
    (IPv4 first), ``all_items`` all of them."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def put(self, cookie: int, ips: str | Iterable[str], mark: int) -> None:
        """Written by the daemon at ADD, from the SO_NETNS_COOKIE of the marker
        socket it opened in the pod netns (connect4/6 look mark -> ips up in
        mb_mark_pod_ips on every use: a withdrawn mark is not a pod).
        ips: the pod's IPs as written to mb_mark_pod_ips (one per family)."""
        v = t.MbNetnsPod()
        v.ips = t.MbPodIps.of((ips,) if isinstance(ips, str) else ips)
        v.mark = mark
        self.b.put(struct.pack("=Q", cookie), bytes(v))

    def delete(self, cookie: int) -> bool:
        return self.b.delete(struct.pack("=Q", cookie))

    def all_items(self) -> list[tuple[int, tuple[str, ...], int]]:
        out = []
        for k, v in self.b.items():
            np = t.MbNetnsPod.from_buffer_copy(v)
            out.append((struct.unpack("=Q", k)[0], np.ips.ips(), np.mark))
        return out

    def items(self) -> list[tuple[int, str, int]]:
        return [(cookie, ips[0], mark) for cookie, ips, mark in self.all_items()]


class SkmsgBudget:
    """mb_skmsg_budget: a sockhash socket's 4-tuple -> bytes it may still
    redirect through sk_msg (0: on the normal path for good)."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def items(self) -> list[tuple[t.MbPair, int]]:
        return [(t.MbPair.from_buffer_copy(k), struct.unpack("=Q", v)[0])
                for k, v in self.b.items()]


class Settings:
    """mb_settings: u64 knobs at MB_SET_* indexes."""

    def __init__(self, backend: MapBackend) -> None:
        self.b = backend

    def get(self, idx: int) -> int:
        raw = self.b.get(struct.pack("=I", idx))
        return 0 if raw is None else struct.unpack("=Q", raw)[0]

    def set(self, idx: int, value: int) -> None:
        if not 0 <= idx < t.MB_N_SETTINGS:
            raise ValueError(f"setting index {idx} is outside 0..{t.MB_N_SETTINGS - 1}")
        self.b.put(struct.pack("=I", idx), struct.pack("=Q", value))


class Maps:
    """All typed handles; built by loader.Datapath.maps or loader.open_maps."""

    def __init__(self, backends: dict[str, MapBackend], closer=None) -> None:
        self.backends = backends
        self.local_pods = LocalPods(backends[t.MAP_LOCAL_PODS])
        self.mark_pod_ips = MarkPodIps(backends[t.MAP_MARK_POD_IPS])
        self.pair_orig_dst = PairOrigDst(backends[t.MAP_PAIR_ORIG_DST])
        self.netns_ip = NetnsIp(backends[t.MAP_NETNS_IP])
        self.settings = Settings(backends[t.MAP_SETTINGS])
        # ambient mode's (bpf/ambient.py)
        self.cgroup_info = ambient.CgroupInfo(backends[t.MAP_CGROUP_INFO])
        self.ambient_ips = ambient.AmbientIps(backends[t.MAP_AMBIENT_IPS])
        self.skmsg_budget = SkmsgBudget(backends[t.MAP_SKMSG_BUDGET])
        self.netns_pod = NetnsPod(backends[t.MAP_NETNS_POD])
        self.in_pending = InPending(backends[t.MAP_IN_PENDING])
        self._closer = closer

    def counters(self) -> dict[str, int]:
        """Counter name -> value summed over CPUs (backend values are already summed)."""
        names = {**t.COUNTERS, **t.XDP_COUNTERS}
        out = {name: 0 for name in names.values()}
        for k, v in self.backends[t.MAP_COUNTERS].items():
            idx = struct.unpack("=I", k)[0]
            value = struct.unpack("=Q", v)[0]
            if idx in names:
                out[names[idx]] = value
            elif value:  # a slot without a name yet
                out[f"c{idx}"] = value
        return out

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Map name -> (entries in use, max_entries), for the backends that know
        their capacity (the kernel's; not DictBackend)."""
        return {name: (len(b), b.max_entries) for name, b in self.backends.items()
                if isinstance(b, Sized) and hasattr(b, "max_entries")}

    def dump(self) -> dict[str, object]:
        """A JSON-friendly view of every map (for ``merbridge maps dump``)."""
        def origin(o: t.MbOrigin) -> dict[str, object]:
            return {"addr": str(o.addr), "port": o.port_host, "flags": o.flags, "pid": o.pid}
        return {
            t.MAP_LOCAL_PODS: {ip: repr(p) for ip, p in self.local_pods.items()},
            t.MAP_MARK_POD_IPS: {str(k): list(ips) for k, ips in self.mark_pod_ips.all_items()},
            t.MAP_PAIR_ORIG_DST: {str(p): origin(o) for p, o in self.pair_orig_dst.items()},
            t.MAP_NETNS_IP: {str(c): list(ips) for c, ips in self.netns_ip.all_items()},
            t.MAP_NETNS_POD: {str(c): {"ips": list(ips), "mark": m}
                              for c, ips, m in self.netns_pod.all_items()},
            t.MAP_SETTINGS: {str(i): self.settings.get(i) for i in range(t.MB_N_SETTINGS)},
            t.MAP_SKMSG_BUDGET: {str(p): left for p, left in self.skmsg_budget.items()},
            t.MAP_IN_PENDING: {str(p): {"port": socket.ntohs(f.port), "flags": f.flags,
                                        "ack": socket.ntohl(f.ack)}
                               for p, f in self.in_pending.items()},
            t.MAP_COUNTERS: self.counters(),
        }

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None
