"""Inbound flow state of the tc and XDP rewrite (bpf/progs/inbound.c) under
attack: a spoofed SYN flood and spoofed tuples of local connections.

Topology (namespaces private to the module):

    rem (10.232.2.2, "another node") -- node (forwarding) -+- pod A eth0 (10.232.1.2)
                                                           +- pod B eth0 (10.232.3.2)

Both pods run an echo server on the inbound port 15006 in a test cgroup that
has the whole datapath attached (getsockopt answers SO_ORIGINAL_DST, sockops
frees a flow when its socket closes); both are enrolled with the hook under
test.
"""
import json
import os
import socket
import subprocess

import pytest

from merbridge.bpf import loader
from merbridge.bpf import types as t
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns
from merbridge.lab import netns as labns

from test_xdp import make_podnet, nothing_attached, wait_for

pytestmark = pytest.mark.root

PEER = os.path.join(os.path.dirname(__file__), "inbound_peer.py")
PODA, PODB, REM = "10.232.1.2", "10.232.3.2", "10.232.2.2"
IN_PORT = 15006
POLICY = PodPolicy(include_inbound_all=True)
MARK0 = 0x2340001   # the pods' marker keys
FLOOD = 200_000
FLOOD_PORTS = "8080,8081,8082,8083"
MAX_CONNS = t.MB_MAX_CONNS   # mb_pair_orig_dst, mb_in_pending


@pytest.fixture(scope="module")
def topo(datapath):
    _, cgroup = datapath
    tag = os.urandom(4).hex()
    pa, pb, node, rem = (f"mbt-{tag}-{n}" for n in ("pa", "pb", "node", "rem"))
    servers = []
    try:
        for ns in (pa, pb, node, rem):
            labns.create_netns(ns)
        links = ((pa, "vpa", PODA, "10.232.1.1"), (pb, "vpb", PODB, "10.232.3.1"),
                 (rem, "vrem", REM, "10.232.2.1"))
        for ns, peer, ip, gw in links:
            labns.create_veth("eth0", peer, ns=ns, peer_ns=node)
            labns.link_up(ns, "eth0")
            labns.link_up(node, peer)
            labns.add_address(ns, "eth0", f"{ip}/24")
            labns.add_address(node, peer, f"{gw}/24")
            labns.add_route(ns, "default", gw)
        labns.set_sysctl(node, "net.ipv4.ip_forward", 1)
        for ns in (pa, pb):
            srv = labns.spawn(["/usr/bin/python3", PEER, "echo", str(IN_PORT)], ns=ns,
                              cgroup=cgroup, stdout=subprocess.PIPE, text=True)
            servers.append(srv)
            assert srv.stdout.readline().strip() == "ready"
        yield {"pa": labns.netns_path(pa), "pb": labns.netns_path(pb),
               "node": labns.netns_path(node), "rem": rem}
    finally:
        for srv in servers:
            srv.kill()
            srv.wait()
        for ns in (pa, pb, node, rem):
            labns.remove_netns(ns)


@pytest.fixture(params=["tc", "generic"])
def enrolled(topo, datapath, request):
    """Both pods enrolled with the hook of the parameter (tc, or XDP generic),
    their netns recorded as the daemon does (marker socket, mb_mark_pod_ips,
    mb_netns_pod: only a recorded pod's sockets get SO_ORIGINAL_DST and free
    their flow at close, docs/security.md)."""
    dp, _ = datapath
    maps = dp.maps
    pn = make_podnet(dp, topo["node"], request.param)
    pods = ({"pod": topo["pa"], "node": topo["node"]}, {"pod": topo["pb"], "node": topo["node"]})
    markers = []
    try:
        for mark, (ip, p) in enumerate(zip((PODA, PODB), pods), start=MARK0):
            maps.local_pods.put(ip, POLICY)
            markers.append(netns.open_marker_listener(p["pod"], mark))
            maps.mark_pod_ips.put(mark, ip)
            maps.netns_pod.put(loader.netns_cookie_of(markers[-1]), ip, mark)
        for p in pods:
            pn.attach_xdp(p["pod"], "eth0")
        yield maps
    finally:
        for mark, marker in enumerate(markers, start=MARK0):
            maps.netns_pod.delete(loader.netns_cookie_of(marker))
            maps.mark_pod_ips.delete(mark)
            marker.close()
        for p in pods:
            pn.detach_xdp(p["pod"], "eth0")
            netns.set_tx_checksum(p["pod"], "eth0", True)
        for ip in (PODA, PODB):
            maps.local_pods.delete(ip)
            maps.pair_orig_dst.delete_ip(ip)
            maps.in_pending.delete_ip(ip)
    for p in pods:
        assert nothing_attached(p)


def key_of(pair) -> tuple[str, int, str, int]:
    return (t.addr_unpack(bytes(pair.sip)), socket.ntohs(pair.sport),
            t.addr_unpack(bytes(pair.dip)), socket.ntohs(pair.dport))


def established(maps) -> dict:
    return {key_of(p): (str(o.addr), o.port_host, o.flags, o.pid)
            for p, o in maps.pair_orig_dst.items()}


