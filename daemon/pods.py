"""The pod registry: the one place that decides and records what is enrolled.

CNI mode: ``add``/``delete``/``check``/``gc``/``status`` implement the daemon
side of the chained plugin's commands. An ADD for a pod in the mesh writes
``mb_mark_pod_ips[key] = pod IP`` and ``mb_local_pods[ip] = policy``, opens the
39807 marker listener in the pod netns with ``SO_MARK = key`` and attaches XDP
to the pod's veth pair; it is all-or-nothing (an undo stack rolls back every
step done so far). The mark key is chosen once per container, kept in the
registry and persisted (``state.py``), so DEL removes exactly what ADD wrote.

The marker listener dies with the daemon (kill -9, OOM): so that a running
pod stays intercepted until the next daemon re-opens it, ADD also writes
``mb_netns_pod[netns cookie] = (pod IP, key)``, the connect programs' cache
of the listener probe (the cookie comes from the marker socket itself, which
lives in the pod netns). connect4/6 trust an entry only while
``mb_mark_pod_ips[key]`` still holds that IP, and DEL removes both.

Mark keys are 31-bit on purpose (1..2^31-1): SO_MARK is a u32, but Python's
setsockopt/getsockopt pass it as a signed C int, so a key with the top bit
set could not be written to, or compared with, the listener's mark.

Legacy mode (``--cni-mode=false``): ``on_pod_event`` keeps ``mb_local_pods``
equal to the in-mesh pods of the pod source (``legacy.py``). In CNI mode the
same events re-write the policy of enrolled pods and clean up pods whose DEL
never came.

Input from the pod source is untrusted: a manifest of the wrong shape, bad
annotations or a policy larger than the datapath's lists is a ``PodError``
with code 101 and nothing is written; no value from a manifest ever reaches a
shell or a path.

The per-container kernel work (apply / ensure / withdraw / check) is the
``Pieces`` mixin in ``enrolment.py``, which also defines ``PodError`` and the
codes re-exported here.

Collaborators are injected so that the state machine runs without root in
unit tests: ``maps`` (``local_pods``/``mark_pod_ips`` with put/get/delete/items),
``podnet`` (see ``PodNet``) and ``lookup(namespace, name) -> pod | None``.

Restart: the CNI server starts before ``restore`` has re-adopted the state
file, so the runtime's commands are held back meanwhile (``restoring()``):
ADD, CHECK and GC wait up to ``add_wait`` seconds and then answer code 11 (try
again later), DEL waits until the restore is over. Restore itself only works
on records that are still the live ones (a pod event may withdraw one while
it runs). After a clean stop (``StateStore.stopped_cleanly``), ``adopt`` then
enrols the in-mesh pods of the pod source that have no record at all -- pods
started while no daemon ran and our plugin was not in the CNI config -- by
finding their netns among the named network namespaces by pod IP, through
the normal ADD path. The runtime's
container id of such a pod is not known: its record's id is ``adopted:...``
(a ':' never occurs in a CNI container id), the runtime's later DEL, CHECK
or ADD for the same netns finds it by netns (an ADD gives it the real id),
and GC leaves it to the pod source.

Errors: every failure surfaces as ``PodError(code, msg, details)`` with a CNI
code (11 try again later, 50 not ready, 999 internal, 100+ ours); the CNI
server turns it into the plugin's error reply.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from merbridge.bpf import maps as bpfmaps
from merbridge.bpf import types as bpftypes
from merbridge.bpf.mesh import Mesh
from merbridge.daemon import annotations
from merbridge.daemon.enrolment import (  # noqa: F401  (re-exported: the registry's API)
    INTERNAL, INVALID_ANNOTATIONS, INVALID_ENVIRONMENT, INVALID_NETNS, KEY_MASK, NO_POD_IP,
    NODE_FULL, NOT_AVAILABLE, NOT_ENROLLED, TRY_AGAIN_LATER, _BAD_MANIFEST, PodError, Pieces,
    map_full, netns_id)
from merbridge.daemon.legacy import LegacyPods
from merbridge.daemon.state import ADDING, ENROLLED, Record, StateStore

log = logging.getLogger(__name__)

#: container id prefix of records ``adopt`` made (CNI container ids have no ':')
ADOPTED = "adopted:"

class PodNet(Protocol):
    """Per-pod network plumbing (``podnet.py`` in production, a fake in unit tests)."""

    def open_marker(self, netns: str, key: int) -> Any: ...      # returns an object with close()
    def marker_ok(self, marker: Any, key: int) -> bool: ...
    def attach_xdp(self, netns: str, ifname: str) -> None: ...
    def detach_xdp(self, netns: str, ifname: str) -> None: ...   # idempotent
    def xdp_attached(self, netns: str, ifname: str) -> bool: ...
    def tx_checksum_off(self, netns: str, ifname: str) -> None: ...
    def addresses(self, netns: str, ifname: str) -> list[str]: ...
    # optional: the netns cookie of the netns a marker socket lives in
    # def netns_cookie(self, marker: Any) -> int: ...
    # optional: {netns path: [(ifname, ip), ...]} of the named netns in a directory
    # def netns_addresses(self, netns_dir: str) -> dict[str, list[tuple[str, str]]]: ...


@dataclass(frozen=True)
class Attachment:
    """What a CNI request tells us about one container's attachment."""

    container_id: str
    netns: str = ""
    ifname: str = "eth0"
    namespace: str = ""
    name: str = ""
    uid: str = ""
    ips: tuple[str, ...] = ()


