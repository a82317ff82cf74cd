"""CNI-mode pod plumbing in a real pod netns: the marker listener (SO_MARK),
netns path validation, tx checksum offload, veth peer discovery, XDP attach and
detach through PodNet (the rewrite itself is tested in test_xdp.py)."""
import os
import re
import socket
import subprocess
import threading

import pytest

from merbridge.bpf import loader, mesh
from merbridge.bpf.mesh import MARK_LISTENER_PORT
from merbridge.daemon import netns, podnet
from merbridge.lab import netns as labns

pytestmark = pytest.mark.root


@pytest.fixture
def pod(unique):
    """A pod netns with eth0 (veth) whose peer sits in a "node" netns."""
    pod, node = f"{unique}-pod", f"{unique}-node"
    try:
        labns.create_netns(pod)
        labns.create_netns(node)
        labns.create_veth("eth0", "vpod", ns=pod, peer_ns=node)
        labns.link_up(pod, "eth0")
        labns.link_up(node, "vpod")
        labns.add_address(pod, "eth0", "10.231.1.2/24")
        labns.add_address(pod, "eth0", "fd00:231:1::2/64")
        yield labns.netns_path(pod), labns.netns_path(node)
    finally:
        labns.remove_netns(pod)
        labns.remove_netns(node)


@pytest.fixture(scope="module")
def datapath_xdp():
    """Datapath.xdp_programs of a datapath pinned in a unique directory."""
    dp = loader.Datapath(f"/sys/fs/bpf/mbt-{os.urandom(4).hex()}", mesh.get("istio"),
                         cni_mode=True)
    try:
        dp.load()
        dp.xdp_programs()
        yield dp.xdp_programs
    finally:
        dp.close()
        dp.unpin()


