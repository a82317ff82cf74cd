"""The daemon in CNI mode, driven through the installed plugin like a runtime.

A real ``merbridge run --cni-mode=true`` (see daemonenv.py) installs its plugin
into a tmp CNI config; the test then runs that plugin with CNI_* variables and a
prevResult for lab pods, and checks what the kernel has: the 39807 listener
with the pod's mark in the pod netns, the map entries, XDP on both ends of the
veth, and traffic going through the pods' haproxy sidecars.
"""
import dataclasses
import json

import pytest

from daemonenv import ISTIO, Env
from merbridge.lab.lab import Lab

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=["tc", "xdp"])
def world(make_bpffs, request):
    """The daemon with each --inbound-hook: the same enrolment, traffic and
    cleanup checks pass with both."""
    with make_bpffs() as bpffs, Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        c = lab.add_pod("c", in_mesh=False)
        for pod in (a, b, c):
            pod.start_app(8080)
        a.start_sidecar()
        b.start_sidecar()
        env = Env(lab, bpffs, inbound_hook=request.param)
        try:
            for pod in (a, b, c):
                env.publish_pod(pod)
            proc = env.start()
            yield env, proc, a, b, c
        finally:
            env.close()


def via_sidecars(src, dst, family="ipv4"):
    """src-app -> dst:8080; the reply plus the sidecar log entries it produced."""
    target = dst.ip4 if family == "ipv4" else dst.ip6
    n_out, n_in = len(src.sidecar.entries()), len(dst.sidecar.entries())
    r = src.connect(target, 8080)
    out = src.sidecar.wait_entries(since=n_out, dir="outbound", timeout=2)
    inb = dst.sidecar.wait_entries(since=n_in, dir="inbound", timeout=2)
    return r, out, inb


def ok(res):
    assert res.returncode == 0, f"rc={res.returncode} out={res.stdout} err={res.stderr}"
    return json.loads(res.stdout) if res.stdout.strip() else None


def test_add_enrols_the_pod_and_traffic_goes_through_both_sidecars(world):
    env, proc, a, b, c = world
    for pod in (a, b):
        out = ok(env.cni("ADD", pod))
        assert [ip["address"] for ip in out["ips"]] == [f"{pod.ip4}/24", f"{pod.ip6}/64"]
    state = json.load(open(f"{env.state_dir}/enrolled.json"))
    keys = {r["name"]: r["key"] for r in state["containers"]}
    maps = env.maps()
    try:
        assert {ip: k for k, ip in maps.mark_pod_ips.items()} == {a.ip4: keys["a"],
                                                                  b.ip4: keys["b"]}
        assert set(ip for ip, _ in maps.local_pods.items()) == {a.ip4, a.ip6, b.ip4, b.ip6}
    finally:
        maps.close()
    assert set(env.marker(a)) == {hex(keys["a"])}
    assert set(env.marker(b)) == {hex(keys["b"])}
    for pod in (a, b):
        ingress, egress = env.xdp(pod)
        assert ingress and egress and ingress != egress
    ok(env.cni("CHECK", a))
    for family in ("ipv4", "ipv6"):
        r, out, inb = via_sidecars(a, b, family)
        assert r.ok, r.error
        dst = b.ip4 if family == "ipv4" else b.ip6
        assert [(e["dst"], e["dport"]) for e in out] == [(dst, 8080)]
        assert [(e["dst"], e["dport"]) for e in inb] == [(dst, 8080)]
        assert r.peer[0] == ("127.0.0.6" if family == "ipv4" else "::6")


def test_add_twice_is_idempotent(world):
    env, proc, a, b, c = world
    ok(env.cni("ADD", a))
    before = env.marker(a)
    ok(env.cni("ADD", a))
    assert env.marker(a) == before
    maps = env.maps()
    try:
        assert len(maps.mark_pod_ips.items()) == 2
    finally:
        maps.close()


def test_pod_outside_the_mesh_gets_nothing(world):
    env, proc, a, b, c = world
    ok(env.cni("ADD", c))
    assert env.marker(c) == []
    assert env.xdp(c) == (0, 0)
    ok(env.cni("CHECK", c))
    r = c.connect(b.ip4, 8080)
    assert r.ok and r.peer[0] == "127.0.0.6"        # into b: b's inbound sidecar still works
    ok(env.cni("DEL", c))


def test_unknown_pod_is_try_again_later(world, unique):
    env, proc, a, b, c = world
    nobody = dataclasses.replace(a, name="nobody")    # never published
    res = env.cni("ADD", nobody, container_id=unique)
    assert res.returncode != 0
    assert json.loads(res.stdout)["code"] == 11


def test_invalid_annotation_fails_add_and_leaves_nothing(world):
    env, proc, a, b, c = world
    bad = dataclasses.replace(c, name="bad", in_mesh=True)
    env.publish_pod(bad, {"traffic.sidecar.istio.io/excludeInboundPorts": "80,http"})
    try:
        for _ in range(10):                           # until the pod source has it
            res = env.cni("ADD", bad, container_id="ctr-bad")
            if json.loads(res.stdout or "{}").get("code") != 11:
                break
        err = json.loads(res.stdout)
        assert res.returncode != 0 and err["code"] >= 100, err
        assert "excludeInboundPorts" in err["msg"] + err.get("details", "")
        assert env.marker(c) == [] and env.xdp(c) == (0, 0)
        maps = env.maps()
        try:
            assert c.ip4 not in dict(maps.local_pods.items())
        finally:
            maps.close()
    finally:
        env.unpublish(bad.name)


def test_del_removes_everything_and_is_idempotent(world):
    env, proc, a, b, c = world
    ok(env.cni("ADD", a))
    ok(env.cni("DEL", a))
    assert env.marker(a) == []
    assert env.xdp(a) == (0, 0)
    maps = env.maps()
    try:
        assert a.ip4 not in [ip for _, ip in maps.mark_pod_ips.items()]
        assert not {a.ip4, a.ip6} & {ip for ip, _ in maps.local_pods.items()}
    finally:
        maps.close()
    res = env.cni("CHECK", a)
    assert res.returncode != 0
    ok(env.cni("DEL", a))                             # again: nothing left, still fine
    # a's traffic no longer passes its sidecar; b still captures inbound
    n = len(a.sidecar.entries())
    r = a.connect(b.ip4, 8080)
    assert r.ok and r.peer[0] == "127.0.0.6"
    assert a.sidecar.entries(n) == []
    ok(env.cni("ADD", a))                             # and it can come back


def test_gc_drops_containers_the_runtime_no_longer_has(world):
    env, proc, a, b, c = world
    ok(env.cni("ADD", a))
    ok(env.cni("ADD", b))
    ok(env.cni("GC", attachments=[f"ctr-{b.name}"]))
    assert env.marker(a) == [] and env.xdp(a) == (0, 0)
    assert env.marker(b) != []
    ok(env.cni("ADD", a))


def test_status_says_ready(world):
    env, proc, a, b, c = world
    ok(env.cni("STATUS"))
    assert proc.poll() is None
    assert ISTIO.name in env.log(proc) or "ready" in env.log(proc)
