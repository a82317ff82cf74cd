"""End to end: our eBPF datapath instead of istio-iptables, with real sidecars.

The datapath is attached to the lab's parent cgroup (the pods' cgroups are its
children and inherit the programs) -- never the root cgroup. Expected paths are
the istio-iptables oracle's (tests/root/test_lab.py):
A-app -> A-sidecar (saw B:8080) -> B-sidecar :15006 (saw B:8080) -> B-app
(peer 127.0.0.6 / ::6), in IPv4 and IPv6, in CNI mode and in legacy mode.
"""
import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass

import pytest

from merbridge.bpf import loader
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import Lab, Pod, Sidecar


pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
FAMILIES = ["ipv4", "ipv6"]
MODES = [pytest.param(True, id="cni"), pytest.param(False, id="legacy")]


def ip(pod: Pod, family: str) -> str:
    return pod.ip4 if family == "ipv4" else pod.ip6


def passthrough(family: str) -> str:
    return "127.0.0.6" if family == "ipv4" else "::6"


def cidr16(addr: str, prefixlen: int | None = None):
    """A PodPolicy CIDR: 16 bytes, IPv4 as ::ffff:a.b.c.d over /96+n."""
    if ":" in addr:
        return socket.inet_pton(socket.AF_INET6, addr), 128 if prefixlen is None else prefixlen
    return (b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr),
            96 + (32 if prefixlen is None else prefixlen))


@dataclass
class Mesh:
    lab: Lab
    dp: object
    cni_mode: bool
    a: Pod
    b: Pod
    c: Pod          # outside the mesh: no sidecar, no policy, no marker
    sa: Sidecar
    sb: Sidecar
    detached: bool = False

    def detach(self) -> None:
        if not self.detached:
            self.detached = True
            self.dp.detach()
            self.dp.unpin()
            self.dp.close()


def enrol(dp, pod: Pod, key: int, policy: PodPolicy, cni_mode: bool, closers: list) -> None:
    """What the daemon does for a mesh pod: its policy under both pod IPs and,
    in CNI mode, the marker listener (SO_MARK = key) plus mb_mark_pod_ips
    (both pod IPs: each family's connects are bound to its pod IP) and the
    record of the pod netns in mb_netns_pod."""
    for addr in pod.ips():
        dp.maps.local_pods.put(addr, policy)
    if cni_mode:
        sock = netns.open_marker_listener(labns.netns_path(pod.ns), key)
        closers.append(sock.close)
        dp.maps.mark_pod_ips.put(key, pod.ip4, pod.ip6)
        dp.maps.netns_pod.put(loader.netns_cookie_of(sock), (pod.ip4, pod.ip6), key)


def learn_pod_ips(dp, pods, outside: Pod) -> None:
    """Legacy mode knows a pod's IP (hence its policy) only after sockops saw a
    non-redirected connection of its netns leave from the pod IP; until then it
    captures everything. Like Envoy calling istiod at start-up, each sidecar
    (UID 1337) first reaches something outside the mesh."""
    for pod in pods:
        assert pod.connect(outside.ip4, 8080, uid=ISTIO.proxy_uid).ok
    learned = {addr for _, addr in dp.maps.netns_ip.items()}
    assert {pod.ip4 for pod in pods} <= learned, learned


@contextlib.contextmanager
def mesh_setup(bpffs: str, cni_mode: bool):
    """Lab + datapath; pins go to a fresh directory in the private bpffs."""
    pin_dir = os.path.join(bpffs, "merbridge")
    closers: list = []
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        c = lab.add_pod("c", in_mesh=False)
        for pod in (a, b, c):
            pod.start_app(8080)
            pod.start_app(9090)
        sa, sb = a.start_sidecar(), b.start_sidecar()
        dp = loader.Datapath(pin_dir, ISTIO, cni_mode)
        m = Mesh(lab, dp, cni_mode, a, b, c, sa, sb)
        try:
            dp.load()
            dp.attach(lab.cgroup)
            # A excludes port 9090 and pod C's addresses from outbound capture.
            enrol(dp, a, 1, PodPolicy(exclude_outbound_ports=frozenset({9090}),
                                      exclude_outbound_cidrs=(cidr16(c.ip4), cidr16(c.ip6)),
                                      status_port=ISTIO.status_port), cni_mode, closers)
            enrol(dp, b, 2, PodPolicy(status_port=ISTIO.status_port), cni_mode, closers)
            if not cni_mode:
                learn_pod_ips(dp, (a, b), c)
            yield m
        finally:
            for close in closers:
                close()
            m.detach()


@pytest.fixture(scope="module", params=MODES)
def mesh(request, make_bpffs):
    with make_bpffs() as pin_dir, mesh_setup(pin_dir, request.param) as m:
        yield m


def connect_via_sidecars(m: Mesh, family: str, port: int = 8080):
    """A-app -> B:port; returns the reply and the new sidecar log entries."""
    na, nb = len(m.sa.entries()), len(m.sb.entries())
    r = m.a.connect(ip(m.b, family), port)
    out = m.sa.wait_entries(since=na, dir="outbound")
    inb = m.sb.wait_entries(since=nb, dir="inbound")
    return r, out, inb


