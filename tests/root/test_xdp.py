"""The inbound port rewrite on a real veth pair, with each hook: tc
(bpf/progs/inbound.c, cls_bpf on the host-side peer, the pod's tx checksum offload
left on) and XDP (the same bpf/progs/inbound.c, native and generic, tx checksum off).

Topology (all namespaces private to the test module):

    remote (10.231.2.2, fd00:231:2::2) -- node (forwarding) -- pod eth0 (10.231.1.2, fd00:231:1::2)

The "remote" netns stands for another node. The pod has a listener on the
inbound port 15006 (and on 9090, 7070 and the status port 15020) but nothing
on 8080. With the pod enrolled (mb_local_pods entry, XDP on eth0 and on its
host-side peer in "node", tx checksum off on eth0) a connection from remote to
pod:8080 must land on 15006, the flow must be recorded for SO_ORIGINAL_DST, the
client must see pod:8080, and bytes must arrive intact.

Checksums: veth never verifies TCP checksums by default (locally generated
packets are CHECKSUM_PARTIAL, CHECKSUM_NONE is upgraded to UNNECESSARY on rx),
so a broken rewrite would pass silently. The "verified" variants turn tx
offload off on every sender and rx offload off on both receivers so the kernel
really checks; the negative control shows it does.
"""
import json
import os
import socket
import subprocess
import time

import pytest

from merbridge.bpf import loader
from merbridge.bpf import types as t
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns, podnet
from merbridge.lab import netns as labns

pytestmark = pytest.mark.root

PEER = os.path.join(os.path.dirname(__file__), "xdp_peer.py")
POD4, POD6 = "10.231.1.2", "fd00:231:1::2"
REM4, REM6 = "10.231.2.2", "fd00:231:2::2"
IN_PORT = 15006
SIZE = 8 << 20
MARK = 0x2330001   # the pod's marker key (enrolled)
POLICY = PodPolicy(include_inbound_all=True, exclude_inbound_ports=frozenset({9090}),
                   status_port=15020)


