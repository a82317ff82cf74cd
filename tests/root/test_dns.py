"""DNS capture to the sidecar's DNS proxy, against Istio's own DNS rules.

A real DNS server (dnsmasq) runs in pod N, outside the mesh (another
namespace); each mesh pod runs a stand-in for the agent's DNS proxy on
127.0.0.1:15053 and [::1]:15053 (dnsmasq as the proxy's UID) that answers
svc.example. with its own address. Pod A is enrolled with DNS capture
(ISTIO_META_DNS_CAPTURE="true", MB_POD_F_DNS_CAPTURE), pod B without it, and
pod I is not enrolled at all but carries the real istio-iptables rules with
istio-cni's DNS capture (``labconfig.istio_iptables(redirect_dns=True)``,
cni/pkg/plugin/testdata/dns.txt.golden): the oracle. For every way of asking
(unconnected UDP, connected UDP, TCP; IPv4, IPv6, IPv4-mapped on a dual-stack
socket) and every caller (the app, the proxy's UID) A must see exactly what I
sees: the app gets the proxy's answer from the server's address, the proxy
gets the real server's answer; B always gets the real server's. dig, a real
resolver that drops a reply from an unexpected source, is asked too.
"""
from __future__ import annotations

import contextlib
import os

import pytest

from merbridge.bpf import loader
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.lab.lab import Lab, Pod
from test_e2e_sidecar import enrol

pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
MODES = [pytest.param(True, id="cni"), pytest.param(False, id="legacy")]
NAME = "svc.example"
REAL, PROXIED = "10.99.0.1", "10.99.0.53"

def dnsmasq(pod: Pod, port: int, addrs: list[str], answer: str, uid: int | None = None,
            upstream: str | None = None) -> None:
    pod.start_dns(port, addrs, {NAME: answer}, uid=uid, upstream=upstream)


def query(pod: Pod, how: str, host: str, uid: int | None = None) -> dict:
    return pod.dns_query(how, host, NAME, uid=uid)


def dig(pod: Pod, host: str, tcp: bool = False) -> str:
    """dig's answer (it ignores a UDP reply from another address than it asked)."""
    argv = ["dig", f"@{host}", NAME, "A", "+short", "+tries=1", "+time=3"]
    res = pod.run(argv + (["+tcp"] if tcp else []))
    return res.stdout.strip()


@contextlib.contextmanager
def dns_setup(bpffs: str, cni_mode: bool):
    pin_dir = os.path.join(bpffs, "merbridge")
    closers: list = []
    with Lab("mbt") as lab:
        n = lab.add_pod("n", in_mesh=False)
        a, b, i = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("i", in_mesh=False)
        dnsmasq(n, 53, [n.ip4, n.ip6], REAL)
        for pod in (a, b, i):
            dnsmasq(pod, ISTIO.dns_port, ["127.0.0.1", "::1"], PROXIED, uid=ISTIO.proxy_uid,
                    upstream=n.ip4)
        i.apply_istio_iptables(redirect_dns=True)
        # the sidecars' outbound listener: legacy mode's mesh probe; B's TCP
        # port-53 connects are ordinary outbound traffic
        a.start_sidecar()
        b.start_sidecar()
        dp = loader.Datapath(pin_dir, ISTIO, cni_mode)
        try:
            dp.load()
            dp.attach(lab.cgroup)
            for key, pod, dns in ((1, a, True), (2, b, False)):
                enrol(dp, pod, key, PodPolicy(status_port=ISTIO.status_port, dns_capture=dns),
                      cni_mode, closers)
                if not cni_mode:
                    # legacy: the pod IPs are learned from the proxy's own connections
                    for addr in (n.ip4, n.ip6):
                        pod.connect(addr, 53, uid=ISTIO.proxy_uid, timeout=1)
            if not cni_mode:
                learned = {x for _, ips in dp.maps.netns_ip.all_items() for x in ips}
                assert set(a.ips()) | set(b.ips()) <= learned, learned
            yield lab, dp
        finally:
            for close in closers:
                close()
            dp.detach()
            dp.unpin()
            dp.close()


@pytest.fixture(scope="module", params=MODES)
def env(request, make_bpffs):
    with make_bpffs() as bpffs, dns_setup(bpffs, request.param) as e:
        yield e


def server(lab: Lab, family: str) -> str:
    n = lab.pods["n"]
    return {"ipv4": n.ip4, "ipv6": n.ip6, "v4-mapped": "::ffff:" + n.ip4}[family]


