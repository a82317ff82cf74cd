"""Istio ambient mode: which pods are in the ambient mesh, and keeping the
datapath's view of them (``mb_cgroup_info``, ``mb_ambient_ips``, the ztunnel
address in ``mb_settings``) equal to the pod source, by label, on running pods.

The decision (pure, like ``annotations``):

* a pod is ambient when its label ``istio.io/dataplane-mode`` is ``ambient``,
  or when its namespace has that label and the pod does not opt out with
  ``istio.io/dataplane-mode=none`` (or ``ambient.istio.io/redirection=disabled``);
* never: pods with an Istio sidecar (sidecar mode wins, as in Istio), host
  network pods, pods of excluded namespaces, and ztunnel itself: a pod
  labelled ``app=ztunnel`` in the ztunnel namespace (``--ztunnel-namespace``,
  default istio-system). ztunnel's own cgroups are flagged so that its traffic
  is never intercepted, and its pod IP is the address the datapath redirects
  to. The label alone is not enough: anyone who can create a pod can set it,
  and such a pod would leave the mesh and capture every ambient pod's traffic;
  creating pods in istio-system is reserved to the mesh's operators. A pod
  with the label elsewhere is an ordinary pod.

Namespace labels come from the pod source (a namespace watch, or Namespace
manifests in ``--pods-dir``) through ``on_namespace``; a change re-evaluates
that namespace's running pods at once.

Pod -> cgroups: a pod's cgroup is a directory below ``cgroup_root`` whose name
contains the pod UID (kubelet's cgroupfs layout ``.../pod<uid>/`` and its
systemd layout ``...-pod<uid_with_underscores>.slice/`` both do); that
directory and every directory below it (the containers) get an entry keyed by
their cgroup id (inode number). Processes of a pod run in those cgroups, and
``bpf_get_current_cgroup_id()`` returns exactly that id.

New container cgroups appear without any pod event (a container restarts, a
sidecar-less pod's containers start after the pod object got its IP), so a
process watcher (``procwatch.ProcessWatcher``, netlink process events) reports
each exec; a process in a not yet known cgroup under a known pod's directory
adds that cgroup. Exits schedule a prune of cgroups that have disappeared. A
periodic full rescan covers lost events and nodes where the watcher cannot run.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from merbridge.bpf import ambient as bpfambient
from merbridge.bpf import types as bpft
from merbridge.daemon import annotations as pod_annotations
from merbridge.daemon import procwatch
from merbridge.daemon.config import (DEFAULT_EXCLUDE_NAMESPACES, DEFAULT_ZTUNNEL_NAMESPACE,
                                     find_cgroup2_mount)

log = logging.getLogger(__name__)

DATAPLANE_MODE = "istio.io/dataplane-mode"
REDIRECTION = "ambient.istio.io/redirection"
ZTUNNEL_LABEL = ("app", "ztunnel")


@dataclass(frozen=True)
class AmbientState:
    in_mesh: bool
    ztunnel: bool
    reason: str


def is_ztunnel(pod: dict, ztunnel_namespace: str = DEFAULT_ZTUNNEL_NAMESPACE) -> bool:
    """The node's ztunnel: label ``app=ztunnel`` AND the ztunnel namespace."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    return (labels.get(ZTUNNEL_LABEL[0]) == ZTUNNEL_LABEL[1]
            and (meta.get("namespace") or "default") == ztunnel_namespace)


