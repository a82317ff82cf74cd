"""The demo's "why": the datapath's decision order replayed on a pod's policy,
and the table that shows it (merbridge.lab.demoreport)."""
import json

from merbridge.bpf.mesh import MESHES
from merbridge.daemon import annotations
from merbridge.lab import demoreport
from merbridge.lab.demoreport import PodView

ISTIO = MESHES["istio"]
A = "traffic.sidecar.istio.io/"


def view(name, ip4, ip6, ann=None, in_mesh=True):
    manifest = {"metadata": {"name": name, "namespace": "demo", "annotations": dict(ann or {})},
                "spec": {"containers": [{"name": "app"}]}}
    if in_mesh:
        manifest["metadata"]["annotations"]["sidecar.istio.io/status"] = "{}"
        manifest["spec"]["containers"].append({"name": "istio-proxy"})
    m = annotations.mesh_membership(manifest, ISTIO)
    policy = annotations.pod_policy(manifest, ISTIO) if m.in_mesh else None
    return PodView(name, (ip4, ip6), enrolled=m.in_mesh, policy=policy, reason=m.reason,
                   annotations={k[len(A):]: v for k, v in (ann or {}).items()})


FRONT = view("frontend", "10.241.0.4", "fd00:241::4")
BACK = view("backend", "10.241.0.2", "fd00:241::2",
            {A + "excludeInboundPorts": "7070", A + "includeOutboundPorts": "5432"})
LEGACY = view("legacy", "10.241.0.3", "fd00:241::3", in_mesh=False)
BATCH = view("batch", "10.241.0.5", "fd00:241::5",
             {A + "excludeOutboundPorts": "9090,9091",
              A + "excludeOutboundIPRanges": "10.241.0.3/32,fd00:241::3/128"})
LOCAL = {ip: v for v in (FRONT, BACK, LEGACY, BATCH) for ip in v.ips}


def out(src, ip, port, uid=None):
    return demoreport.expect_outbound(src, ip, port, uid, LOCAL, ISTIO)


def test_mesh_pod_outbound_is_captured_with_the_membership_reason():
    d = out(FRONT, BACK.ips[0], 8080)
    assert d.captured and "istio sidecar injected" in d.rule
    assert out(FRONT, BACK.ips[1], 8080).captured


def test_pod_outside_the_mesh_is_never_captured_and_says_why():
    d = out(LEGACY, BACK.ips[0], 8080)
    assert not d.captured and "no istio-proxy container" in d.rule
    d = demoreport.expect_inbound(LEGACY, 8080)
    assert not d.captured and "not in the mesh" in d.rule


def test_excluded_port_names_the_annotation_and_only_that_port():
    d = out(BATCH, BACK.ips[0], 9090)
    assert not d.captured and d.rule == "batch: excludeOutboundPorts=9090,9091"
    assert out(BATCH, BACK.ips[0], 8080).captured


def test_mesh_default_exclusion_is_not_blamed_on_an_annotation():
    d = out(FRONT, BACK.ips[0], 15020)
    assert not d.captured and "default" in d.rule


def test_excluded_cidr_v4_and_v6():
    for ip in LEGACY.ips:
        d = out(BATCH, ip, 8080)
        assert not d.captured and "excludeOutboundIPRanges=" in d.rule
    assert out(BATCH, "10.241.0.30", 8080).captured


def test_proxy_uid_is_never_captured_again_but_goes_straight_to_a_local_mesh_pod():
    d = out(FRONT, LEGACY.ips[0], 8080, uid=1337)
    assert not d.captured and "proxy UID 1337" in d.rule
    d = out(FRONT, BACK.ips[0], 8080, uid=1337)
    assert not d.captured and "backend's inbound :15006" in d.rule


def test_loopback_and_own_ip_are_left_alone():
    assert not out(FRONT, "127.0.0.1", 8080).captured
    assert not out(FRONT, FRONT.ips[0], 8080).captured


def test_include_outbound_ports_with_no_ranges():
    no_ranges = view("x", "10.241.0.9", "fd00:241::9", {A + "includeOutboundIPRanges": "",
                                                         A + "includeOutboundPorts": "5432"})
    assert out(no_ranges, BACK.ips[0], 5432).captured
    assert not out(no_ranges, BACK.ips[0], 8080).captured


def test_inbound_policy():
    assert demoreport.expect_inbound(BACK, 8080).captured
    for port in (7070, 15008, 15020, 15006):
        assert not demoreport.expect_inbound(BACK, port).captured


def test_cidr_contains():
    net = (bytes(10) + b"\xff\xff" + bytes([10, 241, 0, 0]), 96 + 24)   # ::ffff:10.241.0.0/120
    assert demoreport.cidr_contains(net, "10.241.0.200")
    assert not demoreport.cidr_contains(net, "10.241.1.1")
    assert not demoreport.cidr_contains(net, "fd00:241::1")
    assert demoreport.cidr_contains((bytes(16), 0), "fd00:241::1")


def test_counter_delta_names_xdp_slots_and_drops_unchanged():
    assert demoreport.counter_delta({"redirect_out": 3, "c24": 1},
                                    {"redirect_out": 4, "c24": 2, "bypass_proxy": 0}) == \
        {"redirect_out": 1, "xdp_new_flow": 1}


def row(agrees=True, outbound=True):
    hop = {"intercepted": True, "sidecar": "frontend", "via": None,
           "original_dst": "10.241.0.2:8080"}
    return {"source": "frontend", "uid": None, "destination": "backend",
            "dst_ip": "10.241.0.2", "dst_port": 8080, "app_peer": "127.0.0.6", "error": None,
            "outbound": hop if outbound else {"intercepted": False},
            "inbound": dict(hop, sidecar="backend", via="connect hook"),
            "counters": {"redirect_out": 1},
            "expected": {"outbound_rule": "frontend in mesh", "inbound_rule": "backend: :8080"},
            "agrees": agrees}


def test_table_shows_each_fact_and_flags_a_disagreement():
    text = demoreport.render_table({"connections": [row(), row(agrees=False, outbound=False)]})
    lines = text.splitlines()
    assert "frontend -> backend 10.241.0.2:8080" in lines[2]
    assert "frontend saw 10.241.0.2:8080" in lines[2]
    assert "backend via connect hook saw 10.241.0.2:8080" in lines[2]
    assert lines[2].rstrip().endswith("127.0.0.6")
    assert "not intercepted" in lines[6]
    assert "DISAGREES" in lines[9] and "DISAGREES" not in lines[5]
    assert "1/2 connections did what the daemon's policy says" in text
    assert json.loads(demoreport.render_json({"connections": [row()]}))["connections"][0][
        "agrees"] is True
