"""Building blocks of the conformance suite: netns names, a chained conflist, cnitool,
the plugin executable, and a recording fake of the daemon's handler.

Plain functions and classes (no fixtures) so that other suites, e.g. one that
runs the real daemon, can import them: ``from cnikit import CniNetwork, Cnitool``.
``conftest.py`` wraps them in fixtures.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from merbridge.bpf.mesh import MARK_LISTENER_PORT, MESHES
from merbridge.daemon.cniserver import CniRequestError

CNITOOL = shutil.which("cnitool") or "/usr/local/bin/cnitool"
CNI_PLUGIN_DIR = "/usr/lib/cni"
LIBCNI_CACHE = "/var/lib/cni/results"
# what a node's runtime gives plugins: no venv, /usr/bin/python3 for the zipapp
NODE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True,
                          timeout=60, **kw)


def netns_path(name: str) -> str:
    return f"/var/run/netns/{name}"

@dataclasses.dataclass
class CniNetwork:
    """A chained conflist in its own NETCONFPATH: bridge + host-local, then merbridge-cni."""

    name: str
    conf_dir: str
    ipam_dir: str
    socket_path: str
    cni_version: str
    subnet4: str
    subnet6: str
    bridge: str
    log_level: str = "debug"

    def plugin_conf(self) -> dict:
        return {"type": "merbridge-cni", "socketPath": self.socket_path, "timeoutSeconds": 5,
                "logLevel": self.log_level}

    def conflist(self, chained: bool = True) -> dict:
        """The whole chain, or (``chained=False``) only the primary plugin: what a
        node has before the daemon's installer chains merbridge-cni in."""
        plugins = [self.bridge_conf()] + ([self.plugin_conf()] if chained else [])
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": plugins}

    def bridge_conf(self) -> dict:
        return {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": self.ipam_dir,
                         "ranges": [[{"subnet": self.subnet4}], [{"subnet": self.subnet6}]],
                         "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}

    @property
    def conf_path(self) -> str:
        return os.path.join(self.conf_dir, f"10-{self.name}.conflist")

    def write(self, chained: bool = True) -> None:
        os.makedirs(self.conf_dir, exist_ok=True)
        with open(self.conf_path, "w") as f:
            json.dump(self.conflist(chained), f, indent=2)

    def plugin_stdin(self, cni_version: str | None = None, **extra) -> bytes:
        """The merbridge-cni part of the conflist as libcni would pass it (no prevResult)."""
        conf = {"cniVersion": cni_version or self.cni_version, "name": self.name,
                **self.plugin_conf(), **extra}
        return json.dumps(conf).encode()

    def allocated_ips(self) -> list[str]:
        """IPs host-local still holds for this network (one file per address)."""
        d = os.path.join(self.ipam_dir, self.name)
        if not os.path.isdir(d):
            return []
        return sorted(f for f in os.listdir(d) if f[0].isdigit() or ":" in f)

    def cleanup_cache(self) -> None:
        for path in glob.glob(os.path.join(LIBCNI_CACHE, f"{glob.escape(self.name)}-*")):
            os.unlink(path)


def cnitool_container_id(netns: str) -> str:
    """cnitool's container id: ``cnitool-`` + hex of the first 10 bytes of sha512(netns)."""
    return "cnitool-" + hashlib.sha512(os.path.abspath(netns).encode()).hexdigest()[:20]


def kubelet_args(namespace: str = "default", name: str = "web-0",
                 uid: str = "uid-0") -> str:
    return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID=infra0;K8S_POD_UID={uid}")


@dataclasses.dataclass
class Cnitool:
    node: str
    plugin_dir: str

    def env(self, net: CniNetwork, cni_args: str) -> dict:
        return {"PATH": NODE_PATH, "NETCONFPATH": net.conf_dir,
                "CNI_PATH": f"{CNI_PLUGIN_DIR}:{self.plugin_dir}", "CNI_ARGS": cni_args}

    def __call__(self, command: str, net: CniNetwork, pod_netns: str,
                 cni_args: str | None = None) -> subprocess.CompletedProcess:
        return run("nsenter", f"--net={netns_path(self.node)}", CNITOOL, command, net.name,
                   netns_path(pod_netns), check=False,
                   env=self.env(net, kubelet_args() if cni_args is None else cni_args))


def prev_result_logged(stderr: str) -> dict:
    """The prevResult merbridge-cni received (it logs it at debug level)."""
    marker = " prevResult: "
    lines = [line for line in stderr.splitlines() if marker in line]
    assert len(lines) == 1, stderr
    return json.loads(lines[0].split(marker, 1)[1])


class RecordingHandler:
    """The daemon side of the contract, in memory: records every request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.enrolled: dict[str, object] = {}
        self.ready: tuple[bool, str] = (True, "ready")

    def add(self, req):
        self.calls.append(("add", req))
        self.enrolled[req.container_id] = req
        return {"enrolled": req.container_id}

    def delete(self, req):
        self.calls.append(("delete", req))
        self.enrolled.pop(req.container_id, None)

    def check(self, req):
        self.calls.append(("check", req))
        if req.container_id not in self.enrolled:
            raise CniRequestError(103, "pod is not enrolled", req.container_id)

    def gc(self, req):
        self.calls.append(("gc", req))
        valid = {a.container_id for a in req.attachments}
        for cid in [c for c in self.enrolled if c not in valid]:
            del self.enrolled[cid]

    def status(self):
        self.calls.append(("status", None))
        return self.ready

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def invoke_plugin(node: str, exe: str, env: dict, stdin: bytes):
    """Run a CNI plugin executable directly in the node netns, the way libcni
    execs it: ``env`` (str or bytes values) plus a node PATH, ``stdin`` bytes.

    Returns (exit code, stdout JSON or None, stderr)."""
    p = subprocess.run(["nsenter", f"--net={netns_path(node)}", exe], input=stdin,
                       capture_output=True, timeout=60, env={"PATH": NODE_PATH, **env})
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p.returncode, (json.loads(p.stdout) if p.stdout else None), \
        p.stderr.decode(errors="replace")


# -- the real daemon ------------------------------------------------------------
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
                "--node-name=conformance"]

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
    xdp = links[0].get("xdp") or {}
    prog = xdp.get("prog") or {}
    if not prog and xdp.get("attached"):
        prog = xdp["attached"][0].get("prog") or {}
    if not prog.get("id"):
        return 0, ""
    info = json.loads(run("bpftool", "-j", "prog", "show", "id", str(prog["id"])).stdout)
    return prog["id"], info.get("name", "")