def listeners(ns_path: str) -> list[str]:
    """`ss -ltne` lines for the marker port inside ``ns_path``."""
    res = subprocess.run(["nsenter", f"--net={ns_path}", "ss", "-Hltne",
                          f"sport = :{MARK_LISTENER_PORT}"],
                         capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_marker_listener_has_mark_and_goes_away(pod):
    pod_ns, _ = pod
    key = 0x5EED1234
    sock = netns.open_marker_listener(pod_ns, key)
    try:
        lines = listeners(pod_ns)
        assert len(lines) == 1, lines
        assert f"[::]:{MARK_LISTENER_PORT}" in lines[0] or f"*:{MARK_LISTENER_PORT}" in lines[0]
        assert re.search(rf"fwmark:{hex(key)}\b", lines[0]), lines[0]
        # dual stack: an IPv4 lookup of 0.0.0.0:39807 finds it too
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == key
        pn = podnet.PodNet(lambda: (0, 0))
        assert pn.marker_ok(sock, key)
        assert not pn.marker_ok(sock, key + 1)
        # a second marker on the same port is refused with a clear error
        with pytest.raises(netns.PodNetnsError, match="address already in use|Address already"):
            netns.open_marker_listener(pod_ns, key)
    finally:
        sock.close()
    assert listeners(pod_ns) == []
    assert not podnet.PodNet(lambda: (0, 0)).marker_ok(sock, key)


def test_no_thread_is_left_in_the_pod_netns(pod):
    pod_ns, _ = pod
    pod_ino = os.stat(pod_ns).st_ino
    sock = netns.open_marker_listener(pod_ns, 7, family="ipv4")
    try:
        assert sock.family == socket.AF_INET
        for tid in os.listdir("/proc/self/task"):
            assert os.stat(f"/proc/self/task/{tid}/ns/net").st_ino != pod_ino
        assert threading.active_count() >= 1
        assert any(f"0.0.0.0:{MARK_LISTENER_PORT}" in line and "fwmark:0x7" in line
                   for line in listeners(pod_ns))
    finally:
        sock.close()


@pytest.mark.parametrize("bad, why", [
    ("/etc/hostname", "not a namespace"),
    ("/tmp", "not a network namespace file"),
    ("relative/path", "absolute"),
    ("/var/run/netns/../netns/x", "normalised"),
    ("/var/run/netns/mbt-does-not-exist", "cannot open"),
    ("/proc/self/ns/net", "own network namespace"),
    (f"/proc/{os.getpid()}/ns/net", "own network namespace"),
    ("/proc/self/ns/uts", "not a network namespace"),
    ("", "bad netns path"),
])
def test_bad_netns_paths_are_refused(bad, why):
    for call in (lambda: netns.open_marker_listener(bad, 1),
                 lambda: netns.set_tx_checksum(bad, "eth0", False),
                 lambda: netns.attach_xdp(bad, "eth0", 0, 0),
                 lambda: netns.check_pod_netns(bad)):
        with pytest.raises(netns.PodNetnsError, match=why):
            call()


def test_bad_arguments_are_refused(pod):
    pod_ns, _ = pod
    for mark in (0, -1, 1 << 32, "1"):
        with pytest.raises(netns.PodNetnsError, match="mark"):
            netns.open_marker_listener(pod_ns, mark)
    for ifname in ("", "../eth0", "x" * 16, "a b"):
        with pytest.raises(netns.PodNetnsError, match="interface name"):
            netns.set_tx_checksum(pod_ns, ifname, False)
    with pytest.raises(netns.PodNetnsError, match="no interface"):
        netns.pod_addresses(pod_ns, "eth9")
    assert listeners(pod_ns) == []


def test_tx_checksum_toggle(pod):
    pod_ns, _ = pod
    assert netns.tx_checksum(pod_ns, "eth0") == {"tx-checksum-ip-generic": True}
    assert netns.set_tx_checksum(pod_ns, "eth0", False) == {"tx-checksum-ip-generic": False}
    out = subprocess.run(["nsenter", f"--net={pod_ns}", "ethtool", "-k", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    assert "tx-checksum-ip-generic: off" in out
    assert netns.set_tx_checksum(pod_ns, "eth0", True) == {"tx-checksum-ip-generic": True}


def test_peer_and_addresses(pod):
    pod_ns, node_ns = pod
    assert netns.peer_of(pod_ns, "eth0", node_ns) == "vpod"
    assert netns.pod_addresses(pod_ns, "eth0") == ["10.231.1.2", "fd00:231:1::2"]
    # the peer is not in this (the test's own) netns: refused, not guessed
    with pytest.raises(netns.PodNetnsError, match="peer"):
        netns.peer_of(pod_ns, "eth0", None)


def test_podnet_attach_detach(pod, datapath_xdp):
    pod_ns, node_ns = pod
    pn = podnet.PodNet(datapath_xdp, peer_netns=node_ns, xdp_mode="auto")
    assert not pn.xdp_attached(pod_ns, "eth0")
    att = pn.attach_xdp(pod_ns, "eth0")
    assert att.mode == "native" and att.peer_ifname == "vpod"   # auto: native first
    ingress, egress = (podnet.prog_id(fd) for fd in datapath_xdp())
    assert netns.xdp_prog_id(pod_ns, "eth0") == (ingress, "native")
    assert netns.xdp_prog_id(node_ns, "vpod") == (egress, "native")
    assert netns.tx_checksum(pod_ns, "eth0") == {"tx-checksum-ip-generic": False}
    assert pn.xdp_attached(pod_ns, "eth0")
    pn.detach_xdp(pod_ns, "eth0")
    assert netns.xdp_prog_id(pod_ns, "eth0") == (0, "")
    assert netns.xdp_prog_id(node_ns, "vpod") == (0, "")
    assert not pn.xdp_attached(pod_ns, "eth0")
    pn.detach_xdp(pod_ns, "eth0")          # idempotent


def test_podnet_generic_mode_and_hardware_checksum(pod, datapath_xdp):
    pod_ns, node_ns = pod
    pn = podnet.PodNet(datapath_xdp, peer_netns=node_ns, hardware_checksum=True)
    assert pn.attach_xdp(pod_ns, "eth0").mode == "generic"
    assert netns.xdp_prog_id(pod_ns, "eth0")[1] == "generic"
    assert netns.tx_checksum(pod_ns, "eth0") == {"tx-checksum-ip-generic": True}
    pn.detach_xdp(pod_ns, "eth0")
    assert netns.xdp_prog_id(node_ns, "vpod") == (0, "")


def test_detach_after_the_pod_is_gone(pod, datapath_xdp):
    pod_ns, node_ns = pod
    pn = podnet.PodNet(datapath_xdp, peer_netns=node_ns)
    pn.attach_xdp(pod_ns, "eth0")
    labns.remove_netns(os.path.basename(pod_ns))   # the runtime tore the pod down
    pn.detach_xdp(pod_ns, "eth0")                  # DEL afterwards: no error
    assert not pn.xdp_attached(pod_ns, "eth0")


def tc_show(node_ns: str, what: str) -> str:
    return subprocess.run(["nsenter", f"--net={node_ns}", "tc", *what.split()],
                          capture_output=True, text=True, check=True).stdout


def test_tc_detach_keeps_somebody_elses_filter_and_removes_its_own_qdisc(pod):
    """Detach deletes the clsact qdisc in one change only when nothing but our
    filters is in it; a filter of somebody else's keeps the qdisc and itself."""
    pod_ns, node_ns = pod
    dp = loader.Datapath(f"/sys/fs/bpf/mbt-{os.urandom(4).hex()}", mesh.get("istio"),
                         cni_mode=True)
    try:
        dp.load()
        pn = podnet.PodNet(dp.xdp_programs, peer_netns=node_ns, inbound_hook="tc",
                           tc_programs=dp.tc_programs)
        pn.attach_xdp(pod_ns, "eth0")
        assert pn.xdp_attached(pod_ns, "eth0")
        subprocess.run(["nsenter", f"--net={node_ns}", "tc", "filter", "add", "dev", "vpod",
                        "ingress", "prio", "7", "protocol", "all", "u32", "match", "u32", "0", "0",
                        "classid", "1:1"], check=True)
        pn.detach_xdp(pod_ns, "eth0")
        assert not pn.xdp_attached(pod_ns, "eth0")
        assert "u32" in tc_show(node_ns, "filter show dev vpod ingress")
        assert "bpf" not in tc_show(node_ns, "filter show dev vpod ingress")
        assert "bpf" not in tc_show(node_ns, "filter show dev vpod egress")
        assert "clsact" in tc_show(node_ns, "qdisc show dev vpod")
        subprocess.run(["nsenter", f"--net={node_ns}", "tc", "filter", "del", "dev", "vpod",
                        "ingress", "prio", "7"], check=True)
        pn.attach_xdp(pod_ns, "eth0")
        assert "clsact" in tc_show(node_ns, "qdisc show dev vpod")
        pn.detach_xdp(pod_ns, "eth0")
        assert "clsact" not in tc_show(node_ns, "qdisc show dev vpod")
        pn.detach_xdp(pod_ns, "eth0")      # idempotent
    finally:
        dp.close()
        dp.unpin()


def test_rtnl_answers_each_request_of_a_batch_in_order(pod):
    """Rtnl.exchange sends several requests at once and reports each one's
    errno in order; a refused request does not stop the ones after it; a
    dump ends at NLMSG_DONE; pod_addresses reads through it too."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_GETLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    pod_ns, _ = pod

    def get(**match):
        msg = ifinfmsg()
        if "ifname" in match:
            msg["attrs"] = [("IFLA_IFNAME", match["ifname"])]
        else:
            msg["index"] = match["index"]
        return msg, RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK

    with netns.rtnl_at(pod_ns) as rtnl:
        answers = rtnl.exchange([get(ifname="eth0"), get(ifname="nope0"), get(ifname="lo")],
                                ifinfmsg)
        assert [code for code, _ in answers] == [0, 19, 0]    # ENODEV in the middle
        assert [len(r) for _, r in answers] == [1, 0, 1]
        assert answers[0][1][0].get_attr("IFLA_IFNAME") == "eth0"
        assert answers[2][1][0].get_attr("IFLA_IFNAME") == "lo"
        again = rtnl.request(*get(index=answers[0][1][0]["index"])[:2], cls=ifinfmsg)
        assert again[0].get_attr("IFLA_IFNAME") == "eth0"    # the same socket goes on
    assert netns.pod_addresses(pod_ns, "eth0") == ["10.231.1.2", "fd00:231:1::2"]
