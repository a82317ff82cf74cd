# Over ~450 lines: one state machine under one lock (records, keys, CNI commands, restart).
"""The pod registry: the one place that decides and records what is enrolled.

CNI mode: the registry is the CNI server's handler (``cniserver.CniHandler``):
``add``/``delete``/``check``/``gc``/``status`` take the plugin's validated
``CniRequest`` and answer, or raise the one ``CniError``. An ADD for a pod in
the mesh chooses the pod's mark key, records it (``state.py``) and has its
``Enroller`` (``enroll.py``) create the kernel pieces: ``mb_mark_pod_ips[key]
= pod IP``, ``mb_local_pods[ip] = policy``, the 39807 marker listener in the
pod netns with ``SO_MARK = key``, ``mb_netns_pod`` and the inbound rewrite on
the pod's veth pair; it is all-or-nothing (an undo stack rolls back every step
done so far). The key is chosen once per container and persisted, so DEL
removes exactly what ADD wrote.

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

Input from the pod source is untrusted: what the registry uses of a pod comes
through ``podfacts.py``, where a manifest that cannot be used is code 101 and
nothing is written. Collaborators are injected so that the state machine runs
without root in unit tests: ``maps`` (``bpf.maps.Maps``, over in-memory
backends there), ``podnet`` (``enroll.PodNet``) and ``lookup(namespace, name)
-> pod | None``.

Restart: the CNI server starts before ``restore`` has re-adopted the state
file, so the runtime's commands are held back meanwhile (``restoring()``):
ADD, CHECK and GC wait up to ``add_wait`` seconds and then answer code 11 (try
again later), DEL waits until the restore is over. Restore itself only works
on records that are still the live ones (a pod event may withdraw one while
it runs). ``adopt`` (``adopt.py``) then enrols the in-mesh pods that have no
record through the normal ADD path, as ``adopted:...`` containers; the
runtime's later DEL, CHECK or ADD for the same netns finds such a record by
netns (an ADD gives it the real id), and GC leaves it to the pod source.

Errors: every failure is a ``CniError`` (``merbridge.cni.errors``) with a CNI
code (11 try again later, 50 not ready, 999 internal, 101-104 ours); the CNI
server turns it into the plugin's error reply.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from merbridge.bpf import types as bpftypes
from merbridge.bpf.mesh import Mesh
from merbridge.cni import errors
from merbridge.cni.errors import CniError
from merbridge.cni.protocol import CniRequest
from merbridge.daemon import annotations as pod_annotations
from merbridge.daemon import podfacts
from merbridge.daemon.adopt import ADOPTED, Adopter
from merbridge.daemon.enroll import Enroller, PodNet, failure, netns_id, same_netns
from merbridge.daemon.legacy import LegacyPods
from merbridge.daemon.podfacts import pod_meta
from merbridge.daemon.state import ADDING, ENROLLED, Record, StateStore

log = logging.getLogger(__name__)

#: mark keys stay in 1..2^31-1 (see the module docstring)
KEY_MASK = 0x7FFFFFFF


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
    raise CniError(errors.INTERNAL, "no free mark key")  # unreachable: used is finite


def _bare_ips(req: CniRequest) -> tuple[str, ...]:
    """prevResult addresses arrive as "addr/prefix"; the maps want bare addresses."""
    return tuple(dict.fromkeys(ip.split("/", 1)[0] for ip in req.ips))


class Registry:
    def __init__(self, *, mesh: Mesh, maps: Any, podnet: PodNet | None,
                 lookup: Callable[[str, str], dict | None],
                 store: StateStore | None = None, cni_mode: bool = True,
                 exclude_namespaces: Iterable[str] = (), hardware_checksum: bool = False,
                 add_wait: float = 5.0, metrics: Any = None):
        self.mesh, self.maps, self.podnet, self.lookup = mesh, maps, podnet, lookup
        self.store, self.cni_mode = store, cni_mode
        self.exclude_namespaces = tuple(exclude_namespaces)
        self.add_wait, self.metrics = add_wait, metrics
        self.records: dict[str, Record] = {}
        #: not ready: STATUS answers "starting"; draining: "draining" (``merbridge drain``)
        self.ready = self.draining = False
        self._lock = threading.RLock()               # records, markers, keys, maps
        self.enroller = Enroller(maps, podnet, self._lock, hardware_checksum)
        self.adopter = Adopter(podnet, self._adoptable_ips, self._records_now, self._add_command)
        self.legacy = LegacyPods(maps, self._lock, self._legacy_decide, pod_meta, CniError)
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

    def _records_now(self) -> list[Record]:
        with self._lock:
            return list(self.records.values())

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
        if snapshot is not None and self.store is not None:   # a snapshot comes from the store
            self.store.write(snapshot)

    def _policy(self, pod: dict):
        return podfacts.policy(pod, self.mesh)

    def _fallback_policy(self, rec: Record):
        pod = self.lookup(rec.namespace, rec.name)
        if pod is not None:
            try:
                return self._policy(pod)
            except CniError:
                log.error("pod %s/%s: bad annotations, using the mesh defaults",
                          rec.namespace, rec.name)
        return pod_annotations.pod_policy({"metadata": {"namespace": rec.namespace,
                                                        "name": rec.name}}, self.mesh)

    def _in_mesh(self, pod: dict) -> bool:
        return podfacts.in_mesh(pod, self.mesh, self.exclude_namespaces)

    def _adoptable_ips(self, pod: dict) -> tuple[str, ...]:
        return podfacts.pod_ips(pod) if self._in_mesh(pod) else ()

    def _wait_for_pod(self, req: CniRequest) -> dict:
        deadline = time.monotonic() + self.add_wait
        while True:
            # the lookup runs outside the condition: a source may hold its own lock
            # while it delivers the event that notifies us
            pod = self.lookup(req.pod_namespace, req.pod_name)
            if isinstance(pod, dict) and (not req.pod_uid or not pod_meta(pod)[2]
                                          or pod_meta(pod)[2] == req.pod_uid):
                return pod
            left = deadline - time.monotonic()
            if left <= 0:
                raise CniError(errors.TRY_AGAIN_LATER, "pod not known yet",
                               f"{req.pod_namespace}/{req.pod_name} is not in the pod source "
                               f"after {self.add_wait:g}s")
            with self._pod_seen:
                self._pod_seen.wait(min(left, 0.2))

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
        raise CniError(errors.TRY_AGAIN_LATER, "merbridge daemon is restoring its state",
                       f"{command} not served within {self.add_wait:g}s of a restart")

    def _record_for(self, cid: str, netns: str = "") -> Record | None:
        """The record of container ``cid``, else the adopted record of its netns."""
        rec = self.records.get(cid)
        if rec is not None or not netns:
            return rec
        now = netns_id(netns)
        with self._lock:
            # the same netns under another path (adopt may know it as /proc/<pid>/ns/net)
            return next((r for r in self.records.values() if r.container_id.startswith(ADOPTED)
                         and (r.netns == netns and now in (None, r.netns_id)
                              or now is not None and r.netns_id == now)), None)

    # -- CNI commands (cniserver.CniHandler) -----------------------------
    def add(self, req: CniRequest) -> dict:
        """Enrol the pod; {"enrolled", "key"} for the plugin's log."""
        if not req.container_id or not req.netns:
            raise CniError(errors.INTERNAL, "ADD needs a container id and a netns")
        self._await_restore("ADD")
        rec = self._add_command(req)
        return {"enrolled": rec is not None, "key": rec.key if rec else 0}

    def _add_command(self, req: CniRequest) -> Record | None:
        with self._container_lock(req.container_id):
            try:
                self._check_netns(req.netns)
                try:
                    return self._add(req)
                except CniError:
                    raise
                except Exception as exc:   # anything before the undo stack exists
                    log.error("ADD %s failed", req.container_id, exc_info=True)
                    raise CniError(errors.INTERNAL,
                                   f"ADD of {req.pod_namespace}/{req.pod_name} failed",
                                   f"{type(exc).__name__}: {exc}"[:500]) from exc
            except CniError as exc:
                log.warning("ADD %s (%s/%s) failed: %s", req.container_id, req.pod_namespace,
                            req.pod_name, exc)
                raise

    def _check_netns(self, path: str) -> None:
        """Refuse a netns path that is not a pod's network namespace (relative,
        ``..``, a symlink trick, a regular file, another namespace type, the
        daemon's own netns) before anything is looked up or written."""
        try:
            self.enroller.net.check_netns(path)
        except Exception as exc:
            raise CniError(errors.INVALID_NETNS, "invalid netns", str(exc)[:500]) from exc

    def _add(self, req: CniRequest) -> Record | None:
        old = self._record_for(req.container_id, req.netns)
        if old is not None and old.container_id != req.container_id:
            with self._container_lock(old.container_id):
                if self.records.get(old.container_id) is old:
                    self._claim(old, req.container_id)
                else:
                    old = None             # withdrawn meanwhile
        ifname = req.ifname or "eth0"
        if old is not None:
            if old.netns == req.netns and old.ifname == ifname and old.phase == ENROLLED:
                self._ensure(old)          # idempotent ADD: repair whatever is missing
                return old
            self._withdraw(old)            # a changed attachment replaces the old one
        pod = self._wait_for_pod(req)
        if not self._in_mesh(pod):
            log.info("ADD %s: pod %s/%s is not in the mesh", req.container_id,
                     req.pod_namespace, req.pod_name)
            return None
        policy = self._policy(pod)
        ips = _bare_ips(req) or podfacts.pod_ips(pod) or tuple(
            self.enroller.net.addresses(req.netns, ifname))
        if not ips:
            raise CniError(errors.NO_POD_IP, "pod has no IP address",
                           f"no IP in prevResult, pod status or {ifname} of {req.netns}")
        rec = Record(container_id=req.container_id, netns=req.netns, ifname=ifname,
                     namespace=req.pod_namespace, name=req.pod_name,
                     uid=req.pod_uid or pod_meta(pod)[2], ips=ips, phase=ADDING,
                     netns_id=netns_id(req.netns))
        with self._lock:
            if req.container_id.startswith(ADOPTED) and any(
                    r.netns == req.netns or (rec.netns_id and r.netns_id == rec.netns_id)
                    or set(r.ips) & set(ips) for r in self.records.values()):
                # the runtime's own ADD got there first: it enrols the pod
                raise CniError(errors.TRY_AGAIN_LATER, "pod is being enrolled by its CNI ADD",
                               f"{req.pod_namespace}/{req.pod_name} in {req.netns}")
            used = self._keys_in_use()
            if len(used) >= bpftypes.MB_MAX_PODS:
                raise CniError(errors.NODE_FULL, "node pod limit reached",
                               f"{len(used)} pods are enrolled; the datapath holds "
                               f"{bpftypes.MB_MAX_PODS} (MB_MAX_PODS)")
            rec.key = allocate_key(req.container_id, used)
            self.records[rec.container_id] = rec
            snapshot = self._snapshot()
        self._write(snapshot)              # the key is known before it is written anywhere
        undo: list[Callable[[], None]] = []
        try:
            self.enroller.apply(rec, policy, undo)
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
                self.enroller.markers.pop(rec.container_id, None)
                self._save()
            error = failure(exc, f"{req.pod_namespace}/{req.pod_name}")
            if error.code == errors.INTERNAL and error is not exc:
                log.error("enrolling %s failed", rec.container_id, exc_info=True)
            raise error from (None if error is exc else exc)
        log.info("enrolled %s/%s container %s ips %s key %#x", rec.namespace, rec.name,
                 rec.container_id, ",".join(rec.ips), rec.key)
        return rec

    def _claim(self, rec: Record, container_id: str) -> None:
        """An adopted record gets the runtime's container id (same key, same pieces)."""
        with self._lock:
            self.records.pop(rec.container_id, None)
            marker = self.enroller.markers.pop(rec.container_id, None)
            if marker is not None:
                self.enroller.markers[container_id] = marker
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

    def _ensure(self, rec: Record, policy=None) -> None:
        if self.enroller.ensure(rec, policy, lambda: self._fallback_policy(rec)):
            with self._lock:
                self._save()               # the netns cookie changed

    def _withdraw(self, rec: Record) -> None:
        problems = self.enroller.release(rec)
        with self._lock:
            problems += self.enroller.clear(rec, lambda ip: any(
                ip in r.ips for c, r in self.records.items() if c != rec.container_id))
            if problems:
                raise CniError(errors.INTERNAL, f"removing container {rec.container_id}",
                               "; ".join(problems))
            self.records.pop(rec.container_id, None)
            snapshot = self._snapshot()
        self._write(snapshot)
        log.info("withdrew %s/%s container %s", rec.namespace, rec.name, rec.container_id)

    def delete(self, req: CniRequest) -> None:
        self._await_restore("DEL", wait=True)
        self._delete(req.container_id, req.netns)

    def _delete(self, cid: str, netns: str = "") -> None:
        with self._container_lock(cid):
            rec = self._record_for(cid, netns)
            if rec is None:
                return                     # nothing of ours: DEL is idempotent
            if rec.container_id == cid:
                self._withdraw(rec)
            else:                          # adopted: the pod event path locks it too
                with self._container_lock(rec.container_id):
                    if self.records.get(rec.container_id) is rec:
                        self._withdraw(rec)

    def check(self, req: CniRequest) -> None:
        self._await_restore("CHECK")
        with self._container_lock(req.container_id):
            rec = self._record_for(req.container_id, req.netns)
            if rec is None:
                pod = self.lookup(req.pod_namespace, req.pod_name)
                if pod is not None and self._in_mesh(pod):
                    raise CniError(errors.NOT_ENROLLED, "pod is in the mesh but not enrolled",
                                   f"{req.pod_namespace}/{req.pod_name} container "
                                   f"{req.container_id}")
                return
            problems = self.enroller.problems(rec)
            if problems:
                raise CniError(errors.NOT_ENROLLED, f"enrolment of {rec.namespace}/{rec.name} "
                               "is incomplete", "; ".join(problems))

    def gc(self, req: CniRequest) -> None:
        """Drop every container not in ``req.attachments``."""
        self._await_restore("GC")
        keep = {a.container_id for a in req.attachments}
        failed = []
        # adopted records carry no runtime container id: the pod source removes them
        for cid in [c for c in list(self.records)
                    if c not in keep and not c.startswith(ADOPTED)]:
            try:
                self._delete(cid)
            except CniError as exc:
                failed.append(f"{cid}: {exc.msg}: {exc.details}" if exc.details
                              else f"{cid}: {exc.msg}")
        if failed:
            raise CniError(errors.INTERNAL, "GC could not remove everything", "; ".join(failed))

    def status(self) -> tuple[bool, str]:
        if self.draining:
            raise CniError(errors.PLUGIN_NOT_AVAILABLE, "merbridge is draining")
        if not self.ready:
            raise CniError(errors.PLUGIN_NOT_AVAILABLE, "merbridge is starting")
        return True, "ready"

    # -- restart ---------------------------------------------------------
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
                    self._restore_one(rec)
                except Exception:
                    log.exception("restore of %s/%s (%s) failed", rec.namespace, rec.name,
                                  rec.container_id)
        with self._lock:
            self.enroller.prune(list(self.records.values()))
            self._save()

    def _restore_one(self, rec: Record) -> None:
        if not same_netns(rec):
            log.info("restore: netns of %s/%s (%s) is gone", rec.namespace, rec.name,
                     rec.container_id)
            self._withdraw(rec)
            return
        pod = self.lookup(rec.namespace, rec.name)
        if pod is None or (rec.uid and pod_meta(pod)[2] and pod_meta(pod)[2] != rec.uid):
            # deleted while no daemon ran (its DEL was lost): the pod
            # source has had its first full listing by now
            log.info("restore: pod %s/%s (%s) is gone from the pod source", rec.namespace,
                     rec.name, rec.container_id)
            self._withdraw(rec)
            return
        policy = None
        try:
            policy = self._policy(pod)
        except CniError as exc:
            log.error("restore: %s; keeping the pinned policy", exc)
        self._ensure(rec, policy)
        with self._lock:
            rec.phase = ENROLLED

    def adopt(self, pods: Iterable[dict], netns_dir: str, proc_path: str | None = None) -> int:
        """Enrol each in-mesh pod of ``pods`` that has no record, found by IP among
        the node's network namespaces (``adopt.py``); how many it enrolled.
        ``unaccounted`` then holds those it could not enrol."""
        return self.adopter.run(pods, netns_dir, proc_path)

    @property
    def unaccounted(self) -> list[str]:
        return self.adopter.unaccounted

    def shutdown(self) -> None:
        """Close every marker listener and detach every XDP program; the records
        stay on disk so the next daemon re-enrols the pods that still run, and
        learns that it should ``adopt`` (state.py)."""
        self.ready = False
        for cid, rec in list(self.records.items()):
            with self._container_lock(cid):
                for problem in self.enroller.release(rec):
                    log.error("shutdown: %s of %s", problem, cid)
        if self.cni_mode and self.store is not None:
            with self._lock:
                self.store.save(self.records, stopped_cleanly=True)

    # -- pod source events -------------------------------------------------
    def on_pod_event(self, event: str, pod: dict) -> None:
        with self._pod_seen:
            self._pod_seen.notify_all()
        try:
            if self.cni_mode:
                self._cni_event(event, pod)
            else:
                self.legacy.event(event, pod)
        except Exception:
            log.exception("pod event %s for %s/%s failed", event, *pod_meta(pod)[:2])

    def _matching(self, pod: dict) -> list[Record]:
        ns, name, uid = pod_meta(pod)
        return [r for r in self.records.values() if r.namespace == ns and r.name == name
                and (not uid or not r.uid or r.uid == uid)]

    def _cni_event(self, event: str, pod: dict) -> None:
        for rec in self._matching(pod):
            if event == "DELETED":
                self._delete(rec.container_id)
            elif rec.phase == ENROLLED:
                try:
                    policy = self._policy(pod)
                except CniError as exc:
                    log.error("%s; keeping the previous policy", exc)
                    continue
                with self._lock:
                    for ip in rec.ips:
                        if self.maps.local_pods.get(ip) != policy:
                            self.maps.local_pods.put(ip, policy)

    def _legacy_decide(self, pod: dict) -> tuple[tuple[str, ...], Any]:
        if not self._in_mesh(pod):
            return (), None
        return podfacts.pod_ips(pod), self._policy(pod)

    def resync_legacy(self, pods: Iterable[dict]) -> None:
        """Make mb_local_pods exactly the in-mesh pods of a full snapshot."""
        self.legacy.resync(pods)
