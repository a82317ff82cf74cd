"""The demo's node: everything ``merbridge-lab demo`` builds, and its verified teardown.

All of it is private to one run (names carry ``mbdemo-<hex>``):

* a "node" network namespace (the lab's), where cnitool, the CNI plugins and the
  daemon run, so the bridge, the host-side veths and their XDP never touch the
  host's network namespace;
* a child cgroup of the cgroup v2 mount (one per pod below it), a private bpffs
  (``mount -t bpf`` on a temp dir) and temp CNI bin/conf/state/ipam dirs;
* ``merbridge run --cni-mode=true --pods-dir=...`` in the node netns
  (``node.RealDaemon``): it attaches
  the eBPF programs to the demo's cgroup and chains ``merbridge-cni`` into the
  demo's primary conflist (bridge + host-local);
* pods: a netns + cgroup each (``Lab.add_bare_pod``), networked through that
  chained conflist by the real ``cnitool`` exactly as a runtime would, each with
  a Pod manifest in the pods dir; haproxy sidecars as UID 1337 and echo apps.

``teardown()`` undoes it in the production order (CNI DEL, daemon SIGTERM: it
unchains itself and unpins; then processes, cgroups, netns, the bpffs mount,
libcni's cache entries, temp dirs) and reports what it checked is gone.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from merbridge.bpf.mesh import MESHES
from merbridge.daemon import annotations, netns as podns
from merbridge.lab import demoreport, netns
from merbridge.lab.cgroups import CGROUP_ROOT
from merbridge.lab.lab import Lab, Pod, uninterrupted
from merbridge.lab.manifests import pod_manifest
from merbridge.lab.node import RealDaemon

MESH = MESHES["istio"]
PREFIX = "mbdemo"
K8S_NAMESPACE = "demo"
SUBNET4, SUBNET6 = "10.241.0.0/24", "fd00:241::/64"
CNITOOL = shutil.which("cnitool") or "/usr/local/bin/cnitool"
CNI_PLUGIN_DIR = "/usr/lib/cni"
LIBCNI_CACHE = "/var/lib/cni/results"
#: what a node's runtime gives CNI plugins (no venv on PATH)
NODE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ISTIO_STATUS = '{"containers":["istio-proxy"],"initContainers":null}'
#: prefix of Istio's traffic annotations
A = "traffic.sidecar.istio.io/"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what failed."""


@dataclass
class PodSpec:
    name: str
    in_mesh: bool
    apps: tuple[int, ...] = ()
    #: traffic.sidecar.istio.io/* annotations; "{legacy}" is replaced by that pod's IPv4
    annotations: dict[str, str] = field(default_factory=dict)
    #: the istio-proxy container's env, as the injector renders proxyMetadata
    #: (ISTIO_META_DNS_CAPTURE: the sidecar's DNS proxy answers the pod's queries)
    proxy_env: dict[str, str] = field(default_factory=dict)


