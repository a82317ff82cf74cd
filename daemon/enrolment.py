"""The kernel pieces of one enrolment, and how they are undone and checked.

Split from the registry (``pods.py``): ``Pieces`` is a mixin of ``Registry``
holding the per-container work -- map entries, the marker listener, the
``mb_netns_pod`` entry that keeps a pod intercepted while no daemon holds
its listener, XDP and tx checksum -- in the three forms the registry needs:
``_apply`` (all-or-nothing, with an undo stack), ``_ensure`` (idempotent
repair: repeated ADD, restart) and ``_withdraw`` (DEL), plus ``_problems``
(CHECK). It relies on the registry's ``maps``, ``podnet``, ``records``,
``markers``, ``_lock``, ``_save`` (``_snapshot``, ``_write``), ``_policy``,
``lookup``, ``mesh`` and ``hardware_checksum``.

A pod's mark maps to its IPs, one per family (``_marked_ips``): the connect
programs bind a redirected connection to the pod IP of its family, so a
dual-stack pod's IPv6 connections are as unique on the node as its IPv4 ones.

Also here: ``PodError`` and the CNI codes (re-exported by ``pods``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from merbridge.daemon import annotations
from merbridge.daemon.state import ENROLLED, Record

log = logging.getLogger("merbridge.daemon.pods")

# CNI codes (the spec's, and ours from 100 up)
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
INVALID_NETNS = 8
INVALID_ENVIRONMENT = 4
INTERNAL = 999
INVALID_ANNOTATIONS = 101
NO_POD_IP = 102
NOT_ENROLLED = 103
NODE_FULL = 104

#: mark keys stay in 1..2^31-1 (see the module docstring)
KEY_MASK = 0x7FFFFFFF
#: what a malformed manifest raises in the annotation parsers
_BAD_MANIFEST = (ValueError, TypeError, AttributeError, KeyError)


class PodError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details


def netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Pieces:
    def _apply(self, rec: Record, policy, undo: list) -> None:
        """Create every piece of an enrolment, pushing its undo first-in-last-out."""
        with self._lock:
            self.maps.mark_pod_ips.put(rec.key, *self._marked_ips(rec.ips))
            undo.append(lambda: self._quiet(self.maps.mark_pod_ips.delete, rec.key))
            for ip in rec.ips:
                self.maps.local_pods.put(ip, policy)
                undo.append(lambda ip=ip: self._quiet(self.maps.local_pods.delete, ip))
        both = getattr(self.podnet, "open_marker_and_rtnl", None)
        if both is not None:       # one entry into the pod netns for both sockets
            marker, rtnl = both(rec.netns, rec.key)
            undo.append(rtnl.close)
        else:
            marker, rtnl = self.podnet.open_marker(rec.netns, rec.key), None
        undo.append(marker.close)
        self.markers[rec.container_id] = marker
        undo.append(lambda: self.markers.pop(rec.container_id, None))
        # the cookie is saved with the "enrolled" record (one write less per
        # ADD): a restart finds an "adding" record's entries by its key anyway
        self._remember_netns(rec, marker, save=False)
        undo.append(lambda: self._forget_netns(rec))
        undo.append(lambda: self.podnet.detach_xdp(rec.netns, rec.ifname))
        if rtnl is None:
            self.podnet.attach_xdp(rec.netns, rec.ifname)   # tx checksum off first, in there
        else:
            try:
                self.podnet.attach_xdp(rec.netns, rec.ifname, pod_rtnl=rtnl)
            finally:
                rtnl.close()       # used and closed by the attach; never kept

    # -- mb_netns_pod: interception that does not depend on the listener -------
    def _netns_pods(self):
        return getattr(self.maps, "netns_pod", None)

    def _remember_netns(self, rec: Record, marker: Any, save: bool = True) -> None:
        """mb_netns_pod[cookie of the pod netns] = (pod IPs, key); the record's
        new cookie is saved unless ``save`` is False (the caller saves next)."""
        cookie_of = getattr(self.podnet, "netns_cookie", None)
        table = self._netns_pods()
        if cookie_of is None or table is None:
            return
        cookie = int(cookie_of(marker))
        with self._lock:
            table.put(cookie, self._marked_ips(rec.ips), rec.key)
            if rec.netns_cookie != cookie:
                rec.netns_cookie = cookie
                if save:
                    self._save()

    def _forget_netns(self, rec: Record) -> None:
        """Remove rec's mb_netns_pod entries: by its cookie, and any entry the
        connect programs cached for its key (the same netns, normally)."""
        table = self._netns_pods()
        if table is None:
            return
        with self._lock:
            doomed = {rec.netns_cookie} if rec.netns_cookie else set()
            doomed.update(c for c, _, mark in table.items() if mark == rec.key)
            for cookie in doomed:
                table.delete(cookie)

    @staticmethod
    def _marked_ips(ips: tuple[str, ...]) -> tuple[str, ...]:
        """The IPs mb_mark_pod_ips holds for a pod: its first IPv4 and its
        first IPv6 address, IPv4 first (a pod may have more of one family)."""
        v4 = [ip for ip in ips if ":" not in ip]
        v6 = [ip for ip in ips if ":" in ip]
        return tuple(fam[0] for fam in (v4, v6) if fam)

    @staticmethod
    def _quiet(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except KeyError:
            pass

    def _ensure(self, rec: Record, policy=None) -> None:
        """Make an enrolled container's pieces present again (idempotent ADD, restart)."""
        with self._lock:
            self.maps.mark_pod_ips.put(rec.key, *self._marked_ips(rec.ips))
            for ip in rec.ips:
                if policy is not None:
                    self.maps.local_pods.put(ip, policy)
                elif self.maps.local_pods.get(ip) is None:
                    self.maps.local_pods.put(ip, self._fallback_policy(rec))
        marker = self.markers.get(rec.container_id)
        if marker is None or not self.podnet.marker_ok(marker, rec.key):
            if marker is not None:
                marker.close()
            marker = self.markers[rec.container_id] = self.podnet.open_marker(rec.netns,
                                                                               rec.key)
        self._remember_netns(rec, marker)
        if not self.podnet.xdp_attached(rec.netns, rec.ifname):
            self.podnet.attach_xdp(rec.netns, rec.ifname)   # with tx checksum off
        elif not self.hardware_checksum:
            self.podnet.tx_checksum_off(rec.netns, rec.ifname)

    def _fallback_policy(self, rec: Record):
        pod = self.lookup(rec.namespace, rec.name)
        if pod is not None:
            try:
                return self._policy(pod)
            except PodError:
                log.error("pod %s/%s: bad annotations, using the mesh defaults",
                          rec.namespace, rec.name)
        return annotations.pod_policy({"metadata": {"namespace": rec.namespace,
                                                    "name": rec.name}}, self.mesh)

    def _withdraw(self, rec: Record) -> None:
        errors = []
        marker = self.markers.pop(rec.container_id, None)
        if marker is not None:
            marker.close()
        if self._same_netns(rec):
            try:
                self.podnet.detach_xdp(rec.netns, rec.ifname)
            except Exception as exc:
                if self._same_netns(rec):  # gone meanwhile: nothing left to detach
                    errors.append(f"detach XDP in {rec.netns}: {exc}")
        with self._lock:
            for fn, arg in [(self.maps.mark_pod_ips.delete, rec.key)] + [
                    (self.maps.local_pods.delete, ip) for ip in rec.ips
                    if not self._ip_used_elsewhere(ip, rec.container_id)]:
                try:
                    self._quiet(fn, arg)
                except Exception as exc:
                    errors.append(f"delete map entry {arg}: {exc}")
            try:
                self._forget_netns(rec)
            except Exception as exc:
                errors.append(f"netns cache of {rec.key:#x}: {exc}")
            flows = getattr(self.maps, "pair_orig_dst", None)
            for ip in rec.ips if flows is not None else ():
                try:
                    flows.delete_ip(ip)    # recorded original destinations of its flows
                except Exception as exc:
                    errors.append(f"flow state of {ip}: {exc}")
            if errors:
                raise PodError(INTERNAL, f"removing container {rec.container_id}",
                               "; ".join(errors))
            self.records.pop(rec.container_id, None)
            snapshot = self._snapshot()
        self._write(snapshot)
        log.info("withdrew %s/%s container %s", rec.namespace, rec.name, rec.container_id)

    def _ip_used_elsewhere(self, ip: str, cid: str) -> bool:
        return any(ip in r.ips for c, r in self.records.items() if c != cid)

    def _same_netns(self, rec: Record) -> bool:
        now = netns_id(rec.netns)
        return now is not None and (rec.netns_id is None or now == rec.netns_id)

    def _problems(self, rec: Record) -> list[str]:
        out = []
        if rec.phase != ENROLLED:
            out.append(f"phase is {rec.phase}")
        if not self._same_netns(rec):
            return out + [f"netns {rec.netns} is gone"]
        want = self._marked_ips(rec.ips)
        if self.maps.mark_pod_ips.ips(rec.key) != want:
            out.append(f"mark_pod_ips[{rec.key:#x}] is not {', '.join(want)}")
        out += [f"local_pods has no {ip}" for ip in rec.ips
                if self.maps.local_pods.get(ip) is None]
        marker = self.markers.get(rec.container_id)
        if marker is None or not self.podnet.marker_ok(marker, rec.key):
            out.append("marker listener is not open")
        if not self.podnet.xdp_attached(rec.netns, rec.ifname):
            hook = "tc" if getattr(self.podnet, "inbound_hook", "xdp") == "tc" else "XDP"
            out.append(f"{hook} is not attached to {rec.ifname}")
        table = self._netns_pods()
        if table is not None and getattr(self.podnet, "netns_cookie", None) is not None:
            entry = {c: (ips, mark) for c, ips, mark in table.all_items()}.get(rec.netns_cookie)
            if entry != (want, rec.key):
                out.append(f"netns_pod has no entry for netns cookie {rec.netns_cookie:#x} "
                           f"(key {rec.key:#x}, {', '.join(want)})")
        tx_checksum = getattr(self.podnet, "tx_checksum", None)
        if tx_checksum is not None and not self.hardware_checksum:
            try:
                on = [name for name, enabled in tx_checksum(rec.netns, rec.ifname).items()
                      if enabled]
            except Exception as exc:
                out.append(f"cannot read the tx checksum offload of {rec.ifname}: {exc}")
            else:
                if on:
                    out.append(f"tx checksum offload is on for {rec.ifname} ({', '.join(on)}); "
                               "merbridge needs it off unless --hardware-checksum=true")
        return out


def map_full(exc: BaseException) -> bool:
    """A map update refused for lack of room (E2BIG from a full hash map; bcc
    reports it only in the message)."""
    return getattr(exc, "errno", None) in (7, 28) or any(
        m in str(exc) for m in ("Argument list too long", "No space left"))