@pytest.fixture(scope="module")
def topo(datapath):
    _, cgroup = datapath
    tag = os.urandom(4).hex()
    pod, node, rem = f"mbt-{tag}-pod", f"mbt-{tag}-node", f"mbt-{tag}-rem"
    server = None
    try:
        for ns in (pod, node, rem):
            labns.create_netns(ns)
        labns.create_veth("eth0", "vpod", ns=pod, peer_ns=node)
        labns.create_veth("eth0", "vrem", ns=rem, peer_ns=node)
        for ns, ifname in ((pod, "eth0"), (node, "vpod"), (node, "vrem"), (rem, "eth0")):
            labns.link_up(ns, ifname)
        for ns, ifname, cidr in ((pod, "eth0", f"{POD4}/24"), (pod, "eth0", f"{POD6}/64"),
                                 (node, "vpod", "10.231.1.1/24"),
                                 (node, "vpod", "fd00:231:1::1/64"),
                                 (node, "vrem", "10.231.2.1/24"),
                                 (node, "vrem", "fd00:231:2::1/64"),
                                 (rem, "eth0", f"{REM4}/24"), (rem, "eth0", f"{REM6}/64")):
            labns.add_address(ns, ifname, cidr)
        labns.add_route(pod, "default", "10.231.1.1")
        labns.add_route(pod, "default6", "fd00:231:1::1")
        labns.add_route(rem, "default", "10.231.2.1")
        labns.add_route(rem, "default6", "fd00:231:2::1")
        labns.set_sysctl(node, "net.ipv4.ip_forward", 1)
        labns.set_sysctl(node, "net.ipv6.conf.all.forwarding", 1)
        server = labns.spawn(["/usr/bin/python3", PEER, "server", str(IN_PORT), "9090",
                              "7070", "15020"], ns=pod, cgroup=cgroup,
                              stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        # resolve neighbours once, so no test pays for a lost first SYN
        for dst in (POD4, POD6):
            res = labns.run(["/usr/bin/python3", PEER, "client", dst, "9090", "1", "5"], ns=rem)
            assert '"sock"' in res.stdout, res
        yield {"pod": labns.netns_path(pod), "node": labns.netns_path(node),
               "rem": labns.netns_path(rem), "names": (pod, node, rem)}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (pod, node, rem):
            labns.remove_netns(ns)


def ethtool(ns_path: str, ifname: str, *args: str) -> None:
    subprocess.run(["nsenter", f"--net={ns_path}", "ethtool", "-K", ifname, *args],
                   check=True, capture_output=True)


@pytest.fixture
def verified(topo):
    """Make the kernel verify TCP checksums on the remote->pod path and back."""
    senders = ((topo["rem"], "eth0"), (topo["node"], "vrem"), (topo["node"], "vpod"))
    receivers = ((topo["rem"], "eth0"), (topo["pod"], "eth0"))
    try:
        for ns, ifname in senders:
            ethtool(ns, ifname, "tx", "off")
        for ns, ifname in receivers:
            ethtool(ns, ifname, "rx", "off")
        yield
    finally:
        for ns, ifname in senders:
            ethtool(ns, ifname, "tx", "on")
        for ns, ifname in receivers:
            ethtool(ns, ifname, "rx", "on")


HOOKS = ["tc", "native", "generic"]      # tc, or XDP in that mode


def make_podnet(dp, node_ns: str, hook: str) -> podnet.PodNet:
    if hook == "tc":
        return podnet.PodNet(dp.xdp_programs, peer_netns=node_ns, inbound_hook="tc",
                             tc_programs=dp.tc_programs)
    return podnet.PodNet(dp.xdp_programs, xdp_mode=hook, peer_netns=node_ns)


def nothing_attached(topo) -> bool:
    """No XDP program on either end of the pod's veth and no tc filter of ours."""
    pod_id, peer_id = netns.xdp_prog_ids(topo["pod"], "eth0", topo["node"])
    return (pod_id, peer_id) == (0, 0) and netns.tc_names(topo["pod"], "eth0", topo["node"]) == {}


@pytest.fixture(params=HOOKS)
def enrolled(topo, datapath, request):
    """The pod enrolled as the daemon would: policy in mb_local_pods, its
    netns recorded (marker socket, mb_mark_pod_ips, mb_netns_pod: only that
    pod's sockets get SO_ORIGINAL_DST and free their flow), and the inbound
    programs on its veth pair (tc; or XDP with tx checksum off), hook from
    the parameter. Yields the typed maps; afterwards nothing is left
    attached."""
    dp, _ = datapath
    maps = dp.maps
    hook = request.param
    for ip in (POD4, POD6):
        maps.local_pods.put(ip, POLICY)
    marker = netns.open_marker_listener(topo["pod"], MARK)
    cookie = loader.netns_cookie_of(marker)
    maps.mark_pod_ips.put(MARK, POD4, POD6)
    maps.netns_pod.put(cookie, (POD4, POD6), MARK)
    pn = make_podnet(dp, topo["node"], hook)
    try:
        assert pn.attach_xdp(topo["pod"], "eth0").mode == hook
        assert pn.xdp_attached(topo["pod"], "eth0")
        tx_on = any(netns.tx_checksum(topo["pod"], "eth0").values())
        assert tx_on is (hook == "tc")       # only XDP needs the offload off
        yield maps
    finally:
        marker.close()
        maps.netns_pod.delete(cookie)
        maps.mark_pod_ips.delete(MARK)
        pn.detach_xdp(topo["pod"], "eth0")
        netns.set_tx_checksum(topo["pod"], "eth0", True)
        for ip in (POD4, POD6):
            maps.local_pods.delete(ip)
            maps.pair_orig_dst.delete_ip(ip)
            maps.in_pending.delete_ip(ip)
    assert nothing_attached(topo)


def connect(topo, host: str, port: int, size: int = SIZE, timeout: float = 5) -> dict:
    res = labns.run(["/usr/bin/python3", PEER, "client", host, str(port), str(size),
                     str(timeout)], ns=os.path.basename(topo["rem"]), timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def csum_errors(ns_path: str) -> int:
    snmp = subprocess.run(["nsenter", f"--net={ns_path}", "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    head, vals = [line.split() for line in snmp if line.startswith("Tcp:")]
    return int(dict(zip(head[1:], vals[1:]))["InCsumErrors"])


def flows(maps) -> dict[tuple[str, int, str, int], tuple[str, int, int]]:
    out = {}
    for pair, orig in maps.pair_orig_dst.items():
        key = (t.addr_unpack(bytes(pair.sip)), socket.ntohs(pair.sport),
               t.addr_unpack(bytes(pair.dip)), socket.ntohs(pair.dport))
        out[key] = (t.addr_unpack(bytes(orig.addr)), socket.ntohs(orig.port), orig.flags)
    return out


def pending(maps) -> dict[tuple[str, int, str, int], tuple[int, int]]:
    return {(t.addr_unpack(bytes(p.sip)), socket.ntohs(p.sport), t.addr_unpack(bytes(p.dip)),
             socket.ntohs(p.dport)): (socket.ntohs(f.port), f.flags)
            for p, f in maps.in_pending.items()}


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_redirected(topo, maps, host: str, remote: str, port: int = 8080) -> dict:
    before = csum_errors(topo["pod"]), csum_errors(topo["rem"])
    c0 = maps.counters()
    r = connect(topo, host, port)
    assert "error" not in r, r
    assert r["sock"] == [host, IN_PORT]            # the pod accepted on the inbound port
    assert r["client_peer"] == [host, port]        # the client saw the original port
    assert r["sha"] == r["sent_sha"] and r["n"] == SIZE
    # SO_ORIGINAL_DST, via mb_getsockopt: the established flow was recorded
    assert r["orig"] == [host, port]
    key = (remote, r["peer"][1], host, IN_PORT)
    # the client closed first, so the pod's socket ended in LAST_ACK -> CLOSE:
    # the flow state is freed, in neither map
    assert wait_for(lambda: key not in flows(maps) and key not in pending(maps)), (
        flows(maps).get(key), pending(maps).get(key))
    c1 = maps.counters()
    assert c1["in_established"] - c0["in_established"] == 1
    assert c1["in_closed"] - c0["in_closed"] == 1
    assert (csum_errors(topo["pod"]), csum_errors(topo["rem"])) == before
    return r


@pytest.mark.parametrize("host, remote", [(POD4, REM4), (POD6, REM6)], ids=["v4", "v6"])
def test_remote_connection_lands_on_inbound_port(topo, verified, enrolled, host, remote):
    assert_redirected(topo, enrolled, host, remote)


def test_default_offloads(topo, enrolled):
    """Without the test's checksum verification (the production default on veth)."""
    assert_redirected(topo, enrolled, POD4, REM4)
    assert_redirected(topo, enrolled, POD6, REM6)


@pytest.mark.parametrize("enrolled", ["native", "generic"], indirect=True)
def test_pod_tx_checksum_on_breaks_the_handshake(topo, verified, enrolled):
    """Negative control (XDP): with the pod's tx offload on, its SYN-ACK leaves
    with a pseudo-header seed, the egress rewrite patches the seed, and the
    checksum the node completes is wrong. Proves the verified variants really
    verify, and why attach_xdp turns tx checksum off. The tc hook passes the
    same verified tests with the offload on (bpf_l4_csum_replace)."""
    netns.set_tx_checksum(topo["pod"], "eth0", True)
    before = csum_errors(topo["rem"])
    r = connect(topo, POD4, 8080, size=1, timeout=2)
    assert "error" in r
    assert csum_errors(topo["rem"]) > before
    netns.set_tx_checksum(topo["pod"], "eth0", False)
    assert_redirected(topo, enrolled, POD4, REM4)


@pytest.mark.parametrize("host, remote", [(POD4, REM4), (POD6, REM6)], ids=["v4", "v6"])
def test_excluded_status_and_inbound_ports_pass_untouched(topo, verified, enrolled, host,
                                                          remote):
    for port in (9090, 15020, IN_PORT):       # excluded, status port, already inbound
        r = connect(topo, host, port, size=1 << 20)
        assert r["sock"] == [host, port] and r["client_peer"] == [host, port]
        assert r["sha"] == r["sent_sha"]
        assert not any(k[0] == remote and k[1] == r["peer"][1]
                       for k in list(flows(enrolled)) + list(pending(enrolled)))


def test_include_list_policy(topo, enrolled):
    enrolled.local_pods.put(POD4, PodPolicy(include_inbound_all=False,
                                            include_inbound_ports=frozenset({8080})))
    r = connect(topo, POD4, 7070, size=1000)
    assert r["sock"] == [POD4, 7070]
    assert_redirected(topo, enrolled, POD4, REM4)


def test_pod_not_in_mesh_is_untouched(topo, enrolled):
    enrolled.local_pods.delete(POD4)
    r = connect(topo, POD4, 8080, size=1, timeout=2)
    assert "refused" in r["error"]              # nothing listens on 8080 itself
    assert flows(enrolled) == {} and pending(enrolled) == {}


def test_pod_rst_forgets_the_flow(topo, enrolled):
    """The pod aborts a redirected connection: its RST must leave with the
    original port (else the client's stack would ignore it and time out instead
    of seeing a reset) and the flow record must go with it."""
    r = connect(topo, POD4, 8080, size=-1, timeout=5)
    assert "reset" in r["error"].lower(), r
    assert r["client_peer"] == [POD4, 8080]
    assert wait_for(lambda: flows(enrolled) == {} and pending(enrolled) == {})
