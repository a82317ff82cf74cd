"""Root tests of each datapath hook against the real kernel.

(Over 450 lines on purpose: one module-scoped Datapath per mode is loaded once
and shared by every hook's cases; split files would each compile it again.)

One Datapath per mode is loaded into a private pin dir for the module; each
test makes its own pod (netns + child cgroup), attaches the programs to that
cgroup, and checks with plain sockets where a connect landed and what
SO_ORIGINAL_DST said. Addresses live only on a dummy interface inside the
test's netns.
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import subprocess
import time
import uuid

import pytest

from hookenv import PROBE, Pod, datapath, sh
from merbridge.bpf import loader, mesh, sysbpf
from merbridge.bpf import types as t
from merbridge.bpf.maps import encode_policy
from merbridge.bpf.policy import PodPolicy
from merbridge.lab import labconfig

pytestmark = pytest.mark.root

ISTIO = mesh.get("istio")
POD4, DST4 = "10.231.0.1", "10.231.0.2"
POD6, DST6 = "fd00:231::1", "fd00:231::2"
MARK = 0x2310001
MARK2 = 0x2310002   # test_probe_cache_*
MARK3 = 0x2310003   # test_istio_validation_probe_*


@pytest.fixture(scope="module")
def dp():
    with datapath(cni_mode=True) as d:
        yield d


@pytest.fixture
def pod(dp):
    """A CNI-mode mesh pod: marker listener with SO_MARK, pod IPs, servers.

    DST4/DST6:8080 is a plain server in the pod's netns outside the cgroup
    ("direct"); 127.0.0.1/[::1]:15001 is the sidecar stand-in ("proxy"),
    run as UID 1337 inside the cgroup (getsockopt and sockops act on sockets
    created there); :15006 the inbound listener."""
    p = Pod(v4=[POD4, DST4], v6=[POD6, DST6])
    try:
        p.serve("marker", "0.0.0.0", 39807, mark=MARK, in_cgroup=False)
        p.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        p.serve("direct6", "::", 8081, fam="6", in_cgroup=False)
        p.serve("proxy", "127.0.0.1", 15001, uid=1337, gid=1337)
        p.serve("proxy6", "::1", 15001, fam="6", uid=1337, gid=1337)
        p.serve("inbound", "0.0.0.0", 15006, uid=1337, gid=1337)
        p.enrol(dp, MARK, POD4)
        dp.maps.local_pods.put(POD4, PodPolicy())
        dp.attach(p.cgroup)
        yield p
    finally:
        dp.detach(p.cgroup)
        dp.maps.local_pods.delete(POD4)
        dp.maps.local_pods.delete(POD6)
        Pod.forget(dp, MARK)
        p.close()


def test_app_connect_v4_goes_to_sidecar_with_original_dst(dp, pod):
    before = dp.maps.counters()
    r = pod.connect(DST4, 8080)
    assert r["reply"]["tag"] == "proxy"
    assert r["reply"]["orig"] == [DST4, 8080]
    assert r["reply"]["data"] == "hello"
    # the source was bound to the pod IP (quadruple conflict), and the app
    # still sees its own side as the pod IP
    assert r["reply"]["peer"][0] == POD4 and r["sock"][0] == POD4
    after = dp.maps.counters()
    assert after["redirect_out"] - before["redirect_out"] == 1
    assert after["bind_pod_ip"] - before["bind_pod_ip"] == 1
    assert after["getsockopt_answer"] - before["getsockopt_answer"] == 1
    assert after["pair_recorded"] - before["pair_recorded"] == 1


def test_app_connect_v6_goes_to_sidecar(dp, pod):
    dp.maps.mark_pod_ips.put(MARK, POD6)  # a v6 pod: bind to its v6 address
    dp.maps.local_pods.put(POD6, PodPolicy())
    r = pod.connect(DST6, 8081)
    assert r["reply"]["tag"] == "proxy6"
    assert r["reply"]["orig"] == [DST6, 8081]
    assert r["reply"]["peer"][0] == POD6


def test_v4_pod_v6_destination_still_redirected_unbound(dp, pod):
    """A single-stack IPv4 pod (no IPv6 pod IP to bind): a v6 connect is still
    redirected, from ::1."""
    r = pod.connect(DST6, 8081)
    assert r["reply"]["tag"] == "proxy6"
    assert r["reply"]["orig"] == [DST6, 8081]
    assert r["reply"]["peer"][0] == "::1"


def test_dual_stack_pod_binds_each_family_to_its_pod_ip(dp, pod):
    """CNI mode, a dual-stack pod: mb_mark_pod_ips holds both pod IPs, so an
    IPv6 connect is bound to the v6 pod IP (not left on ::1, where two pods'
    tuples could collide in the node-global pair map), an IPv4 one to the v4
    pod IP, and an IPv4-mapped destination on an AF_INET6 socket (really an
    IPv4 connection) to the v4 pod IP."""
    dp.maps.mark_pod_ips.put(MARK, POD4, POD6)
    dp.maps.local_pods.put(POD6, PodPolicy())
    before = dp.maps.counters()
    r = pod.connect(DST6, 8081)
    assert r["reply"]["tag"] == "proxy6" and r["reply"]["orig"] == [DST6, 8081]
    assert r["reply"]["peer"][0] == POD6 and r["sock"][0] == POD6
    r = pod.connect(DST4, 8080)
    assert r["reply"]["tag"] == "proxy" and r["reply"]["orig"] == [DST4, 8080]
    assert r["reply"]["peer"][0] == POD4
    r = pod.connect(f"::ffff:{DST4}", 8080)
    assert r["reply"]["tag"] == "proxy" and r["reply"]["orig"] == [DST4, 8080]
    assert r["reply"]["peer"][0] == POD4 and r["sock"][0] == f"::ffff:{POD4}"
    after = dp.maps.counters()
    assert after["bind_pod_ip"] - before["bind_pod_ip"] == 3
    assert after["getsockopt_answer"] - before["getsockopt_answer"] == 3


def test_v4_mapped_destination_on_v6_socket_is_redirected(dp, pod):
    """An AF_INET6 socket connecting to ::ffff:a.b.c.d goes through connect6:
    redirected to ::ffff:127.0.0.1 (the v4 proxy listener), bound to the v4
    pod IP, and SO_ORIGINAL_DST is the IPv4 destination."""
    before = dp.maps.counters()
    r = pod.connect(f"::ffff:{DST4}", 8080)
    assert r["reply"]["tag"] == "proxy"
    assert r["reply"]["orig"] == [DST4, 8080]
    assert r["reply"]["local"] == ["127.0.0.1", 15001]
    assert r["reply"]["peer"][0] == POD4 and r["sock"][0] == f"::ffff:{POD4}"
    after = dp.maps.counters()
    assert after["redirect_out"] - before["redirect_out"] == 1
    assert after["bind_pod_ip"] - before["bind_pod_ip"] == 1
    # the same rules as IPv4: the own pod IP and loopback are left alone
    assert pod.connect(f"::ffff:{POD4}", 8080)["reply"]["tag"] == "direct"
    assert pod.connect("::ffff:127.0.0.1", 8080)["reply"]["tag"] == "direct"


PODS2 = {"a": ("10.231.1.1", "fd00:231:1::1", 0x2310011),
         "b": ("10.231.2.1", "fd00:231:2::1", 0x2310012)}


def test_two_dual_stack_pods_on_one_source_port_keep_their_original_dst(dp):
    """Two dual-stack pods whose IPv6 connects get the same source port (the
    only one in their ephemeral range) while their sidecars have not yet
    asked SO_ORIGINAL_DST: the pair map keys differ by pod IP, so each
    sidecar sees its own app's destination (bound to ::1, the second entry
    would overwrite the first)."""
    pods: dict[str, Pod] = {}
    try:
        for name, (ip4, ip6, mark) in PODS2.items():
            p = pods[name] = Pod(v4=[ip4], v6=[ip6])
            p.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
            p.serve("marker", "0.0.0.0", 39807, mark=mark, in_cgroup=False)
            p.serve(f"proxy-{name}", "::1", 15001, fam="6", uid=1337, gid=1337,
                    accept_delay=2)
            p.enrol(dp, mark, ip4, ip6)
            dp.maps.local_pods.put(ip6, PodPolicy())
            dp.attach(p.cgroup)
        # both connections complete their handshake before either is accepted
        clients = {name: pods[name].connect_async(f"fd00:231:99::{i + 1}", 8000 + i)
                   for i, name in enumerate(PODS2)}
        replies = {name: Pod.finish(c) for name, c in clients.items()}
        for i, name in enumerate(PODS2):
            r = replies[name]
            assert r["reply"]["tag"] == f"proxy-{name}"
            assert r["sock"] == [PODS2[name][1], 40000]
            assert r["reply"]["orig"] == [f"fd00:231:99::{i + 1}", 8000 + i]
    finally:
        for name, p in pods.items():
            dp.detach(p.cgroup)
            Pod.forget(dp, PODS2[name][2])
            dp.maps.local_pods.delete(PODS2[name][1])
            p.close()


FAMILY_DST = {"v4": (DST4, 8080, "direct"), "v6": (DST6, 8081, "direct6")}


@pytest.mark.parametrize("family", sorted(FAMILY_DST))
@pytest.mark.parametrize("who", [{"uid": 1337}, {"gid": 1337}], ids=["uid", "gid"])
def test_proxy_uid_or_gid_bypasses(dp, pod, who, family):
    dp.maps.mark_pod_ips.put(MARK, POD4, POD6)
    dst, port, tag = FAMILY_DST[family]
    before = dp.maps.counters()["bypass_proxy"]
    r = pod.connect(dst, port, **who)
    assert r["reply"]["tag"] == tag
    assert dp.maps.counters()["bypass_proxy"] == before + 1


def test_loopback_and_own_ip_bypass(pod):
    assert pod.connect("127.0.0.1", 8080)["reply"]["tag"] == "direct"
    assert pod.connect(POD4, 8080)["reply"]["tag"] == "direct"
    assert pod.connect("::1", 8081)["reply"]["tag"] == "direct6"


def test_outside_mesh_netns_bypasses(dp):
    p = Pod(v4=[POD4, DST4])  # no marker listener
    try:
        p.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        p.serve("proxy", "127.0.0.1", 15001, uid=1337, in_cgroup=False)
        dp.attach(p.cgroup)
        before = dp.maps.counters()["bypass_not_mesh"]
        assert p.connect(DST4, 8080)["reply"]["tag"] == "direct"
        assert dp.maps.counters()["bypass_not_mesh"] > before
    finally:
        dp.detach(p.cgroup)
        p.close()


def _cidr(ip: str, plen: int) -> tuple[bytes, int]:
    return (t.addr_pack(ip), plen + (96 if ":" not in ip else 0))


@pytest.mark.parametrize("policy,port,expect", [
    (PodPolicy(exclude_outbound_ports=frozenset({8080})), 8080, "direct"),
    (PodPolicy(exclude_outbound_cidrs=(_cidr("10.231.0.0", 24),)), 8080, "direct"),
    (PodPolicy(exclude_outbound_cidrs=(_cidr("10.9.0.0", 16),)), 8080, "proxy"),
    # an IPv6 range never matches IPv4, not even ::/0 (Istio: ip6tables only)
    (PodPolicy(exclude_outbound_cidrs=(_cidr("::", 0),)), 8080, "proxy"),
    # include list without "*": only listed CIDRs ...
    (PodPolicy(include_outbound_all=False, include_outbound_cidrs=(_cidr("10.231.0.2", 32),)),
     8080, "proxy"),
    (PodPolicy(include_outbound_all=False, include_outbound_cidrs=(_cidr("10.9.0.0", 16),)),
     8080, "direct"),
    # ... or listed ports, whatever the IP (OR-ed with the ranges)
    (PodPolicy(include_outbound_all=False, include_outbound_ports=frozenset({8080})),
     8080, "proxy"),
    # excludeOutboundPorts wins over includeOutboundPorts
    (PodPolicy(include_outbound_ports=frozenset({8080}),
               exclude_outbound_ports=frozenset({8080})), 8080, "direct"),
    # excluded CIDR wins over an included port (ISTIO_OUTPUT order)
    (PodPolicy(include_outbound_ports=frozenset({8080}),
               exclude_outbound_cidrs=(_cidr("10.231.0.2", 32),)), 8080, "direct"),
], ids=["excl-port", "excl-cidr", "excl-other-cidr", "excl-v6-all", "incl-cidr", "incl-other-cidr",
        "incl-port", "excl-port-over-incl-port", "excl-cidr-over-incl-port"])
def test_outbound_policy(dp, pod, policy, port, expect):
    dp.maps.local_pods.put(POD4, policy)
    assert pod.connect(DST4, port)["reply"]["tag"] == expect


# Where each family's connect lands: (destination, port, not redirected, redirected).
# The pod has only an IPv4 pod IP, whose policy applies to every connect.
CIDR_DST = {"v4": (DST4, 8080, "direct", "proxy"), "v6": (DST6, 8081, "direct6", "proxy6"),
            "mapped": (f"::ffff:{DST4}", 8080, "direct", "proxy")}


# (CIDR, destination family, in it?): each family against each, whole and
# partial words of the 16-byte form (IPv4 /n is ::ffff:a.b.c.d/96+n)
@pytest.mark.parametrize("cidr,family,inside", [
    (("10.231.0.2", 32), "v4", True),
    (("10.231.0.3", 32), "v4", False),
    (("10.231.0.0", 20), "v4", True),
    (("10.231.16.0", 20), "v4", False),
    (("0.0.0.0", 0), "v4", True),
    (("10.231.0.0", 20), "mapped", True),
    (("10.231.16.0", 20), "mapped", False),
    # an IPv4 range never matches IPv6 ...
    (("0.0.0.0", 0), "v6", False),
    # ... nor an IPv6 range IPv4, even ::/0 or ::/96 (Istio: ip6tables only)
    (("::", 0), "v4", False),
    (("::", 96), "v4", False),
    (("::", 0), "mapped", False),
    (("::", 0), "v6", True),
    (("fd00::", 20), "v6", True),
    (("fd00:1000::", 20), "v6", False),
    (("fd00:231::", 100), "v6", True),
    (("fd00:231::1000:0", 100), "v6", False),
    (("fd00:231::", 64), "v6", True),
    (("fd00:232::", 64), "v6", False),
    ((DST6, 128), "v6", True),
    (("fd00:231::3", 128), "v6", False),
    (("fd01:231::2", 128), "v6", False),
], ids=lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_cidr_match_per_family(dp, pod, cidr, family, inside):
    dst, port, direct, proxy = CIDR_DST[family]
    dp.maps.local_pods.put(POD4, PodPolicy(exclude_outbound_cidrs=(_cidr(*cidr),)))
    assert pod.connect(dst, port)["reply"]["tag"] == (direct if inside else proxy)
    dp.maps.local_pods.put(POD4, PodPolicy(include_outbound_all=False,
                                           include_outbound_cidrs=(_cidr(*cidr),)))
    assert pod.connect(dst, port)["reply"]["tag"] == (proxy if inside else direct)


def _counted(policy: PodPolicy, field: str, n: int, entries: tuple = ()) -> bytes:
    """policy's mb_pod_config with list ``field`` (optionally its first
    entries rewritten) counted as n long: the entries past n stay in the value."""
    c = encode_policy(policy)
    arr = getattr(c, field)
    for i, e in enumerate(entries):
        arr[i] = e
    setattr(c, "n_" + field, n)
    return bytes(c)


def test_list_entries_past_the_count_are_ignored(dp, pod):
    """Only the first n_* entries of a list are the pod's: one past the
    count that would match changes nothing, in every list connect reads."""
    def put(value: bytes) -> None:
        dp.maps.local_pods.b.put(t.addr_pack(POD4), value)

    def tag(dst: str, port: int) -> str:
        return pod.connect(dst, port)["reply"]["tag"]

    cases = ((DST4, 8080, "direct", "proxy", (_cidr("10.9.0.0", 16), _cidr(DST4, 32))),
             (DST6, 8081, "direct6", "proxy6", (_cidr("fd00:9::", 32), _cidr("fd00:231::", 64))))
    for dst, port, direct, proxy, cidrs in cases:
        for n, listed in ((1, False), (2, True)):
            put(_counted(PodPolicy(exclude_outbound_cidrs=cidrs), "exclude_out_cidrs", n))
            assert tag(dst, port) == (direct if listed else proxy)
            put(_counted(PodPolicy(include_outbound_all=False, include_outbound_cidrs=cidrs),
                         "include_out_cidrs", n))
            assert tag(dst, port) == (proxy if listed else direct)
    ports = frozenset({9999, 8080})
    for n, listed in ((1, False), (2, True)):
        put(_counted(PodPolicy(exclude_outbound_ports=ports), "exclude_out_ports", n, (9999, 8080)))
        assert tag(DST4, 8080) == ("direct" if listed else "proxy")
        put(_counted(PodPolicy(include_outbound_all=False, include_outbound_ports=ports),
                     "include_out_ports", n, (9999, 8080)))
        assert tag(DST4, 8080) == ("proxy" if listed else "direct")
    # a loopback range past the count: the lo RETURN stays (an app's call to
    # its own pod IP is direct); within it, either family's drops it
    for lo in (_cidr("127.0.0.1", 32), _cidr("::1", 128)):
        include = (_cidr(POD4, 32), lo)
        put(_counted(PodPolicy(include_outbound_all=False, include_outbound_cidrs=include),
                     "include_out_cidrs", 1))
        assert tag(POD4, 8080) == "direct"
        put(_counted(PodPolicy(include_outbound_all=False, include_outbound_cidrs=include),
                     "include_out_cidrs", 2))
        assert tag(POD4, 8080) == "proxy"


def test_proxy_to_local_pod_goes_to_its_inbound_listener(dp, pod):
    dp.maps.local_pods.put(DST4, PodPolicy())
    try:
        r = pod.connect(DST4, 8080, uid=1337)
        assert r["reply"]["tag"] == "inbound"
        # DST4 stands for another pod but lives in this pod's netns, whose
        # record says POD4: SO_ORIGINAL_DST is kept from a netns that is not
        # the target pod's (docs/security.md; the target pod's own proxy gets
        # it: test_coexist.py::test_ebpf_first_with_istio_rules_in_place)
        # (the kernel's own answer: ENOENT from conntrack, or ENOPROTOOPT where
        # nf_conntrack is not loaded -- a module in Debian's 6.1, the vm tier)
        assert r["reply"]["orig"] in ("errno 2", "errno 92")
        # the target pod's inbound policy can exclude the port
        dp.maps.local_pods.put(DST4, PodPolicy(exclude_inbound_ports=frozenset({8080})))
        assert pod.connect(DST4, 8080, uid=1337)["reply"]["tag"] == "direct"
        dp.maps.local_pods.put(DST4, PodPolicy(include_inbound_all=False,
                                               include_inbound_ports=frozenset({9090})))
        assert pod.connect(DST4, 8080, uid=1337)["reply"]["tag"] == "direct"
    finally:
        dp.maps.local_pods.delete(DST4)


def test_proxy_hairpin_to_own_pod_ip_and_passthrough_source(dp, pod):
    # the sidecar calling its own pod IP goes to its own inbound listener ...
    before = dp.maps.counters()
    r = pod.connect(POD4, 8080, uid=1337)
    assert r["reply"]["tag"] == "inbound" and r["reply"]["orig"] == [POD4, 8080]
    # ... at 127.0.0.1, where iptables' REDIRECT sends it, from the pod IP
    # (unique on the node, as an app's call to 15001)
    assert r["reply"]["local"] == ["127.0.0.1", 15006]
    assert r["reply"]["peer"][0] == POD4 and r["sock"][0] == POD4
    after = dp.maps.counters()
    assert after["redirect_in"] - before["redirect_in"] == 1
    assert after["bind_pod_ip"] - before["bind_pod_ip"] == 1
    # ... whose passthrough connection from 127.0.0.6 is left alone (no loop)
    r = pod.connect(POD4, 8080, bind="127.0.0.6", uid=1337)
    assert r["reply"]["tag"] == "direct" and r["reply"]["peer"][0] == "127.0.0.6"


# The proxy (UID or GID 1337) calling over lo, in istio-iptables' terms:
# (who, destination, port, bind). "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport
# 15008 -j ISTIO_IN_REDIRECT" comes after excludeOutboundPorts and the
# 127.0.0.6 source RETURN, and goes straight to ISTIO_IN_REDIRECT: the pod's
# inbound exclusions and status port do not apply to it.
HAIRPIN_CASES = [(who, *case) for who in ({"uid": 1337}, {"gid": 1337}) for case in (
    (POD4, 8080, ""),           # excluded inbound port: still the inbound listener
    (POD4, 15020, ""),          # status port: the same
    (POD4, 9099, ""),           # excluded outbound port: direct
    (POD4, 15008, ""),          # HBONE: direct
    (POD4, 8080, "127.0.0.6"),  # inbound passthrough source: direct
    ("127.0.0.1", 8080, ""),    # 127.0.0.1: direct
    ("127.0.0.2", 8080, ""),    # other 127/8 addresses leave through lo: inbound
    ("127.0.0.6", 8080, ""),    # the same (source 127.0.0.1, not the passthrough)
    (POD6, 8081, ""),           # IPv6 own pod IP: inbound
    ("::1", 8081, ""),          # ::1: direct
    ("::6", 8081, "::6"),       # IPv6 inbound passthrough source: direct
    ("::6", 8081, ""),          # the same: source selection picks ::6 itself
    ("::6", 8081, "::1"),       # ::6 is on lo (istio-iptables puts it there): inbound
)]
N_HAIRPIN = len(HAIRPIN_CASES) // 2   # cases per caller
HAIRPIN_POLICIES = {
    # includeInboundPorts="*" minus 8080 and the status port 15020
    "exclusions": (dict(exclude_inbound_ports=(8080, 15020, 15021, 15090)),
                   PodPolicy(exclude_inbound_ports=frozenset({8080, 15021, 15090}),
                             exclude_outbound_ports=frozenset({9099}), status_port=15020)),
    # includeInboundPorts="": no inbound capture at all, the hairpin stays
    "no-inbound": (dict(capture_inbound=False),
                   PodPolicy(include_inbound_all=False,
                             exclude_outbound_ports=frozenset({9099}), status_port=15020)),
}


def _hairpin_pod(v4: list[str], v6: list[str], cgroup: bool) -> Pod:
    p = Pod(v4=v4, v6=v6, cgroup=cgroup)
    try:
        p.ip("addr", "add", "::6/128", "dev", "lo")   # as istio-iptables does
        for tag, port in (("direct", 8080), ("status", 15020), ("excluded-out", 9099),
                          ("hbone", 15008)):
            p.serve(tag, "0.0.0.0", port, in_cgroup=False)
        p.serve("direct6", "::", 8081, fam="6only", in_cgroup=False)
        # the sidecar's inbound listeners: in the cgroup, for getsockopt
        p.serve("inbound", "0.0.0.0", 15006, uid=1337, gid=1337)
        p.serve("inbound6", "::", 15006, fam="6only", uid=1337, gid=1337)
    except BaseException:
        p.close()
        raise
    return p


def _landed(p: Pod, who: dict, dst: str, port: int, bind: str) -> tuple:
    """(listener, SO_ORIGINAL_DST, the accepted socket's local address) for
    the inbound listener, (listener, None, None) for the others."""
    r = p.connect(dst, port, bind=bind, **who)["reply"]
    if not r["tag"].startswith("inbound"):
        return r["tag"], None, None
    return r["tag"], r["orig"], r["local"]


@pytest.mark.parametrize("config", sorted(HAIRPIN_POLICIES))
def test_proxy_hairpin_matches_istio_iptables(dp, config):
    """The same calls in a pod with istio-iptables' rules (the oracle,
    lab/labconfig.py) and in a pod with our datapath land on the same
    listener with the same SO_ORIGINAL_DST, at the same local address
    (REDIRECT in OUTPUT sends a local call to 127.0.0.1 / ::1)."""
    iptables_opts, policy = HAIRPIN_POLICIES[config]
    oracle = ours = None
    try:
        oracle = _hairpin_pod([POD4], [POD6], cgroup=False)
        for version in (4, 6):
            oracle.apply_iptables(version, labconfig.istio_iptables(
                version, exclude_outbound_ports=(9099,), **iptables_opts))
        ours = _hairpin_pod([POD4], [POD6], cgroup=True)
        ours.serve("marker", "0.0.0.0", 39807, mark=MARK, in_cgroup=False)
        ours.enrol(dp, MARK, POD4, POD6)
        for ip in (POD4, POD6):
            dp.maps.local_pods.put(ip, policy)
        dp.attach(ours.cgroup)
        want = [_landed(oracle, *case) for case in HAIRPIN_CASES]
        got = [_landed(ours, *case) for case in HAIRPIN_CASES]
        assert got == want
        # the oracle really is istio's: excluded inbound ports and the status
        # port hairpin to the inbound listener, the exclusions below do not
        assert [tag for tag, *_ in want[:N_HAIRPIN]] == [
            "inbound", "inbound", "excluded-out", "hbone", "direct", "direct",
            "inbound", "inbound", "inbound6", "direct6", "direct6", "direct6", "inbound6"]
        assert want[0][1] == [POD4, 8080] and want[8][1] == [POD6, 8081]
        assert want[7][1] == ["127.0.0.6", 8080] and want[12][1] == ["::6", 8081]
        assert [local for _, _, local in want[:N_HAIRPIN] if local] == [
            ["127.0.0.1", 15006]] * 4 + [["::1", 15006]] * 2
        # a caller with only the proxy's GID is RETURNed by the UID's
        # "-o lo ! --uid-owner" rule before the GID's hairpin rule
        assert [tag for tag, *_ in want[N_HAIRPIN:]] == [
            "direct", "status", "excluded-out", "hbone", "direct", "direct",
            "direct", "direct", "direct6", "direct6", "direct6", "direct6", "direct6"]
    finally:
        if ours is not None:
            dp.detach(ours.cgroup)
            ours.close()
        for ip in (POD4, POD6):
            dp.maps.local_pods.delete(ip)
        Pod.forget(dp, MARK)
        if oracle is not None:
            oracle.close()


PROBE_LANDED = {"4": (["127.0.0.1", 15006], ["127.0.0.6", 15002]),
                "6": (["::1", 15006], ["::6", 15002])}


@pytest.mark.parametrize("family", sorted(PROBE_LANDED))
@pytest.mark.parametrize("cni_mode", [True, False], ids=["cni", "legacy"])
def test_istio_validation_probe_passes_in_pure_ebpf(dp, cni_mode, family):
    """Istio's validation probe (istio-iptables' validator.go, run by the
    istio-validation init container) with our datapath alone: as UID/GID 1337
    it listens on 127.0.0.1 (::1) :15001 and :15006 and dials 127.0.0.6 (::6)
    :15002 from 127.0.0.1 (::1). That call leaves through lo, so it lands on
    15006 at 127.0.0.1 (::1), where iptables' REDIRECT would send it, with
    SO_ORIGINAL_DST 127.0.0.6 (::6) :15002. The prober binds its source
    first, so it keeps it. In legacy mode the prober's own 127.0.0.1:15001
    (::1) listener makes the pod a mesh pod."""
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    d = dp
    p = Pod(v4=[POD4], v6=[POD6])
    try:
        p.ip("addr", "add", "::6/128", "dev", "lo")   # as istio-iptables does
        if cni_mode:
            p.serve("marker", "0.0.0.0", 39807, mark=MARK3, in_cgroup=False)
            p.enrol(dp, MARK3, POD4, POD6)
            for ip in (POD4, POD6):
                dp.maps.local_pods.put(ip, PodPolicy())
        else:
            d = loader.Datapath(pin, ISTIO, cni_mode=False).load()
        d.attach(p.cgroup)
        before = d.maps.counters()
        r = json.loads(p.run(PROBE, family, uid=1337, gid=1337))
        local, orig = PROBE_LANDED[family]
        assert "error" not in r, r
        assert (r["port"], r["local"], r["orig"]) == (15006, local, orig)
        assert r["peer"][0] == local[0]
        after = d.maps.counters()
        assert after["redirect_in"] - before["redirect_in"] == 1
        assert after["getsockopt_answer"] - before["getsockopt_answer"] == 1
    finally:
        if d is dp:
            dp.detach(p.cgroup)
            for ip in (POD4, POD6):
                dp.maps.local_pods.delete(ip)
            Pod.forget(dp, MARK3)
        else:
            d.detach()
            d.close()
            loader.detach_cgroup(p.cgroup)
        loader.remove_pins(pin)
        p.close()


def test_loopback_in_include_ranges_drops_the_lo_return(dp, pod):
    """includeOutboundIPRanges naming a loopback address (istio-iptables'
    HasLoopBackIP) leaves out "-o lo ! --uid-owner/--gid-owner RETURN": an
    app's call to its own pod IP is then judged by the include ranges, and a
    caller with only the proxy's GID reaches the GID's hairpin rule.
    127.0.0.1 stays direct ("-d 127.0.0.1/32 -j RETURN")."""
    dp.maps.mark_pod_ips.put(MARK, POD4, POD6)
    dp.maps.local_pods.put(POD4, PodPolicy(
        include_outbound_all=False,
        include_outbound_cidrs=(_cidr("127.0.0.1", 32), _cidr(POD4, 32))))
    r = pod.connect(POD4, 8080)
    assert r["reply"]["tag"] == "proxy" and r["reply"]["orig"] == [POD4, 8080]
    r = pod.connect(POD4, 8080, gid=1337)
    assert r["reply"]["tag"] == "inbound" and r["reply"]["orig"] == [POD4, 8080]
    assert pod.connect("127.0.0.1", 8080)["reply"]["tag"] == "direct"
    assert pod.connect("127.0.0.1", 8080, gid=1337)["reply"]["tag"] == "direct"
    # without it, both are direct (the default istio-iptables rule set)
    dp.maps.local_pods.put(POD4, PodPolicy(
        include_outbound_all=False, include_outbound_cidrs=(_cidr(POD4, 32),)))
    assert pod.connect(POD4, 8080)["reply"]["tag"] == "direct"
    assert pod.connect(POD4, 8080, gid=1337)["reply"]["tag"] == "direct"


def test_hbone_port_never_redirected(pod):
    pod.serve("hbone", "0.0.0.0", 15008, in_cgroup=False)
    assert pod.connect(POD4, 15008, uid=1337)["reply"]["tag"] == "hbone"
    assert pod.connect(DST4, 15008)["reply"]["tag"] == "hbone"


PEERGROUPS = r'''
import ctypes, os, socket, struct
os.setgroups(list(range(200000, 202000)))     # 2000 supplementary groups
a, b = socket.socketpair()                    # created inside the test cgroup
# Python's socket.getsockopt caps buffers at 1024 bytes: call libc directly
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(16384)
n = ctypes.c_uint(16384)
SO_PEERGROUPS = 59
if libc.getsockopt(a.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(n)):
    raise OSError(ctypes.get_errno(), "getsockopt")
got = struct.unpack("=%dI" % (n.value // 4), buf.raw[:n.value])
print(n.value, sorted(got) == list(range(200000, 202000)))
'''


def test_large_getsockopt_passes_through_untouched(dp, pod):
    """SO_PEERGROUPS returns 4 bytes per supplementary group of the peer: with
    2000 groups the result is 8000 bytes, more than the page the cgroup
    getsockopt program can see. It must come back whole (upstream clamped
    optlen to 4096, truncating such results)."""
    before = dp.maps.counters()["getsockopt_large"]
    out = pod.run(PEERGROUPS).split()
    assert out == ["8000", "True"]
    assert dp.maps.counters()["getsockopt_large"] > before


def test_bcc_layouts_match_mirrors(dp):
    b = next(iter(dp._objs.values()))
    for name, key, leaf in [(t.MAP_PAIR_ORIG_DST, t.MbPair, t.MbOrigin),
                            (t.MAP_LOCAL_PODS, t.MbAddr, t.MbPodConfig),
                            (t.MAP_NETNS_IP, None, t.MbPodIps)]:
        table = b.get_table(name.encode())
        for mine, theirs in ((key, table.Key), (leaf, table.Leaf)):
            if mine is None:
                continue
            assert ct.sizeof(mine) == ct.sizeof(theirs), name
            assert [getattr(mine, f).offset for f, *_ in mine._fields_] == \
                   [getattr(theirs, f).offset for f, *_ in theirs._fields_], name


def _bpftool_cgroup(path: str) -> str:
    return subprocess.run(["bpftool", "cgroup", "show", path], capture_output=True,
                          text=True, check=True).stdout


def test_reload_replaces_and_unpin_leaves_nothing():
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    p = Pod(v4=[POD4, DST4])
    first = second = None
    try:
        first = loader.Datapath(pin, ISTIO, cni_mode=True).load()
        first.attach(p.cgroup)
        first.maps.mark_pod_ips.put(7, POD4)
        # a second daemon (as after kill -9) over the same pins
        second = loader.Datapath(pin, ISTIO, cni_mode=True).load()
        second.attach(p.cgroup)
        second.attach(p.cgroup)
        assert second.maps.mark_pod_ips.items() == [(7, POD4)]  # maps reused
        names = sorted(a.name for a in loader.attached(p.cgroup))
        assert names == sorted(prog.func for prog in loader.PROGRAMS if prog.target == "cgroup")
        shown = _bpftool_cgroup(p.cgroup)
        for n in names:
            assert shown.count(n) == 1
        # what is attached is the second daemon's programs
        ids = {a.prog_id for a in loader.attached(p.cgroup)}
        assert ids == {_prog_id(second._fns[n].fd) for n in names}
        first.close()
        second.detach()
        second.close()
        second.unpin()
        assert loader.attached(p.cgroup) == []
        assert "mb_" not in _bpftool_cgroup(p.cgroup)
        assert not os.path.exists(pin)
    finally:
        for d in (first, second):
            if d is not None:
                d.close()
        loader.detach_cgroup(p.cgroup)
        loader.remove_pins(pin)
        p.close()


def test_attach_detaches_a_retired_program_an_older_version_left():
    """A daemon of an older version killed before its clean stop leaves its
    programs attached. Those this version no longer has (programs.RETIRED:
    the sock_release program of mb_sock_peer) go at the next attach; before,
    they count as ours for attached() and detach."""
    from bcc import BPF
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    p = Pod(v4=[POD4, DST4])
    old = dp = None
    try:
        prog_type, attach_type = loader.HOOKS["cgroup/sock_release"]
        old = BPF(text=b"int mb_sockrelease(struct bpf_sock *sk) { return 1; }")
        fn = old.load_func(b"mb_sockrelease", prog_type, attach_type=attach_type)
        fd = os.open(p.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sysbpf.attach_replace(fd, fn.fd, attach_type, "mb_sockrelease")
        finally:
            os.close(fd)
        assert [a.name for a in loader.attached(p.cgroup)] == ["mb_sockrelease"]
        dp = loader.Datapath(pin, ISTIO, cni_mode=True).load()
        dp.attach(p.cgroup)
        names = sorted(a.name for a in loader.attached(p.cgroup))
        assert names == sorted(prog.func for prog in loader.PROGRAMS if prog.target == "cgroup")
        assert "mb_sockrelease" not in _bpftool_cgroup(p.cgroup)
    finally:
        loader.detach_cgroup(p.cgroup)
        if dp is not None:
            dp.close()
        if old is not None:
            old.cleanup()
        loader.remove_pins(pin)
        p.close()


def test_load_unpins_the_maps_an_older_version_left():
    """mb_sock_peer (a hash keyed by socket cookie until a socket's original
    destination moved into the socket) stays pinned after an upgrade unless
    the new version removes it: the next load does, and leaves the maps of
    this version."""
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    os.mkdir(pin)
    old = os.path.join(pin, "mb_sock_peer")
    assert "mb_sock_peer" in t.RETIRED_MAPS
    dp = None
    try:
        subprocess.run(["bpftool", "map", "create", old, "type", "hash", "key", "8",
                        "value", "40", "entries", "1024", "name", "mb_sock_peer"],
                       check=True, capture_output=True)
        dp = loader.Datapath(pin, ISTIO, cni_mode=True).load()
        assert not os.path.exists(old)
        assert sorted(os.listdir(pin)) == sorted(t.ALL_MAPS)
    finally:
        if dp is not None:
            dp.close()
        loader.remove_pins(pin)


@pytest.mark.parametrize("name,kind,key_size", [(t.MAP_MARK_POD_IPS, "hash", "4"),
                                                (t.MAP_NETNS_IP, "lru_hash", "8")])
def test_pin_of_an_older_layout_is_a_clear_error(name, kind, key_size):
    """mb_mark_pod_ips once held one 16-byte address per mark, mb_netns_ip
    one per netns: a daemon of this version over such pins says so (bcc would
    reuse the pin and the verifier refuse the programs with a bare EACCES),
    and leaves the pin."""
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    os.mkdir(pin)
    old = os.path.join(pin, name)
    try:
        subprocess.run(["bpftool", "map", "create", old, "type", kind, "key", key_size,
                        "value", "16", "entries", "1024", "name", name],
                       check=True, capture_output=True)
        d = loader.Datapath(pin, ISTIO, cni_mode=True)
        with pytest.raises(loader.DatapathError, match="pinned by another merbridge version"):
            d.load()
        d.close()
        assert os.listdir(pin) == [name]
    finally:
        loader.remove_pins(pin)


def _prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise AssertionError("no prog_id")


def test_open_maps_without_programs(dp):
    dp.maps.mark_pod_ips.put(99, "10.231.9.9")
    try:
        m = loader.open_maps(dp.pin_dir)
        try:
            assert (99, "10.231.9.9") in m.mark_pod_ips.items()
            assert "redirect_out" in m.counters()
        finally:
            m.close()
    finally:
        dp.maps.mark_pod_ips.delete(99)
    with pytest.raises(loader.DatapathError):
        loader.open_maps(f"/sys/fs/bpf/mbt-missing-{uuid.uuid4().hex[:8]}")


def test_sk_msg_shortcuts_app_and_sidecar(dp, pod):
    """Both ends of app -> sidecar are in the sockhash; their sends are
    redirected straight to the peer and the bytes arrive intact."""
    before = dp.maps.counters()
    r = pod.connect(DST4, 8080)
    assert r["reply"]["tag"] == "proxy" and r["reply"]["data"] == "hello"
    after = dp.maps.counters()
    assert after["sockhash_add"] - before["sockhash_add"] == 2
    # "hello" one way, the JSON reply the other way
    assert after["msg_redirect"] - before["msg_redirect"] >= 2


def test_sk_msg_kill_switch(dp, pod):
    dp.maps.settings.set(t.MB_SET_SKMSG_OFF, 1)
    try:
        before = dp.maps.counters()
        assert pod.connect(DST4, 8080)["reply"]["tag"] == "proxy"
        after = dp.maps.counters()
        assert after["msg_redirect"] == before["msg_redirect"]
        assert after["sockhash_add"] == before["sockhash_add"]
        assert after["getsockopt_answer"] > before["getsockopt_answer"]
    finally:
        dp.maps.settings.set(t.MB_SET_SKMSG_OFF, 0)


def test_legacy_mode_in_mesh_by_sidecar_listener_and_learns_pod_ip():
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    p = Pod(v4=[POD4, DST4])
    d = None
    try:
        d = loader.Datapath(pin, ISTIO, cni_mode=False).load()
        p.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        # Envoy listens on 0.0.0.0:15001, which the 127.128.x.y scheme needs
        p.serve("proxy", "0.0.0.0", 15001, uid=1337, gid=1337)
        d.attach(p.cgroup)
        r = p.connect(DST4, 8080)
        assert r["reply"]["tag"] == "proxy" and r["reply"]["orig"] == [DST4, 8080]
        local = r["reply"]["local"][0]
        assert local.startswith("127.") and local != "127.0.0.1"   # 127.128.0.0/12
        assert d.maps.counters()["legacy_dst"] == 1
        # the proxy's own (bypassed) connection from the pod IP teaches the netns its IP
        assert p.connect(DST4, 8080, bind=POD4, uid=1337)["reply"]["tag"] == "direct"
        assert [ip for _, ip in d.maps.netns_ip.items()] == [POD4]
        r = p.connect(DST4, 8080)
        assert r["reply"]["tag"] == "proxy" and r["reply"]["peer"][0] == POD4
        assert r["reply"]["local"] == ["127.0.0.1", 15001]
    finally:
        if d is not None:
            d.detach()
            d.close()
        loader.detach_cgroup(p.cgroup)
        loader.remove_pins(pin)
        p.close()


def _link_local(p: Pod, dev: str) -> str:
    """dev's fe80:: address in p, once duplicate address detection is done."""
    out = ""
    for _ in range(100):
        out = sh("ip", "-n", p.name, "-6", "-o", "addr", "show", "dev", dev, "scope", "link").stdout
        if out and "tentative" not in out:
            return out.split()[3].split("/")[0]
        time.sleep(0.1)
    raise AssertionError(f"no usable link-local address on {dev}: {out!r}")


