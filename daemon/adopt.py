"""Adoption: enrol the in-mesh pods that started while no daemon ran.

After a clean stop (``StateStore.stopped_cleanly``) our plugin was out of the
CNI config, so pods may have started unseen; a fail-open ADD that was never
replayed leaves one too. The registry's ``adopt`` (``pods.py``) hands this
module the pod source's listing; ``Adopter`` finds each in-mesh pod without a
record among the node's network namespaces, the named ones (``--netns-dir``)
and, with ``proc_path``, those held by any process, as the one whose
interface carries the pod's primary IP, and enrols it through the registry's
normal ADD path with a ``CniRequest`` whose container id is
``adopted:<ns>/<name>/<uid>`` (a ':' never occurs in a CNI container id).

A pod that no netns matches, or several do, is left alone with a log line,
once per pod: the reconciler runs this every second. ``unaccounted`` holds the
in-mesh pods with an IP and no record that the last pass could not enrol.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from merbridge.cni.errors import CniError
from merbridge.cni.protocol import CniRequest
from merbridge.daemon.enroll import PodNet, primary_ip
from merbridge.daemon.podfacts import host_network, pod_meta
from merbridge.daemon.state import Record

log = logging.getLogger("merbridge.daemon.pods")

#: container id prefix of records ``adopt`` made (CNI container ids have no ':')
ADOPTED = "adopted:"


class Adopter:
    """``ips(pod)``: the IPs of an in-mesh pod, () otherwise (raises CniError for
    a pod whose manifest cannot be used); ``records()``: the registry's records
    now; ``enrol(req)``: the registry's ADD path (raises CniError)."""

    def __init__(self, podnet: PodNet | None, ips: Callable[[dict], tuple[str, ...]],
                 records: Callable[[], list[Record]], enrol: Callable[[CniRequest], Any]):
        self.podnet, self._ips, self._records, self._enrol = podnet, ips, records, enrol
        self.unaccounted: list[str] = []
        self._told: set[tuple[str, str, str]] = set()
        # a pod's verdict (in the mesh, its IPs), kept while the pod source hands
        # out the same object (a changed pod is a new object)
        self._verdicts: dict[tuple, tuple[dict, tuple[str, ...]]] = {}

    def _wanted(self, pods: Iterable[dict]) -> list[tuple[dict, tuple[str, ...]]]:
        uids: dict[tuple[str, str], list[str]] = {}
        for r in self._records():
            uids.setdefault((r.namespace, r.name), []).append(r.uid)
        wanted, seen = [], {}
        for pod in pods:
            ns, name, uid = pod_meta(pod)
            if any(not uid or not u or u == uid for u in uids.get((ns, name), ())):
                continue                   # it has a record (as the registry matches)
            key = (ns, name, uid, id(pod))
            verdict = self._verdicts.get(key)
            if verdict is None or verdict[0] is not pod:
                try:
                    ips = self._ips(pod)
                except CniError as exc:
                    log.warning("adopt: %s", exc)
                    ips = ()
                verdict = (pod, ips if not host_network(pod) else ())
            seen[key] = verdict
            if verdict[1]:
                wanted.append((pod, verdict[1]))
        self._verdicts = seen
        return wanted

    def run(self, pods: Iterable[dict], netns_dir: str, proc_path: str | None = None) -> int:
        """Enrol what can be enrolled; how many pods it enrolled."""
        self.unaccounted = []
        if self.podnet is None:
            return 0
        wanted = self._wanted(pods)
        if not wanted:
            self._told.clear()
            return 0
        try:
            found = self.podnet.netns_addresses(netns_dir, proc_path)
        except Exception as exc:           # start-up goes on: these pods stay as they are
            log.error("adopt: cannot search %s for the netns of %d pod(s): %s", netns_dir,
                      len(wanted), exc)
            self.unaccounted = ["/".join(pod_meta(p)[:2]) for p, _ in wanted]
            return 0
        owners: dict[str, list[tuple[str, str]]] = {}
        for path, addrs in found.items():
            for ifname, ip in addrs:
                owners.setdefault(ip, []).append((path, ifname))
        adopted = 0
        for pod, ips in wanted:
            ns, name, uid = pod_meta(pod)
            self.unaccounted.append(f"{ns}/{name}")
            again = (ns, name, uid) in self._told
            say, warn = (log.debug, log.debug) if again else (log.info, log.warning)
            self._told.add((ns, name, uid))
            primary = primary_ip(ips)
            where = owners.get(primary, [])
            if not where:
                say("adopt: no netns in %s%s carries %s of pod %s/%s", netns_dir,
                    f" or {proc_path}" if proc_path else "", primary, ns, name)
                continue
            if len(where) > 1:
                warn("adopt: pod %s/%s not enrolled: its IP %s is on %s", ns, name,
                     primary, ", ".join(f"{i} in {p}" for p, i in where))
                continue
            path, ifname = where[0]
            if any(r.netns == path or set(r.ips) & set(ips) for r in self._records()):
                warn("adopt: pod %s/%s: netns %s or its IPs belong to another "
                     "record; not enrolled", ns, name, path)
                continue
            try:
                # no ips: the ADD path reads them from the pod, as here
                self._enrol(CniRequest(command="ADD", container_id=f"{ADOPTED}{ns}/{name}/{uid}",
                                       netns=path, ifname=ifname, pod_namespace=ns,
                                       pod_name=name, pod_uid=uid))
            except CniError:
                continue                   # logged by the ADD path
            adopted += 1
            self.unaccounted.pop()
            log.info("adopted pod %s/%s, started while no daemon ran: netns %s %s", ns, name,
                     path, ifname)
        return adopted
