"""Legacy mode (``--cni-mode=false``): ``mb_local_pods`` follows the pod source.

Without the CNI plugin there is no per-container enrolment: the daemon only
keeps ``mb_local_pods`` equal to the IPs and policies of the in-mesh pods the
pod source lists (the connect programs find the caller's own IP through
``mb_netns_ip``, which the datapath learns by itself). ``LegacyPods`` is that
bookkeeping, split from the CNI-mode registry (``pods.py``), which owns the
map lock and hands it in so both never write the map at the same time.

A pod with bad annotations is left as it was (logged), never half-written.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class LegacyPods:
    """In-mesh pods of the pod source -> ``mb_local_pods``.

    ``decide(pod) -> (ips, policy)``: the IPs and policy to write (``()`` when
    the pod is not in the mesh); raises ``error`` (the registry's ``CniError``)
    for a pod whose annotations cannot be used.
    """

    def __init__(self, maps: Any, lock: threading.RLock,
                 decide: Callable[[dict], tuple[tuple[str, ...], Any]],
                 meta: Callable[[dict], tuple[str, str, str]], error: type[Exception]):
        self.maps, self._lock, self._decide, self._meta = maps, lock, decide, meta
        self._error = error
        self.pods: dict[tuple[str, str], tuple[str, ...]] = {}  # (ns, name) -> ips written
        #: pod IPs -> the cookie of the pod's netns (None: not found); set by the
        #: runtime (netns.find_netns_cookie over --netns-dir). See _seed.
        self.find_netns_cookie: Callable[[tuple[str, ...]], int | None] | None = None

    def _seed(self, ips: tuple[str, ...], policy: Any) -> None:
        """Tell the datapath a pod's netns -> IPs (``mb_netns_ip``) when its
        proxy runs as its own UID/GID (istio-proxy's securityContext).

        Legacy mode learns a netns' pod IP from a connection the datapath left
        alone; until then the pod's policy, its proxy identity included, is
        unknown and the mesh default (1337) counts as the proxy. A proxy running
        as another UID would then be captured by its own outbound listener and
        never leave the pod, so nothing would teach the IP. For such pods the
        daemon finds the netns by pod IP and writes the entry itself."""
        if self.find_netns_cookie is None or not (policy.proxy_uid or policy.proxy_gid):
            return
        try:
            cookie = self.find_netns_cookie(ips)
        except Exception as exc:  # a netns that vanished while it was read
            log.warning("pod %s: finding its netns failed: %s", ",".join(ips), exc)
            return
        if cookie is None:
            log.warning("pod %s: no single netns carries its IPs; its proxy identity applies "
                        "once its IP is learned from traffic", ",".join(ips))
            return
        with self._lock:
            self.maps.netns_ip.put(cookie, *ips)

    def __len__(self) -> int:
        """In-mesh pods written to ``mb_local_pods`` (legacy mode's pods_enrolled)."""
        return len(self.pods)

    def _delete(self, ip: str) -> None:
        try:
            self.maps.local_pods.delete(ip)
        except KeyError:
            pass

    def event(self, event: str, pod: dict) -> None:
        ns, name, _ = self._meta(pod)
        ips: tuple[str, ...] = ()
        policy = None
        try:
            if event != "DELETED":
                ips, policy = self._decide(pod)
        except self._error as exc:
            log.error("%s; leaving the pod as it is", exc)
            return
        with self._lock:
            old = self.pods.get((ns, name), ())
            for ip in old:
                if ip not in ips:
                    self._delete(ip)
            for ip in ips:
                if self.maps.local_pods.get(ip) != policy:
                    self.maps.local_pods.put(ip, policy)
            if ips:
                self.pods[(ns, name)] = ips
            else:
                self.pods.pop((ns, name), None)
        if ips:
            self._seed(ips, policy)

    def resync(self, pods: Iterable[dict]) -> None:
        """Make ``mb_local_pods`` exactly the in-mesh pods of a full snapshot."""
        seen = set()
        for pod in pods:
            seen.add(self._meta(pod)[:2])
            self.event("ADDED", pod)
        with self._lock:
            for key in [k for k in self.pods if k not in seen]:
                for ip in self.pods.pop(key):
                    self._delete(ip)
            wanted = {ip for ips in self.pods.values() for ip in ips}
            for ip, _ in list(self.maps.local_pods.items()):
                if ip not in wanted:
                    self._delete(ip)
