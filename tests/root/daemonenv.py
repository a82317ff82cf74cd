"""Scaffolding for the daemon root tests: a real ``merbridge run`` subprocess on
private paths, lab pods as its "node", and the installed plugin driven like a
container runtime (CNI_* environment + netconf on stdin).

The daemon runs inside the lab's node netns (``nsenter --net``), the way the
DaemonSet runs with hostNetwork in the node's: the host-side veth peers of the
lab pods are its own interfaces. Every path is private: a bpffs mounted by the
test, tmp CNI bin/conf dirs with a stand-in primary conflist, a tmp state dir
and socket, a ``--pods-dir`` of manifests, and the lab's own cgroup.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

#: the vm tier (tests/vm) emulates its CPU: bcc's compile at the daemon's start
#: takes minutes there, so it stretches the wait for readiness (and only that)
READY_SCALE = float(os.environ.get("MERBRIDGE_TEST_READY_SCALE", "1"))

from merbridge.bpf import loader
from merbridge.bpf.mesh import MARK_LISTENER_PORT, MESHES
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import Lab, Pod

ISTIO = MESHES["istio"]
#: the venv's console script (sys.executable is the venv's python, not its target)
MERBRIDGE = os.path.join(os.path.dirname(sys.executable), "merbridge")
PRIMARY = "10-mbtest.conflist"
PRIMARY_CONFIG = (b'{\n  "cniVersion": "1.0.0",\n  "name": "mbtest",\n  "plugins": [\n'
                  b'    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}\n'
                  b'  ]\n}\n')


def manifest(pod: Pod, uid: str, annotations: dict | None = None) -> dict:
    """The Kubernetes Pod object of a lab pod, as the pod source would list it."""
    containers = [{"name": "app"}]
    ann = dict(annotations or {})
    if pod.in_mesh:
        containers.append({"name": ISTIO.sidecar_container, "args": ["proxy", "sidecar"]})
        ann.setdefault("sidecar.istio.io/status", "{}")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": "default", "uid": uid,
                         "annotations": ann},
            "spec": {"nodeName": "lab", "containers": containers},
            "status": {"phase": "Running", "podIP": pod.ip4,
                       "podIPs": [{"ip": pod.ip4}, {"ip": pod.ip6}]}}


@dataclass
class PendingCni:
    """A plugin process waiting for its netconf (``Env.cni_pending``)."""
    proc: subprocess.Popen
    conf: str

    def go(self) -> subprocess.CompletedProcess:
        """Hand it the netconf and wait for its result."""
        out, err = self.proc.communicate(self.conf, timeout=60)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Env:
    lab: Lab
    bpffs: str
    cni_mode: bool = True
    inbound_hook: str = "tc"        # the daemon's --inbound-hook
    #: the daemon's --cni-fail-open, and the failOpen of the calls made by ``cni()``
    fail_open: bool = False
    root: str = ""
    procs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="mbt-daemon-")
        self.pin_dir = os.path.join(self.bpffs, "merbridge")
        self.state_dir = os.path.join(self.root, "state")
        self.bin_dir = os.path.join(self.root, "bin")
        self.conf_dir = os.path.join(self.root, "net.d")
        self.pods_dir = os.path.join(self.root, "pods")
        self.socket = os.path.join(self.root, "cni.sock")
        for d in (self.bin_dir, self.conf_dir, self.pods_dir):
            os.mkdir(d)
        self.primary = os.path.join(self.conf_dir, PRIMARY)
        with open(self.primary, "wb") as f:
            f.write(PRIMARY_CONFIG)
        self.node_netns = labns.netns_path(self.lab.nodes[0].ns)

    # -- pods --------------------------------------------------------------
    def publish(self, pod: Pod, annotations: dict | None = None) -> dict:
        m = manifest(pod, f"uid-{pod.name}-{self.lab.name}", annotations)
        tmp = os.path.join(self.pods_dir, f".{pod.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(m, f)
        os.replace(tmp, os.path.join(self.pods_dir, f"{pod.name}.json"))
        return m

    def unpublish(self, pod: Pod) -> None:
        os.unlink(os.path.join(self.pods_dir, f"{pod.name}.json"))

    # -- the daemon --------------------------------------------------------
    def argv(self, *extra: str) -> list[str]:
        return [MERBRIDGE, "run", "--mode=istio", f"--cni-mode={str(self.cni_mode).lower()}",
                f"--bpffs-path={self.pin_dir}", f"--cgroup-path={self.lab.cgroup}",
                f"--state-dir={self.state_dir}", f"--cni-bin-dir={self.bin_dir}",
                f"--cni-conf-dir={self.conf_dir}", f"--socket-path={self.socket}",
                f"--pods-dir={self.pods_dir}", "--metrics-addr=127.0.0.1:0",
                "--node-name=lab", f"--inbound-hook={self.inbound_hook}",
                f"--cni-fail-open={str(self.fail_open).lower()}",
                # pods are found only where a test says (the node's are not ours)
                f"--netns-dir={self.root}/netns", "--proc-path=", *extra]

    def start(self, *extra: str, wait: bool = True) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"daemon-{len(self.procs)}.log"), "wb")
        proc = subprocess.Popen(["nsenter", f"--net={self.node_netns}", *self.argv(*extra)],
                                stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        log.close()
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        with open(proc.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 90) -> None:
        timeout *= READY_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{self.log(proc)}")
            if self.cni_mode:
                # the socket serves before the plugin is installed: wait for both
                if os.path.exists(os.path.join(self.bin_dir, "merbridge-cni")) \
                        and self.cni("STATUS").returncode == 0:
                    return
            elif "merbridge ready" in self.log(proc):
                return
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.log(proc)}")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    # -- the plugin, as a container runtime runs it ---------------------------
    def cni(self, command: str, pod: Pod | None = None, container_id: str = "",
            cni_version: str = "1.1.0", attachments: list | None = None,
            netns_path: str | None = None) -> subprocess.CompletedProcess:
        conf, env = self._cni_call(command, pod, container_id, cni_version, attachments,
                                   netns_path)
        plugin = os.path.join(self.bin_dir, "merbridge-cni")
        return subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True,
                              text=True, timeout=30)

    def cni_pending(self, command: str, pod: Pod) -> PendingCni:
        """The plugin started now but held on its stdin until ``go()``: a runtime's
        command in flight while the daemon (re)starts. It runs a copy of the
        installed merbridge-cni, which a starting daemon replaces."""
        plugin = os.path.join(self.root, "merbridge-cni.copy")
        if not os.path.exists(plugin):
            shutil.copy2(os.path.join(self.bin_dir, "merbridge-cni"), plugin)
        conf, env = self._cni_call(command, pod, "", "1.1.0", None, None)
        proc = subprocess.Popen([plugin], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
        return PendingCni(proc, json.dumps(conf))

    def _cni_call(self, command: str, pod: Pod | None, container_id: str, cni_version: str,
                  attachments: list | None, netns_path: str | None) -> tuple[dict, dict]:
        """The netconf and environment a runtime gives the plugin."""
        conf = {"cniVersion": cni_version, "name": "mbtest", "type": "merbridge-cni",
                "socketPath": self.socket, "failOpen": self.fail_open,
                "pendingDir": os.path.join(self.state_dir, "pending")}
        env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_PATH": self.bin_dir}
        if pod is not None:
            path = netns_path or labns.netns_path(pod.ns)
            env.update(CNI_CONTAINERID=container_id or f"ctr-{pod.name}", CNI_IFNAME="eth0",
                       CNI_NETNS=path,
                       CNI_ARGS=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name};"
                                f"K8S_POD_UID=uid-{pod.name}-{self.lab.name}")
            conf["prevResult"] = {
                "cniVersion": cni_version,
                "interfaces": [{"name": "eth0", "sandbox": path}],
                "ips": [{"address": f"{pod.ip4}/24", "interface": 0},
                        {"address": f"{pod.ip6}/64", "interface": 0}]}
        if attachments is not None:
            conf["cni.dev/attachments"] = [{"containerID": c, "ifname": "eth0"}
                                           for c in attachments]
        return conf, env

    # -- observations ----------------------------------------------------------
    def marker(self, pod: Pod) -> list[str]:
        """fwmarks of the sockets listening on 39807 in the pod netns (ss -e)."""
        out = labns.run(["ss", "-tlnHe", f"sport = :{MARK_LISTENER_PORT}"], ns=pod.ns).stdout
        return [w.split(":", 1)[1] for line in out.splitlines() for w in line.split()
                if w.startswith("fwmark:")]

    def xdp(self, pod: Pod) -> tuple[int, int]:
        """The inbound programs on the pod's veth pair, whichever the hook:
        XDP program ids on the pod's eth0 and its host-side peer, or the ids
        of the tc programs (to the pod, from the pod) on that peer; (0, 0)
        when none. The other hook must have nothing there."""
        xdp = (netns.xdp_prog_id(labns.netns_path(pod.ns), "eth0")[0],
               netns.xdp_prog_id(self.node_netns, pod.host_if, allow_own=True)[0])
        names = netns.tc_filter_names(self.node_netns, pod.host_if, allow_own=True)
        tc = tuple(int(names[k].split("#")[1]) if k in names else 0
                   for k in ("to_pod", "from_pod"))
        assert (tc if self.inbound_hook == "xdp" else xdp) == (0, 0), (self.inbound_hook, xdp, tc)
        return tc if self.inbound_hook == "tc" else xdp

    def maps(self):
        return loader.open_maps(self.pin_dir)

    def attached(self) -> list:
        return loader.attached(self.lab.cgroup)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        # a killed daemon leaves its programs attached to the lab cgroup: detach
        # them (the lab removes the cgroup) and leave the pins to the bpffs unmount
        try:
            loader.detach_cgroup(self.lab.cgroup)
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
