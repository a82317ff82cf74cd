"""DaemonConfig: everything ``merbridge run`` is told, in one frozen dataclass.

Every production path is a field, so tests (and unusual nodes) point the
daemon at their own cgroup, pin dir, CNI dirs and socket.  The CLI builds it;
``merbridge.daemon.runtime.run(config)`` consumes it.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace

from merbridge.bpf import mesh as meshes
# the plugin's defaults are the daemon's: the socket both use, the namespaces both skip
from merbridge.cni.protocol import DEFAULT_EXCLUDE_NAMESPACES, DEFAULT_SOCKET_PATH  # noqa: F401

DEFAULT_BPFFS_PATH = "/sys/fs/bpf/merbridge"
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
DEFAULT_STATE_DIR = "/var/run/merbridge"
#: where the runtime's pod network namespaces are (named, as ``ip netns`` keeps them)
DEFAULT_NETNS_DIR = "/var/run/netns"
#: the node's merbridge-cni executable (the static build of cni/static): where the
#: image puts it (deploy/Dockerfile), then where scripts/prepare-host puts it
DEFAULT_CNI_PLUGIN_PATHS = ("/usr/local/lib/merbridge/merbridge-cni",
                            os.path.join(sys.prefix, "libexec", "merbridge", "merbridge-cni"))
#: where the node's processes are seen (the DaemonSet mounts the host's at /host/proc)
DEFAULT_PROC_PATH = "/proc"
#: CNI mode: seconds between passes that enrol remembered and unseen pods
DEFAULT_RECONCILE_INTERVAL = 1.0
#: see merbridge.daemon.metrics for why this address
DEFAULT_METRICS_ADDR = "127.0.0.1:15990"
#: ambient mode: the namespace the node's ztunnel runs in (Istio's default)
DEFAULT_ZTUNNEL_NAMESPACE = "istio-system"


def cni_plugin_path(explicit: str = "") -> str | None:
    """The plugin executable to install: ``explicit``, else the first built one found."""
    if explicit:
        return explicit
    return next((p for p in DEFAULT_CNI_PLUGIN_PATHS if os.access(p, os.X_OK)), None)


#: the kubelet's pods cgroup under the cgroup2 mount (cgroupfs driver, systemd driver)
KUBEPODS_CGROUPS = ("kubepods", "kubepods.slice")


def default_attach_point(mount: str, ambient: bool = False) -> tuple[str, str]:
    """(cgroup directory, why) the programs attach to when --cgroup-path is not
    given: the kubelet's pods cgroup where one exists, so that node processes
    (kubelet, containerd, the daemon) never run them; the cgroup2 root
    otherwise, or with --ambient, whose capture of node processes' calls to
    ambient pods (the kubelet's probes) needs them (docs/security.md)."""
    if ambient:
        return mount, ("--ambient: node processes' calls to ambient pods go through ztunnel, "
                       "so the cgroup2 root")
    for name in KUBEPODS_CGROUPS:
        path = os.path.join(mount, name)
        if os.path.isfile(os.path.join(path, "cgroup.procs")):
            return path, f"the kubelet's pods cgroup ({name}): node processes never run the programs"
    return mount, ("no kubepods or kubepods.slice cgroup under the cgroup2 mount: the cgroup2 "
                   "root (node processes run the programs, which act only for pod netns)")


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def find_cgroup2_mount(mounts_file: str = "/proc/mounts") -> str | None:
    """The cgroup v2 mount point: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid).

    With several cgroup2 mounts, the standard locations win, then the first
    listed (the earliest mount).
    """
    try:
        with open(mounts_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            # /proc/mounts escapes blanks as octal (\040)
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1]))
    for standard in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if standard in found:
            return standard
    return found[0] if found else None


@dataclass(frozen=True)
class DaemonConfig:
    mesh: str = "istio"
    cni_mode: bool = False
    hardware_checksum: bool = False
    inbound_hook: str = "tc"        # podnet.INBOUND_HOOKS; see deploy/README.md
    node_name: str = ""
    kubeconfig: str | None = None
    pods_dir: str | None = None
    cgroup_path: str = ""
    #: why cgroup_path (validate(): "--cgroup-path", or default_attach_point's reason)
    cgroup_reason: str = ""
    bpffs_path: str = DEFAULT_BPFFS_PATH
    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    socket_path: str = DEFAULT_SOCKET_PATH
    metrics_addr: str = DEFAULT_METRICS_ADDR
    state_dir: str = DEFAULT_STATE_DIR
    #: CNI mode: searched for pods that started while no daemon ran
    netns_dir: str = DEFAULT_NETNS_DIR
    #: CNI mode: the plugin executable to install ("" = the first of DEFAULT_CNI_PLUGIN_PATHS)
    cni_plugin: str = ""
    #: CNI mode: an ADD the daemon cannot serve passes (and is replayed later) instead of failing
    fail_open: bool = True
    #: CNI mode: the node's /proc, searched for the netns of pods started while no daemon ran
    proc_path: str = DEFAULT_PROC_PATH
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    exclude_namespaces: tuple[str, ...] = field(default=DEFAULT_EXCLUDE_NAMESPACES)
    debug: bool = False
    #: Istio ambient mode (docs/ambient.md): pods by label -> node's ztunnel
    ambient: bool = False
    #: only an ``app=ztunnel`` pod in this namespace is the node's ztunnel
    ztunnel_namespace: str = DEFAULT_ZTUNNEL_NAMESPACE

    @property
    def pending_dir(self) -> str:
        """Where the plugin remembers the ADDs no daemon served (cni/pending.py)."""
        return os.path.join(self.state_dir, "pending")

    @property
    def mode(self) -> str:
        """The upstream flag's name for ``mesh``."""
        return self.mesh

    def validate(self) -> "DaemonConfig":
        """Return a copy with defaults resolved; ConfigError when a setting cannot work."""
        try:
            meshes.get(self.mesh)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.pods_dir and not self.node_name:
            raise ConfigError("no node name: pass --node-name or set NODE_NAME (the hostname is "
                              "not used: it often differs from the Kubernetes node name)")
        if self.pods_dir and not os.path.isdir(self.pods_dir):
            raise ConfigError(f"--pods-dir {self.pods_dir} is not a directory")
        if self.ambient and not self.ztunnel_namespace:
            raise ConfigError("--ztunnel-namespace is empty: ambient mode needs the namespace "
                              "the node's ztunnel runs in (Istio's default: istio-system)")
        if self.cni_plugin and not os.access(self.cni_plugin, os.X_OK):
            raise ConfigError(f"--cni-plugin {self.cni_plugin} is not an executable file "
                              "(build it with scripts/build-cni)")
        if self.cgroup_path:
            return replace(self, cgroup_reason=self.cgroup_reason or "--cgroup-path")
        mount = find_cgroup2_mount()
        if not mount:
            raise ConfigError("no cgroup v2 mount found in /proc/mounts; mount one "
                              "(mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup-path")
        cgroup, why = default_attach_point(mount, self.ambient)
        return replace(self, cgroup_path=cgroup, cgroup_reason=why)
