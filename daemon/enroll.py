"""The kernel pieces of one enrolment, and how they are made, repaired, undone
and checked: the registry's (``pods.py``) one collaborator for them.

An ``Enroller`` is built from the datapath's maps and the pod plumbing
(``PodNet``, below; ``podnet.py`` in production, a fake in the unit tests) and
owns the open marker listeners. Per container (a ``state.Record``) it offers:

- ``apply``: create every piece, all-or-nothing (an undo stack the registry
  runs on failure): ``mb_mark_pod_ips``, ``mb_local_pods``, the marker
  listener, ``mb_netns_pod`` (which keeps a pod intercepted while no daemon
  holds its listener), the inbound rewrite (tc or XDP) and tx checksum;
- ``ensure``: make them present again (a repeated ADD, a restart);
- ``release`` then ``clear``: undo them (DEL), kernel attachments first, then
  map entries under the registry's lock, as one step with its records;
- ``problems``: what CHECK reports.

It never reads or writes the registry's records or state file: the registry
passes each record in and saves what changed. The lock is the registry's, so
map writes of both never interleave.

A pod's mark maps to its IPs, one per family (``marked_ips``): the connect
programs bind a redirected connection to the pod IP of its family, so a
dual-stack pod's IPv6 connections are as unique on the node as its IPv4 ones.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Protocol

from merbridge.cni import errors
from merbridge.cni.errors import CniError
from merbridge.daemon.state import ENROLLED, Record

log = logging.getLogger("merbridge.daemon.pods")


class PodNet(Protocol):
    """Per-pod network plumbing (``podnet.PodNet`` in production, a fake in unit tests).

    Errors: ``CniError`` where the CNI code is known (``attach_xdp`` on an
    interface that is not the pod's veth: code 4), any other exception
    otherwise (the registry reports it as 999, or as code 8 from
    ``check_netns``)."""

    #: where the inbound rewrite runs: "tc" or "xdp" (the ``*_xdp`` methods do either)
    inbound_hook: str

    def check_netns(self, netns: str) -> Any: ...   # raises unless a pod's network namespace
    def open_marker(self, netns: str, key: int) -> Any: ...   # an object with close()
    def open_marker_and_rtnl(self, netns: str, key: int) -> tuple[Any, Any]: ...
    def marker_ok(self, marker: Any, key: int) -> bool: ...
    def netns_cookie(self, marker: Any) -> int: ...   # of the netns the marker lives in
    def attach_xdp(self, netns: str, ifname: str, pod_rtnl: Any = None) -> Any: ...
    def detach_xdp(self, netns: str, ifname: str) -> None: ...   # idempotent
    def xdp_attached(self, netns: str, ifname: str) -> bool: ...
    def tx_checksum_off(self, netns: str, ifname: str) -> None: ...
    def tx_checksum(self, netns: str, ifname: str) -> dict[str, bool]: ...   # must be off
    def addresses(self, netns: str, ifname: str) -> list[str]: ...
    def netns_addresses(self, netns_dir: str, proc_path: str | None = None
                        ) -> dict[str, list[tuple[str, str]]]: ...   # {netns: [(ifname, ip)]}


def netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_netns(rec: Record) -> bool:
    """The record's netns still exists and is the one it was enrolled in."""
    now = netns_id(rec.netns)
    return now is not None and (rec.netns_id is None or now == rec.netns_id)


def marked_ips(ips: tuple[str, ...]) -> tuple[str, ...]:
    """The IPs mb_mark_pod_ips holds for a pod: its first IPv4 and its
    first IPv6 address, IPv4 first (a pod may have more of one family)."""
    v4 = [ip for ip in ips if ":" not in ip]
    v6 = [ip for ip in ips if ":" in ip]
    return tuple(fam[0] for fam in (v4, v6) if fam)


def primary_ip(ips: tuple[str, ...]) -> str:
    v4 = [ip for ip in ips if ":" not in ip]
    return (v4 or list(ips))[0]


def map_full(exc: BaseException) -> bool:
    """A map update refused for lack of room (E2BIG from a full hash map; bcc
    reports it only in the message)."""
    return getattr(exc, "errno", None) in (7, 28) or any(
        m in str(exc) for m in ("Argument list too long", "No space left"))


def _quiet(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except KeyError:
        pass


class Enroller:
    """The kernel pieces of enrolments: ``maps`` (``bpf.maps.Maps``), ``podnet``
    (``PodNet``), ``lock`` (the registry's, held for every map write)."""

    def __init__(self, maps: Any, podnet: PodNet | None, lock: threading.RLock,
                 hardware_checksum: bool = False) -> None:
        self.maps, self.podnet, self._lock = maps, podnet, lock
        self.hardware_checksum = hardware_checksum
        self.markers: dict[str, Any] = {}            # container id -> open marker socket

    @property
    def net(self) -> PodNet:
        """The pod plumbing. Only CNI commands enrol pods, and CNI mode always has
        plumbing (without CNI mode, ``podnet`` is None and nothing here runs)."""
        if self.podnet is None:
            raise RuntimeError("no pod plumbing: pods are enrolled only in CNI mode")
        return self.podnet

    def apply(self, rec: Record, policy: Any, undo: list) -> None:
        """Create every piece of an enrolment, pushing its undo first-in-last-out."""
        with self._lock:
            self.maps.mark_pod_ips.put(rec.key, *marked_ips(rec.ips))
            undo.append(lambda: _quiet(self.maps.mark_pod_ips.delete, rec.key))
            for ip in rec.ips:
                self.maps.local_pods.put(ip, policy)
                undo.append(lambda ip=ip: _quiet(self.maps.local_pods.delete, ip))
        # one entry into the pod netns for both sockets
        marker, rtnl = self.net.open_marker_and_rtnl(rec.netns, rec.key)
        undo.append(rtnl.close)
        undo.append(marker.close)
        self.markers[rec.container_id] = marker
        undo.append(lambda: self.markers.pop(rec.container_id, None))
        # the cookie is saved with the "enrolled" record (one write less per
        # ADD): a restart finds an "adding" record's entries by its key anyway
        self.remember_netns(rec, marker)
        undo.append(lambda: self._forget_netns(rec))
        undo.append(lambda: self.net.detach_xdp(rec.netns, rec.ifname))
        try:   # tx checksum off first, in there
            self.net.attach_xdp(rec.netns, rec.ifname, pod_rtnl=rtnl)
        finally:
            rtnl.close()           # used and closed by the attach; never kept

    # -- mb_netns_pod: interception that does not depend on the listener -------
    def remember_netns(self, rec: Record, marker: Any) -> bool:
        """mb_netns_pod[cookie of the pod netns] = (pod IPs, key); True when the
        record's cookie changed (the registry saves it)."""
        cookie = int(self.net.netns_cookie(marker))
        with self._lock:
            self.maps.netns_pod.put(cookie, marked_ips(rec.ips), rec.key)
            if rec.netns_cookie == cookie:
                return False
            rec.netns_cookie = cookie
            return True

    def _forget_netns(self, rec: Record) -> None:
        """Remove rec's mb_netns_pod entries: by its cookie, and any entry the
        connect programs cached for its key (the same netns, normally)."""
        table = self.maps.netns_pod
        with self._lock:
            doomed = {rec.netns_cookie} if rec.netns_cookie else set()
            doomed.update(c for c, _, mark in table.items() if mark == rec.key)
            for cookie in doomed:
                table.delete(cookie)

    def ensure(self, rec: Record, policy: Any, fallback: Callable[[], Any]) -> bool:
        """Make an enrolled container's pieces present again (idempotent ADD,
        restart). ``policy`` None keeps a pinned policy, else writes
        ``fallback()``. True when the record's netns cookie changed."""
        with self._lock:
            self.maps.mark_pod_ips.put(rec.key, *marked_ips(rec.ips))
            for ip in rec.ips:
                if policy is not None:
                    self.maps.local_pods.put(ip, policy)
                elif self.maps.local_pods.get(ip) is None:
                    self.maps.local_pods.put(ip, fallback())
        marker = self.markers.get(rec.container_id)
        if marker is None or not self.net.marker_ok(marker, rec.key):
            if marker is not None:
                marker.close()
            marker = self.markers[rec.container_id] = self.net.open_marker(rec.netns, rec.key)
        changed = self.remember_netns(rec, marker)
        if not self.net.xdp_attached(rec.netns, rec.ifname):
            self.net.attach_xdp(rec.netns, rec.ifname)   # with tx checksum off
        elif not self.hardware_checksum:
            self.net.tx_checksum_off(rec.netns, rec.ifname)
        return changed

    def release(self, rec: Record) -> list[str]:
        """Close the container's marker and detach its inbound rewrite; the errors."""
        errors_ = []
        marker = self.markers.pop(rec.container_id, None)
        if marker is not None:
            marker.close()
        if same_netns(rec):
            try:
                self.net.detach_xdp(rec.netns, rec.ifname)
            except Exception as exc:
                if same_netns(rec):  # gone meanwhile: nothing left to detach
                    errors_.append(f"detach XDP in {rec.netns}: {exc}")
        return errors_

    def clear(self, rec: Record, used_elsewhere: Callable[[str], bool]) -> list[str]:
        """Remove the container's map entries (call it holding the lock); the errors.
        An IP another record still uses keeps its ``mb_local_pods`` entry."""
        errors_ = []
        with self._lock:
            for fn, arg in [(self.maps.mark_pod_ips.delete, rec.key)] + [
                    (self.maps.local_pods.delete, ip) for ip in rec.ips
                    if not used_elsewhere(ip)]:
                try:
                    _quiet(fn, arg)
                except Exception as exc:
                    errors_.append(f"delete map entry {arg}: {exc}")
            try:
                self._forget_netns(rec)
            except Exception as exc:
                errors_.append(f"netns cache of {rec.key:#x}: {exc}")
            for ip in rec.ips:
                try:
                    self.maps.pair_orig_dst.delete_ip(ip)  # recorded original destinations
                except Exception as exc:
                    errors_.append(f"flow state of {ip}: {exc}")
        return errors_

    def prune(self, records: list[Record]) -> None:
        """Remove the map entries none of ``records`` explains (after a restart)."""
        with self._lock:
            keys = {r.key for r in records}
            ips = {ip for r in records for ip in r.ips}
            for key, _ in list(self.maps.mark_pod_ips.items()):
                if key not in keys:
                    _quiet(self.maps.mark_pod_ips.delete, key)
            for ip, _ in list(self.maps.local_pods.items()):
                if ip not in ips:
                    _quiet(self.maps.local_pods.delete, ip)
            owned = {(r.key, primary_ip(r.ips)) for r in records if r.ips}
            for cookie, ip, mark in list(self.maps.netns_pod.items()):
                if (mark, ip) not in owned:
                    self.maps.netns_pod.delete(cookie)

    def problems(self, rec: Record) -> list[str]:
        out = []
        if rec.phase != ENROLLED:
            out.append(f"phase is {rec.phase}")
        if not same_netns(rec):
            return out + [f"netns {rec.netns} is gone"]
        want = marked_ips(rec.ips)
        if self.maps.mark_pod_ips.ips(rec.key) != want:
            out.append(f"mark_pod_ips[{rec.key:#x}] is not {', '.join(want)}")
        out += [f"local_pods has no {ip}" for ip in rec.ips
                if self.maps.local_pods.get(ip) is None]
        marker = self.markers.get(rec.container_id)
        if marker is None or not self.net.marker_ok(marker, rec.key):
            out.append("marker listener is not open")
        if not self.net.xdp_attached(rec.netns, rec.ifname):
            hook = "tc" if self.net.inbound_hook == "tc" else "XDP"
            out.append(f"{hook} is not attached to {rec.ifname}")
        entry = {c: (ips, mark)
                 for c, ips, mark in self.maps.netns_pod.all_items()}.get(rec.netns_cookie)
        if entry != (want, rec.key):
            out.append(f"netns_pod has no entry for netns cookie {rec.netns_cookie:#x} "
                       f"(key {rec.key:#x}, {', '.join(want)})")
        if not self.hardware_checksum:
            try:
                on = [name for name, enabled in
                      self.net.tx_checksum(rec.netns, rec.ifname).items() if enabled]
            except Exception as exc:
                out.append(f"cannot read the tx checksum offload of {rec.ifname}: {exc}")
            else:
                if on:
                    out.append(f"tx checksum offload is on for {rec.ifname} ({', '.join(on)}); "
                               "merbridge needs it off unless --hardware-checksum=true")
        return out


def failure(exc: BaseException, what: str) -> CniError:
    """The CniError of an ADD that failed after its undo stack ran."""
    if isinstance(exc, CniError):
        return exc
    if map_full(exc):
        return CniError(errors.NODE_FULL, "node pod limit reached",
                        f"a datapath map is full: {exc}"[:500])
    return CniError(errors.INTERNAL, f"enrolling {what} failed", f"{type(exc).__name__}: {exc}")