FAMILIES = ["ipv4", "ipv6", "v4-mapped"]
HOWS = ["udp", "connected", "tcp"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_app_query_is_answered_by_the_proxy_from_the_server(env, family, how):
    lab, dp = env
    host = server(lab, family)
    before = dp.maps.counters()["dns_captured"]
    ours = query(lab.pods["a"], how, host)
    assert dp.maps.counters()["dns_captured"] - before == 1
    oracle = query(lab.pods["i"], how, host)
    assert ours == oracle == {"answer": PROXIED, "from": [host, 53]}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_own_query_reaches_the_server(env, family, how):
    lab, dp = env
    host = server(lab, family)
    before = dp.maps.counters()["dns_captured"]
    ours = query(lab.pods["a"], how, host, uid=ISTIO.proxy_uid)
    oracle = query(lab.pods["i"], how, host, uid=ISTIO.proxy_uid)
    assert ours == oracle == {"answer": REAL, "from": [host, 53]}
    assert dp.maps.counters()["dns_captured"] == before


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pod_without_dns_capture_is_untouched(env, family, how):
    """UDP leaves as it is; TCP is captured as any outbound connection is
    (as istio-iptables without DNS capture: ISTIO_OUTPUT REDIRECTs all TCP):
    B's sidecar passes it on to the server."""
    lab, dp = env
    host = server(lab, family)
    b = lab.pods["b"]
    before = dp.maps.counters()
    since = len(b.sidecar.entries())
    assert query(b, how, host) == {"answer": REAL, "from": [host, 53]}
    after = dp.maps.counters()
    assert after["dns_captured"] == before["dns_captured"]
    out = b.sidecar.wait_entries(since=since, dir="outbound", timeout=2 if how == "tcp" else 0)
    assert [(x["dst"], x["dport"]) for x in out] == ([(host.removeprefix("::ffff:"), 53)]
                                                     if how == "tcp" else [])
    assert after["redirect_out"] - before["redirect_out"] == (how == "tcp")


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_real_resolver_accepts_the_reply(env, family, tcp):
    """dig checks the reply's source; under merbridge as under iptables it
    gets the proxy's answer, in pod B the server's."""
    lab, _ = env
    host = server(lab, family)
    assert dig(lab.pods["a"], host, tcp) == dig(lab.pods["i"], host, tcp) == PROXIED
    assert dig(lab.pods["b"], host, tcp) == REAL


def test_proxy_tcp_53_to_its_own_pod_is_left_alone(env):
    """With DNS capture, istio-iptables' proxy-UID rules leave TCP 53 alone, to
    the pod's own IP too (the lo rule's ``! --dports 53,15008``, then the UID's
    RETURN): the proxy reaches its own app's port 53 directly, as in pod I,
    not through its inbound listener (whose upstream call would come from
    127.0.0.6)."""
    lab, _ = env
    a, i = lab.pods["a"], lab.pods["i"]
    seen = {}
    for pod in (a, i):
        pod.start_app(53)
        r = pod.connect(pod.ip4, 53, uid=ISTIO.proxy_uid)
        assert r.ok, r
        seen[pod.name] = (r.peer[0] == r.local[0] == pod.ip4, r.local[1])
    assert seen["a"] == seen["i"] == (True, 53), seen


def test_loopback_and_excluded_port(env):
    """All port-53 traffic is captured, a loopback resolver's too (the
    "-o lo ! --uid-owner RETURN" rules leave port 53 to ISTIO_OUTPUT_DNS);
    excludeOutboundPorts=53 comes first and leaves it all alone."""
    lab, dp = env
    a, i = lab.pods["a"], lab.pods["i"]
    for pod in (a, i):
        dnsmasq(pod, 53, ["127.0.0.1"], "10.99.0.127")
    # the pod's own resolver on 127.0.0.1:53 is passed over for the proxy
    for how in HOWS:
        assert query(a, how, "127.0.0.1") == query(i, how, "127.0.0.1") == {
            "answer": PROXIED, "from": ["127.0.0.1", 53]}
    for addr in a.ips():
        dp.maps.local_pods.put(addr, PodPolicy(status_port=ISTIO.status_port, dns_capture=True,
                                               exclude_outbound_ports=frozenset({53})))
    try:
        host = lab.pods["n"].ip4
        for how in HOWS:
            assert query(a, how, host) == {"answer": REAL, "from": [host, 53]}
    finally:
        for addr in a.ips():
            dp.maps.local_pods.put(addr, PodPolicy(status_port=ISTIO.status_port,
                                                   dns_capture=True))
