"""Scaffolding for the reliability suite (tests/root/test_reliability_*.py).

``ChurnNet`` turns a daemonenv ``Env`` into a node a container runtime would
drive: the stand-in primary conflist is replaced by a real bridge +
host-local one (private subnets, a unique bridge, IPAM state in tmp) before
the daemon chains itself in, and pods are created and destroyed through the
reference ``cnitool`` run in the lab's node netns -- the same exec, env and
stdin a runtime gives the plugins. ``ChurnNet.connect`` sends one real
connection from the node to a pod, which the pod's XDP steers to its 15006
listener (recorded in ``mb_pair_orig_dst``).

``Observer`` reads what a leak would show: the daemon's open fds, threads,
loaded BPF programs and memory (from /proc and its /metrics), every map it
owns, a pod's flow entries, the state file, XDP attachments in the node netns
and on a pod's veth pair, and marker listeners.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field

import daemonhttp
from daemonenv import Env
from merbridge.bpf import types as t
from merbridge.bpf.mesh import MARK_LISTENER_PORT
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import ISTIO, PYTHON
from merbridge.lab.manifests import pod_manifest

CNITOOL = "/usr/local/bin/cnitool"
CNI_PLUGINS = "/usr/lib/cni"
LIBCNI_CACHE = "/var/lib/cni/results"
NODE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: server and client of the XDP tests: one JSON line per connection
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xdp_peer.py")


@dataclass
class ChurnNet:
    env: Env
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    octet: int = field(default_factory=lambda: 200 + secrets.randbelow(30))
    created: set = field(default_factory=set)
    refused: int = 0
    #: ADDs that passed while no daemon served them (failOpen)
    passed_open: int = 0
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
        self.env.publish(pod_manifest(pod, uid=f"uid-{pod}"))

    def unpublish(self, pod: str) -> None:
        self.env.unpublish(pod)

    def make_netns(self, pod: str) -> str:
        ns = self.netns_name(pod)
        labns.create_netns(ns)
        with self.lock:
            self.created.add(ns)
        return ns

    def drop_netns(self, pod: str) -> None:
        ns = self.netns_name(pod)
        labns.remove_netns(ns)
        with self.lock:
            self.created.discard(ns)

    def node_env(self, pod: str) -> dict:
        """What the runtime gives cnitool and every plugin it runs."""
        return {"PATH": NODE_PATH, "CNI_PATH": f"{CNI_PLUGINS}:{self.env.bin_dir}",
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
                            f"K8S_POD_UID=uid-{pod}"}

    def cnitool(self, command: str, pod: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={self.env.node_netns}", CNITOOL, command,
                               self.name, labns.netns_path(self.netns_name(pod))],
                              env={**self.node_env(pod), "NETCONFPATH": self.env.conf_dir},
                              capture_output=True, text=True, timeout=60)

    def plugin_del(self, pod: str, result: dict) -> subprocess.CompletedProcess:
        """merbridge-cni's DEL alone, as libcni runs it first in the chain's DEL
        (the installed conflist's entry, the cached ADD result as prevResult,
        cnitool's container id); bridge's DEL, which removes the veth, has not
        run yet, so what ours left behind on the pair is still visible."""
        with open(self.env.primary) as f:
            conflist = json.load(f)
        (entry,) = [p for p in conflist["plugins"] if p["type"] == "merbridge-cni"]
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **entry,
                "prevResult": result}
        path = labns.netns_path(self.netns_name(pod))
        # cnitool's container id: "cnitool-" + the first 10 bytes of sha512(netns path)
        cid = "cnitool-" + hashlib.sha512(path.encode()).hexdigest()[:20]
        env = {**self.node_env(pod), "CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid,
               "CNI_NETNS": path, "CNI_IFNAME": "eth0"}
        return subprocess.run(["nsenter", f"--net={self.env.node_netns}",
                               os.path.join(self.env.bin_dir, "merbridge-cni")],
                              input=json.dumps(conf), env=env, capture_output=True, text=True,
                              timeout=60)

    def connect(self, pod: str, ip: str, port: int = 8080) -> dict:
        """One real connection from the node netns to ``ip:port`` of ``pod``, whose
        only listener is a server on the sidecar's inbound port (15006) in the
        daemon's cgroup (where mb_getsockopt answers SO_ORIGINAL_DST). Returns
        the server's JSON (``sock``, ``orig``, ``sha``, ``n``) plus the client's
        ``client_peer``/``sent_sha``, or ``error``."""
        server = labns.spawn([PYTHON, PEER, "server", str(ISTIO.in_port)],
                             ns=self.netns_name(pod), cgroup=self.env.lab.cgroup,
                             stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                return {"error": f"server exited rc={server.wait()}"}
            res = labns.run([PYTHON, PEER, "client", ip, str(port), "4096", "5"],
                            ns=self.env.lab.nodes[0].ns)
            return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr}
        finally:
            server.kill()
            server.wait()
            server.stdout.close()

    def cycle(self, pod: str, hold=None, withdrawn=None,
              retry_for: float = 0.0) -> tuple[bool, bool]:
        """One pod's life the way kubelet lives it: publish, netns, ADD (a failed
        ADD is followed by DEL, as a runtime does, and retried for ``retry_for``
        seconds), ``hold(pod, result)``, DEL, netns gone. With ``withdrawn``, the
        DEL starts with merbridge-cni's own (``plugin_del``) and
        ``withdrawn(pod, result, plugin_del's process)`` runs before the chain's
        DEL (ours again, idempotent, then bridge's) removes the veth. Failed ADD
        attempts are counted in ``self.refused``."""
        self.publish(pod)
        self.make_netns(pod)
        try:
            deadline = time.monotonic() + retry_for
            while True:
                added = self.cnitool("add", pod)
                if "passing through (failOpen)" in added.stderr:
                    with self.lock:
                        self.passed_open += 1
                if added.returncode == 0 or time.monotonic() > deadline:
                    break
                with self.lock:
                    self.refused += 1
                    self.last_refusal = f"{pod}: {added.stderr.strip()[-300:]}"
                self.cnitool("del", pod)
                time.sleep(0.5)
            if added.returncode == 0 and (hold or withdrawn):
                result = json.loads(added.stdout)
                if hold is not None:
                    hold(pod, result)
                if withdrawn is not None:
                    withdrawn(pod, result, self.plugin_del(pod, result))
            deleted = self.cnitool("del", pod)
            return added.returncode == 0, deleted.returncode == 0
        finally:
            self.drop_netns(pod)
            self.unpublish(pod)

    def close(self) -> None:
        for ns in list(self.created):
            labns.remove_netns(ns)
        for path in glob.glob(os.path.join(LIBCNI_CACHE, f"{glob.escape(self.name)}-*")):
            os.unlink(path)


def wire_bare_pod(pod, env: Env, result: str) -> None:
    """Fill a bare lab pod's addresses and host-side interface from the chain's
    ADD result (``cnitool add``'s stdout)."""
    for entry in json.loads(result)["ips"]:
        ip = entry["address"].split("/")[0]
        if ":" in ip:
            pod.ip6 = ip
        else:
            pod.ip4 = ip
    pod.host_if = netns.peer_of(labns.netns_path(pod.ns), "eth0", env.node_netns)


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

    def programs(self) -> set[int]:
        """Ids of the BPF programs the daemon holds open (``prog_id`` in the
        fdinfo of its ``anon_inode:bpf-prog`` fds)."""
        ids = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{self.pid}/fdinfo/{fd}") as f:
                    ids.update(int(line.split()[1]) for line in f
                               if line.startswith("prog_id:"))
            except OSError:
                pass
        return ids

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of /proc/PID/status in KiB: VmRSS, or RssAnon (the
        heap and stacks, without the mapped libraries and bcc's objects)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def scrape(self) -> dict[str, float]:
        """The daemon's /metrics as {"name{labels}": value} (daemonhttp.scrape)."""
        return daemonhttp.scrape(self.env, next(p for p in self.env.procs if p.pid == self.pid))

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

    @staticmethod
    def flows(maps, ips) -> list[str]:
        """Flow state that mentions one of ``ips``: ``mb_pair_orig_dst`` entries
        (tuple or recorded origin), ``mb_in_pending`` and ``mb_skmsg_budget`` tuples."""
        ips = {str(t.MbAddr.of(ip)) for ip in ips}
        out = [f"pair_orig_dst {pair} orig {o.addr}" for pair, o in maps.pair_orig_dst.items()
               if ips & {str(pair.sip), str(pair.dip), str(o.addr)}]
        out += [f"in_pending {pair}" for pair, _ in maps.in_pending.items()
                if ips & {str(pair.sip), str(pair.dip)}]
        return out + [f"skmsg_budget {pair}" for pair, _ in maps.skmsg_budget.items()
                      if ips & {str(pair.sip), str(pair.dip)}]

    def xdp_on_pod(self, ns: str) -> tuple[int, int]:
        """The inbound programs on the pod's veth pair (0: none): XDP program
        ids on eth0 and its host-side peer, or the ids of our two tc filters
        on that peer, by the daemon's hook; the other hook must have none."""
        path = labns.netns_path(ns)
        xdp = netns.xdp_prog_ids(path, "eth0", self.env.node_netns)
        names = netns.tc_names(path, "eth0", self.env.node_netns)
        tc = tuple(int(names[k].split("#")[1]) if k in names else 0
                   for k in ("to_pod", "from_pod"))
        hook = getattr(self.env, "inbound_hook", "xdp")
        assert (tc if hook == "xdp" else xdp) == (0, 0), (hook, xdp, tc)
        return tc if hook == "tc" else xdp

    def xdp_in_node(self) -> list[str]:
        """Node-netns interfaces with an XDP program or a tc filter of ours
        (the host-side veth peers)."""
        ns = self.env.lab.nodes[0].ns
        out = labns.run(["ip", "-o", "link", "show"], ns=ns).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        xdp = [n for n, line in zip(names, out.splitlines()) if " xdp" in line]
        tc = [n for n in names if n != "lo"
              and netns.tc_filter_names(self.env.node_netns, n, allow_own=True)]
        return xdp + tc

    def markers_in(self, ns: str) -> list[str]:
        out = labns.run(["ss", "-tlnH", f"sport = :{MARK_LISTENER_PORT}"], ns=ns).stdout
        return out.splitlines()
