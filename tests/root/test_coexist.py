"""Coexistence with Istio's own iptables: the production upgrade path.

istio-init (or istio-cni) leaves its nat rules in every pod while merbridge
runs. Our connect rewrite happens first; iptables must then leave the
rewritten connection alone (it sees loopback or the proxy's UID), and each
sidecar must see the right original destination, answered by our
getsockopt even where conntrack could answer too. Uninstalling merbridge
(detach + unpin) hands interception back to iptables with no change to
Istio. Both modes, IPv4 and IPv6:

    A-app -> B:8080  ==  A-sidecar (saw B:8080) -> B-sidecar :15006 (saw B:8080)
                         -> B-app (peer 127.0.0.6 / ::6)

with exactly one outbound and one inbound hop (no double interception).
The proxy's own calls through lo (its own pod IP, Istio's validation probe)
are NATed once too: our rewrite sends them to 127.0.0.1 / ::1, which Istio's
"--uid-owner 1337 -j RETURN" leaves alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass

import pytest

from hookenv import PROBE
from merbridge.bpf import loader
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import PYTHON, Lab, Pod, Sidecar

pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
FAMILIES = ["ipv4", "ipv6"]
MODES = [pytest.param(True, id="cni"), pytest.param(False, id="legacy")]


def ip(pod: Pod, family: str) -> str:
    return pod.ip4 if family == "ipv4" else pod.ip6


def passthrough(family: str) -> str:
    return "127.0.0.6" if family == "ipv4" else "::6"


@dataclass
class Env:
    lab: Lab
    dp: loader.Datapath
    cni_mode: bool
    a: Pod
    b: Pod
    c: Pod
    v: Pod
    sa: Sidecar
    sb: Sidecar
    pin_dir: str
    attached: bool = True

    def uninstall(self) -> None:
        if self.attached:
            self.attached = False
            self.dp.detach()
            self.dp.unpin()
            self.dp.close()


@contextlib.contextmanager
def coexist_setup(bpffs: str, cni_mode: bool):
    """Pods A and B with sidecars AND istio-iptables, C outside the mesh, V
    with istio-iptables but no sidecar yet (where istio-validation runs);
    the datapath attached to the lab cgroup and A, B and V enrolled (both
    pod IPs per mark, as the daemon does)."""
    pin_dir = os.path.join(bpffs, "merbridge")
    closers: list = []
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        c = lab.add_pod("c", in_mesh=False)
        v = lab.add_pod("v")
        for pod in (a, b, c):
            pod.start_app(8080)
        b.start_app(9090)
        sa, sb = a.start_sidecar(), b.start_sidecar()
        for pod in (a, b, v):
            pod.apply_istio_iptables()
        dp = loader.Datapath(pin_dir, ISTIO, cni_mode)
        env = Env(lab, dp, cni_mode, a, b, c, v, sa, sb, pin_dir)
        try:
            dp.load()
            dp.attach(lab.cgroup)
            # A's eBPF policy leaves port 9090 alone; Istio's rules do not
            policy_a = PodPolicy(status_port=ISTIO.status_port,
                                 exclude_outbound_ports=frozenset({9090}))
            policy_b = PodPolicy(status_port=ISTIO.status_port)
            for key, pod, policy in ((1, a, policy_a), (2, b, policy_b), (3, v, policy_b)):
                for addr in pod.ips():
                    dp.maps.local_pods.put(addr, policy)
                if cni_mode:
                    sock = netns.open_marker_listener(labns.netns_path(pod.ns), key)
                    closers.append(sock.close)
                    dp.maps.mark_pod_ips.put(key, *pod.ips())
                    dp.maps.netns_pod.put(loader.netns_cookie_of(sock), pod.ips(), key)
            yield env
        finally:
            for close in closers:
                close()
            env.uninstall()


@pytest.fixture(scope="module", params=MODES)
def env(request, make_bpffs):
    with make_bpffs() as pin_dir, coexist_setup(pin_dir, request.param) as e:
        yield e


def through_sidecars(e: Env, family: str) -> None:
    """A-app -> B:8080 takes exactly one outbound and one inbound hop, each
    sidecar seeing B:8080 as the original destination."""
    na, nb = len(e.sa.entries()), len(e.sb.entries())
    r = e.a.connect(ip(e.b, family), 8080)
    assert r.ok, r.error
    assert r.pod == "b"
    assert r.peer[0] == passthrough(family)
    out = e.sa.wait_entries(since=na, dir="outbound")
    inb = e.sb.wait_entries(since=nb, dir="inbound")
    assert [(x["dst"], x["dport"]) for x in out] == [(ip(e.b, family), 8080)]
    assert [(x["dst"], x["dport"]) for x in inb] == [(ip(e.b, family), 8080)]
    assert inb[0]["bsrc"] == passthrough(family)
    # no other hop anywhere: not a second outbound in A, no inbound in A,
    # no outbound in B
    assert len(e.sa.entries(na)) == 1 and len(e.sb.entries(nb)) == 1


def moved(e: Env, before: dict[str, int]) -> dict[str, int]:
    """How far each datapath counter moved since ``before`` (maps.counters())."""
    return {k: v - before.get(k, 0) for k, v in e.dp.maps.counters().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_ebpf_first_with_istio_rules_in_place(env, family):
    before = env.dp.maps.counters()
    through_sidecars(env, family)
    d = moved(env, before)
    # it was our datapath, not iptables, that intercepted: both hops were
    # rewritten at connect and both original destinations answered by us
    assert d["redirect_out"] == 1
    assert d["redirect_in"] == 1
    assert d["getsockopt_answer"] >= 2


@pytest.mark.parametrize("family", FAMILIES)
def test_ebpf_first_again_after_the_pod_ip_is_known(env, family):
    """Legacy mode learns a pod's IP from its sidecar's own connections;
    interception must work before (above) and after that."""
    for pod in (env.a, env.b):
        assert pod.connect(ip(env.c, family), 8080, uid=ISTIO.proxy_uid).ok
    through_sidecars(env, family)


def learn_pod_ip(e: Env, family: str = "ipv4") -> None:
    """Legacy mode: A's IP of a family is known once its proxy made a
    connection of its own in that family (mb_netns_ip holds one per family)."""
    if not e.cni_mode:
        assert e.a.connect(ip(e.c, family), 8080, uid=ISTIO.proxy_uid).ok


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_calls_its_own_pod_ip(env, family):
    """The proxy calling its own pod IP ("-o lo ! -d 127.0.0.1/32 --uid-owner
    1337 -j ISTIO_IN_REDIRECT") lands on its own inbound listener, which sees
    A:8080 and passes the call on to its app; one hop only. Our rewrite goes
    to 127.0.0.1 / ::1:15006, which iptables leaves alone: had it gone to
    A:15006, iptables would REDIRECT it once more and conntrack's answer
    (A:15006) would hide ours."""
    e = env
    learn_pod_ip(e, family)
    na = len(e.sa.entries())
    before = e.dp.maps.counters()
    r = e.a.connect(ip(e.a, family), 8080, uid=ISTIO.proxy_uid)
    assert r.ok, r.error
    assert r.pod == "a" and r.peer[0] == passthrough(family)
    inb = e.sa.wait_entries(since=na, dir="inbound")
    assert [(x["dst"], x["dport"], x["src"]) for x in inb] == [
        (ip(e.a, family), 8080, ip(e.a, family))]
    assert len(e.sa.entries(na)) == 1
    d = moved(e, before)
    assert d["redirect_in"] == 1
    assert d["bind_pod_ip"] == 1
    assert d["getsockopt_answer"] >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_istio_validation_probe_passes_with_istio_rules(env, family):
    """istio-validation (hookenv.PROBE) in V: the connection lands on
    127.0.0.1 (::1):15006 with SO_ORIGINAL_DST 127.0.0.6 (::6):15002,
    rewritten by us, not by iptables (whose second REDIRECT would have left
    conntrack answering :15006 and the probe failing)."""
    e = env
    before = e.dp.maps.counters()
    res = e.v.run([PYTHON, "-I", "-c", PROBE, family[-1]], uid=ISTIO.proxy_uid,
                  gid=ISTIO.proxy_gid)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    loopback = "127.0.0.1" if family == "ipv4" else "::1"
    assert "error" not in r, r
    assert (r["port"], r["local"], r["orig"]) == (
        ISTIO.in_port, [loopback, ISTIO.in_port], [passthrough(family), 15002])
    d = moved(e, before)
    assert d["redirect_in"] == 1
    assert d["getsockopt_answer"] == 1


BOUND_CLIENT = r"""
import json, socket, sys
s = socket.socket()
s.settimeout(5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"hi\n")
print(s.recv(4096).decode().strip())
"""


def test_conntrack_answer_wins_for_connections_iptables_redirected(env):
    """A connection our policy leaves alone but Istio's rules REDIRECT: the
    kernel (conntrack) answers SO_ORIGINAL_DST and must not be overridden,
    even by a stale entry of ours under the very same tuple."""
    e = env
    learn_pod_ip(e)   # legacy: A's policy applies once its IP is learned
    sport = 40001
    from merbridge.bpf import types as t
    stale = t.MbOrigin(addr=t.MbAddr.of("10.9.9.9"), port=socket.htons(1234),
                       flags=t.MB_ORIGIN_F_REDIRECT)
    e.dp.maps.pair_orig_dst.put(t.MbPair.of(e.a.ip4, sport, "127.0.0.1", ISTIO.out_port), stale)
    na = len(e.sa.entries())
    before = e.dp.maps.counters()
    res = e.a.run(["/usr/bin/python3", "-I", "-c", BOUND_CLIENT, e.b.ip4, "9090", str(sport)])
    assert res.returncode == 0, res.stderr
    assert '"pod": "b"' in res.stdout and '"port": 9090' in res.stdout
    out = e.sa.wait_entries(since=na, dir="outbound")
    assert [(x["dst"], x["dport"]) for x in out] == [(e.b.ip4, 9090)]
    d = moved(e, before)
    assert d["bypass_policy"] > 0   # not our rewrite
    assert d["getsockopt_nat"] == 1


@pytest.mark.parametrize("cni_mode", MODES)
def test_uninstall_falls_back_to_istio_iptables(pin_dir, cni_mode):
    with coexist_setup(pin_dir, cni_mode) as e:
        through_sidecars(e, "ipv4")
        e.uninstall()
        assert [f for f in os.listdir(pin_dir) if not f.endswith(".debug")] == []
        # zero change to Istio: its rules intercept again, with the right
        # original destinations, both families
        for family in FAMILIES:
            through_sidecars(e, family)


def test_rules_are_istios(lab):
    """The oracle really is istio-iptables: REDIRECT to 15001 / 15006."""
    p = lab.add_pod("r")
    p.apply_istio_iptables()
    nat = p.iptables_nat(4)
    assert "-j REDIRECT --to-ports 15001" in nat and "-j REDIRECT --to-ports 15006" in nat
    assert socket.has_ipv6 and "REDIRECT" in p.iptables_nat(6)
