"""merbridge-cni chained behind bridge + host-local, against the REAL daemon.

One ``merbridge run --cni-mode=true`` per module (``daemon_world``), inside a
"node" netns, on a private bpffs, a child cgroup and tmp CNI dirs. The node's
primary conflist (bridge + host-local) is written before the daemon starts; the
daemon chains merbridge-cni into it and installs the plugin, and cnitool (in
the node netns) drives exactly that installed conflist. Pods are bare network
namespaces networked only by ``cnitool add``; their Pod manifests sit in the
daemon's ``--pods-dir``.

After ADD the kernel must hold the enrolment (39807 listener with the pod's
mark, ``mb_mark_pod_ips``/``mb_local_pods`` entries, XDP on both ends of the
veth), a client on a second "node" must land on the pod's 15006 with
SO_ORIGINAL_DST = pod:8080, and after DEL everything must be gone. Malformed
invocations get their CNI error code and change nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest

from cnikit import (CNI_PLUGIN_DIR, LIBCNI_CACHE, invoke_plugin, netns_path,
                    prev_result_logged, run)
from daemonkit import (Pod, cid_of, cnitool_ok, direct, enrolled, eth0_exists, host_veth,
                       hook_of, listeners, plugin_call, snapshot, tc_progs, tx_checksums,
                       xdp_prog)
from merbridge.daemon import netns
from merbridge.lab import netns as labns

pytestmark = pytest.mark.root

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, os.pardir, "tests", "root", "xdp_peer.py")
PYTHON = "/usr/bin/python3"
IN_PORT = 15006


# -- tests ------------------------------------------------------------------------
def test_daemon_chained_itself_into_the_primary_conflist(daemon_world):
    w = daemon_world
    (conflist,) = w.daemon.conflists()
    assert conflist["name"] == w.net.name and conflist["cniVersion"] == "1.0.0"
    bridge, ours = conflist["plugins"]
    assert bridge == w.net.bridge_conf()                  # the primary entry untouched
    assert ours["type"] == "merbridge-cni" and ours["socketPath"] == w.daemon.socket
    assert os.access(w.daemon.plugin, os.X_OK)


def withdrawn(w, pod: Pod, result: dict, key: int) -> None:
    """Assert nothing of ``pod``'s enrolment is left anywhere."""
    assert cid_of(pod) not in w.daemon.records()
    assert listeners(pod.ns) == []
    assert w.maps.mark_pod_ips.get(key) is None
    for ip in result["ips"]:
        assert w.maps.local_pods.get(ip["address"].split("/")[0]) is None
    assert not eth0_exists(pod) or xdp_prog(pod.ns, "eth0") == (0, "")
    veth = host_veth(result)
    assert run("ip", "-n", w.node, "link", "show", "dev", veth, check=False).returncode != 0 \
        or (xdp_prog(w.node, veth) == (0, "") and tc_progs(w.node, veth) == {})


def test_add_check_del(daemon_world, pods):
    w = daemon_world
    pod = pods("web")
    result = cnitool_ok(w, "add", pod)
    assert result["cniVersion"] == "1.0.0" and len(result["ips"]) == 2
    rec = enrolled(w, pod, result)
    cnitool_ok(w, "check", pod)
    cache = [f for f in os.listdir(LIBCNI_CACHE) if f.startswith(w.net.name)]
    assert cache == [f"{w.net.name}-{cid_of(pod)}-eth0"]
    cnitool_ok(w, "del", pod)
    withdrawn(w, pod, result, rec["key"])
    assert not eth0_exists(pod) and w.net.allocated_ips() == []
    assert [f for f in os.listdir(LIBCNI_CACHE) if f.startswith(w.net.name)] == []
    cnitool_ok(w, "del", pod)                             # DEL twice: still success
    withdrawn(w, pod, result, rec["key"])


def test_add_del_at_0_3_1(daemon_world, pods, tmp_path):
    """The installed chain at cniVersion 0.3.1, what Istio's and upstream
    Merbridge's installers write: ADD enrols from a 0.3.1 prevResult, libcni
    refuses CHECK (0.4.0 on), DEL (no prevResult before 0.4.0) withdraws it all."""
    w = daemon_world
    (installed,) = w.daemon.conflists()
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-v031.conflist").write_text(
        json.dumps({**installed, "cniVersion": "0.3.1"}))
    net = dataclasses.replace(w.net, conf_dir=str(tmp_path / "net.d"))
    pod = pods("v031")
    p = w.cnitool("add", net, pod.ns, cni_args=pod.args)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["cniVersion"] == "0.3.1" and len(result["ips"]) == 2
    assert all("version" in ip for ip in result["ips"])       # the 0.3.x result format
    rec = enrolled(w, pod, result)
    p = w.cnitool("check", net, pod.ns, cni_args=pod.args)
    assert p.returncode != 0 and "does not support the CHECK command" in p.stderr, p.stderr
    p = w.cnitool("del", net, pod.ns, cni_args=pod.args)
    assert p.returncode == 0, p.stderr
    withdrawn(w, pod, result, rec["key"])
    assert not eth0_exists(pod) and w.net.allocated_ips() == []


