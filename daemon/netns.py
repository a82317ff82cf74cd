"""Pod network-namespace plumbing: the daemon's only module that talks netlink (pyroute2).
(Over 450 lines because the design keeps pyroute2 in this one product module.)

The daemon's per-pod work in CNI mode: a marker listener inside the pod
netns, XDP or tc on the pod's veth pair, tx checksum offload off, and the
read-only look-ups that find a pod's netns by address. Pod namespaces arrive
as *paths* (CNI_NETNS: /var/run/netns/NAME or /proc/PID/ns/net), so every
function takes a path.

Anything that must run *inside* a pod netns (creating the listener socket,
ethtool ioctls) runs on a fresh thread that setns()es and then exits: setns
with CLONE_NEWNET moves only the calling thread, so no long-lived daemon
thread ever sits in a pod netns. Netlink work opens its rtnetlink socket the
same way (a socket belongs to the netns it was created in). pyroute2's own
IPRoute(netns=path) forks a child for that, ~14 ms per call in a daemon of
~200 MB; the thread costs ~0.3 ms.

The requests of a CNI ADD/DEL (links, netns ids, tc, XDP) go through ``Rtnl``:
pyroute2's message classes build and read every message, and ``Rtnl`` sends
them and collects the answers itself, several in one send() where they go
together. pyroute2 0.9's request engine runs an asyncio loop for each request
and sets one up for each IPRoute. Measured in the daemon on this project's
2-core test machine (median of 44 ADDs): the inbound attach of an ADD (find
and verify the veth peer, clsact, both filters) took 8.6 ms through IPRoute
and 3.4 ms through ``Rtnl`` (0.28 ms per link query, 0.47 ms for the three
tc requests in one send); the daemon's whole ADD 14.0 ms and 9.4 ms.
"""
from __future__ import annotations

import ipaddress
import os
import socket as _socket
import stat as _stat
import struct as _struct
import sys as _sys
import threading as _threading
import time
from dataclasses import dataclass as _dataclass
from fcntl import ioctl as _ioctl
from typing import Callable, Sequence

from pyroute2 import IPRoute, netns as _netns
from pyroute2.ethtool import Ethtool as _Ethtool
from pyroute2.netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
                              NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (RTM_DELQDISC, RTM_DELTFILTER, RTM_GETADDR, RTM_GETLINK,
                                   RTM_GETNSID, RTM_GETTFILTER, RTM_NEWLINK, RTM_NEWQDISC,
                                   RTM_NEWTFILTER, TC_H_CLSACT)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg
from pyroute2.netlink.rtnl.tcmsg.sched_bpf import TCA_BPF_FLAG_ACT_DIRECT
from pyroute2.protocols import ETH_P_ALL

from merbridge.bpf.mesh import MARK_LISTENER_PORT


class NetnsError(RuntimeError):
    """A namespace operation failed; the message says which and why."""

_NS_GET_NSTYPE = 0xB703          # linux/nsfs.h: _IO(0xb7, 0x3)
_CLONE_NEWNET = 0x40000000       # os.CLONE_NEWNET needs Python 3.12
XDP_MODES = {"generic": 1 << 1, "native": 1 << 2}   # XDP_FLAGS_SKB_MODE / DRV_MODE
# IFLA_XDP_ATTACHED, as pyroute2 decodes it -> (our mode name, XDP flags)
_XDP_ATTACHED = {"xdp": ("native", 1 << 2), "xdpgeneric": ("generic", 1 << 1)}
# tx checksum features that leave a CHECKSUM_PARTIAL seed for later; the XDP
# egress rewrite needs every pod-sent segment to carry a finished checksum.
TX_CHECKSUM_FEATURES = ("tx-checksum-ipv4", "tx-checksum-ip-generic", "tx-checksum-ipv6")


class PodNetnsError(NetnsError):
    """A pod netns path or interface was refused, or pod plumbing failed."""


class NotPodVethError(PodNetnsError):
    """The pod's interface is missing, not a veth, or its peer is not in the
    node netns: no XDP program can go on it (a bad CNI_IFNAME, not a fault)."""


def _check_ifname(ifname: str) -> None:
    if (not isinstance(ifname, str) or not 0 < len(ifname) < 16
            or any(c in ifname for c in "/\0 \t\n:") or ifname in (".", "..")):
        raise PodNetnsError(f"bad interface name {ifname!r}")


