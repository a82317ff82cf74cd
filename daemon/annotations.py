"""Pod -> (is it in the mesh?, its interception policy): pure functions.

Two questions are answered here, from a pod in Kubernetes JSON (camelCase)
form and the chosen mesh row (``merbridge.bpf.mesh``):

* ``mesh_membership`` -- should merbridge intercept this pod at all?  For
  Istio it follows istio-cni's checks (cni/pkg/plugin/plugin.go), with one
  deliberate difference, see below.
* ``pod_policy`` -- which ports and CIDRs to redirect, from the
  ``traffic.sidecar.istio.io/*`` annotations, with istio-iptables as the
  oracle for their meaning (an annotation means here exactly what the
  equivalent iptables rule set would do).

The istio-init difference: istio-cni skips a pod that carries an
``istio-init`` init container, because istio-init already programs the same
iptables rules and programming them twice would break the pod.  Merbridge
does not program iptables at all: its eBPF hooks rewrite the connection
before netfilter sees it, and istio-init's rules then see 127.0.0.1 and
RETURN.  Skipping those pods would leave the most common Istio installation
(init-container mode) with no acceleration, which is the opposite of the
point, so such pods ARE enrolled (the reason string says iptables is also
present).

Errors: a malformed annotation raises ``AnnotationError`` naming the
annotation and the value; a CNI ADD then fails, as it does with istio-cni.
Lists longer than the datapath can hold are an error too, never truncated.
netaddr is imported here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import netaddr

from merbridge.bpf import types as bpf_types
from merbridge.bpf.mesh import Mesh
from merbridge.bpf.policy import Cidr, PodPolicy

# Sizes of the per-pod lists in struct mb_pod_config (bpf/include/merbridge.h)
MAX_PORTS = bpf_types.MB_MAX_PORTS
MAX_CIDRS = bpf_types.MB_MAX_CIDRS

PREFIX = "traffic.sidecar.istio.io/"
INCLUDE_OUTBOUND_IP_RANGES = PREFIX + "includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = PREFIX + "excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = PREFIX + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = PREFIX + "excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = PREFIX + "includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = PREFIX + "excludeOutboundPorts"
STATUS_PORT = "status.sidecar.istio.io/port"
INJECT = "sidecar.istio.io/inject"
STATUS = "sidecar.istio.io/status"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"

#: interception modes Istio accepts; merbridge implements only REDIRECT
_ISTIO_MODES = ("REDIRECT", "TPROXY", "NONE")

#: Kuma and OSM name the same knobs differently; Linkerd reuses Istio's names
#: (as upstream merbridge does).  Only the names differ, the syntax is shared.
_ALIASES: dict[str, dict[str, str]] = {
    "kuma": {
        EXCLUDE_INBOUND_PORTS: "traffic.kuma.io/exclude-inbound-ports",
        EXCLUDE_OUTBOUND_PORTS: "traffic.kuma.io/exclude-outbound-ports",
    },
    "osm": {
        STATUS_PORT: "openservicemesh.io/port",
        EXCLUDE_INBOUND_PORTS: "openservicemesh.io/inbound-port-exclusion-list",
        EXCLUDE_OUTBOUND_PORTS: "openservicemesh.io/outbound-port-exclusion-list",
        INCLUDE_INBOUND_PORTS: "openservicemesh.io/inbound-port-inclusion-list",
        INCLUDE_OUTBOUND_PORTS: "openservicemesh.io/outbound-port-inclusion-list",
        EXCLUDE_OUTBOUND_IP_RANGES: "openservicemesh.io/outbound-ip-range-exclusion-list",
        INCLUDE_OUTBOUND_IP_RANGES: "openservicemesh.io/outbound-ip-range-inclusion-list",
    },
}

#: opt-out switches of the other meshes: (key, values meaning "off")
_OPT_OUT: dict[str, tuple[str, frozenset[str]]] = {
    "linkerd": ("linkerd.io/inject", frozenset({"disabled"})),
    "kuma": ("kuma.io/sidecar-injection", frozenset({"disabled", "false"})),
    "osm": ("openservicemesh.io/sidecar-injection", frozenset({"disabled", "false", "no", "off"})),
}


class AnnotationError(ValueError):
    """An annotation value istio-iptables would reject (fails the CNI ADD)."""

    def __init__(self, annotation: str, value: str, why: str):
        super().__init__(f"invalid annotation {annotation}={value!r}: {why}")
        self.annotation = annotation
        self.value = value


@dataclass(frozen=True)
class Membership:
    in_mesh: bool
    reason: str


# --------------------------------------------------------------- helpers


def _meta(pod: dict) -> dict:
    return pod.get("metadata") or {}


def _annotations(pod: dict) -> dict[str, str]:
    return _meta(pod).get("annotations") or {}


def _labels(pod: dict) -> dict[str, str]:
    return _meta(pod).get("labels") or {}


def _containers(pod: dict) -> list[dict]:
    spec = pod.get("spec") or {}
    # native sidecars (Kubernetes >= 1.28) put the proxy in initContainers
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _find_container(pod: dict, name: str) -> dict | None:
    for c in _containers(pod):
        if c.get("name") == name:
            return c
    return None


def _env(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value", "")
    return None


def parse_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool: the accepted spellings, None for anything else."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _split(name: str, value: str) -> list[str]:
    """The items of a comma-separated list, blanks around each trimmed.

    A blank value is the empty list.  An empty item ("80,,90", "80,", ",80")
    is an error, as in istio-cni: its validators split on every comma and
    ParseUint("")/ParsePrefix("") fail, which fails the pod's ADD.  Trimming
    follows istio-cni's ports (ParseUint of the trimmed item); for CIDRs we
    trim as well, where ParsePrefix would reject " 10.0.0.0/8" (upstream
    merbridge trimmed but then parsed the untrimmed text, losing items).
    """
    if not value.strip():
        return []
    items = [item.strip() for item in value.split(",")]
    if "" in items:
        raise AnnotationError(name, value, "empty list item (a stray comma)")
    return items


# --------------------------------------------------------------- membership


def mesh_membership(pod: dict, mesh: Mesh, exclude_namespaces: Iterable[str] = ()) -> Membership:
    """Decide whether merbridge intercepts ``pod``; the reason is for logs and status.

    Raises AnnotationError only for an interceptionMode value Istio itself
    rejects (istio-cni fails the ADD for it).
    """
    meta = _meta(pod)
    namespace = meta.get("namespace") or "default"
    if namespace in set(exclude_namespaces):
        return Membership(False, f"namespace {namespace} is excluded")
    if (pod.get("spec") or {}).get("hostNetwork") is True:
        # it shares the node's netns, which the datapath never acts for
        # (docs/security.md); a policy for its IP (the node's) would hit
        # every sidecar's calls to the node (ambient mode excludes it too)
        return Membership(False, "hostNetwork pod (the node's network namespace)")
    sidecar = _find_container(pod, mesh.sidecar_container)
    if mesh.name != "istio":
        return _other_mesh_membership(pod, mesh, sidecar)

    annotations, labels = _annotations(pod), _labels(pod)
    has_init = _find_container(pod, "istio-init") is not None
    if sidecar is None:
        return Membership(False, "no istio-proxy container")
    disable = _env(sidecar, "DISABLE_ENVOY")
    if disable is not None and parse_bool(disable) is True:
        return Membership(False, "istio-proxy has DISABLE_ENVOY=true")
    args = sidecar.get("args") or []
    if len(args) >= 2 and args[0] == "proxy" and args[1] != "sidecar":
        return Membership(False, f"proxy type is {args[1]!r}, not 'sidecar'")
    # a present label replaces the (deprecated) annotation outright; a value
    # ParseBool rejects is ignored, exactly as istio-cni does
    source, values = ("label", labels) if INJECT in labels else ("annotation", annotations)
    if parse_bool(values.get(INJECT, "")) is False:
        return Membership(False, f"{INJECT} {source} is {values[INJECT]!r}")
    if STATUS not in annotations:
        return Membership(False, f"no {STATUS} annotation (not injected)")
    mode = annotations.get(INTERCEPTION_MODE, "REDIRECT").strip()
    if mode not in _ISTIO_MODES:
        raise AnnotationError(INTERCEPTION_MODE, mode, f"expected one of {', '.join(_ISTIO_MODES)}")
    if mode != "REDIRECT":
        return Membership(False, f"interceptionMode {mode} is not supported by merbridge "
                                 "(REDIRECT only); the pod keeps its iptables interception")
    reason = "istio sidecar injected"
    if has_init:
        reason += " (istio-init iptables also present; eBPF redirects first)"
    return Membership(True, reason)


def _other_mesh_membership(pod: dict, mesh: Mesh, sidecar: dict | None) -> Membership:
    if sidecar is None:
        return Membership(False, f"no {mesh.sidecar_container} container")
    key, off = _OPT_OUT[mesh.name]
    for values in (_labels(pod), _annotations(pod)):
        if values.get(key, "").strip().lower() in off:
            return Membership(False, f"{key} is {values[key]!r}")
    return Membership(True, f"{mesh.name} sidecar injected")


# --------------------------------------------------------------- policy


def _ports(name: str, value: str, *, wildcard: bool = False) -> tuple[bool, frozenset[int]]:
    """Parse a port list; with ``wildcard`` a lone ``*`` means all (returns True)."""
    if wildcard and value.strip() == "*":
        return True, frozenset()
    ports = []
    for item in _split(name, value):
        # strconv.ParseUint(s, 10, 16): digits only, 0..65535
        if not (item.isascii() and item.isdigit()) or int(item) > 65535:
            raise AnnotationError(name, value, f"{item!r} is not a port number (0-65535)")
        ports.append(int(item))
    if len(set(ports)) > MAX_PORTS:
        raise AnnotationError(name, value, f"{len(set(ports))} ports; at most {MAX_PORTS} are supported")
    return False, frozenset(ports)


def pack_cidr(network: netaddr.IPNetwork) -> Cidr:
    """A CIDR as the datapath stores it: 16 bytes, IPv4 as ::ffff:a.b.c.d/96+n."""
    network = network.cidr  # clear host bits, as iptables -d does
    if network.version == 4:
        return (network.ip.ipv6(ipv4_compatible=False).packed, 96 + network.prefixlen)
    return (network.ip.packed, network.prefixlen)


_V4_MAPPED = netaddr.IPNetwork("::ffff:0:0/96")


def _cidrs(name: str, value: str, *, wildcard: bool) -> tuple[bool, tuple[Cidr, ...]]:
    if wildcard and value.strip() == "*":
        return True, ()
    networks = []
    for item in _split(name, value):
        # netip.ParsePrefix needs an explicit prefix length; so do we
        if "/" not in item:
            raise AnnotationError(name, value, f"{item!r} is not a CIDR (like 10.0.0.0/8)")
        try:
            networks.append(netaddr.IPNetwork(item))
        except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
            raise AnnotationError(name, value, f"{item!r} is not a CIDR: {exc}") from None
    # an IPv6 range inside ::ffff:0:0/96 names IPv4-mapped addresses, which no
    # IPv6 packet carries: ip6tables' rule for it matches nothing, and so
    # does ours (kept, it would be read as the IPv4 range it maps)
    networks = [n for n in networks if n.version == 4 or n.cidr not in _V4_MAPPED]
    merged = netaddr.IPSet(networks).iter_cidrs()  # sorted, de-duplicated, merged
    if len(merged) > MAX_CIDRS:
        raise AnnotationError(name, value, f"{len(merged)} CIDRs; at most {MAX_CIDRS} are supported")
    return False, tuple(pack_cidr(n) for n in merged)


def _get(annotations: dict[str, str], mesh: Mesh, key: str) -> tuple[str, str | None]:
    name = _ALIASES.get(mesh.name, {}).get(key, key)
    value = annotations.get(name)
    return name, value


def pod_policy(pod: dict, mesh: Mesh) -> PodPolicy:
    """The pod's interception rules; raises AnnotationError on a bad value.

    As istio-cni (cni/pkg/plugin/sidecar_redirect.go) and istio-iptables:

    * lists are comma-separated; an empty item is an error (``_split``);
    * ``excludeOutboundPorts`` defaults to the mesh's default (Istio: 15020)
      only when the annotation is absent; a present annotation replaces it, so
      ``excludeOutboundPorts: "5432"`` captures 15020 again, as istio-cni does.
      Our datapath intercepts TCP only; istio-iptables also RETURNs UDP to
      these ports, which for us is simply never redirected;
    * ``excludeInboundPorts`` always adds the mesh defaults and the status port.

    One deliberate difference, ``excludeOutboundIPRanges: "*"``: Istio rejects
    it (istio-cni's ParsePrefix("*") fails the pod's ADD; istio-iptables exits
    with "invalid value for OUTBOUND_IP_RANGES_EXCLUDE"), so such a pod never
    starts.  We accept it and exclude every destination, IPv4 and IPv6
    (``0.0.0.0/0`` and ``::/0``: an IPv6 range never matches IPv4, as
    ip6tables' rules never see IPv4 packets): none of the
    pod's outbound connections is redirected, while inbound capture is
    unchanged.  "Exclude all" is the only meaning the value can have, failing
    the ADD would only trade a clear intent for a pod that cannot start, and
    upstream merbridge accepted the value too (but its list walk stopped at the
    entry and excluded nothing).

    Kubelet's health probes are not read from the pod spec: Istio's injector
    rewrites HTTP, TCP and gRPC probes to the status port (15020, never
    captured, inbound or by XDP), and where a pod turns that rewrite off
    (``sidecar.istio.io/rewriteAppHTTPProbers: "false"``) istio-iptables
    captures the probe like any other inbound connection.  Leaving an app's
    probe port out of XDP would also let every other node's mesh (mTLS)
    traffic to that port skip the sidecar, since XDP cannot tell kubelet's
    packets from a peer's.
    """
    ann = _annotations(pod)

    name, value = _get(ann, mesh, STATUS_PORT)
    status_port = mesh.status_port
    if value is not None:
        _, parsed = _ports(name, value)
        if len(parsed) != 1 or "," in value:
            raise AnnotationError(name, value, "expected a single port number (0 = none)")
        status_port = next(iter(parsed))

    # inbound: default "*" (capture every port but the exclusions)
    name, value = _get(ann, mesh, INCLUDE_INBOUND_PORTS)
    in_all, in_ports = _ports(name, value, wildcard=True) if value is not None else (True, frozenset())
    name, value = _get(ann, mesh, EXCLUDE_INBOUND_PORTS)
    _, in_excl = _ports(name, value or "")
    defaults_in = set(mesh.default_exclude_inbound_ports) | ({status_port} if status_port else set())
    in_excl = frozenset(in_excl | defaults_in)
    if len(in_excl) > MAX_PORTS:
        raise AnnotationError(name, value or "", f"{len(in_excl)} ports with the {len(defaults_in)} "
                                                  f"defaults; at most {MAX_PORTS} are supported")

    # outbound: default "*" for the ranges; the port lists add to / cut from it
    name, value = _get(ann, mesh, INCLUDE_OUTBOUND_IP_RANGES)
    out_all, out_cidrs = _cidrs(name, value, wildcard=True) if value is not None else (True, ())
    name, value = _get(ann, mesh, EXCLUDE_OUTBOUND_IP_RANGES)
    excl_all, excl_cidrs = _cidrs(name, value or "", wildcard=True)
    if excl_all:
        # "*" excludes every destination, v4 and v6 alike (see the docstring)
        excl_cidrs = (pack_cidr(netaddr.IPNetwork("0.0.0.0/0")), (bytes(16), 0))
    name, value = _get(ann, mesh, INCLUDE_OUTBOUND_PORTS)
    _, out_ports = _ports(name, value or "")
    name, value = _get(ann, mesh, EXCLUDE_OUTBOUND_PORTS)
    if value is None:
        # istio-cni: the default (15020) only when the annotation is absent
        out_excl = frozenset(mesh.default_exclude_outbound_ports)
    else:
        _, out_excl = _ports(name, value)

    proxy_uid, proxy_gid = proxy_identity(pod, mesh)
    return PodPolicy(
        dns_capture=dns_capture(pod, mesh),
        proxy_uid=proxy_uid,
        proxy_gid=proxy_gid,
        include_inbound_all=in_all,
        include_inbound_ports=in_ports,
        exclude_inbound_ports=in_excl,
        include_outbound_all=out_all,
        include_outbound_cidrs=out_cidrs,
        exclude_outbound_cidrs=excl_cidrs,
        include_outbound_ports=out_ports,
        exclude_outbound_ports=out_excl,
        status_port=status_port,
    )


#: Istio's DNS proxying switch, as the injector renders it (from meshConfig
#: defaultConfig.proxyMetadata or the proxy.istio.io/config annotation) into
#: the istio-proxy container's env, where istio-cni reads it
DNS_CAPTURE_ENV = "ISTIO_META_DNS_CAPTURE"
#: Kuma's builtin DNS (kuma-dp's DNS proxy on 15053), a pod annotation
KUMA_BUILTIN_DNS = "kuma.io/builtin-dns"


def dns_capture(pod: dict, mesh: Mesh) -> bool:
    """Are the pod's port-53 queries sent to the mesh's DNS proxy?

    Istio: as istio-cni (cni/pkg/plugin/sidecar_redirect.go), the
    ``ISTIO_META_DNS_CAPTURE`` value of the istio-proxy container's env, read
    with Go's ParseBool; a value it rejects leaves capture off (istio-cni
    logs and carries on). Kuma: ``kuma.io/builtin-dns: enabled``. A mesh
    without a DNS proxy (``mesh.dns_port == 0``): never.
    """
    if not mesh.dns_port:
        return False
    if mesh.name == "kuma":
        return _annotations(pod).get(KUMA_BUILTIN_DNS, "").strip().lower() == "enabled"
    if mesh.name != "istio":
        return False
    sidecar = _find_container(pod, mesh.sidecar_container)
    value = _env(sidecar, DNS_CAPTURE_ENV) if sidecar else None
    return value is not None and parse_bool(value) is True


def proxy_identity(pod: dict, mesh: Mesh) -> tuple[int, int]:
    """(UID, GID) the pod's proxy runs as, 0 for the mesh default.

    As istio-cni: the sidecar container's ``securityContext.runAsUser`` /
    ``runAsGroup`` when set and non-zero (OpenShift gives the proxy a UID from
    the namespace's range), else the mesh's (1337). Not the pod-level
    securityContext, which istio-cni does not read either. A value that is
    not a whole number in 1..2^32-1 is an error (the API server would have
    refused it).
    """
    sidecar = _find_container(pod, mesh.sidecar_container)
    ctx = (sidecar or {}).get("securityContext") or {}
    ids = []
    for key in ("runAsUser", "runAsGroup"):
        value = ctx.get(key)
        if value is None or value == 0:
            ids.append(0)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2 ** 32:
            raise AnnotationError(f"{mesh.sidecar_container}.securityContext.{key}", str(value),
                                  "expected a user or group id (1..4294967295)")
        ids.append(value)
    return ids[0], ids[1]


def pod_ips(pod: dict) -> list[str]:
    """The pod's IPs (dual stack: status.podIPs, else status.podIP), normalised."""
    status: dict[str, Any] = pod.get("status") or {}
    raw = [entry.get("ip", "") for entry in status.get("podIPs") or []]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    ips = []
    for ip in raw:
        try:
            addr = netaddr.IPAddress(ip)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            continue  # never produced by a kubelet; ignore rather than guess
        if addr.value == 0:
            continue  # 0.0.0.0 / :: is no pod's address (nor a slot in mb_pod_ips)
        text = str(addr)
        if text not in ips:
            ips.append(text)
    return ips

