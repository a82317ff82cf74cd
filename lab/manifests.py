"""The one Pod manifest builder: Kubernetes Pod objects as the daemon's pod
sources read them (a ``--pods-dir`` file, or the API server's answer)."""
from __future__ import annotations

from typing import Sequence

from merbridge.bpf.mesh import MESHES

ISTIO = MESHES["istio"]
#: the istio injector's status annotation; its presence marks an injected pod
INJECTED = "sidecar.istio.io/status"


def pod_manifest(name: str, *, namespace: str = "default", uid: str | None = None,
                 node: str = "lab", in_mesh: bool = True, annotations: dict | None = None,
                 ips: Sequence[str] = (), phase: str = "Running",
                 proxy_env: dict[str, str] | None = None, injected: str = "{}") -> dict:
    """A Pod named ``name``. ``in_mesh``: istio-injected, i.e. an ``istio-proxy``
    container (``proxy sidecar``, with ``proxy_env`` as its env) and the
    injector's status annotation (``injected``, unless ``annotations`` carry
    one). ``ips``: ``status.podIP``/``podIPs``; none for a pod the CNI has not
    networked yet (CNI mode takes the addresses from the ADD's prevResult).
    ``uid``: ``metadata.uid`` (left out when None)."""
    ann = dict(annotations or {})
    containers: list[dict] = [{"name": "app"}]
    if in_mesh:
        ann.setdefault(INJECTED, injected)
        sidecar: dict = {"name": ISTIO.sidecar_container, "args": ["proxy", "sidecar"]}
        if proxy_env:
            sidecar["env"] = [{"name": k, "value": v} for k, v in proxy_env.items()]
        containers.append(sidecar)
    meta: dict = {"name": name, "namespace": namespace, "annotations": ann}
    if uid is not None:
        meta["uid"] = uid
    status: dict = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": containers}, "status": status}