@pytest.mark.parametrize("family", FAMILIES)
def test_app_to_app_travels_both_sidecars(mesh, family):
    m = mesh
    r, out, inb = connect_via_sidecars(m, family)
    assert r.ok, r.error
    assert r.pod == "b"
    # A's sidecar got the connection and learnt B:8080 as original destination.
    assert [(e["dst"], e["dport"]) for e in out] == [(ip(m.b, family), 8080)]
    # ... from A's pod IP of that family: the 4-tuple is unique on the node
    # (legacy mode learns only the IPv4 one; its IPv6 connects stay on ::1)
    if m.cni_mode or family == "ipv4":
        assert out[0]["src"] == ip(m.a, family)
    # B's inbound listener got the sidecar's connection and also saw B:8080.
    assert [(e["fe"][:7], e["dst"], e["dport"]) for e in inb] == [
        ("inbound", ip(m.b, family), 8080)]
    # B's app was reached by the inbound passthrough, not directly.
    assert r.peer[0] == passthrough(family)
    assert inb[0]["bsrc"] == passthrough(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_pod_outside_the_mesh_is_untouched(mesh, family):
    m = mesh
    na, nb = len(m.sa.entries()), len(m.sb.entries())
    # C's own connections are not redirected: B's app sees C itself.
    r = m.c.connect(ip(m.b, family), 8080)
    assert r.ok, r.error
    assert r.peer[0] == ip(m.c, family) and r.client_peer == (ip(m.b, family), 8080)
    # B (mesh) -> C: B's sidecar carries it and reaches C directly from B's
    # own IP; nothing captures it inbound, as C has no sidecar.
    nb2 = len(m.sb.entries())
    r = m.b.connect(ip(m.c, family), 8080)
    assert r.ok, r.error
    assert r.peer[0] == ip(m.b, family)  # from B's sidecar's upstream socket
    assert [(e["dir"], e["dst"], e["dport"]) for e in m.sb.wait_entries(since=nb2)] == [
        ("outbound", ip(m.c, family), 8080)]
    assert m.sa.entries(na) == []
    assert [e for e in m.sb.entries(nb) if e["dir"] == "inbound"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_excluded_port_and_cidr_bypass_the_sidecar(mesh, family):
    m = mesh
    na = len(m.sa.entries())
    r = m.a.connect(ip(m.b, family), 9090)  # excluded outbound port
    assert r.ok, r.error
    assert r.peer[0] == ip(m.a, family) and r.client_peer == (ip(m.b, family), 9090)
    r = m.a.connect(ip(m.c, family), 8080)  # excluded CIDR
    assert r.ok, r.error
    assert r.peer[0] == ip(m.a, family)
    assert m.sa.entries(na) == []
    # ... while a port that is not excluded still goes through the sidecar.
    r, out, _ = connect_via_sidecars(m, family)
    assert r.ok and out and r.peer[0] == passthrough(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_sidecar_traffic_is_not_caught_again(mesh, family):
    m = mesh
    na = len(m.sa.entries())
    # A process with the proxy's UID/GID reaching a non-mesh pod goes straight.
    r = m.a.connect(ip(m.c, family), 9090, uid=ISTIO.proxy_uid)
    assert r.ok, r.error
    assert r.peer[0] == ip(m.a, family)
    assert m.sa.entries(na) == []
    # Exactly one outbound and one inbound hop per app connection: the
    # sidecars' upstream sockets were not redirected into a sidecar again.
    r, out, inb = connect_via_sidecars(m, family)
    assert r.ok and len(out) == 1 and len(inb) == 1
    # A direct connection to the outbound port has no original destination:
    # refused by the self-loop guard, and the sidecar survives.
    r = m.a.connect("127.0.0.1" if family == "ipv4" else "::1", ISTIO.out_port, timeout=2)
    assert not r.ok
    assert all(p.poll() is None for p in m.sa.procs)


@pytest.mark.parametrize("cni_mode", MODES)
def test_detach_and_unpin_restore_the_direct_path(pin_dir, cni_mode):
    with mesh_setup(pin_dir, cni_mode) as m:
        r, out, _ = connect_via_sidecars(m, "ipv4")
        assert r.ok and out and r.peer[0] == "127.0.0.6"
        cgroup = m.lab.cgroup
        a, b, sa = m.a, m.b, m.sa
        assert _attached(cgroup) != ""
        m.detach()  # the pods and sidecars stay up
        assert _attached(cgroup) == ""
        # nothing of ours stays pinned (a fresh bpffs holds the kernel's
        # preloaded maps.debug/progs.debug iterators, nothing else)
        assert [f for f in os.listdir(pin_dir) if not f.endswith(".debug")] == []
        na = len(sa.entries())
        for family in FAMILIES:
            r = a.connect(ip(b, family), 8080)
            assert r.ok, r.error
            assert r.peer[0] == ip(a, family)
        assert sa.entries(na) == []


def _attached(cgroup: str) -> str:
    res = subprocess.run(["bpftool", "cgroup", "show", cgroup], capture_output=True,
                         text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines()[1:] if ln.strip()]
    return "\n".join(lines)