def ambient_state(pod: dict, namespace_labels: dict[str, str] | None = None,
                  exclude_namespaces: Iterable[str] = DEFAULT_EXCLUDE_NAMESPACES,
                  ztunnel_namespace: str = DEFAULT_ZTUNNEL_NAMESPACE) -> AmbientState:
    """Is ``pod`` (Kubernetes JSON) in the ambient mesh? Pure; never raises."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    ns = meta.get("namespace") or "default"
    if is_ztunnel(pod, ztunnel_namespace):
        return AmbientState(False, True, "ztunnel")
    if ns in set(exclude_namespaces):
        return AmbientState(False, False, f"namespace {ns} is excluded")
    if (pod.get("spec") or {}).get("hostNetwork"):
        return AmbientState(False, False, "host network pod")
    if pod_annotations.STATUS in notes or any(
            c.get("name") == "istio-proxy" for c in pod_annotations._containers(pod)):
        return AmbientState(False, False, "has an istio sidecar (sidecar mode)")
    if labels.get(REDIRECTION) == "disabled" or notes.get(REDIRECTION) == "disabled":
        return AmbientState(False, False, f"{REDIRECTION}=disabled")
    mode = labels.get(DATAPLANE_MODE, "").strip().lower()
    if mode == "none":
        return AmbientState(False, False, f"pod label {DATAPLANE_MODE}=none")
    if mode == "ambient":
        return AmbientState(True, False, f"pod label {DATAPLANE_MODE}=ambient")
    ns_mode = (namespace_labels or {}).get(DATAPLANE_MODE, "").strip().lower()
    if ns_mode == "ambient":
        return AmbientState(True, False, f"namespace {ns} label {DATAPLANE_MODE}=ambient")
    return AmbientState(False, False, "not labelled for ambient")


def split_ips(ips: Iterable[str]) -> tuple[str, str]:
    """(first IPv4, first IPv6) of a pod's IPs, '' where missing."""
    v4 = next((ip for ip in ips if ":" not in ip), "")
    v6 = next((ip for ip in ips if ":" in ip), "")
    return v4, v6


@dataclass
class _Pod:
    uid: str
    namespace: str
    name: str
    pod: dict
    state: AmbientState
    ips: tuple[str, str]
    cgroups: dict[int, str] = field(default_factory=dict)   # cgroup id -> path


