"""What the pod source says about a pod, for the registry: identity, mesh
membership, IPs and policy, with a manifest that cannot be used turned into
the CNI code 101 (``CniError``), so that nothing is written for it.

Input from the pod source is untrusted: the annotation parsers
(``annotations.py``) raise ValueError for a bad value, and a manifest of the
wrong shape raises whatever its first wrong field does; both end here. The
policy is also checked against the datapath's limits (ports, CIDRs) before
any map write.
"""
from __future__ import annotations

from typing import Iterable

from merbridge.bpf import maps as bpfmaps
from merbridge.bpf.mesh import Mesh
from merbridge.bpf.policy import PodPolicy
from merbridge.cni import errors
from merbridge.cni.errors import CniError
from merbridge.daemon import annotations as pod_annotations

#: what a malformed manifest raises in the annotation parsers
BAD_MANIFEST = (ValueError, TypeError, AttributeError, KeyError)


def pod_meta(pod: dict) -> tuple[str, str, str]:
    """(namespace, name, uid); "default" for a missing namespace."""
    md = pod.get("metadata") if isinstance(pod, dict) else None
    md = md if isinstance(md, dict) else {}

    def text(key: str) -> str:
        value = md.get(key)
        return value if isinstance(value, str) else ""
    return text("namespace") or "default", text("name"), text("uid")


def host_network(pod: dict) -> bool:
    spec = pod.get("spec") if isinstance(pod, dict) else None
    return isinstance(spec, dict) and spec.get("hostNetwork") is True


def bad_pod(pod: dict, exc: Exception) -> CniError:
    ns, name, _ = pod_meta(pod)
    if isinstance(exc, ValueError):
        return CniError(errors.INVALID_ANNOTATIONS, f"invalid annotations on pod {ns}/{name}",
                        str(exc)[:500])
    return CniError(errors.INVALID_ANNOTATIONS, f"malformed manifest of pod {ns}/{name}",
                    f"{type(exc).__name__}: {exc}"[:500])


def policy(pod: dict, mesh: Mesh) -> PodPolicy:
    try:
        result = pod_annotations.pod_policy(pod, mesh)
        bpfmaps.policy_value(result)  # the datapath's limits, before any write (encoded once)
        return result
    except BAD_MANIFEST as exc:
        raise bad_pod(pod, exc) from exc


def in_mesh(pod: dict, mesh: Mesh, exclude_namespaces: Iterable[str]) -> bool:
    try:
        return pod_annotations.mesh_membership(pod, mesh, exclude_namespaces).in_mesh
    except BAD_MANIFEST as exc:
        raise bad_pod(pod, exc) from exc


def pod_ips(pod: dict) -> tuple[str, ...]:
    try:
        return tuple(pod_annotations.pod_ips(pod))
    except BAD_MANIFEST as exc:
        raise bad_pod(pod, exc) from exc
