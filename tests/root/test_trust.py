"""The trust model's datapath lines (docs/security.md), on the real kernel.

The hooks act only for pods: an unprivileged user in the node's netns, or in
a user namespace with a netns of its own, cannot make connect4/6 steer a
connection or make getsockopt hand out another pod's original destination.
The "node" netns is one these tests create and name as the node's through
mb_settings[MB_SET_NODE_NETNS], as the daemon does with its own netns.
"""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import time

import pytest

from hookenv import Pod, datapath
from merbridge.bpf import loader
from merbridge.bpf import types as t
from merbridge.bpf.policy import PodPolicy

pytestmark = pytest.mark.root

NOBODY = 65534
NODE4, DST4 = "10.232.0.1", "10.232.0.2"
POD_A, POD_B = "10.232.1.1", "10.232.2.1"
MARK_A, MARK_B = 0x2320001, 0x2320002


@pytest.fixture(scope="module", params=[True, False], ids=["cni", "legacy"])
def dp(request):
    with datapath(cni_mode=request.param) as d:
        yield d


@pytest.fixture
def node(dp):
    """A netns + attached cgroup standing for the node: the datapath is told
    it is the node's netns, as the daemon records its own at load()."""
    n = Pod(v4=[NODE4, DST4])
    before = dp.maps.settings.get(t.MB_SET_NODE_NETNS)
    try:
        dp.maps.settings.set(t.MB_SET_NODE_NETNS, n.netns_cookie())
        n.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        dp.attach(n.cgroup)
        yield n
    finally:
        dp.detach(n.cgroup)
        dp.maps.settings.set(t.MB_SET_NODE_NETNS, before)
        n.close()


def test_daemon_records_its_own_netns_as_the_node(dp):
    assert dp.maps.settings.get(t.MB_SET_NODE_NETNS) == loader.own_netns_cookie()


def test_unprivileged_listeners_in_the_node_netns_steer_nothing(dp, node):
    """uid 65534 listens on 0.0.0.0:39807 (the CNI marker port) and
    0.0.0.0:15001 (the proxy's outbound port, what legacy mode probes for),
    inside the attached cgroup; a node process's connect is left alone, and
    the listeners never see a connection."""
    node.serve("evil-marker", "0.0.0.0", 39807, uid=NOBODY, gid=NOBODY)
    node.serve("evil-proxy", "0.0.0.0", 15001, uid=NOBODY, gid=NOBODY)
    before = dp.maps.counters()
    for _ in range(3):
        r = node.connect(DST4, 8080)
        assert r["reply"]["tag"] == "direct" and r["reply"]["orig"] != [DST4, 8080]
        assert r["reply"]["peer"][0] == NODE4 or r["reply"]["peer"][0] == DST4
    after = dp.maps.counters()
    assert after["redirect_out"] == before["redirect_out"]
    assert after["bypass_not_mesh"] - before["bypass_not_mesh"] >= 3
    # the same listeners with the pod's mark enrolled (CNI mode): still nothing
    if dp.cni_mode:
        dp.maps.mark_pod_ips.put(0, NODE4)
        try:
            assert node.connect(DST4, 8080)["reply"]["tag"] == "direct"
        finally:
            dp.maps.mark_pod_ips.delete(0)


CNI_ONLY = pytest.mark.parametrize("dp", [True], ids=["cni"], indirect=True)


