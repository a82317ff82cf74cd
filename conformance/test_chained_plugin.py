"""merbridge-cni as the runtime sees it: real cnitool, bridge + host-local, then us.

cnitool runs inside a node netns we create; the daemon is the real CniServer
with a recording in-memory handler. Debian's bridge plugin speaks up to 1.0.0,
so the chain runs at 0.3.1 (what Istio's and upstream Merbridge's installers
write), 0.4.0 and 1.0.0; CHECK exists from 0.4.0 on; the 1.1.0 verbs (STATUS,
GC) are invoked directly, the way libcni would.
"""
from __future__ import annotations

import json
import os

import pytest

from cnikit import cnitool_container_id, kubelet_args, netns_path, prev_result_logged, run

pytestmark = pytest.mark.root

#: ADD and DEL
CHAIN_VERSIONS = ["0.3.1", "0.4.0", "1.0.0"]
#: CHECK too, and DEL with the cached prevResult: both came with 0.4.0 (libcni
#: refuses CHECK below it and passes no prevResult to DEL)
CHECK_VERSIONS = [v for v in CHAIN_VERSIONS if v != "0.3.1"]


def pod_addresses(pod: str) -> list[str]:
    """Global addresses on the pod's eth0 (empty when eth0 is gone)."""
    p = run("ip", "-n", pod, "-j", "addr", "show", "dev", "eth0", check=False)
    if p.returncode != 0:
        return []
    return sorted(f"{a['local']}/{a['prefixlen']}" for link in json.loads(p.stdout)
                  for a in link.get("addr_info", []) if a.get("scope") == "global")


def node_veths(node: str) -> list[str]:
    links = json.loads(run("ip", "-n", node, "-j", "link", "show", "type", "veth").stdout)
    return [link["ifname"] for link in links]


def result_ips(result: dict) -> list[str]:
    return sorted(ip["address"] for ip in result["ips"])


@pytest.mark.parametrize("v", CHAIN_VERSIONS)
def test_add_check_del(v, cnitool, network_factory, netns_factory, fake_daemon, run_plugin):
    _, handler = fake_daemon
    net, pod = network_factory(v), netns_factory("pod")
    cid = cnitool_container_id(netns_path(pod))

    p = cnitool("add", net, pod)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    # what cnitool printed is what the bridge plugin handed us...
    prev = prev_result_logged(p.stderr)
    assert result == prev
    # ...and our raw stdout for that prevResult is that prevResult, not just
    # something libcni's typed Result happens to normalise to the same thing
    rc, out, err = run_plugin({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid,
                               "CNI_NETNS": netns_path(pod), "CNI_IFNAME": "eth0",
                               "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": kubelet_args()},
                              net.plugin_stdin(prevResult=prev))
    assert (rc, out) == (0, prev), err
    handler.calls.pop()
    assert result["cniVersion"] == v
    assert any(i.get("sandbox") == netns_path(pod) for i in result["interfaces"])
    assert ("version" in result["ips"][0]) == v.startswith("0.")   # dropped in 1.0.0
    # and it describes the pod as it really is: both families on eth0
    assert result_ips(result) == pod_addresses(pod)
    assert len(result["ips"]) == 2

    (name, req), = handler.calls
    assert name == "add"
    assert (req.container_id, req.netns, req.ifname) == (cid, netns_path(pod), "eth0")
    assert (req.pod_namespace, req.pod_name, req.pod_uid) == ("default", "web-0", "uid-0")
    assert sorted(req.ips) == result_ips(result)
    assert [(i.name, i.sandbox) for i in req.interfaces] == [("eth0", netns_path(pod))]
    assert (req.cni_version, req.network) == (v, net.name)

    p = cnitool("check", net, pod)
    if v in CHECK_VERSIONS:
        assert p.returncode == 0, p.stderr
        assert handler.names() == ["add", "check"]
        assert handler.calls[1][1].ips == req.ips     # CHECK carries the cached prevResult
    else:                                 # libcni refuses it before any plugin runs
        assert p.returncode != 0 and "does not support the CHECK command" in p.stderr, p.stderr
        assert handler.names() == ["add"]
    checks = handler.names()

    for _ in range(2):                            # DEL twice
        p = cnitool("del", net, pod)
        assert p.returncode == 0, p.stderr
    assert handler.names() == checks + ["delete", "delete"]
    first_del, second_del = (req for _, req in handler.calls[-2:])
    assert sorted(first_del.ips) == (result_ips(result) if v in CHECK_VERSIONS else [])
    assert second_del.ips == ()                   # the second DEL has no cached result
    assert first_del.cni_version == v
    assert handler.enrolled == {}
    assert pod_addresses(pod) == [] and net.allocated_ips() == []