def test_legacy_mode_dual_stack_pod_learns_both_pod_ips():
    """Legacy mode learns the pod IPs per family (mb_netns_ip holds one of
    each): with the IPv4 address known, connects still ask to learn the
    IPv6 one, and sockops files it next to the IPv4 address. Then the app's
    v4 and v6 connects are bound to the respective pod IP, and the proxy's
    calls to its own v4 and v6 pod IPs go through lo to its own 15006 at
    127.0.0.1 / ::1 (had only one address been learned, its call to the
    other would look like a call to another local pod: podIP:15006)."""
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    p = Pod(v4=[POD4, DST4], v6=[POD6, DST6])
    d = None
    try:
        d = loader.Datapath(pin, ISTIO, cni_mode=False).load()
        p.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        p.serve("direct6", "::", 8081, fam="6only", in_cgroup=False)
        p.serve("proxy", "127.0.0.1", 15001, uid=1337, gid=1337)
        p.serve("proxy6", "::1", 15001, fam="6", uid=1337, gid=1337)
        p.serve("inbound", "0.0.0.0", 15006, uid=1337, gid=1337)
        p.serve("inbound6", "::", 15006, fam="6only", uid=1337, gid=1337)
        for ip in (POD4, POD6):   # the legacy daemon writes every pod IP
            d.maps.local_pods.put(ip, PodPolicy())
        d.attach(p.cgroup)

        def learned() -> list[tuple[str, ...]]:
            return [ips for _, ips in d.maps.netns_ip.all_items()]

        assert learned() == []
        # the proxy's own (bypassed) connections, one per family
        assert p.connect(DST4, 8080, bind=POD4, uid=1337)["reply"]["tag"] == "direct"
        assert learned() == [(POD4,)]
        # a link-local source is no pod IP: not learned
        ll = _link_local(p, "eth0")
        assert p.connect(f"{ll}%eth0", 8081, uid=1337)["reply"]["tag"] == "direct6"
        assert learned() == [(POD4,)]
        r = p.connect(DST6, 8081)   # v6 pod IP not known yet: redirected unbound
        assert r["reply"]["tag"] == "proxy6" and r["reply"]["peer"][0] == "::1"
        assert p.connect(DST6, 8081, bind=POD6, uid=1337)["reply"]["tag"] == "direct6"
        assert learned() == [(POD4, POD6)]
        n_learned = d.maps.counters()["learned_ip"]
        assert n_learned == 2
        before = d.maps.counters()
        for dst, port, tag, pod_ip, lo in ((DST4, 8080, "proxy", POD4, "127.0.0.1"),
                                           (DST6, 8081, "proxy6", POD6, "::1")):
            r = p.connect(dst, port)
            assert r["reply"]["tag"] == tag and r["reply"]["orig"] == [dst, port]
            assert r["reply"]["local"] == [lo, 15001]
            assert r["reply"]["peer"][0] == pod_ip and r["sock"][0] == pod_ip
            r = p.connect(pod_ip, port, uid=1337)
            assert r["reply"]["tag"] == tag.replace("proxy", "inbound")
            assert r["reply"]["orig"] == [pod_ip, port]
            assert r["reply"]["local"] == [lo, 15006]
            assert r["reply"]["peer"][0] == pod_ip
        after = d.maps.counters()
        assert after["redirect_out"] - before["redirect_out"] == 2
        assert after["redirect_in"] - before["redirect_in"] == 2
        assert after["bind_pod_ip"] - before["bind_pod_ip"] == 4
        assert after["getsockopt_answer"] - before["getsockopt_answer"] == 4
        # both families known: nothing more to learn
        assert p.connect(DST6, 8081, uid=1337)["reply"]["tag"] == "direct6"
        assert after["learned_ip"] == n_learned == d.maps.counters()["learned_ip"]
        assert learned() == [(POD4, POD6)]
    finally:
        if d is not None:
            d.detach()
            d.close()
        loader.detach_cgroup(p.cgroup)
        loader.remove_pins(pin)
        p.close()


