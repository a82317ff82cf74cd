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
import secrets
import subprocess

import pytest

from cnikit import (CNI_PLUGIN_DIR, LIBCNI_CACHE, invoke_plugin, kubelet_args, listeners,
                    marker_marks, netns_path, pod_manifest, prev_result_logged, remove_cgroup,
                    run, xdp_prog)
from merbridge.daemon import netns

pytestmark = pytest.mark.root

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, os.pardir, "tests", "root", "xdp_peer.py")
PYTHON = "/usr/bin/python3"
IN_PORT = 15006


@dataclasses.dataclass
class Pod:
    name: str
    ns: str
    cgroup: str
    uid: str
    args: str                          # CNI_ARGS kubelet would pass for it

    @property
    def path(self) -> str:
        return netns_path(self.ns)


@pytest.fixture
def pods(daemon_world):
    """``make(name, in_mesh=True, annotations=None)``: a bare pod netns + cgroup and
    its manifest in the pods dir; afterwards cnitool DEL, netns and cgroup removed."""
    w = daemon_world
    made: list[Pod] = []

    def make(name: str, in_mesh: bool = True, annotations: dict | None = None) -> Pod:
        name = f"{name}-{secrets.token_hex(2)}"
        uid = f"uid-{name}-{w.tag}"
        pod = Pod(name, f"mbt-{w.tag}-{name}", os.path.join(w.cgroup, name), uid,
                  kubelet_args(name=name, uid=uid))
        netns.create_netns(pod.ns)
        made.append(pod)
        os.mkdir(pod.cgroup)
        w.daemon.publish(pod_manifest("default", name, uid, in_mesh, annotations))
        return pod

    try:
        yield make
    finally:
        for pod in made:
            try:
                w.cnitool("del", w.net, pod.ns, cni_args=pod.args)
            finally:
                remove_cgroup(pod.cgroup)
                netns.remove_netns(pod.ns)
                w.daemon.unpublish(pod.name)


# -- observations -----------------------------------------------------------------
def host_veth(result: dict) -> str:
    """The host-side veth in the bridge's result (the interface without a sandbox
    that is not the bridge)."""
    (name,) = [i["name"] for i in result["interfaces"]
               if not i.get("sandbox") and "mac" in i and i["name"] != result["interfaces"][0]["name"]]
    return name


def snapshot(w, pod: Pod, veth: str | None) -> dict:
    """Everything merbridge could have left for ``pod`` (and in general)."""
    return {
        "mark_pod_ips": sorted(w.maps.mark_pod_ips.items()),
        "local_pods": sorted(ip for ip, _ in w.maps.local_pods.items()),
        "listener": listeners(pod.ns) if os.path.exists(pod.path) else [],
        "xdp_pod": xdp_prog(pod.ns, "eth0")[0] if eth0_exists(pod) else 0,
        "xdp_host": xdp_prog(w.node, veth)[0] if veth else 0,
        "records": sorted(w.daemon.records()),
        "cache": sorted(f for f in os.listdir(LIBCNI_CACHE) if f.startswith(w.net.name)),
    }


def eth0_exists(pod: Pod) -> bool:
    return run("ip", "-n", pod.ns, "link", "show", "dev", "eth0", check=False).returncode == 0


def cnitool_ok(w, command: str, pod: Pod) -> dict | None:
    p = w.cnitool(command, w.net, pod.ns, cni_args=pod.args)
    assert p.returncode == 0, f"cnitool {command}: {p.stderr}\n{w.daemon.log()[-3000:]}"
    return json.loads(p.stdout) if p.stdout.strip() else None


def direct(w, command: str, pod: Pod, cid: str, prev: dict | None = None,
           version: str = "1.0.0", **extra):
    """The installed merbridge-cni invoked as libcni would (its conflist entry,
    the network's name and version, the cached prevResult)."""
    entry = [p for p in w.daemon.conflists()[0]["plugins"] if p["type"] == "merbridge-cni"][0]
    conf = {"cniVersion": version, "name": w.net.name, **entry, **extra}
    if prev is not None:
        conf["prevResult"] = prev
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": pod.path,
           "CNI_IFNAME": "eth0", "CNI_PATH": f"{CNI_PLUGIN_DIR}:{w.daemon.bin_dir}",
           "CNI_ARGS": pod.args}
    return invoke_plugin(w.node, w.daemon.plugin, env, json.dumps(conf).encode())


def cid_of(pod: Pod) -> str:
    from cnikit import cnitool_container_id
    return cnitool_container_id(pod.path)


# -- tests ------------------------------------------------------------------------
def test_daemon_chained_itself_into_the_primary_conflist(daemon_world):
    w = daemon_world
    (conflist,) = w.daemon.conflists()
    assert conflist["name"] == w.net.name and conflist["cniVersion"] == "1.0.0"
    bridge, ours = conflist["plugins"]
    assert bridge == w.net.bridge_conf()                  # the primary entry untouched
    assert ours["type"] == "merbridge-cni" and ours["socketPath"] == w.daemon.socket
    assert os.access(w.daemon.plugin, os.X_OK)


def test_add_check_del(daemon_world, pods):
    w = daemon_world
    pod = pods("web")
    result = cnitool_ok(w, "add", pod)
    print(json.dumps(result, indent=1))
    print(snapshot(w, pod, host_veth(result)))
    print(marker_marks(pod.ns), w.daemon.records())