def _open_netns(path: str, allow_own: bool = False) -> int:
    """Open ``path`` as a network namespace and return the fd (O_CLOEXEC).

    Refuses relative or non-normalised paths, anything that is not an nsfs
    network namespace (a regular file, a directory, another namespace type)
    and, unless ``allow_own``, the daemon's own netns: enrolling it would put
    XDP and a marker on the node itself.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise PodNetnsError(f"bad netns path {path!r}")
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise PodNetnsError(f"netns path must be absolute and normalised: {path!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise PodNetnsError(f"cannot open netns {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise PodNetnsError(f"{path} is not a network namespace file")
        try:
            nstype = _ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            raise PodNetnsError(f"{path} is not a namespace (not on nsfs)") from None
        if nstype != _CLONE_NEWNET:
            raise PodNetnsError(f"{path} is a namespace, but not a network namespace")
        own = os.stat("/proc/self/ns/net")
        if not allow_own and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            raise PodNetnsError(f"{path} is the daemon's own network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_pod_netns(path: str) -> str:
    """Validate a pod netns path (see ``_open_netns``); returns it unchanged."""
    os.close(_open_netns(path))
    return path


def _in_netns(path: str | None, fn, allow_own: bool = False):
    """Run ``fn()`` on a new thread inside netns ``path`` and return its result.

    The thread enters the namespace, runs ``fn`` and exits; it is never
    reused, so it does not need to find its way back. ``path=None`` runs
    ``fn`` here, in the caller's netns.
    """
    if path is None:
        return fn()
    fd = _open_netns(path, allow_own)
    box: dict = {}

    def body() -> None:
        try:
            _netns.setns(fd)  # this thread only; it exits afterwards
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    try:
        t = _threading.Thread(target=body, name="mb-netns-worker", daemon=True)
        t.start()
        t.join()
        # join() returns before the kernel has reaped the thread; wait for it,
        # so that no task of ours is in the pod netns when we return
        deadline = time.monotonic() + 2
        while os.path.exists(f"/proc/self/task/{t.native_id}") and time.monotonic() < deadline:
            time.sleep(0.00005)   # usually gone at the first or second look
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _rtnl_socket() -> _socket.socket:
    # SOCK_DGRAM: pyroute2's asyncio endpoint accepts only datagram sockets
    return _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, _socket.NETLINK_ROUTE)


class Rtnl:
    """Requests on one rtnetlink socket (see the module's docstring): each
    message is a pyroute2 message object, built by the caller; answers come
    back decoded with ``cls``. Owns and closes the socket."""

    #: no rtnetlink answer takes this long; a request still unanswered by
    #: then is a bug, reported rather than waited on forever
    TIMEOUT = 10.0

    def __init__(self, sock: _socket.socket) -> None:
        self.sock, self._seq = sock, 0
        sock.settimeout(self.TIMEOUT)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def exchange(self, requests: Sequence[tuple], cls=None) -> list[tuple[int, list]]:
        """Send ``requests`` (``(message, type, flags)`` each) in one send()
        and wait for every answer: ``[(errno, [decoded replies])]`` in order,
        errno 0 when the kernel acknowledged it (ask with NLM_F_ACK, or
        NLM_F_DUMP, whose end is NLMSG_DONE). The kernel handles each request
        whatever happened to the ones before it. At most one dump per call
        (the kernel refuses a second one while the first runs: EBUSY)."""
        out = bytearray()
        answers: dict[int, tuple[list, list]] = {}
        for msg, mtype, flags in requests:
            self._seq += 1
            header = msg["header"]
            header["type"], header["flags"] = mtype, flags
            header["sequence_number"], header["pid"] = self._seq, 0
            msg.encode()
            out += msg.data
            answers[self._seq] = ([0], [])
        try:
            self.sock.send(bytes(out))
            pending = set(answers)
            while pending:
                data = self.sock.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    length, mtype, _, seq = _struct.unpack_from("=IHHI", data, off)
                    if length < 16:
                        break
                    chunk = data[off:off + length]
                    off += (length + 3) & ~3
                    if seq not in pending:
                        continue
                    if mtype == NLMSG_ERROR:
                        answers[seq][0][0] = -_struct.unpack_from("=i", chunk, 16)[0]
                        pending.discard(seq)
                    elif mtype == NLMSG_DONE:
                        pending.discard(seq)
                    elif cls is not None:
                        reply = cls(chunk)
                        reply.decode()
                        answers[seq][1].append(reply)
        except OSError as e:
            raise PodNetnsError(f"rtnetlink: {e.strerror or e}") from None
        return [(code[0], replies) for code, replies in answers.values()]

    def request(self, msg, mtype: int, flags: int = 0, cls=None) -> list:
        """One acknowledged request; NetlinkError when the kernel refused it."""
        [(code, replies)] = self.exchange([(msg, mtype, NLM_F_REQUEST | NLM_F_ACK | flags)], cls)
        if code:
            raise NetlinkError(code)
        return replies

    def dump(self, msg, mtype: int, cls) -> list:
        [(code, replies)] = self.exchange([(msg, mtype, NLM_F_REQUEST | NLM_F_DUMP)], cls)
        if code:
            raise NetlinkError(code)
        return replies

    def netnsid(self, fd: int) -> int | None:
        """The id this socket's netns has for the netns open at ``fd``."""
        msg = nsidmsg()
        msg["attrs"] = [("NETNSA_FD", fd)]
        found = self.request(msg, RTM_GETNSID, cls=nsidmsg)
        return found[0].get_attr("NETNSA_NSID") if found else None


def rtnl_at(path: str | None, allow_own: bool = False) -> Rtnl:
    """An ``Rtnl`` whose socket lives in netns ``path`` (None: ours); validated as ``ipr_at``."""
    return Rtnl(_rtnl_socket() if path is None else _in_netns(path, _rtnl_socket, allow_own))


def ipr_at(path: str | None, allow_own: bool = False) -> IPRoute:
    """An IPRoute whose socket lives in netns ``path`` (None: ours). The path
    is validated by ``_open_netns``: nothing is ever created at it;
    ``allow_own`` accepts our own netns too. The caller closes it.

    Never kept between CNI requests: pyroute2 0.9 gives each *thread* that
    uses an IPRoute its own event loop (and, without ``use_socket``, its own
    socket), released only by close(); the socket server runs every request
    on a new thread, so a shared IPRoute leaked fds per request (the churn
    test's fd count caught it)."""
    if path is None:
        return IPRoute(groups=0)
    sock = _in_netns(path, _rtnl_socket, allow_own)
    try:
        return IPRoute(groups=0, use_socket=sock)  # IPRoute owns and closes it
    except BaseException:
        sock.close()
        raise


# ---- marker listener ---------------------------------------------------------

def open_marker_listener(netns_path: str, mark: int, port: int = MARK_LISTENER_PORT,
                         family: str = "dual",
                         _also: Callable[[], None] | None = None) -> _socket.socket:
    """Listen on ``port`` inside the pod netns with ``SO_MARK = mark``.

    The connect hooks find this socket with ``bpf_sk_lookup_tcp`` in the
    connecting socket's netns and read its mark: the pod's key in
    ``mb_mark_pod_ips``. ``family="dual"`` (default) is one ``[::]`` socket
    with IPV6_V6ONLY off, which IPv4 lookups of ``0.0.0.0:port`` find too;
    ``"ipv4"`` binds ``0.0.0.0`` only (for a netns without IPv6).

    The caller keeps the socket open for as long as the pod is enrolled (it
    is never accepted on); closing it removes the marker.
    """
    if not isinstance(mark, int) or not 0 < mark < 1 << 32:
        raise PodNetnsError(f"mark must be a non-zero 32-bit integer, got {mark!r}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise PodNetnsError(f"bad port {port!r}")
    if family not in ("dual", "ipv4"):
        raise PodNetnsError(f"family must be 'dual' or 'ipv4', got {family!r}")

    def make() -> _socket.socket:
        fam = _socket.AF_INET6 if family == "dual" else _socket.AF_INET
        s = _socket.socket(fam, _socket.SOCK_STREAM)
        try:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, mark)
            if fam == _socket.AF_INET6:
                s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
            else:
                s.bind(("0.0.0.0", port))
            s.listen(1)
            if _also is not None:
                _also()
        except BaseException:
            s.close()
            raise
        return s

    try:
        return _in_netns(netns_path, make)
    except OSError as e:
        raise PodNetnsError(
            f"marker listener on port {port} in {netns_path}: {e.strerror or e}") from None


def open_marker_and_rtnl(netns_path: str, mark: int, port: int = MARK_LISTENER_PORT,
                         family: str = "dual") -> tuple[_socket.socket, _socket.socket]:
    """``open_marker_listener`` and an rtnetlink socket in the same pod netns,
    made by one thread (an ADD enters the pod netns once, not twice). The
    caller closes the rtnetlink socket, or hands it to ``attach_tc``."""
    box: list[_socket.socket] = []

    def rtnl() -> None:
        box.append(_rtnl_socket())

    marker = open_marker_listener(netns_path, mark, port, family, _also=rtnl)
    return marker, box[0]


# ---- XDP on the pod's veth pair ---------------------------------------------

@_dataclass(frozen=True)
class XdpAttachment:
    """Where the pod's XDP programs went (for detach and for tests)."""
    netns: str              # pod netns path
    ifname: str             # pod-side interface
    ifindex: int
    peer_netns: str | None  # None: the daemon's own (node) netns
    peer_ifname: str
    peer_ifindex: int
    mode: str               # "native" | "generic"


def _link(rtnl: Rtnl, **match):
    """The link with this ``ifname`` or ``index``, or None. One RTM_GETLINK for
    that link (a dump would decode every link of the namespace: O(pods) in
    the node netns). A name no link can have (not UTF-8 -- CNI_IFNAME arrives
    surrogate-escaped --, or longer than IFNAMSIZ) is not found."""
    msg = ifinfmsg()
    name = match.get("ifname")
    if name is not None:
        try:
            if len(name.encode()) > 15:
                return None
        except UnicodeEncodeError:
            return None
        msg["attrs"] = [("IFLA_IFNAME", name)]
    else:
        msg["index"] = match["index"]
    try:
        found = rtnl.request(msg, RTM_GETLINK, cls=ifinfmsg)
    except NetlinkError as e:
        if e.code == 19 or (name is not None and e.code in (22, 34)):  # ENODEV; EINVAL/ERANGE
            return None
        raise
    return found[0] if found else None


def _veth_kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _find_peer(pod_rtnl: Rtnl, peer_rtnl: Rtnl, netns_path: str, ifname: str,
               peer_netns: str | None):
    """(pod link, peer link) of the pod's veth, verified from both sides.

    The pod side names its peer by IFLA_LINK (an index in another netns,
    IFLA_LINK_NETNSID). We look that index up in ``peer_netns`` and accept it
    only if it is a veth pointing back at the pod link and the nsid really
    denotes ``peer_netns``, so an unrelated veth with a colliding index in
    the node netns is never touched. ``pod_rtnl``/``peer_rtnl`` are open in
    the pod's and in ``peer_netns``: one rtnetlink socket per namespace serves
    the whole attach or detach.
    """
    pod = _link(pod_rtnl, ifname=ifname)
    if pod is None:
        raise NotPodVethError(f"no interface {ifname} in {netns_path}")
    if _veth_kind(pod) != "veth":
        raise NotPodVethError(f"{ifname} in {netns_path} is not a veth")
    nsid = pod.get_attr("IFLA_LINK_NETNSID")
    peer_fd = os.open(peer_netns or "/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        want = pod_rtnl.netnsid(peer_fd)
    finally:
        os.close(peer_fd)
    if nsid is None or want is None or want != nsid:
        raise NotPodVethError(
            f"the peer of {ifname} in {netns_path} is not in {peer_netns or 'the node netns'}")
    peer = _link(peer_rtnl, index=pod.get_attr("IFLA_LINK"))
    if peer is None or _veth_kind(peer) != "veth" or peer.get_attr("IFLA_LINK") != pod["index"]:
        raise NotPodVethError(f"cannot find the host-side peer of {ifname} in {netns_path}")
    return pod, peer


def _xdp_of(link) -> tuple[int, str]:
    """(program id, "native"/"generic"/"other") attached to ``link``; (0, "") if none."""
    xdp = link.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp else None
    if not attached:
        return 0, ""
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0, _XDP_ATTACHED.get(attached, ("other", 0))[0]


def _set_xdp(rtnl: Rtnl, index: int, fd: int, flags: int) -> None:
    msg = ifinfmsg()
    msg["index"] = index
    msg["attrs"] = [("IFLA_XDP", {"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})]
    rtnl.request(msg, RTM_NEWLINK)


def _clear_xdp(rtnl: Rtnl, link) -> None:
    """Remove whatever XDP program ``link`` (as last read) has attached, if any."""
    xdp = link.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp else None
    if attached in _XDP_ATTACHED:
        _set_xdp(rtnl, link["index"], -1, _XDP_ATTACHED[attached][1])


def attach_xdp(netns_path: str, ifname: str, ingress_fd: int, egress_fd: int,
               mode: str = "native", peer_netns: str | None = None,
               prepare: Callable[[], None] | None = None) -> XdpAttachment:
    """Attach ``ingress_fd`` to the pod's ``ifname`` and ``egress_fd`` to its
    host-side veth peer, which lives in ``peer_netns`` (None: this process's
    netns, the node's in production).

    A program already attached to either interface is replaced (after a
    daemon restart that is our own old one: netlink XDP attachments outlive
    the process that made them). The egress side goes first so that no SYN
    is redirected before its reply can be rewritten back; if the ingress
    attach fails the egress one is removed again. ``prepare`` runs once the
    pair is verified (NotPodVethError otherwise) and before anything is
    attached: PodNet turns tx checksum offload off there.
    """
    _check_ifname(ifname)
    if mode not in XDP_MODES:
        raise PodNetnsError(f"XDP mode must be one of {', '.join(XDP_MODES)}, got {mode!r}")
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        pod, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
        if prepare is not None:
            prepare()
        try:
            _set_xdp(peer_rtnl, peer["index"], egress_fd, XDP_MODES[mode])
            _set_xdp(pod_side, pod["index"], ingress_fd, XDP_MODES[mode])
        except NetlinkError as e:
            again = _link(peer_rtnl, index=peer["index"])
            if again is not None:
                _clear_xdp(peer_rtnl, again)
            raise PodNetnsError(f"attach XDP ({mode}) to {ifname} in {netns_path}: "
                                f"{os.strerror(e.code)}") from None
    return XdpAttachment(netns_path, ifname, pod["index"], peer_netns,
                         peer.get_attr("IFLA_IFNAME"), peer["index"], mode)


def detach_xdp(netns_path: str, ifname: str, peer_netns: str | None = None) -> bool:
    """Remove XDP from the pod's interface and its peer. Idempotent: a pod
    netns or interface that is already gone (CNI DEL after teardown) is fine.
    Returns False when there was nothing left to detach."""
    _check_ifname(ifname)
    if not os.path.exists(netns_path):
        return False
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        try:
            pod, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
        except PodNetnsError:
            # the peer cannot be proven ours: clear only the pod side
            link = _link(pod_side, ifname=ifname)
            if link is None:
                return False
            _clear_xdp(pod_side, link)
            return True
        _clear_xdp(pod_side, pod)
        _clear_xdp(peer_rtnl, peer)
    return True


def xdp_prog_id(netns_path: str | None, ifname: str, allow_own: bool = False) -> tuple[int, str]:
    """(program id, "native"/"generic"/"") attached to ``ifname``; (0, "") if none."""
    _check_ifname(ifname)
    with rtnl_at(netns_path, allow_own) as rtnl:
        link = _link(rtnl, ifname=ifname)
    if link is None:
        raise PodNetnsError(f"no interface {ifname} in {netns_path}")
    return _xdp_of(link)


def xdp_prog_ids(netns_path: str, ifname: str, peer_netns: str | None = None) -> tuple[int, int]:
    """Program ids attached to the pod's ``ifname`` and to its host-side peer (0: none)."""
    _check_ifname(ifname)
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        pod, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
    return _xdp_of(pod)[0], _xdp_of(peer)[0]


def peer_of(netns_path: str, ifname: str, peer_netns: str | None = None) -> str:
    """Name of the host-side veth peer of the pod's ``ifname`` (in ``peer_netns``)."""
    _check_ifname(ifname)
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        return _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)[1] \
            .get_attr("IFLA_IFNAME")


# ---- tc (cls_bpf, direct action) on the pod's host-side veth ----------------
#
# --inbound-hook=tc: both programs on the host-side peer, in a clsact qdisc:
# parent ffff:fff3 (egress: towards the pod) and ffff:fff2 (ingress: from the
# pod). Our filters have their own priority and handle, so they are replaced
# in place (a restarted daemon's new programs, no window without a rewrite)
# and removed without touching anybody else's. The filter name carries the
# program id ("mb_tc_to_pod#1234"): pyroute2 0.9 does not decode TCA_BPF_ID.

TC_PRIO = 0x4D42                 # "MB"
TC_HANDLE = 1
TC_PARENTS = {"to_pod": 0xFFFFFFF3, "from_pod": 0xFFFFFFF2}   # clsact egress / ingress


def _filter_msg(index: int, parent: int, kind: str | None = None) -> tcmsg:
    """A tc filter message for our filter in ``parent`` of ``index``."""
    msg = tcmsg()
    msg["index"], msg["parent"] = index, parent
    if kind is not None:
        msg["handle"] = TC_HANDLE
        msg["info"] = _socket.htons(ETH_P_ALL) | (TC_PRIO << 16)
        msg["attrs"] = [("TCA_KIND", kind)]
    return msg


def _clsact_msg(index: int) -> tcmsg:
    msg = tcmsg()
    msg["index"], msg["handle"], msg["parent"] = index, TC_H_CLSACT & 0xFFFF0000, TC_H_CLSACT
    msg["attrs"] = [("TCA_KIND", "clsact")]
    return msg


def _clsact_filters(rtnl: Rtnl, index: int):
    """(``TC_PARENTS`` key, filter message) of every filter in the clsact of ``index``.
    One dump at a time: a socket runs one dump, a second one meanwhile is EBUSY."""
    for where, parent in TC_PARENTS.items():
        try:
            found = rtnl.dump(_filter_msg(index, parent), RTM_GETTFILTER, tcmsg)
        except NetlinkError as e:
            if e.code in (2, 22, 19):  # no clsact (ENOENT/EINVAL), no device
                continue
            raise
        for f in found:
            if f.get_attr("TCA_KIND"):
                yield where, f


def _ours(f) -> bool:
    return f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == TC_PRIO


def _tc_filters(rtnl: Rtnl, index: int) -> dict[str, str]:
    """{"to_pod"/"from_pod": filter name} of our filters on ``index``."""
    out = {}
    for where, f in _clsact_filters(rtnl, index):
        if _ours(f):
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts else None
            if name:
                out[where] = name
    return out


def _clear_tc(rtnl: Rtnl, index: int) -> None:
    """Remove our filters from ``index`` (and the clsact qdisc if nothing else
    is left in it). Nothing of ours there is fine. The filters are listed
    first: when nobody else's is there, deleting the qdisc removes ours with
    it (one change instead of three, each under the kernel's rtnl lock)."""
    found = [_ours(f) for _, f in _clsact_filters(rtnl, index)]
    ours, others = any(found), not all(found)
    if others:
        steps = [(_filter_msg(index, parent, "bpf"), RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK)
                 for parent in (TC_PARENTS.values() if ours else ())]
    else:
        steps = [(_clsact_msg(index), RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK)]
    for code, _ in rtnl.exchange(steps):
        if code not in (0, 2, 22, 19):
            raise NetlinkError(code)


def attach_tc(netns_path: str, ifname: str, to_pod_fd: int, from_pod_fd: int,
              to_pod_name: str, from_pod_name: str,
              peer_netns: str | None = None,
              pod_rtnl: _socket.socket | None = None) -> XdpAttachment:
    """Attach the tc programs to the host-side veth peer of the pod's
    ``ifname`` (verified as for XDP: NotPodVethError otherwise). The
    from-pod side goes first, so that no SYN is redirected before its reply
    can be rewritten back. An XDP program of ours left on the pair (a daemon
    that ran with --inbound-hook=xdp) is removed: the two must not stack. The
    pod's tx checksum offload is not touched. ``pod_rtnl``: an rtnetlink
    socket already open in the pod netns (``open_marker_and_rtnl``), which is
    used and closed instead of opening one. The clsact qdisc and both filters
    go to the kernel in one send()."""
    _check_ifname(ifname)
    pod_side = rtnl_at(netns_path) if pod_rtnl is None else Rtnl(pod_rtnl)
    with pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        pod, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
        index = peer["index"]
        steps = [(_clsact_msg(index), RTM_NEWQDISC,
                  NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)]
        for fd, name, parent in ((from_pod_fd, from_pod_name, TC_PARENTS["from_pod"]),
                                 (to_pod_fd, to_pod_name, TC_PARENTS["to_pod"])):
            msg = _filter_msg(index, parent, "bpf")
            msg["attrs"].append(("TCA_OPTIONS", {"attrs": [
                ("TCA_BPF_CLASSID", 1), ("TCA_BPF_FD", fd), ("TCA_BPF_NAME", name),
                ("TCA_BPF_FLAGS", TCA_BPF_FLAG_ACT_DIRECT)]}))
            steps.append((msg, RTM_NEWTFILTER,
                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE))
        # EEXIST for the qdisc: ours from before, or somebody else's
        failed = [code for i, (code, _) in enumerate(peer_rtnl.exchange(steps))
                  if code and not (i == 0 and code == 17)]
        if failed:
            _clear_tc(peer_rtnl, index)
            raise PodNetnsError(f"attach tc to the peer of {ifname} in {netns_path}: "
                                f"{os.strerror(failed[0])}")
        _clear_xdp(peer_rtnl, peer)
        _clear_xdp(pod_side, pod)
    return XdpAttachment(netns_path, ifname, pod["index"], peer_netns,
                         peer.get_attr("IFLA_IFNAME"), index, "tc")


def detach_tc(netns_path: str, ifname: str, peer_netns: str | None = None) -> bool:
    """Remove our tc filters from the pod's host-side peer. Idempotent, as
    detach_xdp: a pod netns or interface already gone is fine."""
    _check_ifname(ifname)
    if not os.path.exists(netns_path):
        return False
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        try:
            _, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
        except PodNetnsError:
            return False
        _clear_tc(peer_rtnl, peer["index"])
    return True


def tc_filter_names(netns_path: str | None, ifname: str,
                    allow_own: bool = False) -> dict[str, str]:
    """{"to_pod"/"from_pod": filter name} of our tc filters on ``ifname``."""
    _check_ifname(ifname)
    with rtnl_at(netns_path, allow_own) as rtnl:
        link = _link(rtnl, ifname=ifname)
        if link is None:
            raise PodNetnsError(f"no interface {ifname} in {netns_path}")
        return _tc_filters(rtnl, link["index"])


def tc_names(netns_path: str, ifname: str, peer_netns: str | None = None) -> dict[str, str]:
    """{"to_pod"/"from_pod": filter name} of our tc filters on the pod's peer."""
    _check_ifname(ifname)
    with rtnl_at(netns_path) as pod_side, rtnl_at(peer_netns, allow_own=True) as peer_rtnl:
        _, peer = _find_peer(pod_side, peer_rtnl, netns_path, ifname, peer_netns)
        return _tc_filters(peer_rtnl, peer["index"])


# ---- tx checksum offload -----------------------------------------------------

def tx_checksum(netns_path: str | None, ifname: str) -> dict[str, bool]:
    """The state of the interface's tx checksum features (those it has)."""
    _check_ifname(ifname)

    def get() -> dict[str, bool]:
        with _Ethtool() as et:
            feats = et.get_features(ifname).features
        return {n: bool(feats[n].enable) for n in TX_CHECKSUM_FEATURES
                if n in feats and feats[n].available}

    try:
        return _in_netns(netns_path, get)
    except OSError as e:
        raise PodNetnsError(f"ethtool {ifname} in {netns_path}: {e.strerror or e}") from None


def set_tx_checksum(netns_path: str, ifname: str, enabled: bool) -> dict[str, bool]:
    """Turn the tx checksum offloads of ``ifname`` in the pod netns on or off
    (``ethtool -K IF tx on|off``) and return the resulting state.

    Off is what CNI mode needs unless the operator vouches for the hardware
    (``--hardware-checksum``): with offload on, the pod's segments leave with a
    pseudo-header seed in the checksum field, the XDP egress rewrite patches
    that seed, and the checksum completed later is wrong. The kernel also
    drops TSO with tx checksumming, which is the price.
    """
    _check_ifname(ifname)

    def toggle() -> dict[str, bool]:
        with _Ethtool() as et:
            fs = et.get_features(ifname)
            for name in TX_CHECKSUM_FEATURES:
                f = fs.features.get(name)
                if f is not None and f.available:
                    f.enable = bool(enabled)
            et.set_features(ifname, fs)
            feats = et.get_features(ifname).features
        return {n: bool(feats[n].enable) for n in TX_CHECKSUM_FEATURES
                if n in feats and feats[n].available}

    try:
        state = _in_netns(netns_path, toggle)
    except OSError as e:
        raise PodNetnsError(f"ethtool -K {ifname} tx in {netns_path}: {e.strerror or e}") from None
    if any(v != bool(enabled) for v in state.values()):
        raise PodNetnsError(f"{ifname} in {netns_path} refused tx checksum {enabled}: {state}")
    return state


def pod_addresses(netns_path: str, ifname: str) -> list[str]:
    """The global (non link-local) IPs of ``ifname`` in the pod netns, IPv4 first."""
    _check_ifname(ifname)
    with rtnl_at(netns_path) as rtnl:
        link = _link(rtnl, ifname=ifname)
        if link is None:
            raise PodNetnsError(f"no interface {ifname} in {netns_path}")
        found = [a.get_attr("IFA_ADDRESS") for a in rtnl.dump(ifaddrmsg(), RTM_GETADDR, ifaddrmsg)
                 if a["index"] == link["index"]]
    ips = [ipaddress.ip_address(a) for a in found if a]
    ips = [ip for ip in ips if not ip.is_link_local]
    return [str(ip) for ip in sorted(ips, key=lambda ip: ip.version)]


def netns_addresses(netns_dir: str) -> dict[str, list[tuple[str, str]]]:
    """``{netns path: [(ifname, ip), ...]}`` of the named network namespaces in
    ``netns_dir``: the addresses on each interface but ``lo``, as canonical text.

    The caller's own netns and anything that is not a network namespace are
    left out, and so is a namespace removed while it is read (a directory
    shared with others changes under us). A missing directory has none (the
    runtime creates it with its first pod). Only reads: nothing is created or
    changed in any namespace.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for path in _named_netns(netns_dir):
        addrs = netns_addrs(path)
        if addrs is not None:
            found[path] = addrs
    return found


def _named_netns(netns_dir: str) -> list[str]:
    netns_dir = os.path.abspath(netns_dir)
    try:
        names = sorted(os.listdir(netns_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise PodNetnsError(f"cannot list netns directory {netns_dir}: {e.strerror}") from None
    return [os.path.join(netns_dir, name) for name in names]


def netns_addrs(path: str) -> list[tuple[str, str]] | None:
    """``[(ifname, ip), ...]`` in netns ``path`` but on ``lo``; None when ``path``
    is not (or no longer) a network namespace other than ours."""
    try:
        with ipr_at(path) as ipr:
            ifnames = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            addrs = [(ifnames.get(a["index"]), a.get_attr("IFA_ADDRESS"))
                     for a in ipr.get_addr()]
    except (PodNetnsError, OSError, NetlinkError):
        return None
    return [(ifname, str(ipaddress.ip_address(ip))) for ifname, ip in addrs
            if ifname and ifname != "lo" and ip]


def node_netns(netns_dir: str, proc_path: str) -> dict[tuple[int, int], str]:
    """``{(st_dev, st_ino): path}`` of every network namespace in use on the node:
    the named ones in ``netns_dir`` (their path is what the runtime's CNI calls
    carry), then those only a process holds, as ``<proc_path>/<pid>/ns/net``
    (a runtime that does not name its pod namespaces, or a name removed while
    the pod runs). Our own netns is left out. Only stat() calls."""
    found: dict[tuple[int, int], str] = {}
    own = os.stat("/proc/self/ns/net")
    paths = _named_netns(netns_dir)
    try:
        pids = sorted((e for e in os.listdir(proc_path) if e.isdigit()), key=int)
    except OSError:
        pids = []
    paths += [os.path.join(proc_path, pid, "ns", "net") for pid in pids]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue          # gone meanwhile, or not ours to see
        key = (st.st_dev, st.st_ino)
        if key != (own.st_dev, own.st_ino) and _stat.S_ISREG(st.st_mode):
            found.setdefault(key, path)
    return found


#: getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) (Linux 5.14): the cookie
#: bpf_get_netns_cookie() gives the datapath for the same namespace
SO_NETNS_COOKIE = 71


def netns_cookie(path: str) -> int:
    """The kernel's cookie of the network namespace ``path`` (the key of
    ``mb_netns_ip`` and ``mb_netns_pod``), from a socket made inside it."""
    def get() -> int:
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(_socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                  _sys.byteorder)
    return _in_netns(path, get)


def find_netns_cookie(netns_dir: str, ips: Sequence[str]) -> int | None:
    """The cookie of the one named netns in ``netns_dir`` whose interfaces carry
    all of ``ips``; None when none or several do. Only reads."""
    want = {str(ipaddress.ip_address(ip)) for ip in ips}
    found = [path for path, addrs in netns_addresses(netns_dir).items()
             if want <= {ip for _, ip in addrs}]
    return netns_cookie(found[0]) if len(found) == 1 else None
