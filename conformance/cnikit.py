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
import subprocess

from merbridge.cni.errors import CniError

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
    #: failOpen of the merbridge-cni entry; remembered ADDs go to pending_dir
    fail_open: bool = False
    pending_dir: str = ""

    def plugin_conf(self) -> dict:
        return {"type": "merbridge-cni", "socketPath": self.socket_path, "timeoutSeconds": 5,
                "logLevel": self.log_level, "failOpen": self.fail_open,
                "pendingDir": self.pending_dir or os.path.join(self.conf_dir, "pending")}

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
            raise CniError(103, "pod is not enrolled", req.container_id)

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


def invoke_plugin(node: str, exe: str, env: dict, stdin: bytes, timeout: float = 60):
    """Run a CNI plugin executable directly in the node netns, the way libcni
    execs it: ``env`` (str or bytes values) plus a node PATH, ``stdin`` bytes.

    Returns (exit code, stdout JSON or None, stderr)."""
    p = subprocess.run(["nsenter", f"--net={netns_path(node)}", exe], input=stdin,
                       capture_output=True, timeout=timeout, env={"PATH": NODE_PATH, **env})
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p.returncode, (json.loads(p.stdout) if p.stdout else None), \
        p.stderr.decode(errors="replace")