class Node:
    def __init__(self, specs: Sequence[PodSpec], progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.pid = os.getpid()
        #: every name and path the demo makes starts with it (known before anything is made)
        self.name = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
        self.lab: Lab | None = None
        self.root = ""
        self.bpffs = ""
        self.bpffs_mounted = False
        self.bridge = ""                  # set as set-up goes: teardown reads them at any point
        self.conflist = ""
        self.daemon: RealDaemon | None = None
        self.pods: dict[str, Pod] = {}
        self.specs = {s.name: s for s in specs}
        self.manifests: dict[str, dict] = {}
        self.added: list[str] = []        # pods with a successful CNI ADD

    def describe(self) -> dict[str, Any]:
        """Where the node lives (names and paths; they are gone after teardown)."""
        if self.lab is None:
            return {"name": self.name}
        return {"name": self.name, "netns": self.lab.nodes[0].ns, "cgroup": self.lab.cgroup,
                "root": self.root, "bpffs": self.bpffs,
                "conflist": self.conflist, "subnets": [SUBNET4, SUBNET6]}

    # -- set-up ------------------------------------------------------------
    def setup(self) -> None:
        cgroup_root = CGROUP_ROOT or "/sys/fs/cgroup/unified"
        self.progress(f"creating the node netns and cgroup {cgroup_root}/{PREFIX}-<id>")
        with uninterrupted():
            self.lab = Lab(PREFIX, cgroup_root=cgroup_root, name=self.name)
        self.node_ns = netns.netns_path(self.lab.nodes[0].ns)
        with uninterrupted():
            self.root = tempfile.mkdtemp(prefix=self.name + "-")
        for d in ("bin", "net.d", "state", "pods", "ipam", "bpffs"):
            os.mkdir(os.path.join(self.root, d))
        self.dirs = {d: os.path.join(self.root, d) for d in ("bin", "net.d", "state", "pods", "ipam")}
        self.bpffs = os.path.join(self.root, "bpffs")
        with uninterrupted():
            try:
                _run(["mount", "-t", "bpf", "bpf", self.bpffs])
            finally:
                self.bpffs_mounted = _mounted(self.bpffs)
        self.pin_dir = os.path.join(self.bpffs, "merbridge")
        self.bridge = "mbd" + self.name.rsplit("-", 1)[1][:8]
        self.conflist = os.path.join(self.dirs["net.d"], "10-demo.conflist")
        with open(self.conflist, "w") as f:
            json.dump(self._primary_config(), f, indent=2)
        self.progress(f"private bpffs on {self.bpffs}; primary CNI config {self.conflist} "
                      "(bridge + host-local)")
        for spec in self.specs.values():
            if "{legacy}" not in json.dumps(spec.annotations):
                self._publish(spec)
        self._start_daemon()
        for spec in self.specs.values():
            self._add_pod(spec)
        for name, pod in self.pods.items():
            for port in self.specs[name].apps:
                pod.start_app(port)
            if self.specs[name].in_mesh:
                pod.start_sidecar()
        self.progress("apps listening; haproxy sidecars running as UID/GID 1337 in "
                      + ", ".join(n for n, s in self.specs.items() if s.in_mesh))
        self._start_dns()

    #: the name the demo's DNS servers answer, and their answers
    DNS_NAME = "svc.demo.example"
    DNS_REAL, DNS_PROXIED = "10.99.0.1", "10.99.0.53"

    def _start_dns(self) -> None:
        """A DNS server (dnsmasq) in the pod outside the mesh, and in each mesh pod
        the stand-in for the agent's DNS proxy on 127.0.0.1 / [::1]:15053, as the
        proxy's UID, answering DNS_NAME itself and asking the server otherwise."""
        server = self.pods["legacy"]
        server.start_dns(53, [server.ip4, server.ip6], {self.DNS_NAME: self.DNS_REAL})
        for name, spec in self.specs.items():
            if spec.in_mesh:
                self.pods[name].start_dns(MESH.dns_port, ["127.0.0.1", "::1"],
                                          {self.DNS_NAME: self.DNS_PROXIED},
                                          uid=MESH.proxy_uid, upstream=server.ip4)
        self.progress(f"DNS: dnsmasq in legacy :53; DNS proxy stand-ins (dnsmasq, UID "
                      f"{MESH.proxy_uid}) on :{MESH.dns_port} in the mesh pods")

    def _primary_config(self) -> dict:
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": [
            {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "dataDir": self.dirs["ipam"],
                      "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}]}

    def _publish(self, spec: PodSpec) -> None:
        ann = {k: v.replace("{legacy}", self.pods["legacy"].ip4) if "{legacy}" in v else v
               for k, v in spec.annotations.items()}
        manifest = pod_manifest(spec.name, namespace=K8S_NAMESPACE, node="demo",
                                uid=f"uid-{spec.name}-{self.name}", in_mesh=spec.in_mesh,
                                annotations=ann, proxy_env=spec.proxy_env,
                                injected=ISTIO_STATUS)
        path = os.path.join(self.dirs["pods"], f"{spec.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(path + ".tmp", path)
        self.manifests[spec.name] = manifest

    def _start_daemon(self) -> None:
        self.progress("starting `merbridge run --cni-mode=true` in the node netns "
                      "(compiling and loading the eBPF programs)")
        self.daemon = RealDaemon(self.pin_dir, self.lab.cgroup, root=self.root,
                                 netns=self.node_ns, node_name="demo")
        self.daemon.start()
        self.progress(f"daemon ready: programs attached to {self.lab.cgroup}, "
                      f"merbridge-cni chained into {os.path.basename(self.conflist)}")

    def daemon_tail(self, lines: int = 15) -> str:
        return self.daemon.tail(lines=lines) if self.daemon is not None else ""

    def _cnitool(self, command: str, pod: Pod) -> subprocess.CompletedProcess:
        spec_uid = self.manifests[pod.name]["metadata"]["uid"]
        env = {"PATH": NODE_PATH, "NETCONFPATH": self.dirs["net.d"],
               "CNI_PATH": f"{CNI_PLUGIN_DIR}:{self.dirs['bin']}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={K8S_NAMESPACE};"
                           f"K8S_POD_NAME={pod.name};K8S_POD_UID={spec_uid}"}
        return subprocess.run(["nsenter", f"--net={self.node_ns}", CNITOOL, command, self.name,
                               netns.netns_path(pod.ns)], env=env, capture_output=True,
                              text=True, timeout=60)

    def _add_pod(self, spec: PodSpec) -> None:
        if spec.name not in self.manifests:
            self._publish(spec)
        pod = self.lab.add_bare_pod(spec.name, in_mesh=spec.in_mesh)
        self.pods[spec.name] = pod
        with uninterrupted():    # a whole ADD, so teardown DELs exactly what was added
            res = self._cnitool("add", pod)
            if res.returncode == 0:
                self.added.append(spec.name)
        if res.returncode != 0:
            raise DemoError(f"cnitool add {spec.name} failed (rc {res.returncode}): "
                            f"{(res.stdout + res.stderr).strip()}\n{self.daemon_tail()}")
        result = json.loads(res.stdout)
        for ip in (entry["address"].split("/")[0] for entry in result.get("ips", [])):
            if ":" in ip:
                pod.ip6 = ip
            else:
                pod.ip4 = ip
        pod.host_if = podns.peer_of(netns.netns_path(pod.ns), "eth0", self.node_ns)
        tc = podns.tc_filter_names(self.node_ns, pod.host_if, allow_own=True)
        xdp = podns.xdp_prog_id(netns.netns_path(pod.ns), "eth0")[0]
        hook = (f"tc {', '.join(sorted(tc.values()))} on {pod.host_if}" if tc else
                f"XDP prog {xdp} on eth0" if xdp else "")
        self.progress(f"pod {spec.name}: CNI ADD (bridge, host-local, merbridge-cni) -> "
                      f"{pod.ip4}, {pod.ip6}; "
                      + (f"enrolled by the daemon, {hook}" if hook
                         else "left alone by the daemon (no tc/XDP)"))

    # -- the maps: the daemon's decisions ----------------------------------
    def pod_views(self) -> dict[str, demoreport.PodView]:
        from merbridge.bpf import loader
        maps = loader.open_maps(self.pin_dir)
        try:
            written = dict(maps.local_pods.items())
        finally:
            maps.close()
        views = {}
        for name, pod in self.pods.items():
            manifest = self.manifests[name]
            membership = annotations.mesh_membership(manifest, MESH)
            ann = manifest["metadata"]["annotations"]
            policy = written.get(pod.ip4)
            reason = membership.reason
            if membership.in_mesh != (policy is not None):
                # never print a reason the daemon did not act on
                reason = (f"the daemon {'enrolled' if policy else 'did not enrol'} it, "
                          f"although mesh_membership says: {reason}")
            views[name] = demoreport.PodView(
                name=name, ips=(pod.ip4, pod.ip6), enrolled=policy is not None, policy=policy,
                reason=reason, consistent=membership.in_mesh == (policy is not None),
                annotations={k[len(A):]: v for k, v in ann.items() if k.startswith(A)})
        return views

    def counters(self) -> dict[str, int]:
        from merbridge.bpf import loader
        maps = loader.open_maps(self.pin_dir)
        try:
            return maps.counters()
        finally:
            maps.close()

    # -- teardown ------------------------------------------------------------
    def teardown(self) -> dict[str, Any]:
        """Undo everything (each step on its own), then check it is gone."""
        if os.getpid() != self.pid:
            os._exit(130)  # a forked helper that caught Ctrl-C: not ours to clean up
        errors: list[str] = []
        checked: dict[str, bool] = {}

        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # keep going: later steps still clean up
                errors.append(f"{what}: {type(exc).__name__}: {exc}")

        self.progress("tearing down: CNI DEL, daemon SIGTERM, pods, cgroups, netns, bpffs")
        # DEL as the runtime would, while the daemon still runs (merbridge-cni's DEL
        # succeeds with the daemon gone too, so the bridge and host-local clean up)
        for name in reversed(self.added):
            def delete(name=name):
                res = self._cnitool("del", self.pods[name])
                if res.returncode != 0:
                    raise DemoError((res.stdout + res.stderr).strip())
            step(f"cnitool del {name}", delete)
        daemon = self.daemon.proc if self.daemon is not None else None
        if daemon is not None:
            step("stop the daemon", self.daemon.stop)
            # exit 0; or killed by the SIGTERM before its handler was installed (the
            # first thing `merbridge run` does), so before it had made anything
            checked["daemon exited cleanly"] = daemon.returncode in (0, -signal.SIGTERM)
        if self.lab is not None:
            from merbridge.bpf import loader
            try:
                checked["programs detached from the cgroup"] = not loader.attached(self.lab.cgroup)
            except Exception:
                checked["programs detached from the cgroup"] = False
            if not checked["programs detached from the cgroup"]:
                step("detach leftovers", lambda: loader.detach_cgroup(self.lab.cgroup))
        if self.bpffs_mounted:
            checked["daemon removed its pins"] = not os.path.exists(self.pin_dir) or \
                not os.listdir(self.pin_dir)
        if self.root and os.path.exists(self.conflist):
            with open(self.conflist) as f:
                checked["merbridge-cni unchained from the conflist"] = \
                    "merbridge-cni" not in f.read()
            checked["plugin binary removed"] = not os.path.exists(
                os.path.join(self.dirs["bin"], "merbridge-cni"))
        if self.lab is not None:
            lab_procs = list(self.lab._procs)
            step("close the lab", self.lab.close)
            checked["processes gone"] = all(p.poll() is not None for p in lab_procs) and (
                daemon is None or daemon.poll() is not None)
            checked["cgroups gone"] = not os.path.exists(self.lab.cgroup)
            checked["netns gone"] = not any(n.startswith(self.name) for n in _netns_names())
            checked["no interfaces in the host netns"] = not any(
                (self.bridge and self.bridge in link) or self.name in link
                for link in netns.links(None))
        if self.bpffs_mounted:
            step("umount the bpffs", lambda: _run(["umount", self.bpffs]))
            checked["bpffs unmounted"] = not _mounted(self.bpffs)
        if self.lab is not None:
            cache = glob.glob(os.path.join(LIBCNI_CACHE, glob.escape(self.name) + "-*"))
            checked["no libcni cache entries"] = not cache
            for path in cache:
                step(f"remove {path}", lambda p=path: os.unlink(p))
        if self.root:
            step("remove temp dirs", lambda: shutil.rmtree(self.root))
            checked["temp dirs removed"] = not os.path.exists(self.root)
        return {"clean": not errors and all(checked.values()), "checked": checked,
                "errors": errors}


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise DemoError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _mounted(path: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f if line.strip())


def _netns_names() -> list[str]:
    try:
        return os.listdir(netns.NETNS_DIR)
    except OSError:
        return []