def pod_meta(pod: dict) -> tuple[str, str, str]:
    md = pod.get("metadata") if isinstance(pod, dict) else None
    md = md if isinstance(md, dict) else {}

    def text(key: str) -> str:
        value = md.get(key)
        return value if isinstance(value, str) else ""
    return text("namespace") or "default", text("name"), text("uid")


def allocate_key(container_id: str, used: set[int]) -> int:
    """A non-zero 32-bit mark key for a container: FNV-1a of its id, probed past collisions.

    Only the first choice is derived from the id; the key actually used is
    whatever this returns, recorded and persisted, so ADD and DEL always agree
    (upstream hashed two different strings and leaked every entry).
    """
    h = 0x811C9DC5
    for b in container_id.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    # 31 bits: SO_MARK is a u32, but setsockopt/getsockopt go through a C int
    h &= KEY_MASK
    for _ in range(len(used) + 1):
        if h and h not in used:
            return h
        h = (h + 1) & KEY_MASK
    raise PodError(INTERNAL, "no free mark key")  # unreachable: used is finite


class Registry(Pieces):
    def __init__(self, *, mesh: Mesh, maps: Any, podnet: PodNet | None,
                 lookup: Callable[[str, str], dict | None],
                 store: StateStore | None = None, cni_mode: bool = True,
                 exclude_namespaces: Iterable[str] = (), hardware_checksum: bool = False,
                 add_wait: float = 5.0, metrics: Any = None):
        self.mesh, self.maps, self.podnet, self.lookup = mesh, maps, podnet, lookup
        self.store, self.cni_mode = store, cni_mode
        self.exclude_namespaces = tuple(exclude_namespaces)
        self.hardware_checksum, self.add_wait, self.metrics = hardware_checksum, add_wait, metrics
        self.records: dict[str, Record] = {}
        self.markers: dict[str, Any] = {}            # container id -> open marker socket
        self.ready = False
        self._lock = threading.RLock()               # records, markers, keys, maps
        self.legacy = LegacyPods(maps, self._lock, self._legacy_decide, pod_meta, PodError)
        self._ctr_locks: dict[str, list] = {}        # container id -> [lock, users]
        self._pod_seen = threading.Condition()
        self._restored = threading.Event()           # cleared while restoring()
        self._restored.set()

    # -- helpers ---------------------------------------------------------
    @contextmanager
    def _container_lock(self, cid: str) -> Iterator[None]:
        """Serialise the commands of one container. The lock is dropped when its
        last user leaves, so 200 pods coming and going leave 0 locks behind."""
        with self._lock:
            entry = self._ctr_locks.setdefault(cid, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._ctr_locks.get(cid) is entry:
                    del self._ctr_locks[cid]

    def _save(self) -> None:
        self._write(self._snapshot())

    def _snapshot(self) -> tuple[int, str] | None:
        """The state file's next text (take it under ``_lock``; ``_write`` it
        after releasing the lock, so no other pod waits for the file system)."""
        if self.metrics is not None:
            self.metrics.set_pods_enrolled(
                sum(r.phase == ENROLLED for r in self.records.values()))
        return self.store.snapshot(self.records) if self.store is not None else None

    def _write(self, snapshot: tuple[int, str] | None) -> None:
        if snapshot is not None:
            self.store.write(snapshot)

    def _count(self, what: str, result: str, since: float) -> None:
        if self.metrics is not None:
            self.metrics.cni_request(what, result, time.monotonic() - since)

    @staticmethod
    def _bad_pod(pod: dict, exc: Exception) -> PodError:
        ns, name, _ = pod_meta(pod)
        if isinstance(exc, ValueError):
            return PodError(INVALID_ANNOTATIONS, f"invalid annotations on pod {ns}/{name}",
                            str(exc)[:500])
        return PodError(INVALID_ANNOTATIONS, f"malformed manifest of pod {ns}/{name}",
                        f"{type(exc).__name__}: {exc}"[:500])

    def _policy(self, pod: dict):
        try:
            policy = annotations.pod_policy(pod, self.mesh)
            bpfmaps.encode_policy(policy)  # the datapath's limits, before any write
            return policy
        except _BAD_MANIFEST as exc:
            raise self._bad_pod(pod, exc) from exc

    def _in_mesh(self, pod: dict) -> bool:
        try:
            return annotations.mesh_membership(pod, self.mesh, self.exclude_namespaces).in_mesh
        except _BAD_MANIFEST as exc:
            raise self._bad_pod(pod, exc) from exc

    def _pod_ips(self, pod: dict) -> tuple[str, ...]:
        try:
            return tuple(annotations.pod_ips(pod))
        except _BAD_MANIFEST as exc:
            raise self._bad_pod(pod, exc) from exc

    def _wait_for_pod(self, att: Attachment) -> dict:
        deadline = time.monotonic() + self.add_wait
        while True:
            # the lookup runs outside the condition: a source may hold its own lock
            # while it delivers the event that notifies us
            pod = self.lookup(att.namespace, att.name)
            if isinstance(pod, dict) and (not att.uid or not pod_meta(pod)[2]
                                    or pod_meta(pod)[2] == att.uid):
                return pod
            left = deadline - time.monotonic()
            if left <= 0:
                raise PodError(TRY_AGAIN_LATER, "pod not known yet",
                               f"{att.namespace}/{att.name} is not in the pod source "
                               f"after {self.add_wait:g}s")
            with self._pod_seen:
                self._pod_seen.wait(min(left, 0.2))

    def _primary_ip(self, ips: tuple[str, ...]) -> str:
        v4 = [ip for ip in ips if ":" not in ip]
        return (v4 or list(ips))[0]

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Hold the CNI commands back while the body restores and adopts (see the
        module docstring); they proceed when it ends, however it ends."""
        self._restored.clear()
        try:
            yield
        finally:
            self._restored.set()

    def _await_restore(self, command: str, wait: bool = False) -> None:
        """Block a CNI command until the restore is over: DEL (``wait``) for as
        long as it takes, the others ``add_wait`` seconds, then code 11."""
        if self._restored.wait(None if wait else self.add_wait):
            return
        raise PodError(TRY_AGAIN_LATER, "merbridge daemon is restoring its state",
                       f"{command} not served within {self.add_wait:g}s of a restart")

    def _record_for(self, att: Attachment) -> Record | None:
        """The record of ``att``'s container, else the adopted record of its netns."""
        rec = self.records.get(att.container_id)
        if rec is not None or not att.netns:
            return rec
        now = netns_id(att.netns)
        with self._lock:
            # the same netns under another path (adopt may know it as /proc/<pid>/ns/net)
            return next((r for r in self.records.values() if r.container_id.startswith(ADOPTED)
                         and (r.netns == att.netns and now in (None, r.netns_id)
                              or now is not None and r.netns_id == now)), None)

    # -- CNI commands ----------------------------------------------------
    def add(self, att: Attachment) -> None:
        if not att.container_id or not att.netns:
            raise PodError(INTERNAL, "ADD needs a container id and a netns")
        self._await_restore("ADD")
        self._add_command(att)

    def _add_command(self, att: Attachment) -> None:
        t0 = time.monotonic()
        with self._container_lock(att.container_id):
            try:
                self._check_netns(att.netns)
                try:
                    self._add(att)
                except PodError:
                    raise
                except Exception as exc:   # anything before the undo stack exists
                    log.error("ADD %s failed", att.container_id, exc_info=True)
                    raise PodError(INTERNAL, f"ADD of {att.namespace}/{att.name} failed",
                                   f"{type(exc).__name__}: {exc}"[:500]) from exc
            except PodError as exc:
                self._count("ADD", "error", t0)
                log.warning("ADD %s (%s/%s) failed: %s", att.container_id, att.namespace,
                            att.name, exc)
                raise
            self._count("ADD", "ok", t0)

    def _check_netns(self, path: str) -> None:
        """Refuse a netns path that is not a pod's network namespace (relative,
        ``..``, a symlink trick, a regular file, another namespace type, the
        daemon's own netns) before anything is looked up or written."""
        check = getattr(self.podnet, "check_netns", None)
        if check is None:
            return
        try:
            check(path)
        except Exception as exc:
            raise PodError(INVALID_NETNS, "invalid netns", str(exc)[:500]) from exc

    def _add(self, att: Attachment) -> None:
        old = self._record_for(att)
        if old is not None and old.container_id != att.container_id:
            with self._container_lock(old.container_id):
                if self.records.get(old.container_id) is old:
                    self._claim(old, att.container_id)
                else:
                    old = None             # withdrawn meanwhile
        if old is not None:
            if old.netns == att.netns and old.ifname == att.ifname and old.phase == ENROLLED:
                self._ensure(old)          # idempotent ADD: repair whatever is missing
                return
            self._withdraw(old)            # a changed attachment replaces the old one
        pod = self._wait_for_pod(att)
        if not self._in_mesh(pod):
            log.info("ADD %s: pod %s/%s is not in the mesh", att.container_id,
                     att.namespace, att.name)
            return
        policy = self._policy(pod)
        ips = tuple(att.ips) or self._pod_ips(pod) or tuple(
            self.podnet.addresses(att.netns, att.ifname))
        if not ips:
            raise PodError(NO_POD_IP, "pod has no IP address",
                           f"no IP in prevResult, pod status or {att.ifname} of {att.netns}")
        rec = Record(container_id=att.container_id, netns=att.netns, ifname=att.ifname,
                     namespace=att.namespace, name=att.name,
                     uid=att.uid or pod_meta(pod)[2], ips=ips, phase=ADDING,
                     netns_id=netns_id(att.netns))
        with self._lock:
            if att.container_id.startswith(ADOPTED) and any(
                    r.netns == att.netns or (rec.netns_id and r.netns_id == rec.netns_id)
                    or set(r.ips) & set(ips) for r in self.records.values()):
                # the runtime's own ADD got there first: it enrols the pod
                raise PodError(TRY_AGAIN_LATER, "pod is being enrolled by its CNI ADD",
                               f"{att.namespace}/{att.name} in {att.netns}")
            used = self._keys_in_use()
            if len(used) >= bpftypes.MB_MAX_PODS:
                raise PodError(NODE_FULL, "node pod limit reached",
                               f"{len(used)} pods are enrolled; the datapath holds "
                               f"{bpftypes.MB_MAX_PODS} (MB_MAX_PODS)")
            rec.key = allocate_key(att.container_id, used)
            self.records[rec.container_id] = rec
            snapshot = self._snapshot()
        self._write(snapshot)              # the key is known before it is written anywhere
        undo: list[Callable[[], None]] = []
        try:
            self._apply(rec, policy, undo)
            with self._lock:
                rec.phase = ENROLLED
                snapshot = self._snapshot()
            self._write(snapshot)
        except Exception as exc:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("rollback step failed for %s", rec.container_id)
            with self._lock:
                self.records.pop(rec.container_id, None)
                self.markers.pop(rec.container_id, None)
                self._save()
            if isinstance(exc, PodError):
                raise
            if map_full(exc):
                raise PodError(NODE_FULL, "node pod limit reached",
                               f"a datapath map is full: {exc}"[:500]) from exc
            log.error("enrolling %s failed", rec.container_id, exc_info=True)
            raise PodError(INTERNAL, f"enrolling {att.namespace}/{att.name} failed",
                           f"{type(exc).__name__}: {exc}") from exc
        log.info("enrolled %s/%s container %s ips %s key %#x", rec.namespace, rec.name,
                 rec.container_id, ",".join(rec.ips), rec.key)

    def _claim(self, rec: Record, container_id: str) -> None:
        """An adopted record gets the runtime's container id (same key, same pieces)."""
        with self._lock:
            self.records.pop(rec.container_id, None)
            marker = self.markers.pop(rec.container_id, None)
            if marker is not None:
                self.markers[container_id] = marker
            log.info("container %s of %s/%s was adopted as %s", container_id, rec.namespace,
                     rec.name, rec.container_id)
            rec.container_id = container_id
            self.records[container_id] = rec
            self._save()

    def _keys_in_use(self) -> set[int]:
        used = {r.key for r in self.records.values()}
        try:
            used.update(int(k) for k, _ in self.maps.mark_pod_ips.items())
        except Exception:
            log.debug("cannot list mark_pod_ips", exc_info=True)
        return used

    def delete(self, att: Attachment) -> None:
        self._await_restore("DEL", wait=True)
        self._delete(att)

    def _delete(self, att: Attachment) -> None:
        t0 = time.monotonic()
        with self._container_lock(att.container_id):
            rec = self._record_for(att)
            if rec is None:
                self._count("DEL", "ok", t0)
                return                     # nothing of ours: DEL is idempotent
            try:
                if rec.container_id == att.container_id:
                    self._withdraw(rec)
                else:                      # adopted: the pod event path locks it too
                    with self._container_lock(rec.container_id):
                        if self.records.get(rec.container_id) is rec:
                            self._withdraw(rec)
            except PodError:
                self._count("DEL", "error", t0)
                raise
            self._count("DEL", "ok", t0)

    def check(self, att: Attachment) -> None:
        self._await_restore("CHECK")
        with self._container_lock(att.container_id):
            rec = self._record_for(att)
            if rec is None:
                pod = self.lookup(att.namespace, att.name)
                if pod is not None and self._in_mesh(pod):
                    raise PodError(NOT_ENROLLED, "pod is in the mesh but not enrolled",
                                   f"{att.namespace}/{att.name} container {att.container_id}")
                return
            problems = self._problems(rec)
            if problems:
                raise PodError(NOT_ENROLLED, f"enrolment of {rec.namespace}/{rec.name} is "
                               "incomplete", "; ".join(problems))

    def gc(self, valid: Iterable[tuple[str, str]]) -> None:
        self._await_restore("GC")
        keep = {cid for cid, _ in valid}
        errors = []
        # adopted records carry no runtime container id: the pod source removes them
        for cid in [c for c in list(self.records)
                    if c not in keep and not c.startswith(ADOPTED)]:
            try:
                self._delete(Attachment(container_id=cid))
            except PodError as exc:
                errors.append(f"{cid}: {exc}")
        if errors:
            raise PodError(INTERNAL, "GC could not remove everything", "; ".join(errors))

    def restore(self, records: dict[str, Record]) -> None:
        """Adopt the persisted records after a restart and rebuild what died with the
        old process (marker sockets; XDP or map entries if they were removed).

        Records whose netns is gone, or whose pod the pod source no longer lists
        (its DEL came while no daemon ran), are withdrawn; ones left half-added by a killed
        daemon are completed when their netns still exists (the runtime may DEL
        them later, which is fine). Map entries no record explains are removed.

        Run it inside ``restoring()``: CNI commands wait. Pod events do not, so a
        record they withdrew meanwhile is skipped, never rebuilt.
        """
        with self._lock:
            for cid, rec in records.items():
                self.records.setdefault(cid, rec)
        for rec in list(records.values()):
            with self._container_lock(rec.container_id):
                if self.records.get(rec.container_id) is not rec:
                    continue               # withdrawn (or replaced) meanwhile
                try:
                    if not self._same_netns(rec):
                        log.info("restore: netns of %s/%s (%s) is gone", rec.namespace,
                                 rec.name, rec.container_id)
                        self._withdraw(rec)
                        continue
                    pod = self.lookup(rec.namespace, rec.name)
                    if pod is None or (rec.uid and pod_meta(pod)[2]
                                       and pod_meta(pod)[2] != rec.uid):
                        # deleted while no daemon ran (its DEL was lost): the pod
                        # source has had its first full listing by now
                        log.info("restore: pod %s/%s (%s) is gone from the pod source",
                                 rec.namespace, rec.name, rec.container_id)
                        self._withdraw(rec)
                        continue
                    policy = None
                    if pod is not None:
                        try:
                            policy = self._policy(pod)
                        except PodError as exc:
                            log.error("restore: %s; keeping the pinned policy", exc)
                    self._ensure(rec, policy)
                    with self._lock:
                        rec.phase = ENROLLED
                except Exception:
                    log.exception("restore of %s/%s (%s) failed", rec.namespace, rec.name,
                                  rec.container_id)
        with self._lock:
            keys = {r.key for r in self.records.values()}
            ips = {ip for r in self.records.values() for ip in r.ips}
            for key, _ in list(self.maps.mark_pod_ips.items()):
                if key not in keys:
                    self._quiet(self.maps.mark_pod_ips.delete, key)
            for ip, _ in list(self.maps.local_pods.items()):
                if ip not in ips:
                    self._quiet(self.maps.local_pods.delete, ip)
            table = self._netns_pods()
            owned = {(r.key, self._primary_ip(r.ips)) for r in self.records.values() if r.ips}
            for cookie, ip, mark in list(table.items()) if table is not None else ():
                if (mark, ip) not in owned:
                    table.delete(cookie)
            self._save()

    def adopt(self, pods: Iterable[dict], netns_dir: str, proc_path: str | None = None) -> int:
        """Enrol each in-mesh pod of ``pods`` that has no record: find its netns in
        ``netns_dir`` (and, with ``proc_path``, among the netns of the node's
        processes) as the one whose interface carries the pod's primary IP and
        run the ADD path on it (marker, maps, XDP, policy, state record). A pod
        that no netns matches, or several do, is left alone with a log line
        (once per pod: the reconciler calls this every second). Returns how
        many pods it enrolled; ``unaccounted`` is left holding the in-mesh pods
        with an IP and no record that it could not enrol."""
        self.unaccounted: list[str] = []
        told = self.__dict__.setdefault("_adopt_told", set())
        find = getattr(self.podnet, "netns_addresses", None)
        if find is None:
            return 0
        wanted = []
        # this runs every second: records are indexed once, and a pod's verdict
        # (in the mesh, its IPs) is kept while the pod source hands out the same
        # object (a changed pod is a new object)
        with self._lock:
            uids: dict[tuple[str, str], list[str]] = {}
            for r in self.records.values():
                uids.setdefault((r.namespace, r.name), []).append(r.uid)
        verdicts = self.__dict__.setdefault("_adopt_verdicts", {})
        seen = {}
        for pod in pods:
            ns, name, uid = pod_meta(pod)
            if any(not uid or not u or u == uid for u in uids.get((ns, name), ())):
                continue                   # it has a record (as _matching)
            key = (ns, name, uid, id(pod))
            verdict = verdicts.get(key)
            if verdict is None or verdict[0] is not pod:
                try:
                    ips = self._pod_ips(pod) if self._in_mesh(pod) else ()
                except PodError as exc:
                    log.warning("adopt: %s", exc)
                    ips = ()
                verdict = (pod, ips if not self._host_network(pod) else ())
            seen[key] = verdict
            if verdict[1]:
                wanted.append((pod, verdict[1]))
        verdicts.clear()
        verdicts.update(seen)
        if not wanted:
            told.clear()
            return 0
        try:
            found = find(netns_dir, proc_path) if proc_path else find(netns_dir)
        except Exception as exc:           # start-up goes on: these pods stay as they are
            log.error("adopt: cannot search %s for the netns of %d pod(s): %s", netns_dir,
                      len(wanted), exc)
            self.unaccounted = ["/".join(pod_meta(p)[:2]) for p, _ in wanted]
            return 0
        adopted = 0
        owners: dict[str, list[tuple[str, str]]] = {}
        for path, addrs in found.items():
            for ifname, ip in addrs:
                owners.setdefault(ip, []).append((path, ifname))
        for pod, ips in wanted:
            ns, name, uid = pod_meta(pod)
            self.unaccounted.append(f"{ns}/{name}")
            again = (ns, name, uid) in told
            say, warn = (log.debug, log.debug) if again else (log.info, log.warning)
            told.add((ns, name, uid))
            primary = self._primary_ip(ips)
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
            with self._lock:
                taken = any(r.netns == path or set(r.ips) & set(ips)
                            for r in self.records.values())
            if taken:
                warn("adopt: pod %s/%s: netns %s or its IPs belong to another "
                     "record; not enrolled", ns, name, path)
                continue
            try:
                self._add_command(Attachment(container_id=f"{ADOPTED}{ns}/{name}/{uid}",
                                             netns=path, ifname=ifname, namespace=ns,
                                             name=name, uid=uid, ips=ips))
            except PodError:
                continue                   # logged by the ADD path
            adopted += 1
            self.unaccounted.pop()
            log.info("adopted pod %s/%s, started while no daemon ran: netns %s %s", ns, name,
                     path, ifname)
        return adopted

    @staticmethod
    def _host_network(pod: dict) -> bool:
        spec = pod.get("spec") if isinstance(pod, dict) else None
        return isinstance(spec, dict) and spec.get("hostNetwork") is True

    def shutdown(self) -> None:
        """Close every marker listener and detach every XDP program; the records
        stay on disk so the next daemon re-enrols the pods that still run, and
        learns that it should ``adopt`` (state.py)."""
        self.ready = False
        for cid, rec in list(self.records.items()):
            with self._container_lock(cid):
                marker = self.markers.pop(cid, None)
                if marker is not None:
                    marker.close()
                if self._same_netns(rec):
                    try:
                        self.podnet.detach_xdp(rec.netns, rec.ifname)
                    except Exception:
                        log.exception("detach XDP of %s", cid)
        if self.cni_mode and self.store is not None:
            with self._lock:
                self.store.save(self.records, stopped_cleanly=True)

    def status(self) -> None:
        if not self.ready:
            raise PodError(NOT_AVAILABLE, "merbridge daemon is not ready")

    # -- pod source events -------------------------------------------------
    def on_pod_event(self, event: str, pod: dict) -> None:
        with self._pod_seen:
            self._pod_seen.notify_all()
        try:
            if self.cni_mode:
                self._cni_event(event, pod)
            else:
                self._legacy_event(event, pod)
        except Exception:
            log.exception("pod event %s for %s/%s failed", event, *pod_meta(pod)[:2])

    def _matching(self, pod: dict) -> list[Record]:
        ns, name, uid = pod_meta(pod)
        return [r for r in self.records.values() if r.namespace == ns and r.name == name
                and (not uid or not r.uid or r.uid == uid)]

    def _cni_event(self, event: str, pod: dict) -> None:
        for rec in self._matching(pod):
            if event == "DELETED":
                self._delete(Attachment(container_id=rec.container_id))
            elif rec.phase == ENROLLED:
                try:
                    policy = self._policy(pod)
                except PodError as exc:
                    log.error("%s; keeping the previous policy", exc)
                    continue
                with self._lock:
                    for ip in rec.ips:
                        if self.maps.local_pods.get(ip) != policy:
                            self.maps.local_pods.put(ip, policy)

    def _legacy_decide(self, pod: dict) -> tuple[tuple[str, ...], Any]:
        if not self._in_mesh(pod):
            return (), None
        return self._pod_ips(pod), self._policy(pod)

    def _legacy_event(self, event: str, pod: dict) -> None:
        self.legacy.event(event, pod)

    def resync_legacy(self, pods: Iterable[dict]) -> None:
        """Make mb_local_pods exactly the in-mesh pods of a full snapshot."""
        self.legacy.resync(pods)
