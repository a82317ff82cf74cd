"""The real daemon for the conformance suite: ``MerbridgeDaemon`` (``merbridge run
--cni-mode=true`` on private paths inside a node netns), Pod manifests for its
``--pods-dir``, and what the tests observe in the kernel and on disk: the 39807
listener and its fwmark, XDP programs, map entries, state-file records and
libcni cache files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from cnikit import (CNI_PLUGIN_DIR, LIBCNI_CACHE, cnitool_container_id, invoke_plugin,
                    kubelet_args, netns_path, run)
from merbridge.bpf.mesh import MARK_LISTENER_PORT, MESHES

#: the venv's console script (sys.executable is the venv's python)
MERBRIDGE = os.path.join(os.path.dirname(sys.executable), "merbridge")


def pod_manifest(namespace: str, name: str, uid: str, in_mesh: bool = True,
                 annotations: dict | None = None) -> dict:
    """A Kubernetes Pod object as the daemon's ``--pods-dir`` source reads it; an
    istio-injected one (sidecar container + ``sidecar.istio.io/status``) when
    ``in_mesh``. No IPs: the daemon takes them from the CNI prevResult."""
    containers = [{"name": "app"}]
    ann = dict(annotations or {})
    if in_mesh:
        containers.append({"name": MESHES["istio"].sidecar_container,
                           "args": ["proxy", "sidecar"]})
        ann.setdefault("sidecar.istio.io/status", "{}")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "annotations": ann},
            "spec": {"nodeName": "conformance", "containers": containers},
            "status": {"phase": "Pending"}}


@dataclasses.dataclass
class MerbridgeDaemon:
    """``merbridge run --cni-mode=true`` as a subprocess inside the node netns, on
    private paths only: ``pin_dir`` (in a bpffs the caller mounted), ``cgroup``
    (a child cgroup the caller made), and under ``root``: CNI bin and conf dirs,
    state dir, socket and pods dir. The caller writes the primary conflist into
    ``conf_dir`` first; the daemon chains itself into it and installs the plugin
    into ``bin_dir``."""

    node: str
    root: str
    pin_dir: str
    cgroup: str
    proc: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.bin_dir, self.conf_dir = f"{self.root}/bin", f"{self.root}/net.d"
        self.state_dir, self.pods_dir = f"{self.root}/state", f"{self.root}/pods"
        self.socket = f"{self.root}/cni.sock"
        self.log_path = f"{self.root}/daemon.log"
        for d in (self.bin_dir, self.conf_dir, self.pods_dir):
            os.makedirs(d, exist_ok=True)

    @property
    def plugin(self) -> str:
        return os.path.join(self.bin_dir, "merbridge-cni")

    def argv(self) -> list[str]:
        return [MERBRIDGE, "run", "--mode=istio", "--cni-mode=true",
                f"--bpffs-path={self.pin_dir}", f"--cgroup-path={self.cgroup}",
                f"--state-dir={self.state_dir}", f"--cni-bin-dir={self.bin_dir}",
                f"--cni-conf-dir={self.conf_dir}", f"--socket-path={self.socket}",
                f"--pods-dir={self.pods_dir}", "--metrics-addr=127.0.0.1:0",
                "--node-name=conformance", f"--netns-dir={self.root}/netns", "--proc-path=",
                *self.extra_args]

    def start(self, timeout: float = 120) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["nsenter", f"--net={netns_path(self.node)}",
                                          *self.argv()], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        status = {"CNI_COMMAND": "STATUS", "CNI_PATH": self.bin_dir}
        stdin = json.dumps({"cniVersion": "1.1.0", "name": "probe", "type": "merbridge-cni",
                            "socketPath": self.socket}).encode()
        # ready = the plugin is installed and chained in, and STATUS says ready
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.plugin) and self.chained() \
                    and invoke_plugin(self.node, self.plugin, status, stdin)[0] == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def chained(self) -> bool:
        try:
            return any(p.get("type") == "merbridge-cni"
                       for c in self.conflists() for p in c.get("plugins", []))
        except (OSError, ValueError):
            return False

    def conflists(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.conf_dir)):
            if name.endswith(".conflist"):
                with open(os.path.join(self.conf_dir, name)) as f:
                    out.append(json.load(f))
        return out

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    # -- pods it knows about ---------------------------------------------------
    def publish(self, manifest: dict) -> None:
        name = manifest["metadata"]["name"]
        tmp = os.path.join(self.pods_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(self.pods_dir, f"{name}.json"))

    def unpublish(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.pods_dir, f"{name}.json"))
        except FileNotFoundError:
            pass

    def records(self) -> dict[str, dict]:
        """The state file's records by container id (empty when there is no file)."""
        try:
            with open(os.path.join(self.state_dir, "enrolled.json")) as f:
                return {r["container_id"]: r for r in json.load(f)["containers"]}
        except FileNotFoundError:
            return {}


def remove_cgroup(path: str) -> None:
    """rmdir a cgroup this suite made (children first), killing by PID whatever
    this suite left running in it."""
    deadline = time.monotonic() + 5
    while os.path.isdir(path):
        for child in os.scandir(path):
            if child.is_dir():
                remove_cgroup(child.path)
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)


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
    return "xdp" if "--inbound-hook=xdp" in w.daemon.extra_args else "tc"


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
    from merbridge.daemon import netns
    from merbridge.lab import netns as labns

    uid = f"uid-{name}-{w.tag}"
    pod = Pod(name, f"mbt-{w.tag}-{name}", os.path.join(w.cgroup, name), uid,
              kubelet_args(name=name, uid=uid))
    labns.create_netns(pod.ns)
    try:
        os.mkdir(pod.cgroup)
    except BaseException:
        labns.remove_netns(pod.ns)
        raise
    w.daemon.publish(pod_manifest("default", name, uid, in_mesh, annotations))
    return pod


def remove_pod(w, pod: Pod) -> None:
    """The runtime's DEL through the chain, then the pod's cgroup, netns and manifest."""
    from merbridge.daemon import netns
    from merbridge.lab import netns as labns

    try:
        w.cnitool("del", w.net, pod.ns, cni_args=pod.args)
    finally:
        remove_cgroup(pod.cgroup)
        labns.remove_netns(pod.ns)
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


