"""Per-pod network plumbing of CNI mode: marker listener, the inbound rewrite
(tc or XDP, ``inbound_hook``), tx checksum.

``PodNet`` is the production implementation of the ``PodNet`` protocol
(``merbridge.daemon.enroll``, the registry's enroller drives it). It only orchestrates; the kernel work is
done by ``merbridge.daemon.netns`` (the pyroute2 module) and the XDP programs
come from the loader (``merbridge.bpf.loader.Datapath.xdp_programs()``), so
this module imports no third-party library.

Enrolling a pod's netns, in the order the registry calls it:

1. ``open_marker(netns, key)``: a listener on 39807 inside the pod netns with
   ``SO_MARK = key`` (the pod's key in ``mb_mark_pod_ips``). The registry keeps
   the returned socket open while the pod is enrolled.
2. ``attach_xdp(netns, ifname)``: tx checksum offload off on the pod interface
   first (unless ``hardware_checksum``: without it the egress rewrite corrupts
   the checksum the kernel completes later), then the egress program on the
   host-side veth peer, then the ingress program on the pod interface.
3. ``tx_checksum_off(netns, ifname)``: idempotent; already done by step 2.

Withdrawing: close the marker socket, ``detach_xdp(netns, ifname)`` (a netns or
interface that is already gone is fine).
"""
from __future__ import annotations

import os
import socket
import struct
from typing import Callable

from merbridge.bpf.mesh import MARK_LISTENER_PORT
from merbridge.daemon import netns
from merbridge.cni import errors
from merbridge.cni.errors import CniError

PodNetError = netns.PodNetnsError
SO_NETNS_COOKIE = 71  # linux/socket.h (5.14+); not in Python's socket module

#: "generic" (default): skb-mode XDP. On veth it keeps GRO/GSO, and measured
#: here (iperf3 remote -> node -> pod, 3 s runs) it carried 10.6-12.6 Gbit/s
#: towards the pod against 2.5-3.1 Gbit/s in native mode, where veth must hand
#: XDP single MTU-sized frames. "native": driver mode. "auto": native, falling
#: back to generic when the interface refuses it (e.g. an MTU too large for
#: single-buffer veth XDP). Both modes pass the same checksum-verified tests.
XDP_MODES = ("generic", "native", "auto")
#: where the inbound rewrite runs (--inbound-hook): "tc" (cls_bpf on the
#: host-side veth, tx checksum offload and TSO stay on) or "xdp"
#: (xdp_mode above, tx checksum offload off unless hardware_checksum).
#: deploy/README.md gives the measurements behind the default.
INBOUND_HOOKS = ("tc", "xdp")
DEFAULT_INBOUND_HOOK = "tc"


def _bad_ifname(ifname: str, exc: Exception) -> CniError:
    """CNI code 4: CNI_IFNAME is not the pod's end of a veth pair."""
    return CniError(errors.INVALID_ENVIRONMENT_VARIABLES, f"invalid CNI_IFNAME {ifname!r}",
                    str(exc)[:500])