@pytest.mark.parametrize("v", CHECK_VERSIONS)
def test_check_fails_when_the_daemon_lost_the_pod(v, cnitool, network_factory, netns_factory,
                                                   fake_daemon):
    _, handler = fake_daemon
    net, pod = network_factory(v), netns_factory("pod")
    assert cnitool("add", net, pod).returncode == 0
    handler.enrolled.clear()
    p = cnitool("check", net, pod)
    assert p.returncode != 0 and "pod is not enrolled" in p.stderr
    assert cnitool("del", net, pod).returncode == 0


@pytest.mark.parametrize("v", CHAIN_VERSIONS)
def test_del_with_the_daemon_down(v, cnitool, network_factory, netns_factory, fake_daemon):
    server, handler = fake_daemon
    net, pod = network_factory(v), netns_factory("pod")
    assert cnitool("add", net, pod).returncode == 0
    veths = node_veths(cnitool.node)
    assert len(veths) == 1 and net.allocated_ips()
    server.stop()
    p = cnitool("del", net, pod)
    assert p.returncode == 0, p.stderr
    assert "reporting success anyway" in p.stderr
    # the rest of the chain did its teardown
    assert node_veths(cnitool.node) == [] and net.allocated_ips() == []
    assert handler.names() == ["add"]


@pytest.mark.parametrize("v", CHAIN_VERSIONS)
def test_add_with_the_daemon_down_fails_with_try_again_later(v, cnitool, network_factory,
                                                             netns_factory, run_plugin, tmp_path):
    """failOpen false (``--cni-fail-open=false``): the fail-closed behaviour."""
    net, pod = network_factory(v), netns_factory("pod")   # nothing listens on the socket
    assert net.fail_open is False
    p = cnitool("add", net, pod)
    assert p.returncode != 0
    assert "merbridge daemon unavailable, try again later" in p.stderr
    assert p.stdout.strip() == ""
    # the same call made directly shows the code libcni received (libcni keeps a
    # failing plugin's stderr to itself, so rebuild its prevResult from the pod)
    prev = {"cniVersion": v, "interfaces": [{"name": "eth0", "sandbox": netns_path(pod)}],
            "ips": [{"interface": 0, "address": a} for a in pod_addresses(pod)]}
    assert len(prev["ips"]) == 2
    rc, out, _ = run_plugin({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                             "CNI_NETNS": netns_path(pod), "CNI_IFNAME": "eth0",
                             "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": kubelet_args()},
                            net.plugin_stdin(prevResult=prev))
    assert rc == 1 and out["code"] == 11 and out["cniVersion"] == v
    # the runtime then DELs the failed attachment, and the chain cleans up after bridge
    assert net.allocated_ips() and pod_addresses(pod)
    p = cnitool("del", net, pod)
    assert p.returncode == 0, p.stderr
    assert net.allocated_ips() == [] and pod_addresses(pod) == []
    assert node_veths(cnitool.node) == []


@pytest.mark.parametrize("namespace", ["kube-system", "istio-system"])
def test_excluded_namespace_passes_through(namespace, cnitool, network_factory, netns_factory):
    net, pod = network_factory("1.0.0"), netns_factory("pod")   # no daemon at all
    args = kubelet_args(namespace=namespace, name="coredns-0")
    p = cnitool("add", net, pod, cni_args=args)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == prev_result_logged(p.stderr)
    assert cnitool("del", net, pod, cni_args=args).returncode == 0


