"""The conformance suite's pods for the real daemon (``merbridge.lab.node.RealDaemon``:
``merbridge run --cni-mode=true`` on private paths inside a node netns), and
what the tests observe in the kernel and on disk: the 39807 listener and its
fwmark, XDP programs, map entries, state-file records and libcni cache files.
"""
from __future__ import annotations

import dataclasses
import json
import os

from cnikit import (CNI_PLUGIN_DIR, LIBCNI_CACHE, cnitool_container_id, invoke_plugin,
                    kubelet_args, netns_path, run)
from merbridge.bpf.mesh import MARK_LISTENER_PORT
from merbridge.lab import netns
from merbridge.lab.cgroups import remove_cgroup
from merbridge.lab.manifests import pod_manifest

#: what the conformance daemon's pods say (--node-name, and not networked yet)
NODE_NAME = "conformance"

def marker_marks(pod: str, port: int = MARK_LISTENER_PORT) -> list[int]:
    """fwmarks of the sockets listening on ``port`` in the pod netns (``ss -ltne``)."""
    out = run("nsenter", f"--net={netns_path(pod)}", "ss", "-ltneH",
              f"sport = :{port}").stdout
    return [int(w.split(":", 1)[1], 16) for line in out.splitlines() for w in line.split()
            if w.startswith("fwmark:")]


def listeners(pod: str, port: int = MARK_LISTENER_PORT) -> list[str]:
    out = run("nsenter", f"--net={netns_path(pod)}", "ss", "-ltnH", f"sport = :{port}").stdout
    return [line for line in out.splitlines() if line.strip()]