def test_only_a_netns_the_daemon_recorded_is_a_pod(dp):
    """CNI mode trusts no listener: a marker listener whose SO_MARK is an
    enrolled mark does not make a netns a pod, nor does one with an unknown
    mark; only the daemon's mb_netns_pod record of this netns does, and only
    while its mark is in mb_mark_pod_ips. connect4 never writes or deletes
    the record (docs/security.md)."""
    p = Pod(v4=[POD4, DST4, "10.231.0.3"])
    try:
        p.serve("direct", "0.0.0.0", 8080, in_cgroup=False)
        p.serve("proxy", "0.0.0.0", 15001, uid=1337, gid=1337)
        p.serve("marker", "0.0.0.0", 39807, mark=MARK2, in_cgroup=False)
        dp.attach(p.cgroup)
        dp.maps.local_pods.put(POD4, PodPolicy())
        # a listener with a mark nobody enrolled: not a pod
        assert p.connect(DST4, 8080)["reply"]["tag"] == "direct"
        # the listener's mark enrolled, but this netns not recorded: not a pod
        dp.maps.mark_pod_ips.put(MARK2, POD4)
        assert p.connect(DST4, 8080)["reply"]["tag"] == "direct"
        assert [c for c, _, m in dp.maps.netns_pod.all_items() if m == MARK2] == []
        # recorded by the daemon: a pod, with the IPs its mark has now
        cookie = p.enrol(dp, MARK2, POD4)
        r = p.connect(DST4, 8080)
        assert r["reply"]["tag"] == "proxy" and r["reply"]["peer"][0] == POD4
        dp.maps.mark_pod_ips.put(MARK2, "10.231.0.3")
        r = p.connect(DST4, 8080)
        assert r["reply"]["tag"] == "proxy" and r["reply"]["peer"][0] == "10.231.0.3"
        # withdrawn mark: not a pod, and the record is left to the daemon
        dp.maps.mark_pod_ips.delete(MARK2)
        assert p.connect(DST4, 8080)["reply"]["tag"] == "direct"
        assert (cookie, (POD4,), MARK2) in dp.maps.netns_pod.all_items()
    finally:
        dp.detach(p.cgroup)
        dp.maps.local_pods.delete(POD4)
        Pod.forget(dp, MARK2)
        p.close()


def test_direct_connect_to_the_proxy_port_stays_out_of_the_sockhash(dp, pod):
    """Only connections connect4/6 rewrote put the proxy's accepted socket
    into the sockhash (a psock costs ~2 us per socket)."""
    before = dp.maps.counters()
    assert pod.connect("127.0.0.1", 15001)["reply"]["tag"] == "proxy"
    after = dp.maps.counters()
    assert after["sockhash_add"] == before["sockhash_add"]
    assert after["bypass_loopback"] == before["bypass_loopback"] + 1


def test_xdp_shares_the_policy_helper_and_names_its_counters(dp):
    """inbound.c uses helpers.h's mb_policy_in/mb_port_in (no private copy); the
    verifier accepts it, and its counter slots have names."""
    ingress, egress = dp.xdp_programs()
    assert ingress > 0 and egress > 0
    counters = dp.maps.counters()
    for name in ("xdp_new_flow", "xdp_bypass_policy", "xdp_flow_fail", "xdp_rst_delete"):
        assert name in counters
    assert not [k for k in counters if k.startswith("c2")]
    src = open(os.path.join(loader.PROGS_DIR, loader.XDP_SOURCE)).read()
    assert "mb_policy_in(" in src and "mb_xdp_port_in" not in src