def test_cni_args_without_ignore_unknown_are_rejected_by_host_local(cnitool, network_factory,
                                                                    netns_factory, fake_daemon):
    net, pod = network_factory("1.0.0"), netns_factory("pod")
    p = cnitool("add", net, pod, cni_args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
    assert p.returncode != 0 and "unknown args" in p.stderr
    assert fake_daemon[1].calls == []
    assert cnitool("del", net, pod, cni_args="IgnoreUnknown=1").returncode == 0


# -- CNI 1.1.0 verbs, called directly as the spec describes ---------------------
def test_status(network_factory, fake_daemon, run_plugin):
    server, handler = fake_daemon
    net = network_factory("1.0.0")
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}
    assert run_plugin(env, net.plugin_stdin("1.1.0"))[:2] == (0, None)
    handler.ready = (False, "loading BPF programs")
    rc, out, _ = run_plugin(env, net.plugin_stdin("1.1.0"))
    assert rc == 1 and out == {"cniVersion": "1.1.0", "code": 50,
                               "msg": "merbridge daemon is not ready",
                               "details": "loading BPF programs"}
    server.stop()
    rc, out, _ = run_plugin(env, net.plugin_stdin("1.1.0"))
    assert rc == 1 and out["code"] == 50 and "not available" in out["msg"]
    # older configs do not know STATUS
    rc, out, _ = run_plugin(env, net.plugin_stdin("1.0.0"))
    assert rc == 1 and out["code"] == 1


def test_gc_keeps_only_valid_attachments(cnitool, network_factory, netns_factory, fake_daemon,
                                         run_plugin):
    server, handler = fake_daemon
    net = network_factory("1.0.0")
    pods = [netns_factory(f"pod{i}") for i in range(2)]
    for i, pod in enumerate(pods):
        assert cnitool("add", net, pod, cni_args=kubelet_args(name=f"web-{i}")).returncode == 0
    keep = cnitool_container_id(netns_path(pods[0]))
    assert set(handler.enrolled) == {keep, cnitool_container_id(netns_path(pods[1]))}

    valid = [{"containerID": keep, "ifname": "eth0"}]
    stdin = net.plugin_stdin("1.1.0", **{"cni.dev/valid-attachments": valid,
                                         "cni.dev/attachments": valid})
    rc, out, err = run_plugin({"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}, stdin)
    assert (rc, out) == (0, None), err
    assert set(handler.enrolled) == {keep}
    name, req = handler.calls[-1]
    assert name == "gc" and [(a.container_id, a.ifname) for a in req.attachments] == \
        [(keep, "eth0")]
    # GC with the daemon down reports try-again-later
    server.stop()
    rc, out, _ = run_plugin({"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}, stdin)
    assert rc == 1 and out["code"] == 11
    for pod in pods:
        assert cnitool("del", net, pod).returncode == 0


@pytest.mark.parametrize("v", CHAIN_VERSIONS)
def test_add_with_the_daemon_down_passes_when_fail_open(v, cnitool, network_factory,
                                                        netns_factory, run_plugin):
    """failOpen (the daemon's default): the pod starts, prevResult passes through, and
    the ADD is remembered for the daemon; the runtime's DEL forgets it."""
    net, pod = network_factory(v), netns_factory("pod")   # nothing listens on the socket
    net.fail_open = True
    net.write()
    p = cnitool("add", net, pod)
    assert p.returncode == 0, p.stderr
    assert "passing through (failOpen)" in p.stderr
    result = json.loads(p.stdout)
    assert sorted(ip["address"] for ip in result["ips"]) == pod_addresses(pod)
    pending_dir = net.plugin_conf()["pendingDir"]
    [name] = os.listdir(pending_dir)
    record = json.load(open(os.path.join(pending_dir, name)))
    assert name == cnitool_container_id(netns_path(pod)) + ".json" and "stdin" in record
    p = cnitool("del", net, pod)
    assert p.returncode == 0, p.stderr
    assert os.listdir(pending_dir) == []
    assert net.allocated_ips() == [] and node_veths(cnitool.node) == []