def xdp_prog(ns: str, ifname: str) -> tuple[int, str]:
    """(program id, program name) of the XDP program on ``ifname`` in ``ns``; (0, "")."""
    links = json.loads(run("ip", "-n", ns, "-d", "-j", "link", "show", "dev", ifname).stdout)
    prog_id = _xdp_id(links[0])
    if not prog_id:
        return 0, ""
    info = json.loads(run("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
    return prog_id, info.get("name", "")


def xdp_progs(ns: str) -> dict[str, int]:
    """XDP program id of every interface in ``ns`` that has one (one ``ip link``)."""
    links = json.loads(run("ip", "-n", ns, "-d", "-j", "link", "show").stdout)
    return {link["ifname"]: _xdp_id(link) for link in links if _xdp_id(link)}


def tc_progs(ns: str, ifname: str) -> dict[str, str]:
    """{"ingress"/"egress": BPF program name} of the cls_bpf filters on
    ``ifname`` in ``ns`` (``tc -j filter show``); {} without a clsact."""
    out = {}
    for where in ("ingress", "egress"):
        p = run("tc", "-n", ns, "-j", "filter", "show", "dev", ifname, where, check=False)
        for f in json.loads(p.stdout or "[]") if p.returncode == 0 else []:
            name = (f.get("options") or {}).get("bpf_name")
            if name:
                out[where] = name.split("#")[0]
    return out


def tc_progs_all(ns: str) -> dict[str, dict[str, str]]:
    """tc_progs of every interface in ``ns`` that has a BPF filter."""
    links = json.loads(run("ip", "-n", ns, "-j", "link", "show").stdout)
    found = {link["ifname"]: tc_progs(ns, link["ifname"]) for link in links}
    return {name: progs for name, progs in found.items() if progs}


def hook_of(w) -> str:
    """The daemon's --inbound-hook (tc unless the module's DAEMON_ARGS say xdp)."""
    return "xdp" if "--inbound-hook=xdp" in w.daemon.args else "tc"


def _xdp_id(link: dict) -> int:
    xdp = link.get("xdp") or {}
    prog = xdp.get("prog") or {}
    if not prog and xdp.get("attached"):
        prog = xdp["attached"][0].get("prog") or {}
    return prog.get("id") or 0


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


def make_pod(w, name: str, in_mesh: bool = True, annotations: dict | None = None) -> Pod:
    """A bare pod netns + a child cgroup of ``w.cgroup``, its manifest in the
    daemon's pods dir; not networked yet (``cnitool add`` does that)."""
    uid = f"uid-{name}-{w.tag}"
    pod = Pod(name, f"mbt-{w.tag}-{name}", os.path.join(w.cgroup, name), uid,
              kubelet_args(name=name, uid=uid))
    netns.create_netns(pod.ns)
    try:
        os.mkdir(pod.cgroup)
    except BaseException:
        netns.remove_netns(pod.ns)
        raise
    w.daemon.publish(pod_manifest(name, uid=uid, node=NODE_NAME, phase="Pending",
                                  in_mesh=in_mesh, annotations=annotations))
    return pod


def remove_pod(w, pod: Pod) -> None:
    """The runtime's DEL through the chain, then the pod's cgroup, netns and manifest."""
    try:
        w.cnitool("del", w.net, pod.ns, cni_args=pod.args)
    finally:
        remove_cgroup(pod.cgroup)
        netns.remove_netns(pod.ns)
        w.daemon.unpublish(pod.name)


def host_veth(result: dict) -> str:
    """The host-side veth in the bridge's result (the interface without a sandbox
    that is not the bridge)."""
    bridge = result["interfaces"][0]["name"]
    (name,) = [i["name"] for i in result["interfaces"]
               if not i.get("sandbox") and i["name"] != bridge]
    return name


def snapshot(w, pod: Pod, veth: str | None) -> dict:
    """Everything merbridge could have left for ``pod`` (and in general)."""
    return {**node_state(w), **pod_state(w, pod, veth)}


def node_state(w) -> dict:
    """The daemon's node-wide state: map entries, state-file records, libcni cache."""
    netns_pod = getattr(w.maps, "netns_pod", None)
    return {
        "mark_pod_ips": sorted(w.maps.mark_pod_ips.items()),
        "local_pods": sorted(ip for ip, _ in w.maps.local_pods.items()),
        "netns_pod": sorted(netns_pod.all_items()) if netns_pod is not None else [],
        "records": sorted(w.daemon.records().items()),
        "cache": sorted(f for f in os.listdir(LIBCNI_CACHE) if f.startswith(w.net.name)),
    }


def pod_state(w, pod: Pod, veth: str | None) -> dict:
    """``pod``'s marker listener, the XDP on both ends of its veth and the tc
    filters on its host-side end."""
    return {
        "listener": listeners(pod.ns) if os.path.exists(pod.path) else [],
        "xdp_pod": xdp_prog(pod.ns, "eth0")[0] if eth0_exists(pod) else 0,
        "xdp_host": xdp_prog(w.node, veth)[0] if veth else 0,
        "tc_host": tc_progs(w.node, veth) if veth else {},
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
    env, conf = plugin_call(w, command, pod, cid, prev, version, **extra)
    return invoke_plugin(w.node, w.daemon.plugin, env, json.dumps(conf).encode())


def plugin_call(w, command: str, pod: Pod, cid: str, prev: dict | None = None,
                version: str = "1.0.0", **extra) -> tuple[dict, dict]:
    """(env, stdin config) libcni gives the installed merbridge-cni for ``pod``."""
    entry = [p for p in w.daemon.conflists()[0]["plugins"] if p["type"] == "merbridge-cni"][0]
    conf = {"cniVersion": version, "name": w.net.name, **entry, **extra}
    if prev is not None:
        conf["prevResult"] = prev
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": pod.path,
           "CNI_IFNAME": "eth0", "CNI_PATH": f"{CNI_PLUGIN_DIR}:{w.daemon.bin_dir}",
           "CNI_ARGS": pod.args}
    return env, conf


def enrolled(w, pod: Pod, result: dict, hardware_checksum: bool = False) -> dict:
    """Assert the kernel and the daemon hold ``pod``'s enrolment; returns its record."""
    cid = cid_of(pod)
    rec = w.daemon.records()[cid]
    ip4, ip6 = sorted((ip["address"].split("/")[0] for ip in result["ips"]),
                      key=lambda a: ":" in a)
    assert rec["phase"] == "enrolled" and rec["ips"] == [ip4, ip6]
    key = rec["key"]
    assert marker_marks(pod.ns) == [key]                 # ss -ltne: :39807 fwmark:<key>
    assert w.maps.mark_pod_ips.get(key) == ip4
    assert w.maps.local_pods.get(ip4) is not None and w.maps.local_pods.get(ip6) is not None
    assert (rec["netns_cookie"], (ip4, ip6), key) in w.maps.netns_pod.all_items()
    offloads = tx_checksums(pod)
    if hook_of(w) == "tc":
        # tc on the host-side peer, no XDP anywhere, the pod's offload untouched
        assert tc_progs(w.node, host_veth(result)) == {"ingress": "mb_tc_from_pod",
                                                       "egress": "mb_tc_to_pod"}
        assert xdp_prog(pod.ns, "eth0")[0] == xdp_prog(w.node, host_veth(result))[0] == 0
        assert offloads and all(offloads.values()), offloads
        return rec
    assert xdp_prog(pod.ns, "eth0")[1] == "mb_xdp_ingress"
    assert xdp_prog(w.node, host_veth(result))[1] == "mb_xdp_egress"
    assert tc_progs(w.node, host_veth(result)) == {}
    assert offloads and all(offloads.values()) if hardware_checksum \
        else not any(offloads.values()), offloads
    return rec


def tx_checksums(pod: Pod, ifname: str = "eth0") -> dict[str, bool]:
    """``ethtool -k`` in the pod netns: {feature: on} of the tx checksum offloads
    merbridge turns off (``netns.TX_CHECKSUM_FEATURES``; fixed ones left out)."""
    from merbridge.daemon.netns import TX_CHECKSUM_FEATURES

    out = run("nsenter", f"--net={pod.path}", "ethtool", "-k", ifname).stdout
    feats = (line.strip().split(": ", 1) for line in out.splitlines()
             if ": " in line and "[fixed]" not in line)
    return {name: state.startswith("on") for name, state in feats
            if name in TX_CHECKSUM_FEATURES}


def cid_of(pod: Pod) -> str:
    return cnitool_container_id(pod.path)