def open_idle(topo, host: str, port: int = 8080) -> tuple[subprocess.Popen, dict]:
    proc = labns.spawn(["/usr/bin/python3", PEER, "idle", host, str(port)], ns=topo["rem"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=5)
    return proc, json.loads(line)


def resume(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate("go\n", timeout=20)
    return json.loads(out.strip().splitlines()[-1])


def synflood(topo, dst: str, n: int, sport0: int = 1024, ports: str = FLOOD_PORTS) -> dict:
    res = labns.run(["/usr/bin/python3", PEER, "synflood", REM, dst, str(sport0), str(n), ports],
                    ns=topo["rem"], timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_spoofed_syn_flood_keeps_established_flows(topo, enrolled):
    """200,000 SYNs from another node's address to pod A (new tuples, never
    completed) while rem holds an idle established connection to pod B: the
    connection still works afterwards, its flow entry is the same, the flood
    left no established state, and the flow state is bounded."""
    maps = enrolled
    idle, hello = open_idle(topo, PODB)
    try:
        assert hello["sock"] == [PODB, IN_PORT] and hello["orig"] == [PODB, 8080]
        assert hello["echo"] == "first" and hello["client_peer"] == [PODB, 8080]
        key = (REM, hello["client_sock"][1], PODB, IN_PORT)
        before = established(maps)
        assert before[key] == (PODB, 8080, t.MB_ORIGIN_F_XDP, 0)
        c0 = maps.counters()

        sent = synflood(topo, PODA, FLOOD)
        c1 = maps.counters()
        seen = c1["xdp_new_flow"] - c0["xdp_new_flow"]
        # enough SYNs got through to have flushed the old shared 65,535-entry
        # LRU several times over (the rest were dropped on the way, at most)
        assert seen > 2 * MAX_CONNS, (seen, sent)
        # no SYN completed a handshake (rem's kernel answered the SYN-ACKs with RSTs)
        assert c1["in_established"] == c0["in_established"]
        after = established(maps)
        assert after.get(key) == before[key]
        assert not [k for k in after if k[2] == PODA]
        # bounded: the pending flows are capped by their own LRU
        pending = len(maps.in_pending.items())
        assert 0 < pending <= MAX_CONNS

        assert resume(idle) == {"echo": "again"}
    finally:
        if idle.poll() is None:
            idle.kill()
            idle.wait()
    # the flood's target still takes new connections, and they are recorded
    fresh, hello = open_idle(topo, PODA, 8081)
    try:
        assert hello["orig"] == [PODA, 8081] and hello["echo"] == "first"
        assert resume(fresh) == {"echo": "again"}
    finally:
        if fresh.poll() is None:
            fresh.kill()
            fresh.wait()
    # both connections closed (client first): their flow state is gone
    assert wait_for(lambda: not [k for k in established(maps) if k[0] == REM])


def test_sockops_entry_is_never_overwritten(topo, enrolled):
    """A connect/sockops entry (no XDP flag) on the tuple {rem:P -> A:15006},
    as a local connection of that tuple would have: spoofed SYNs and a real
    handshake from rem:P to A:8080 leave it exactly as it was."""
    maps = enrolled
    port = 40123
    pair = t.MbPair.of(REM, port, PODA, IN_PORT)
    origin = t.MbOrigin(t.MbAddr.of(PODA), 4242, socket.htons(9999), t.MB_ORIGIN_F_REDIRECT)
    maps.pair_orig_dst.put(pair, origin)
    want = established(maps)[key_of(pair)]
    try:
        synflood(topo, PODA, 20, sport0=port, ports="8080")
        code = ("import socket,sys\n"
                "s=socket.socket(); s.settimeout(2)\n"
                f"s.bind(('{REM}', {port}))\n"
                "try:\n"
                f"    s.connect(('{PODA}', 8080)); s.sendall(b'x\\n'); print(s.recv(100))\n"
                "except OSError as e:\n"
                "    print('error', e)\n")
        labns.run(["/usr/bin/python3", "-c", code], ns=topo["rem"], timeout=20)
        assert established(maps)[key_of(pair)] == want
    finally:
        maps.pair_orig_dst.delete(pair)


def test_pod_closing_first_keeps_the_port_through_time_wait(topo, enrolled):
    """The pod closes first: its socket goes to TIME_WAIT, the flow leaves
    mb_pair_orig_dst for mb_in_pending (closing), and the client's FIN and the
    pod's last ACK still carry the right ports, so the client closes cleanly
    (no socket of it left in LAST_ACK, retransmitting a FIN nobody answers)."""
    maps = enrolled
    code = ("import json,socket,time\n"
            f"c=socket.create_connection(('{PODB}', 8080), timeout=5)\n"
            "f=c.makefile('rwb', buffering=0)\n"
            "hello=json.loads(f.readline())\n"
            "f.write(b'bye\\n')\n"
            "eof=f.read()\n"
            "port=c.getsockname()[1]\n"
            "c.close()\n"
            "time.sleep(0.5)\n"
            "print(json.dumps({'orig': hello['orig'], 'eof': eof.decode(), 'port': port}))\n")
    c0 = maps.counters()
    res = labns.run(["/usr/bin/python3", "-c", code], ns=topo["rem"], timeout=20)
    # (the netns-wide TCP counters are no witness here: the pod still retransmits
    # SYN-ACKs to the earlier tests' spoofed SYNs, and this netns resets them)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["orig"] == [PODB, 8080] and r["eof"] == ""
    key = (REM, r["port"], PODB, IN_PORT)
    assert key not in established(maps)
    closing = {key_of(p): (socket.ntohs(f.port), f.flags) for p, f in maps.in_pending.items()}
    assert closing.get(key) == (8080, t.MB_IN_F_CLOSING)
    assert maps.counters()["in_closed"] - c0["in_closed"] == 1
    left = labns.run(["ss", "-tanH", "state", "last-ack", "state", "fin-wait-1",
                      "state", "closing"], ns=topo["rem"]).stdout
    assert f":{r['port']} " not in left, left
    maps.in_pending.delete_ip(PODB)
