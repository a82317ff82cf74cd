"""Per-mesh constants: proxy ports, proxy UID/GID and default exclusions.

One row per supported mesh. The loader turns the chosen row into ``-D`` flags
for the C programs; the daemon uses the same row for annotation defaults, so a
port or UID is written here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Port of the marker listener that the daemon opens in each CNI-mode pod
#: netns; its SO_MARK is the pod's key in ``mb_mark_pod_ips``.
MARK_LISTENER_PORT = 39807


@dataclass(frozen=True)
class Mesh:
    name: str
    #: the sidecar's outbound listener (iptables ``ISTIO_REDIRECT`` target)
    out_port: int
    #: the sidecar's inbound listener (``ISTIO_IN_REDIRECT`` target)
    in_port: int
    #: the proxy's UID and GID: never intercepted
    proxy_uid: int
    proxy_gid: int
    #: the sidecar's DNS proxy port, where a pod with DNS capture sends its
    #: port-53 queries (bpf/progs/dns.c; 0: the mesh has no DNS proxy)
    dns_port: int
    #: the source address the proxy binds for inbound passthrough (Envoy: 127.0.0.6)
    inbound_passthrough_ip: str
    #: name of the sidecar container the injector adds
    sidecar_container: str
    #: the default health/status port excluded from inbound capture (0: none)
    status_port: int
    #: ports never captured inbound (the proxy's own listeners, telemetry)
    default_exclude_inbound_ports: tuple[int, ...]
    #: ports never captured outbound
    default_exclude_outbound_ports: tuple[int, ...]
    #: numeric id passed to the C programs as MB_MESH
    code: int


MESHES: dict[str, Mesh] = {
    "istio": Mesh(
        name="istio", out_port=15001, in_port=15006, proxy_uid=1337, proxy_gid=1337,
        dns_port=15053, inbound_passthrough_ip="127.0.0.6", sidecar_container="istio-proxy",
        status_port=15020,
        # 15008 (HBONE) is always returned by ISTIO_INBOUND; 15020/15021/15090 are
        # what istio-cni appends; 15001/15006/15000 are the proxy's own listeners.
        default_exclude_inbound_ports=(15001, 15006, 15000, 15008, 15020, 15021, 15090),
        default_exclude_outbound_ports=(15020,),
        code=1,
    ),
    "linkerd": Mesh(
        name="linkerd", out_port=4140, in_port=4143, proxy_uid=2102, proxy_gid=2102,
        dns_port=0, inbound_passthrough_ip="127.0.0.6", sidecar_container="linkerd-proxy",
        status_port=4191, default_exclude_inbound_ports=(4140, 4143, 4191),
        default_exclude_outbound_ports=(), code=2,
    ),
    "kuma": Mesh(
        name="kuma", out_port=15001, in_port=15006, proxy_uid=5678, proxy_gid=5678,
        dns_port=15053, inbound_passthrough_ip="127.0.0.6", sidecar_container="kuma-sidecar",
        status_port=0, default_exclude_inbound_ports=(9901, 15001, 15006, 15010),
        default_exclude_outbound_ports=(), code=3,
    ),
    "osm": Mesh(
        # OSM's Envoy has no DNS proxy: nothing to capture DNS for
        name="osm", out_port=15001, in_port=15003, proxy_uid=1500, proxy_gid=1500,
        dns_port=0, inbound_passthrough_ip="127.0.0.6", sidecar_container="envoy",
        status_port=15901,
        default_exclude_inbound_ports=(15000, 15001, 15003, 15010, 15021, 15050, 15128,
                                       15901, 15902, 15903, 15904),
        default_exclude_outbound_ports=(), code=4,
    ),
}


def get(name: str) -> Mesh:
    try:
        return MESHES[name]
    except KeyError:
        raise ValueError(f"unknown mesh {name!r}; choose one of {', '.join(MESHES)}") from None
