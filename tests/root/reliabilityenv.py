"""Scaffolding for the reliability suite (tests/root/test_reliability_*.py).

``ChurnNet`` turns a daemonenv ``Env`` into a node a container runtime would
drive: the stand-in primary conflist is replaced by a real bridge +
host-local one (private subnets, a unique bridge, IPAM state in tmp) before
the daemon chains itself in, and pods are created and destroyed through the
reference ``cnitool`` run in the lab's node netns -- the same exec, env and
stdin a runtime gives the plugins.

``Observer`` reads what a leak would show: the daemon's open fds, threads
and memory (from /proc and its /metrics), every map it owns, the state file, XDP attachments in
the node netns and marker listeners.
"""
from __future__ import annotations

import glob
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from daemonenv import Env
from merbridge.bpf.mesh import MARK_LISTENER_PORT
from merbridge.daemon import netns

CNITOOL = "/usr/local/bin/cnitool"
CNI_PLUGINS = "/usr/lib/cni"
LIBCNI_CACHE = "/var/lib/cni/results"
NODE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ChurnNet:
    env: Env
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    octet: int = field(default_factory=lambda: 200 + secrets.randbelow(30))
    created: set = field(default_factory=set)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.name = f"mbt-{self.tag}"
        self.ipam_dir = os.path.join(self.env.root, "ipam")
        conf = {"cniVersion": "1.0.0", "name": self.name, "plugins": [{
            "type": "bridge", "bridge": f"mbc{self.tag}", "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": self.ipam_dir,
                     "ranges": [[{"subnet": f"10.{self.octet}.{secrets.randbelow(250)}.0/24"}],
                                [{"subnet": f"fd00:{self.tag[:4]}:{self.tag[4:]}::/64"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}}]}
        # what the node had before merbridge: the daemon chains itself into it
        with open(self.env.primary, "w") as f:
            json.dump(conf, f, indent=2)
        with open(self.env.primary, "rb") as f:
            self.original = f.read()

    def pod_name(self, i: int) -> str:
        return f"c{i}"

    def netns_name(self, pod: str) -> str:
        return f"{self.name}-{pod}"

    def publish(self, pod: str) -> None:
        manifest = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": "default", "uid": f"uid-{pod}",
                                 "annotations": {"sidecar.istio.io/status": "{}"}},
                    "spec": {"containers": [{"name": "app"}, {
                        "name": "istio-proxy", "args": ["proxy", "sidecar"]}]},
                    "status": {"phase": "Running"}}
        tmp = os.path.join(self.env.pods_dir, f".{pod}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(self.env.pods_dir, f"{pod}.json"))

    def unpublish(self, pod: str) -> None:
        try:
            os.unlink(os.path.join(self.env.pods_dir, f"{pod}.json"))
        except FileNotFoundError:
            pass

    def make_netns(self, pod: str) -> str:
        ns = self.netns_name(pod)
        netns.create_netns(ns)
        with self.lock:
            self.created.add(ns)
        return ns

    def drop_netns(self, pod: str) -> None:
        ns = self.netns_name(pod)
        netns.remove_netns(ns)
        with self.lock:
            self.created.discard(ns)

    def cnitool(self, command: str, pod: str) -> subprocess.CompletedProcess:
        env = {"PATH": NODE_PATH, "NETCONFPATH": self.env.conf_dir,
               "CNI_PATH": f"{CNI_PLUGINS}:{self.env.bin_dir}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
                           f"K8S_POD_UID=uid-{pod}"}
        return subprocess.run(["nsenter", f"--net={self.env.node_netns}", CNITOOL, command,
                               self.name, netns.netns_path(self.netns_name(pod))],
                              env=env, capture_output=True, text=True, timeout=60)

    def cycle(self, pod: str, hold=None, retry_for: float = 0.0) -> tuple[bool, bool]:
        """One pod's life the way kubelet lives it: publish, netns, ADD (a failed
        ADD is followed by DEL, as a runtime does, and retried for ``retry_for``
        seconds), ``hold()``, DEL, netns gone. Failed ADD attempts are counted
        in ``self.refused``."""
        self.publish(pod)
        self.make_netns(pod)
        try:
            deadline = time.monotonic() + retry_for
            while True:
                added = self.cnitool("add", pod)
                if added.returncode == 0 or time.monotonic() > deadline:
                    break
                with self.lock:
                    self.refused += 1
                self.cnitool("del", pod)
                time.sleep(0.5)
            if hold is not None and added.returncode == 0:
                hold(pod)
            deleted = self.cnitool("del", pod)
            return added.returncode == 0, deleted.returncode == 0
        finally:
            self.drop_netns(pod)
            self.unpublish(pod)

    def close(self) -> None:
        for ns in list(self.created):
            netns.remove_netns(ns)
        for path in glob.glob(os.path.join(LIBCNI_CACHE, f"{glob.escape(self.name)}-*")):
            os.unlink(path)


class Observer:
    """What a leak would show, for one daemon process."""

    def __init__(self, env: Env, pid: int):
        self.env, self.pid = env, pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sockets(self) -> int:
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                n += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return n

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of /proc/PID/status in KiB: VmRSS, or RssAnon (the
        heap and stacks, without the mapped libraries and bcc's objects)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def scrape(self) -> dict[str, float]:
        """The daemon's /metrics as {"name{labels}": value}, fetched from inside the
        node netns (the port is the one the daemon logged for --metrics-addr=...:0)."""
        proc = next(p for p in self.env.procs if p.pid == self.pid)
        found = re.search(r"metrics and health on ([\d.]+):(\d+)", self.env.log(proc))
        assert found, "the daemon logged no metrics address"
        url = f"http://{found[1]}:{found[2]}/metrics"
        res = netns.run([sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                         "urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", url],
                        ns=self.env.lab.nodes[0].ns)
        assert res.returncode == 0, res.stderr
        return {name: float(value) for name, _, value in
                (line.rpartition(" ") for line in res.stdout.splitlines())
                if name and not name.startswith("#")}

    def map_entries(self) -> dict[str, int]:
        maps = self.env.maps()
        try:
            out = {"mark_pod_ips": len(maps.mark_pod_ips.items()),
                   "local_pods": len(maps.local_pods.items()),
                   "pair_orig_dst": len(maps.pair_orig_dst.items())}
            if hasattr(maps, "netns_pod"):
                out["netns_pod"] = len(maps.netns_pod.items())
            return out
        finally:
            maps.close()

    def enrolled(self) -> list[str]:
        with open(os.path.join(self.env.state_dir, "enrolled.json")) as f:
            return [r["name"] for r in json.load(f)["containers"]]

    def xdp_in_node(self) -> list[str]:
        """Node-netns interfaces with an XDP program (the host-side veth peers)."""
        out = netns.run(["ip", "-o", "link", "show"], ns=self.env.lab.nodes[0].ns).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if " xdp" in line]

    def markers_in(self, ns: str) -> list[str]:
        out = netns.run(["ss", "-tlnH", f"sport = :{MARK_LISTENER_PORT}"], ns=ns).stdout
        return out.splitlines()