class AmbientController:
    """Keeps the ambient maps equal to the pod source; see the module docstring.

    ``maps`` is ``bpf.maps.Maps`` (``cgroup_info``, ``ambient_ips``,
    ``settings``). Feed it ``on_pod_event(event, pod)`` and
    ``on_namespace(event, namespace)`` (event: ADDED/MODIFIED/DELETED), or a
    full ``resync(pods, namespaces)``; ``start()`` begins watching processes."""

    def __init__(self, maps: Any, cgroup_root: str, *, cgroup_mount: str | None = None,
                 exclude_namespaces: Iterable[str] = DEFAULT_EXCLUDE_NAMESPACES,
                 ztunnel_namespace: str = DEFAULT_ZTUNNEL_NAMESPACE,
                 rescan_interval: float = 30.0, watch_processes: bool = True) -> None:
        self.maps = maps
        self.cgroup_root = os.path.abspath(cgroup_root)
        self.cgroup_mount = cgroup_mount or find_cgroup2_mount() or self.cgroup_root
        self.exclude_namespaces = tuple(exclude_namespaces)
        self.ztunnel_namespace = ztunnel_namespace
        self.rescan_interval = rescan_interval
        self.watch_processes = watch_processes
        self.pods: dict[str, _Pod] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.ztunnel_uid = ""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._prune = threading.Event()
        self._watcher: procwatch.ProcessWatcher | None = None
        self._thread: threading.Thread | None = None
        self.watching = False

    # -- pod source ---------------------------------------------------------
    def on_pod_event(self, event: str, pod: dict) -> None:
        meta = pod.get("metadata") or {}
        uid = procwatch.normalize_uid(meta.get("uid") or "")
        if not uid:
            log.debug("ambient: pod %s/%s has no UUID uid; ignored",
                      meta.get("namespace"), meta.get("name"))
            return
        with self._lock:
            if event == "DELETED":
                self._forget(uid)
            else:
                self._update(uid, pod)

    def on_namespace(self, event: str, namespace: dict) -> None:
        meta = namespace.get("metadata") or {}
        name = meta.get("name") or ""
        with self._lock:
            if event == "DELETED":
                self.namespaces.pop(name, None)
            else:
                self.namespaces[name] = dict(meta.get("labels") or {})
            for p in [p for p in self.pods.values() if p.namespace == name]:
                self._update(p.uid, p.pod)

    def resync(self, pods: Iterable[dict], namespaces: Iterable[dict] | None = None) -> None:
        """Make the maps equal to a full listing (pods gone from it are removed)."""
        with self._lock:
            if namespaces is not None:
                self.namespaces = {(n.get("metadata") or {}).get("name") or "":
                                   dict((n.get("metadata") or {}).get("labels") or {})
                                   for n in namespaces}
            seen = set()
            for pod in pods:
                uid = procwatch.normalize_uid((pod.get("metadata") or {}).get("uid") or "")
                if uid:
                    seen.add(uid)
                    self._update(uid, pod)
            for uid in [u for u in self.pods if u not in seen]:
                self._forget(uid)

    # -- state -> maps ------------------------------------------------------
    def _update(self, uid: str, pod: dict) -> None:
        meta = pod.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        state = ambient_state(pod, self.namespaces.get(ns), self.exclude_namespaces,
                              self.ztunnel_namespace)
        ips = split_ips(pod_annotations.pod_ips(pod))
        old = self.pods.get(uid)
        p = _Pod(uid, ns, meta.get("name") or "", pod, state, ips,
                 dict(old.cgroups) if old else {})
        self.pods[uid] = p
        if old is None or (old.state, old.ips) != (state, ips):
            log.info("ambient: pod %s/%s in_mesh=%s ztunnel=%s (%s) ips=%s", ns, p.name,
                     state.in_mesh, state.ztunnel, state.reason, ",".join(i for i in ips if i))
        self._write_ips(old, p)
        self._write_ztunnel(p)
        # rewrite every known cgroup (in_mesh or ips may have changed), then look for new ones
        for cgid in list(p.cgroups):
            self._put_cgroup(p, cgid)
        self._scan_pod(p)

    def _forget(self, uid: str) -> None:
        p = self.pods.pop(uid, None)
        if p is None:
            return
        log.info("ambient: pod %s/%s gone", p.namespace, p.name)
        for cgid in p.cgroups:
            self.maps.cgroup_info.delete(cgid)
        self._write_ips(p, None)
        if uid == self.ztunnel_uid:
            self._set_ztunnel("", "")
            self.ztunnel_uid = ""
            for other in self.pods.values():   # another ztunnel on the node (rollout)
                self._write_ztunnel(other)

    def _write_ips(self, old: _Pod | None, new: _Pod | None) -> None:
        before = {ip for ip in old.ips if ip} if old and old.state.in_mesh else set()
        after = {ip for ip in new.ips if ip} if new and new.state.in_mesh else set()
        for ip in before - after:
            self.maps.ambient_ips.delete(ip)
        for ip in after - before:
            self.maps.ambient_ips.put(ip)

    def _write_ztunnel(self, p: _Pod) -> None:
        if not p.state.ztunnel or not any(p.ips):
            return
        if self.ztunnel_uid and self.ztunnel_uid != p.uid and self.ztunnel_uid in self.pods:
            log.warning("ambient: two ztunnel pods on this node; keeping %s", self.ztunnel_uid)
            return
        self.ztunnel_uid = p.uid
        self._set_ztunnel(*p.ips)

    def _set_ztunnel(self, ip4: str, ip6: str) -> None:
        for idx, value in bpfambient.ztunnel_settings(ip4, ip6).items():
            self.maps.settings.set(idx, value)
        log.info("ambient: ztunnel address ipv4=%s ipv6=%s", ip4 or "-", ip6 or "-")

    def _put_cgroup(self, p: _Pod, cgid: int) -> None:
        flags = bpft.MB_CG_F_ZTUNNEL if p.state.ztunnel else 0
        self.maps.cgroup_info.put(cgid, p.state.in_mesh and any(p.ips), p.ips[0], p.ips[1],
                                  flags)

    # -- cgroups ------------------------------------------------------------
    def _walk(self) -> Iterable[str]:
        for dirpath, dirnames, _ in os.walk(self.cgroup_root, onerror=lambda e: None):
            yield dirpath
            dirnames.sort()

    def _scan_pod(self, p: _Pod) -> None:
        """Add every cgroup of pod ``p`` (a directory naming its UID, and all below)."""
        found = {}
        for path in self._walk():
            rel = os.path.relpath(path, self.cgroup_root)
            if rel != "." and p.uid in procwatch.uids_in_path(rel):
                cgid = procwatch.cgroup_id(path)
                if cgid:
                    found[cgid] = path
        self._sync_cgroups(p, found)

    def _sync_cgroups(self, p: _Pod, found: dict[int, str]) -> None:
        for cgid in set(p.cgroups) - set(found):
            self.maps.cgroup_info.delete(cgid)
        for cgid in set(found) - set(p.cgroups):
            self._put_cgroup(p, cgid)
            log.debug("ambient: cgroup %s (id %d) is pod %s/%s", found[cgid], cgid,
                      p.namespace, p.name)
        p.cgroups = found

    def rescan(self) -> None:
        """One walk of the tree: every known pod's cgroups, added and removed."""
        with self._lock:
            by_uid: dict[str, dict[int, str]] = {uid: {} for uid in self.pods}
            for path in self._walk():
                rel = os.path.relpath(path, self.cgroup_root)
                for uid in (procwatch.uids_in_path(rel) if rel != "." else ()):
                    if uid in by_uid:
                        cgid = procwatch.cgroup_id(path)
                        if cgid:
                            by_uid[uid][cgid] = path
                        break
            for uid, found in by_uid.items():
                self._sync_cgroups(self.pods[uid], found)

    def on_process(self, kind: str, pid: int) -> None:
        """A process event (``procwatch``): learn the cgroup of an exec'ed process."""
        if kind == "exit":
            self._prune.set()
            return
        if kind == "lost":
            self.rescan()
            return
        path = procwatch.proc_cgroup(pid, self.cgroup_mount)
        if path is None or not (path + "/").startswith(self.cgroup_root.rstrip("/") + "/"):
            return
        rel = os.path.relpath(path, self.cgroup_root)
        with self._lock:
            uid = next((u for u in procwatch.uids_in_path(rel) if u in self.pods), None)
            if uid is None:
                return
            p = self.pods[uid]
            if path in p.cgroups.values():
                return
            cgid = procwatch.cgroup_id(path)
            if cgid:
                p.cgroups[cgid] = path
                self._put_cgroup(p, cgid)
                log.debug("ambient: pid %d: new cgroup %s of pod %s/%s", pid, path,
                          p.namespace, p.name)

    def prune(self) -> None:
        """Drop cgroups that no longer exist (or were replaced: another inode)."""
        with self._lock:
            for p in self.pods.values():
                gone = {c for c, path in p.cgroups.items() if procwatch.cgroup_id(path) != c}
                if gone:
                    self._sync_cgroups(p, {c: x for c, x in p.cgroups.items() if c not in gone})

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self.watch_processes:
            self._watcher = procwatch.ProcessWatcher(self.on_process)
            self.watching = self._watcher.start()
            if not self.watching:
                self._watcher = None
        self._thread = threading.Thread(target=self._loop, name="ambient", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # without process events, rescan often enough to notice new containers
        interval = self.rescan_interval if self.watching else min(self.rescan_interval, 2.0)
        next_scan = time.monotonic() + interval
        while not self._stop.is_set():
            if self._prune.wait(min(1.0, max(0.0, next_scan - time.monotonic()))):
                self._prune.clear()
                self._safe(self.prune)
                self._stop.wait(0.5)    # exits come in bursts: at most two prunes a second
            if time.monotonic() >= next_scan:
                self._safe(self.rescan)
                next_scan = time.monotonic() + interval

    @staticmethod
    def _safe(fn) -> None:
        try:
            fn()
        except Exception:
            log.exception("ambient: %s failed", fn.__name__)

    def stop(self, clear: bool = False) -> None:
        """Stop watching. With ``clear``, also remove every entry we wrote."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if clear:
            with self._lock:
                for uid in list(self.pods):
                    self._forget(uid)