@CNI_ONLY
def test_the_initial_netns_is_never_a_pod(dp):
    """Even a (forged) mb_netns_pod record of the initial netns, with no
    MB_SET_NODE_NETNS set, does not make a process there a pod: connect4
    compares with bpf_get_netns_cookie(NULL). Only loopback traffic, in a
    cgroup this test made."""
    host = Pod(v4=[])   # only its cgroup is used; the process stays in the initial netns
    init = loader.own_netns_cookie()
    before = dp.maps.settings.get(t.MB_SET_NODE_NETNS)
    srv = subprocess.Popen(
        ["python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.2', 0)); "
         "s.listen(); print(s.getsockname()[1], flush=True); c, _ = s.accept(); "
         "c.sendall(b'direct'); c.close()"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        dp.maps.settings.set(t.MB_SET_NODE_NETNS, 0)
        dp.maps.mark_pod_ips.put(MARK_A, "127.0.0.9")
        dp.maps.netns_pod.put(init, "127.0.0.9", MARK_A)
        dp.maps.local_pods.put("127.0.0.9", PodPolicy(include_outbound_cidrs=((t.addr_pack("127.0.0.0"), 104),)))
        dp.attach(host.cgroup)
        c0 = dp.maps.counters()
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {host.cgroup}/cgroup.procs; exec "$@"', "sh", "python3", "-c",
             f"import socket; s = socket.create_connection(('127.0.0.2', {port}), 5); "
             "print(s.recv(10).decode())"], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "direct", out.stderr
        c1 = dp.maps.counters()
        assert c1["redirect_out"] == c0["redirect_out"]
        assert c1["bypass_not_mesh"] > c0["bypass_not_mesh"]
    finally:
        dp.detach(host.cgroup)
        dp.maps.netns_pod.delete(init)
        dp.maps.mark_pod_ips.delete(MARK_A)
        dp.maps.local_pods.delete("127.0.0.9")
        dp.maps.settings.set(t.MB_SET_NODE_NETNS, before)
        srv.kill()
        srv.wait()
        srv.stdout.close()
        host.close()


# Run as uid 65534 inside "unshare -Urn": root of its own user namespace, so
# SO_MARK (ns_capable CAP_NET_ADMIN) and a veth pair are allowed. It listens
# on 39807 with the victim pod's mark and on 15001, then connects to an
# address of its own netns. Prints where the connection landed.
USERNS = r'''
import json, socket, subprocess, sys, threading
mark, ip, peer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for cmd in (["link", "set", "lo", "up"],
            ["link", "add", "e0", "type", "veth", "peer", "name", "e1"],
            ["addr", "add", ip + "/24", "dev", "e0"], ["addr", "add", peer + "/24", "dev", "e1"],
            ["link", "set", "e0", "up"], ["link", "set", "e1", "up"]):
    subprocess.run(["ip", *cmd], check=True)
def listen(addr, port, tag, mark=0):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.bind((addr, port)); s.listen(8)
    def loop():
        while True:
            c, _ = s.accept()
            try:
                raw = c.getsockopt(socket.SOL_IP, 80, 16)
                orig = socket.inet_ntoa(raw[4:8])
            except OSError as e:
                orig = "errno %d" % e.errno
            c.sendall(json.dumps({"tag": tag, "orig": orig}).encode()); c.close()
    threading.Thread(target=loop, daemon=True).start()
listen("0.0.0.0", 39807, "marker", mark)
listen("0.0.0.0", 15001, "evil-proxy")
listen(peer, 8080, "direct")
c = socket.create_connection((peer, 8080), 5)
print(json.dumps(json.loads(c.recv(200))))
'''


@CNI_ONLY
def test_user_namespace_cannot_take_a_pods_identity(dp):
    """An unprivileged user makes a user namespace with its own netns, puts a
    listener with the enrolled pod A's SO_MARK on 39807, listens on 15001,
    and connects from A's IP inside the attached cgroup: its connection is
    not redirected (its netns is not the daemon's record of A), and no
    original destination is handed out. (Legacy mode identifies a pod by its
    proxy's listener, as upstream does: docs/security.md says what that
    leaves open.)"""
    victim = Pod(v4=[POD_A])
    cg = Pod(v4=[])
    try:
        victim.enrol(dp, MARK_A, POD_A)
        dp.maps.local_pods.put(POD_A, PodPolicy())
        dp.attach(cg.cgroup)
        before = dp.maps.counters()
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {cg.cgroup}/cgroup.procs; exec "$@"', "sh",
             "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "unshare", "-Urn", "/usr/bin/python3", "-c", USERNS, str(MARK_A), POD_A, "10.232.1.9"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert r["tag"] == "direct" and r["orig"].startswith("errno"), r
        after = dp.maps.counters()
        assert after["redirect_out"] == before["redirect_out"]
        assert after["getsockopt_answer"] == before["getsockopt_answer"]
    finally:
        dp.detach(cg.cgroup)
        dp.maps.local_pods.delete(POD_A)
        Pod.forget(dp, MARK_A)
        victim.close()
        cg.close()


def _unmesh(dp, p: Pod, ip: str, mark: int) -> None:
    dp.maps.local_pods.delete(ip)
    Pod.forget(dp, mark)
    dp.maps.netns_ip.b.delete(struct.pack("=Q", p.netns_cookie()))


def _meshed(dp, ip: str, mark: int) -> Pod:
    p = Pod(v4=[ip])
    p.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
    if dp.cni_mode:
        p.enrol(dp, mark, ip)
    else:
        # what sockops learns from the pod's first connection
        dp.maps.netns_ip.b.put(struct.pack("=Q", p.netns_cookie()), bytes(t.MbPodIps.of((ip,))))
    dp.maps.local_pods.put(ip, PodPolicy())
    return p


# Rebuilds pod A's redirected tuple A:40000 -> 127.0.0.1:15001 in the caller's
# netns (A's IP added there) and asks SO_ORIGINAL_DST of the accepted socket.
REBUILD = r'''
import socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 15001)); l.listen(1)
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("10.232.1.1", 40000)); c.connect(("127.0.0.1", 15001))
a, _ = l.accept()
try:
    raw = a.getsockopt(socket.SOL_IP, 80, 16)
    print(socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
except OSError as e:
    print("errno", e.errno)
'''


@pytest.mark.parametrize("who", ["other-pod", "node"])
def test_original_dst_only_for_the_redirected_pods_socket(dp, node, who):
    """Pod A's app connects to DST4:8080 and is redirected to A's proxy,
    which holds the connection unaccepted: A's pair entry is live. Another
    pod (B) or the node rebuilds the same 4-tuple in its own netns and asks
    SO_ORIGINAL_DST: no answer. A's proxy gets DST4:8080."""
    a = _meshed(dp, POD_A, MARK_A)
    b = _meshed(dp, POD_B, MARK_B) if who == "other-pod" else node
    try:
        a.serve("proxy", "127.0.0.1", 15001, uid=1337, gid=1337, accept_delay=3)
        dp.attach(a.cgroup)
        if b is not node:
            dp.attach(b.cgroup)
        b.ip("addr", "add", f"{POD_A}/32", "dev", "lo")
        pending = a.connect_async(DST4, 8080)
        # A's pair entry is written once its handshake is done; then the
        # same tuple is rebuilt while A's connection waits in the backlog
        deadline = time.monotonic() + 2.5
        while not any(p.sport == socket.htons(40000) for p, _ in dp.maps.pair_orig_dst.items()):
            assert time.monotonic() < deadline, "A's connection was not redirected"
            time.sleep(0.05)
        got = b.run(REBUILD).split()
        assert got[0] == "errno", got
        r = Pod.finish(pending)
        assert r["reply"]["tag"] == "proxy" and r["reply"]["orig"] == [DST4, 8080]
    finally:
        dp.detach(a.cgroup)
        if b is not node:
            dp.detach(b.cgroup)
            _unmesh(dp, b, POD_B, MARK_B)
            b.close()
        _unmesh(dp, a, POD_A, MARK_A)
        a.close()
