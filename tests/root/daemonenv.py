"""Scaffolding for the daemon root tests: the real ``merbridge run``
(``merbridge.lab.node.RealDaemon``) on private paths, lab pods as its "node",
and the installed plugin driven like a container runtime (CNI_* environment +
netconf on stdin).

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
import subprocess
from dataclasses import dataclass

from merbridge.bpf.mesh import MARK_LISTENER_PORT, MESHES
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import Lab, Pod
from merbridge.lab.manifests import pod_manifest
from merbridge.lab.node import MERBRIDGE, RealDaemon

__all__ = ["Env", "PendingCni", "MERBRIDGE", "PRIMARY", "PRIMARY_CONFIG", "ISTIO"]

ISTIO = MESHES["istio"]
PRIMARY = "10-mbtest.conflist"
PRIMARY_CONFIG = (b'{\n  "cniVersion": "1.0.0",\n  "name": "mbtest",\n  "plugins": [\n'
                  b'    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}\n'
                  b'  ]\n}\n')


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


class Env(RealDaemon):
    """The daemon in the lab's node netns, attached to the lab's cgroup, pins in
    ``bpffs``; a stand-in primary conflist in its conf dir."""

    def __init__(self, lab: Lab, bpffs: str, cni_mode: bool = True, inbound_hook: str = "tc",
                 fail_open: bool = False) -> None:
        #: the daemon's --cni-fail-open, and the failOpen of the calls made by ``cni()``
        self.lab, self.inbound_hook, self.fail_open = lab, inbound_hook, fail_open
        self.node_netns = labns.netns_path(lab.nodes[0].ns)
        super().__init__(os.path.join(bpffs, "merbridge"), lab.cgroup, netns=self.node_netns,
                         cni_mode=cni_mode, node_name="lab",
                         args=(f"--inbound-hook={inbound_hook}",
                               f"--cni-fail-open={str(fail_open).lower()}"))
        self.primary = os.path.join(self.conf_dir, PRIMARY)
        with open(self.primary, "wb") as f:
            f.write(PRIMARY_CONFIG)

    # -- pods --------------------------------------------------------------
    def publish_pod(self, pod: Pod, annotations: dict | None = None) -> dict:
        """The lab pod's Pod object, as the pod source would list it."""
        return self.publish(pod_manifest(pod.name, uid=f"uid-{pod.name}-{self.lab.name}",
                                         in_mesh=pod.in_mesh, annotations=annotations,
                                         ips=(pod.ip4, pod.ip6)))

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