def prog_id(fd: int) -> int:
    """The kernel id of the BPF program behind ``fd`` (from /proc fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise PodNetError(f"fd {fd} is not a BPF program")


class PodNet:
    """Pod plumbing for the registry.

    ``xdp_programs`` returns the (ingress fd, egress fd) pair, normally
    ``Datapath.xdp_programs``; it is called lazily, so the registry can be built
    before the programs are loaded. ``peer_netns`` is where the host-side
    veth peers live: None for the daemon's own netns (the node's, in
    production); tests pass their "node" netns path. ``inbound_hook`` defaults
    to "xdp" here so a caller that only has ``xdp_programs`` keeps working;
    the daemon passes its --inbound-hook (default DEFAULT_INBOUND_HOOK, tc)
    with ``tc_programs``.
    """

    def __init__(self, xdp_programs: Callable[[], tuple[int, int]], *,
                 xdp_mode: str = "generic", hardware_checksum: bool = False,
                 peer_netns: str | None = None, port: int = MARK_LISTENER_PORT,
                 listener_family: str = "dual", inbound_hook: str = "xdp",
                 tc_programs: Callable[[], tuple[int, int]] | None = None):
        if xdp_mode not in XDP_MODES:
            raise PodNetError(f"xdp mode must be one of {', '.join(XDP_MODES)}, got {xdp_mode!r}")
        if inbound_hook not in INBOUND_HOOKS:
            raise PodNetError(f"inbound hook must be one of {', '.join(INBOUND_HOOKS)}, "
                              f"got {inbound_hook!r}")
        if inbound_hook == "tc" and tc_programs is None:
            raise PodNetError("inbound hook tc needs tc_programs")
        self.inbound_hook, self._tc_programs = inbound_hook, tc_programs
        self._xdp_programs = xdp_programs
        self.xdp_mode, self.hardware_checksum = xdp_mode, hardware_checksum
        self.peer_netns, self.port, self.listener_family = peer_netns, port, listener_family

    # -- marker listener ---------------------------------------------------
    def open_marker(self, netns_path: str, key: int) -> socket.socket:
        return netns.open_marker_listener(netns_path, key, self.port, self.listener_family)

    def open_marker_and_rtnl(self, netns_path: str,
                             key: int) -> tuple[socket.socket, socket.socket]:
        """``open_marker`` plus an rtnetlink socket in the same netns, for
        ``attach_xdp(..., pod_rtnl=)``: an ADD enters the pod netns once."""
        return netns.open_marker_and_rtnl(netns_path, key, self.port, self.listener_family)

    def marker_ok(self, marker: socket.socket, key: int) -> bool:
        """Still open, still listening, still carrying ``key``."""
        try:
            return (marker.fileno() >= 0
                    and marker.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                    and marker.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == key)
        except OSError:
            return False

    # -- the inbound rewrite: tc or XDP ------------------------------------------
    # The registry calls attach_xdp / detach_xdp / xdp_attached whatever the
    # hook; with inbound_hook "tc" they do the tc work instead.
    def _tc_names(self) -> tuple[int, int, str, str]:
        from merbridge.bpf.loader import TC_FROM_POD, TC_TO_POD
        if self._tc_programs is None:   # only inbound hook "tc" calls this, and it has them
            raise PodNetError("inbound hook tc needs tc_programs")
        to_pod, from_pod = self._tc_programs()
        return (to_pod, from_pod, f"{TC_TO_POD}#{prog_id(to_pod)}",
                f"{TC_FROM_POD}#{prog_id(from_pod)}")

    def attach_tc(self, netns_path: str, ifname: str,
                  pod_rtnl: socket.socket | None = None) -> netns.XdpAttachment:
        """Both tc programs on the pod's host-side veth; the pod's tx checksum
        offload is left as it is (bpf_l4_csum_replace handles CHECKSUM_PARTIAL)."""
        try:
            return netns.attach_tc(netns_path, ifname, *self._tc_names(),
                                   peer_netns=self.peer_netns, pod_rtnl=pod_rtnl)
        except netns.NotPodVethError as exc:
            raise _bad_ifname(ifname, exc) from exc

    def attach_xdp(self, netns_path: str, ifname: str,
                   pod_rtnl: socket.socket | None = None) -> netns.XdpAttachment:
        """The inbound programs on the pod's veth pair (tc: attach_tc).
        ``pod_rtnl`` (``open_marker_and_rtnl``) is used by the tc hook and
        closed either way."""
        if self.inbound_hook == "tc":
            return self.attach_tc(netns_path, ifname, pod_rtnl)
        if pod_rtnl is not None:
            pod_rtnl.close()
        netns.detach_tc(netns_path, ifname, peer_netns=self.peer_netns)  # never both
        return self._attach_xdp(netns_path, ifname)

    def _attach_xdp(self, netns_path: str, ifname: str) -> netns.XdpAttachment:
        """Both XDP programs on the pod's veth pair; tx checksum offload off
        first (unless hardware_checksum), so no segment is rewritten unfinished.

        An interface that is not a veth with its peer in ``peer_netns`` (a bad
        CNI_IFNAME such as ``lo``) is refused with CNI code 4 before its tx
        checksum is touched; the check is part of the attach, so an ADD pays
        no extra netlink round trips for it."""
        def tx_off() -> None:
            netns.set_tx_checksum(netns_path, ifname, False)

        ingress, egress = self._xdp_programs()
        modes = ("native", "generic") if self.xdp_mode == "auto" else (self.xdp_mode,)
        for i, mode in enumerate(modes):
            try:
                return netns.attach_xdp(netns_path, ifname, ingress, egress, mode=mode,
                                        peer_netns=self.peer_netns,
                                        prepare=None if self.hardware_checksum or i else tx_off)
            except netns.NotPodVethError as exc:
                raise _bad_ifname(ifname, exc) from exc
            except PodNetError:
                if i == len(modes) - 1:
                    raise
        raise AssertionError("unreachable")

    def detach_xdp(self, netns_path: str, ifname: str) -> None:
        if self.inbound_hook == "tc":
            netns.detach_tc(netns_path, ifname, peer_netns=self.peer_netns)
        else:
            netns.detach_xdp(netns_path, ifname, peer_netns=self.peer_netns)

    def xdp_attached(self, netns_path: str, ifname: str) -> bool:
        """Are *our current* programs on both ends? (After a daemon restart the
        previous daemon's programs may still be attached; they are replaced.)"""
        if not os.path.exists(netns_path):
            return False
        if self.inbound_hook == "tc":
            try:
                _, _, to_pod, from_pod = self._tc_names()
                found = netns.tc_names(netns_path, ifname, self.peer_netns)
            except PodNetError:
                return False
            return found == {"to_pod": to_pod, "from_pod": from_pod}
        try:
            ingress, egress = (prog_id(fd) for fd in self._xdp_programs())
            pod_id, peer_id = netns.xdp_prog_ids(netns_path, ifname, self.peer_netns)
        except PodNetError:
            return False
        return pod_id == ingress and peer_id == egress

    # -- checksums, addresses ---------------------------------------------------
    def tx_checksum_off(self, netns_path: str, ifname: str) -> None:
        if self.inbound_hook == "xdp":
            netns.set_tx_checksum(netns_path, ifname, False)

    def tx_checksum(self, netns_path: str, ifname: str) -> dict[str, bool]:
        """The tx checksum offloads of the pod interface that must be off:
        {feature: enabled} (CHECK); none with the tc hook."""
        if self.inbound_hook == "tc":
            return {}
        return netns.tx_checksum(netns_path, ifname)

    def addresses(self, netns_path: str, ifname: str) -> list[str]:
        return netns.pod_addresses(netns_path, ifname)

    def netns_addresses(self, netns_dir: str,
                        proc_path: str | None = None) -> dict[str, list[tuple[str, str]]]:
        """The addresses in every named netns of ``netns_dir`` (``adopt``'s search);
        with ``proc_path`` also in the netns of every process on the node. Each
        namespace is read once and remembered by inode while it exists (``adopt``
        runs every second while a pod is unaccounted for)."""
        if proc_path is None:
            return netns.netns_addresses(netns_dir)
        cache = self.__dict__.setdefault("_netns_cache", {})
        seen = netns.node_netns(netns_dir, proc_path)
        for key in list(cache):
            if key not in seen:
                del cache[key]
        found = {}
        for key, path in seen.items():
            if key not in cache:
                addrs = netns.netns_addrs(path)
                if not addrs:      # not a netns, or not addressed yet: ask again next time
                    continue
                cache[key] = addrs
            found[path] = cache[key]
        return found

    # -- identity of the pod netns -------------------------------------------------
    def check_netns(self, netns_path: str) -> str:
        """Refuse anything but a pod's network namespace (see netns._open_netns)."""
        return netns.check_pod_netns(netns_path)

    def netns_cookie(self, marker: socket.socket) -> int:
        """The netns cookie of the namespace ``marker`` was created in (the pod's):
        the key of the pod's mb_netns_pod entry, which keeps it intercepted while
        no daemon holds the marker listener."""
        try:
            raw = marker.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise PodNetError(f"SO_NETNS_COOKIE: {e.strerror or e}") from None
        return struct.unpack("=Q", raw)[0]