def test_cnitool_result_is_the_bridge_result(daemon_world, pods, tmp_path):
    """The installed conflist with only merbridge-cni's logLevel raised to debug
    (so it logs the prevResult bridge handed it): cnitool prints exactly that."""
    w = daemon_world
    (installed,) = w.daemon.conflists()
    debug = json.loads(json.dumps(installed))
    debug["plugins"][1]["logLevel"] = "debug"
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-debug.conflist").write_text(json.dumps(debug))
    net = dataclasses.replace(w.net, conf_dir=str(tmp_path / "net.d"))
    pod = pods("dbg")
    p = w.cnitool("add", net, pod.ns, cni_args=pod.args)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result == prev_result_logged(p.stderr)
    # and our raw stdout for that prevResult is that prevResult, byte for byte in JSON
    rc, out, err = direct(w, "ADD", pod, cid_of(pod), prev=result)
    assert (rc, out) == (0, result), err
    enrolled(w, pod, result)


@pytest.mark.parametrize("damage", ["xdp", "mark_pod_ips", "local_pods", "netns_pod", "tx_csum"])
def test_check_fails_when_state_is_removed_behind_the_daemons_back(daemon_world, pods, damage):
    w = daemon_world
    pod = pods("chk")
    result = cnitool_ok(w, "add", pod)
    rec = enrolled(w, pod, result)
    cnitool_ok(w, "check", pod)
    if damage == "xdp" and hook_of(w) == "tc":
        netns.detach_tc(pod.path, "eth0", peer_netns=netns_path(w.node))
        why = "tc is not attached"
    elif damage == "xdp":
        netns.detach_xdp(pod.path, "eth0", peer_netns=netns_path(w.node))
        why = "XDP is not attached"
    elif damage == "tx_csum" and hook_of(w) == "tc":
        # tc patches CHECKSUM_PARTIAL packets correctly: offload on is no damage
        run("nsenter", f"--net={pod.path}", "ethtool", "-K", "eth0", "tx", "on")
        assert all(tx_checksums(pod).values())
        cnitool_ok(w, "check", pod)
        cnitool_ok(w, "del", pod)
        return
    elif damage == "mark_pod_ips":
        w.maps.mark_pod_ips.delete(rec["key"])
        why = "mark_pod_ips"
    elif damage == "local_pods":
        w.maps.local_pods.delete(rec["ips"][1])
        why = f"local_pods has no {rec['ips'][1]}"
    elif damage == "netns_pod":   # the entry that keeps the pod intercepted with no daemon
        assert w.maps.netns_pod.delete(rec["netns_cookie"])
        why = f"netns_pod has no entry for netns cookie {rec['netns_cookie']:#x}"
    else:                         # offload back on: the XDP egress rewrite corrupts checksums
        run("nsenter", f"--net={pod.path}", "ethtool", "-K", "eth0", "tx", "on")
        assert any(tx_checksums(pod).values())
        why = "tx checksum offload is on for eth0"
    p = w.cnitool("check", w.net, pod.ns, cni_args=pod.args)
    assert p.returncode != 0 and why in p.stderr, p.stderr
    rc, out, _ = direct(w, "CHECK", pod, cid_of(pod), prev=result)
    assert rc == 1 and out["code"] == 103 and why in out["details"], out
    # a repeated ADD (what a runtime may retry) repairs it
    rc, out, err = direct(w, "ADD", pod, cid_of(pod), prev=result)
    assert (rc, out) == (0, result), err
    assert enrolled(w, pod, result)["key"] == rec["key"]
    cnitool_ok(w, "check", pod)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_remote_client_lands_on_the_pods_inbound_port(daemon_world, pods, family):
    """remote node -> pod:8080 arrives on the pod's 15006 listener (in a child of
    --cgroup-path, where mb_getsockopt answers), SO_ORIGINAL_DST says pod:8080,
    the client talks to pod:8080 throughout, and the bytes arrive intact."""
    w = daemon_world
    pod = pods("srv")
    result = cnitool_ok(w, "add", pod)
    enrolled(w, pod, result)
    ip = [i["address"].split("/")[0] for i in result["ips"]
          if (":" in i["address"]) == (family == "v6")][0]
    server = labns.spawn([PYTHON, PEER, "server", str(IN_PORT)], ns=pod.ns, cgroup=pod.cgroup,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        r = remote_connect(w, ip, 8080)
        assert "error" not in r, r
        assert r["sock"] == [ip, IN_PORT]              # accepted on the inbound port
        assert r["orig"] == [ip, 8080]                 # SO_ORIGINAL_DST
        assert r["client_peer"] == [ip, 8080]          # replies came from pod:8080
        assert r["peer"][0] == (w.remote_ip4 if family == "v4" else w.remote_ip6)
        assert r["sha"] == r["sent_sha"] and r["n"] == 1 << 20
        # after DEL nothing rewrites: 8080 itself has no listener
        cnitool_ok(w, "del", pod)
    finally:
        server.kill()
        server.wait()


def remote_connect(w, ip: str, port: int, size: int = 1 << 20, timeout: float = 5) -> dict:
    res = labns.run([PYTHON, PEER, "client", ip, str(port), str(size), str(timeout)],
                    ns=w.remote, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_pod_outside_the_mesh_passes_through(daemon_world, pods):
    w = daemon_world
    pod = pods("plain", in_mesh=False)
    before = snapshot(w, pod, None)
    result = cnitool_ok(w, "add", pod)
    rc, out, err = direct(w, "ADD", pod, cid_of(pod), prev=result)
    assert (rc, out) == (0, result), err                  # prevResult passed through
    after = snapshot(w, pod, host_veth(result))
    assert after["cache"] == [f"{w.net.name}-{cid_of(pod)}-eth0"]   # libcni's, not ours
    assert {k: v for k, v in after.items() if k != "cache"} == \
        {**{k: v for k, v in before.items() if k != "cache"}, "xdp_pod": 0, "xdp_host": 0}
    cnitool_ok(w, "check", pod)
    # the control for the traffic test: without enrolment 8080 is not rewritten,
    # although the pod is reachable on 15006 from the remote node
    ip = [i["address"].split("/")[0] for i in result["ips"] if ":" not in i["address"]][0]
    server = labns.spawn([PYTHON, PEER, "server", str(IN_PORT)], ns=pod.ns, cgroup=pod.cgroup,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert remote_connect(w, ip, IN_PORT, size=10)["orig"][0] == "error"
        assert "refused" in remote_connect(w, ip, 8080, size=10, timeout=2)["error"]
    finally:
        server.kill()
        server.wait()
    cnitool_ok(w, "del", pod)


def test_invalid_annotation_fails_add_and_leaves_nothing(daemon_world, pods):
    w = daemon_world
    pod = pods("bad", annotations={"traffic.sidecar.istio.io/excludeInboundPorts": "80,http"})
    before = snapshot(w, pod, None)
    p = w.cnitool("add", w.net, pod.ns, cni_args=pod.args)
    assert p.returncode != 0 and "excludeInboundPorts" in p.stderr, p.stderr
    assert p.stdout.strip() == ""
    # libcni kept merbridge-cni's reply to itself: the same call made directly
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": pod.path}],
            "ips": [{"interface": 0, "address": a} for a in pod_cidrs(pod)]}
    assert len(prev["ips"]) == 2
    rc, out, _ = direct(w, "ADD", pod, cid_of(pod), prev=prev)
    assert rc == 1 and out["code"] == 101 and "excludeInboundPorts" in out["msg"] + \
        out.get("details", ""), out
    assert snapshot(w, pod, None) == {**before, "listener": [], "xdp_pod": 0}
    # the runtime's DEL after the failed ADD: the chain releases everything
    cnitool_ok(w, "del", pod)
    assert not eth0_exists(pod) and w.net.allocated_ips() == [] and node_veths(w) == []
    assert snapshot(w, pod, None) == before


def pod_cidrs(pod: Pod) -> list[str]:
    links = json.loads(run("ip", "-n", pod.ns, "-j", "addr", "show", "dev", "eth0").stdout)
    return sorted(f"{a['local']}/{a['prefixlen']}" for link in links
                  for a in link["addr_info"] if a.get("scope") == "global")


def node_veths(w) -> list[str]:
    links = json.loads(run("ip", "-n", w.node, "-j", "link", "show", "type", "veth").stdout)
    return [link["ifname"] for link in links if link["ifname"] != "uplink"]


# -- CNI 1.1.0 verbs, called directly as the spec describes ------------------------
def test_status_and_gc(daemon_world, pods):
    w = daemon_world
    keep, drop = pods("keep"), pods("drop")
    results = {p.name: cnitool_ok(w, "add", p) for p in (keep, drop)}
    recs = {p.name: enrolled(w, p, results[p.name]) for p in (keep, drop)}
    entry = w.daemon.conflists()[0]["plugins"][1]
    status = json.dumps({"cniVersion": "1.1.0", "name": w.net.name, **entry}).encode()
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": f"{CNI_PLUGIN_DIR}:{w.daemon.bin_dir}"}
    assert invoke_plugin(w.node, w.daemon.plugin, env, status)[:2] == (0, None)
    valid = [{"containerID": cid_of(keep), "ifname": "eth0"}]
    gc = json.dumps({"cniVersion": "1.1.0", "name": w.net.name, **entry,
                     "cni.dev/valid-attachments": valid}).encode()
    rc, out, err = invoke_plugin(w.node, w.daemon.plugin, {**env, "CNI_COMMAND": "GC"}, gc)
    assert (rc, out) == (0, None), err
    enrolled(w, keep, results[keep.name])
    withdrawn(w, drop, results[drop.name], recs[drop.name]["key"])



# -- malformed invocations ------------------------------------------------------------
def _drop_env(name):
    return lambda env, conf: ({k: v for k, v in env.items() if k != name}, conf)


def _set_env(name, value):
    return lambda env, conf: ({**env, name: value}, conf)


def _set_conf(**changes):
    return lambda env, conf: (env, {k: v for k, v in {**conf, **changes}.items()
                                    if v is not None})


MALFORMED = {
    # stdin
    "bad-json": (lambda env, conf: (env, json.dumps(conf).encode()[:-9]), 6),
    "not-utf8-stdin": (lambda env, conf: (env, json.dumps(conf).encode().replace(
        b'"merbridge-cni"', b'"merbridge-cni\xff"')), 6),
    "no-prevResult": (_set_conf(prevResult=None), 7),
    "unknown-cniVersion": (_set_conf(cniVersion="9.9.9"), 1),
    "malformed-cniVersion": (_set_conf(cniVersion="one"), 1),
    # environment
    "no-CNI_COMMAND": (_drop_env("CNI_COMMAND"), 4),
    "unknown-CNI_COMMAND": (_set_env("CNI_COMMAND", "FROB"), 4),
    "no-CNI_CONTAINERID": (_drop_env("CNI_CONTAINERID"), 4),
    "no-CNI_NETNS": (_drop_env("CNI_NETNS"), 4),
    "no-CNI_IFNAME": (_drop_env("CNI_IFNAME"), 4),
    "not-utf8-CNI_CONTAINERID": (_set_env("CNI_CONTAINERID", b"ctr-\xff"), 4),
    "not-utf8-CNI_ARGS": (lambda env, conf: ({**env, "CNI_ARGS": env["CNI_ARGS"].encode()
                                              .replace(b"K8S_POD_NAME=", b"K8S_POD_NAME=\xff")},
                                             conf), 4),
    # the daemon refuses it with libcni's ErrInvalidNetNS (Debian's bridge says 999)
    "nonexistent-netns": (lambda env, conf: ({**env, "CNI_NETNS": "/var/run/netns/mbt-gone"},
                                             conf), 8),
    # an interface XDP cannot go on: code 4, everything rolled back (was 999)
    "CNI_IFNAME-not-a-veth": (_set_env("CNI_IFNAME", "lo"), 4),
    "CNI_IFNAME-missing-interface": (_set_env("CNI_IFNAME", "eth9"), 4),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_add_gets_its_code_and_leaves_nothing(daemon_world, pods, case):
    """Each malformed variant of an ADD that would enrol the pod fails with its
    code and changes nothing; then the well-formed ADD (the control) does enrol,
    and DEL restores the starting point."""
    w = daemon_world
    pod = pods("mal")
    # networked by the chain without a pod identity (merbridge-cni passes it through)
    p = w.cnitool("add", w.net, pod.ns, cni_args="IgnoreUnknown=1")
    assert p.returncode == 0, p.stderr
    prev = json.loads(p.stdout)
    veth = host_veth(prev)
    before = snapshot(w, pod, veth)
    assert before["listener"] == [] and before["xdp_pod"] == 0

    env, conf = plugin_call(w, "ADD", pod, cid_of(pod), prev)
    mutate, code = MALFORMED[case]
    bad_env, bad_conf = mutate(dict(env), dict(conf))
    stdin = bad_conf if isinstance(bad_conf, bytes) else json.dumps(bad_conf).encode()
    rc, out, err = invoke_plugin(w.node, w.daemon.plugin, bad_env, stdin)
    assert rc == 1 and out is not None, err
    assert set(out) <= {"cniVersion", "code", "msg", "details"} and out["msg"]
    assert out["code"] == code, out
    if case == "nonexistent-netns":
        assert "cannot open netns /var/run/netns/mbt-gone" in out["details"]
    assert snapshot(w, pod, veth) == before

    # the control: the same call, well-formed, enrols; DEL undoes it exactly
    rc, out, err = invoke_plugin(w.node, w.daemon.plugin, env, json.dumps(conf).encode())
    assert (rc, out) == (0, prev), err
    enrolled(w, pod, prev)
    rc, _, err = invoke_plugin(w.node, w.daemon.plugin, {**env, "CNI_COMMAND": "DEL"},
                               json.dumps(conf).encode())
    assert rc == 0, err
    assert snapshot(w, pod, veth) == before


ENROLLED_MALFORMED = {
    "CHECK-no-prevResult": ("CHECK", _set_conf(prevResult=None), 7),
    "CHECK-cniVersion-0.3.1": ("CHECK", _set_conf(cniVersion="0.3.1"), 1),
    "CHECK-bad-json": ("CHECK", lambda env, conf: (env, b"{"), 6),
    "CHECK-no-CNI_NETNS": ("CHECK", _drop_env("CNI_NETNS"), 4),
    "DEL-no-CNI_CONTAINERID": ("DEL", _drop_env("CNI_CONTAINERID"), 4),
    "DEL-unknown-cniVersion": ("DEL", _set_conf(cniVersion="9.9.9"), 1),
    "DEL-not-utf8-stdin": ("DEL", lambda env, conf: (env, b'{"cniVersion": "1.0.0\xff"}'), 6),
    "GC-cniVersion-1.0.0": ("GC", _set_conf(cniVersion="1.0.0"), 1),
}


@pytest.mark.parametrize("case", list(ENROLLED_MALFORMED))
def test_malformed_check_del_gc_leave_the_enrolment_alone(daemon_world, pods, case):
    w = daemon_world
    pod = pods("on")
    result = cnitool_ok(w, "add", pod)
    enrolled(w, pod, result)
    before = snapshot(w, pod, host_veth(result))
    command, mutate, code = ENROLLED_MALFORMED[case]
    env, conf = plugin_call(w, command, pod, cid_of(pod), result)
    if command == "GC":     # a GC that, were it valid, would remove this pod
        conf = {**conf, "cni.dev/valid-attachments": []}
    bad_env, bad_conf = mutate(env, conf)
    stdin = bad_conf if isinstance(bad_conf, bytes) else json.dumps(bad_conf).encode()
    rc, out, err = invoke_plugin(w.node, w.daemon.plugin, bad_env, stdin)
    assert rc == 1 and out["code"] == code, (out, err)
    assert snapshot(w, pod, host_veth(result)) == before
    cnitool_ok(w, "check", pod)


# -- last: shutdown ---------------------------------------------------------------------
def test_sigterm_uninstalls_and_leaves_nothing(daemon_world, pods):
    """Runs last (it stops the module's daemon). SIGTERM: exit 0, the primary
    conflist back byte for byte, the plugin binary gone, no program left on the
    cgroup, no pins, no marker listener or XDP on a pod that was still enrolled."""
    from merbridge.bpf import loader

    w = daemon_world
    pod = pods("last")
    result = cnitool_ok(w, "add", pod)
    enrolled(w, pod, result)
    assert loader.attached(w.cgroup)
    assert w.daemon.stop() == 0, w.daemon.log()[-3000:]
    with open(w.net.conf_path) as f:
        assert json.load(f) == w.net.conflist(chained=False)
    assert not os.path.exists(w.daemon.plugin)
    assert loader.attached(w.cgroup) == []
    assert not os.path.isdir(w.daemon.pin_dir) or os.listdir(w.daemon.pin_dir) == []
    assert listeners(pod.ns) == [] and xdp_prog(pod.ns, "eth0") == (0, "")
    assert xdp_prog(w.node, host_veth(result)) == (0, "")
    assert tc_progs(w.node, host_veth(result)) == {}
    # every refusal above was an expected one: no traceback in the daemon's log
    tracebacks = [line for line in w.daemon.log().splitlines() if "Traceback" in line]
    assert tracebacks == [], tracebacks[0][:3000]
    # with no daemon and no plugin, the node's own chain still tears the pod down
    p = w.cnitool("del", w.net, pod.ns, cni_args=pod.args)
    assert p.returncode == 0, p.stderr
    assert w.net.allocated_ips() == [] and node_veths(w) == []
