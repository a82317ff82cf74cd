"""PodPolicy: one pod's interception rules, as the datapath needs them.

The daemon builds a PodPolicy from a pod's annotations (istio-iptables is the
oracle for their meaning) and ``maps`` encodes it into ``struct mb_pod_config``.
It is deliberately library-free: CIDRs arrive already packed as 16-byte
IPv6 (IPv4 as ``::ffff:a.b.c.d``) with a prefix length over 128 bits.

Decision order, the same as istio-iptables' ISTIO_OUTPUT chain:

outbound (an app's connect from this pod):
  1. port in exclude_outbound_ports          -> not redirected
  2. destination in exclude_outbound_cidrs   -> not redirected
  3. port in include_outbound_ports          -> redirected (regardless of IP)
  4. include_outbound_all, or destination in include_outbound_cidrs -> redirected
  5. otherwise                               -> not redirected

inbound (a connection to this pod's port P):
  1. P == 15008 or P in exclude_inbound_ports (only consulted with "*") -> not redirected
  2. include_inbound_all                     -> redirected
  3. P in include_inbound_ports              -> redirected
  4. otherwise                               -> not redirected
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

#: a CIDR as (16-byte network address, prefix length 0..128)
Cidr = tuple[bytes, int]


@dataclass(frozen=True)
class PodPolicy:
    include_inbound_all: bool = True
    include_inbound_ports: frozenset[int] = field(default_factory=frozenset)
    exclude_inbound_ports: frozenset[int] = field(default_factory=frozenset)
    include_outbound_all: bool = True
    include_outbound_cidrs: tuple[Cidr, ...] = ()
    exclude_outbound_cidrs: tuple[Cidr, ...] = ()
    include_outbound_ports: frozenset[int] = field(default_factory=frozenset)
    exclude_outbound_ports: frozenset[int] = field(default_factory=frozenset)
    #: the sidecar's status/health port, never captured inbound (0: none)
    status_port: int = 0
    #: DNS capture (Istio: ISTIO_META_DNS_CAPTURE): the pod's TCP and UDP
    #: queries to port 53 go to the mesh's DNS proxy port (bpf/progs/dns.c)
    dns_capture: bool = False
    #: the proxy's UID and GID, never intercepted (istio-cni: the
    #: istio-proxy container's runAsUser / runAsGroup); 0: the mesh default
    proxy_uid: int = 0
    proxy_gid: int = 0


def format_cidr(cidr: Cidr) -> str:
    """(16-byte address, prefix) -> '10.0.0.0/8' or 'fd00::/64' (IPv4-mapped shown as IPv4)."""
    raw, prefix = cidr
    addr = ipaddress.IPv6Address(raw)
    if addr.ipv4_mapped is not None and prefix >= 96:
        return f"{addr.ipv4_mapped}/{prefix - 96}"
    if prefix == 0:
        return "*"
    return f"{addr}/{prefix}"


def describe(policy: PodPolicy) -> str:
    """One line an operator can read: what is and is not captured."""
    def ports(p: frozenset[int]) -> str:
        return ",".join(map(str, sorted(p))) or "-"

    def cidrs(c: tuple[Cidr, ...]) -> str:
        return ",".join(map(format_cidr, c)) or "-"

    inbound = "in: " + ("*" if policy.include_inbound_all else ports(policy.include_inbound_ports))
    if policy.include_inbound_all:
        inbound += f" except {ports(policy.exclude_inbound_ports)}"
    outbound = "out: " + ("*" if policy.include_outbound_all else cidrs(policy.include_outbound_cidrs))
    if policy.include_outbound_ports:
        outbound += f" + ports {ports(policy.include_outbound_ports)}"
    if policy.exclude_outbound_cidrs or policy.exclude_outbound_ports:
        outbound += (f" except {cidrs(policy.exclude_outbound_cidrs)}"
                     f" ports {ports(policy.exclude_outbound_ports)}")
    status = f"; status port {policy.status_port}" if policy.status_port else ""
    dns = "; dns captured" if policy.dns_capture else ""
    ids = ""
    if policy.proxy_uid or policy.proxy_gid:
        ids = f"; proxy uid {policy.proxy_uid or '-'} gid {policy.proxy_gid or '-'}"
    return f"{inbound}; {outbound}{status}{dns}{ids}"
