"""The lab itself, and the istio-iptables oracle the eBPF datapath is judged by.

With istio's REDIRECT rules in the pods, app A -> B:8080 must travel
A-app -> A-sidecar (saw B:8080) -> B-sidecar :15006 (saw B:8080) -> B-app
(peer 127.0.0.6 / ::6). test_e2e_sidecar.py expects exactly the same from eBPF.
"""
import os

import pytest

from merbridge.lab import netns
from merbridge.lab.lab import Lab, LabError

pytestmark = pytest.mark.root

FAMILIES = ["ipv4", "ipv6"]


def ip(pod, family):
    return pod.ip4 if family == "ipv4" else pod.ip6


def passthrough(family):
    return "127.0.0.6" if family == "ipv4" else "::6"


def test_lab_builds_two_nodes_and_leaves_nothing_behind():
    before = set(netns.links(None))
    lab = Lab("mbt", nodes_count=2)
    try:
        a = lab.add_pod("a")
        b = lab.add_pod("b", node=1)
        assert netns.links(a.ns) == ["lo", "eth0"]
        assert {f"{a.ip4}/24", f"{a.ip6}/64"} <= set(netns.addresses(a.ns, "eth0"))
        assert netns.link_exists(a.node.ns, a.host_if)
        assert os.path.isdir(a.cgroup) and os.path.dirname(a.cgroup) == lab.cgroup
        app = b.start_app(8080)
        # The app really runs inside the pod's cgroup.
        with open(os.path.join(b.cgroup, "cgroup.procs")) as f:
            assert str(app.pid) in f.read().split()
        for dst in (b.ip4, b.ip6):  # across nodes, routed by the node namespaces
            r = a.connect(dst, 8080)
            assert r.ok, r.error
            assert r.pod == "b" and r.peer[0] in (a.ip4, a.ip6) and r.local == (dst, 8080)
        sc = a.start_sidecar()
        pids = [app.pid] + [p.pid for p in sc.procs]
        names = [n.ns for n in lab.nodes] + [a.ns, b.ns]
        cgroups, workdir = [lab.cgroup, a.cgroup, b.cgroup], lab.workdir
    finally:
        lab.close()
    assert not any(netns.netns_exists(n) for n in names)
    assert not any(os.path.exists(c) for c in cgroups)
    assert not os.path.exists(workdir)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    assert set(netns.links(None)) - before == set()


def _zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_lab_cleans_up_after_a_failed_step():
    lab = Lab("mbt")
    pod = lab.add_pod("a")
    with pytest.raises(LabError):
        lab.add_pod("a")  # duplicate
    with pytest.raises(LabError):
        pod.start_app(port=70000)  # the app dies: reported, not hung
    ns, cg = pod.ns, pod.cgroup
    lab.close()
    assert not netns.netns_exists(ns) and not os.path.exists(cg)


def test_pod_run_as_uid_in_netns_and_cgroup(lab):
    pod = lab.add_pod("a")
    res = pod.run(["sh", "-c", "id -u; id -G; grep ^0:: /proc/self/cgroup; ip -o link"],
                  uid=1337)
    assert res.returncode == 0, res.stderr
    uid, groups, cgline, links = res.stdout.split("\n", 3)
    assert uid == "1337" and groups == "1337"
    assert cgline == f"0::/{lab.name}/a"
    assert [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()] == ["lo", "eth0"]
    assert netns.get_sysctl(lab.nodes[0].ns, "net.ipv4.ip_forward") == "0"


@pytest.mark.parametrize("nodes", [1, 2], ids=["same-node", "cross-node"])
@pytest.mark.parametrize("family", FAMILIES)
def test_istio_iptables_oracle_app_to_app(family, nodes):
    with Lab("mbt", nodes_count=nodes) as lab:
        _app_to_app(lab, family)


def _app_to_app(lab, family):
    a, b = lab.add_pod("a"), lab.add_pod("b", node=len(lab.nodes) - 1)
    b.start_app(8080)
    sa, sb = a.start_sidecar(), b.start_sidecar()
    a.apply_istio_iptables()
    b.apply_istio_iptables()
    assert "ISTIO_REDIRECT" in a.iptables_nat(4) and "::6/128" in a.iptables_nat(6)

    r = a.connect(ip(b, family), 8080)
    assert r.ok, r.error
    assert r.pod == "b"
    assert r.peer[0] == passthrough(family)  # delivered by B's inbound sidecar
    assert r.client_peer == (ip(b, family), 8080)  # the app never sees the redirect
    out = sa.wait_entries(dir="outbound")
    assert [(e["dst"], e["dport"]) for e in out] == [(ip(b, family), 8080)]
    inb = sb.wait_entries(dir="inbound")
    assert [(e["dst"], e["dport"], e["src"]) for e in inb] == [(ip(b, family), 8080,
                                                                 ip(a, family))]
    assert inb[0]["bsrc"] == passthrough(family)
    # The sidecars' own upstream connections were not caught again.
    assert not sa.entries()[1:] and not [e for e in sb.entries() if e["dir"] == "outbound"]


@pytest.mark.parametrize("family", FAMILIES)
def test_istio_iptables_oracle_mesh_boundaries(lab, family):
    a, b, c = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("c", in_mesh=False)
    for p in (a, b, c):
        p.start_app(8080)
        p.start_app(9090)
    sa, sb = a.start_sidecar(), b.start_sidecar()
    a.apply_istio_iptables(exclude_outbound_ports=(15020, 9090),
                           exclude_outbound_cidrs=(f"{c.ip4}/32", f"{c.ip6}/128"))
    b.apply_istio_iptables()

    # Out-of-mesh C -> B: C untouched, B's inbound still captures.
    r = c.connect(ip(b, family), 8080)
    assert r.ok and r.peer[0] == passthrough(family)
    # Excluded outbound port: A's sidecar is bypassed, B still captures inbound.
    r = a.connect(ip(b, family), 9090)
    assert r.ok and r.peer[0] == passthrough(family)
    assert sb.wait_entries(dir="inbound", dport=9090)
    # Excluded CIDR: A -> C goes straight, C (no sidecar) sees A itself.
    r = a.connect(ip(c, family), 8080)
    assert r.ok and r.peer[0] == ip(a, family)
    assert sa.entries() == []
    # Self-loop guard: a direct connection to the outbound port is refused
    # (no original destination), and the sidecar survives it.
    lo = "127.0.0.1" if family == "ipv4" else "::1"
    r = a.connect(lo, 15001, timeout=2)
    assert not r.ok
    assert all(p.poll() is None for p in sa.procs)
    assert a.connect(ip(b, family), 8080).ok
