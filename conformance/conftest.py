"""Fixtures of the cnitool-driven CNI conformance suite (building blocks in ``cnikit``).

* ``netns_factory``  named network namespaces ``mbt-<hex>-<tag>``, deleted afterwards;
* ``node``           a "node" netns: cnitool and every plugin run inside it, so the
                     bridge plugin's bridge, veths and ip_forward stay off the host;
* ``network_factory`` chained conflists (``cnikit.CniNetwork``) in tmp dirs; removes
                     the libcni result-cache entries their runs created;
* ``cnitool``        ``cnikit.Cnitool`` bound to the node netns and the plugin dir;
* ``plugin_exe``     the node executable (static, ``scripts/build-cni``) built from this
                     checkout; the real daemon installs the same file (MERBRIDGE_CNI_PLUGIN);
* ``run_plugin``     invokes the plugin directly, the way libcni would (STATUS, GC);
* ``fake_daemon``    the daemon's ``CniServer`` with ``cnikit.RecordingHandler``;
* ``daemon_world``   (module) the REAL daemon, ``merbridge run --cni-mode=true``, in
                     a node netns linked to a "remote" node netns, on a private
                     bpffs, a child cgroup and tmp CNI dirs holding a bridge +
                     host-local primary conflist it chains itself into.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import tempfile

import pytest

from cnikit import CNITOOL, NODE_PATH, CniNetwork, Cnitool, RecordingHandler, netns_path, run
from daemonkit import NODE_NAME, Pod, make_pod, remove_pod
from merbridge.cni.zipapp import build_zipapp
from merbridge.daemon.cniserver import CniServer
from merbridge.lab.cgroups import CGROUP_ROOT, make_cgroup, remove_cgroup
from merbridge.lab.node import DaemonError, RealDaemon
from merbridge.lab.testing import skip_root_tests_unless_root

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py skips root tests for tests/ only; do the same here
    skip_root_tests_unless_root(items, under=HERE)


# -- namespaces ---------------------------------------------------------------
@pytest.fixture
def tag() -> str:
    return secrets.token_hex(4)


@pytest.fixture
def netns_factory(tag):
    created: list[str] = []

    def make(suffix: str) -> str:
        name = f"mbt-{tag}-{suffix}"
        run("ip", "netns", "add", name)
        created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            run("ip", "netns", "del", name, check=False)


@pytest.fixture
def node(netns_factory) -> str:
    return netns_factory("node")


# -- the plugin and the network ---------------------------------------------
@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("cni-bin")
    exe = str(d / "merbridge-cni")
    subprocess.run([os.path.join(os.path.dirname(HERE), "scripts", "build-cni"), exe],
                   check=True)
    os.environ["MERBRIDGE_CNI_PLUGIN"] = exe      # for the daemons the suite starts
    return str(d)


@pytest.fixture(scope="session")
def zipapp_exe(tmp_path_factory) -> str:
    """The Python plugin (the fallback without a static build), for comparison."""
    d = tmp_path_factory.mktemp("cni-zipapp")
    return build_zipapp(str(d / "merbridge-cni"))


@pytest.fixture(scope="session")
def plugin_exe(plugin_dir) -> str:
    return os.path.join(plugin_dir, "merbridge-cni")


@pytest.fixture
def network_factory(tmp_path, tag):
    made: list[CniNetwork] = []
    index = [0]

    def make(cni_version: str, socket_path: str | None = None) -> CniNetwork:
        index[0] += 1
        octet = 200 + secrets.randbelow(50)
        name = f"mbt-{tag}-{index[0]}"
        net = CniNetwork(
            name=name, conf_dir=str(tmp_path / f"net.d-{index[0]}"),
            ipam_dir=str(tmp_path / f"ipam-{index[0]}"),
            socket_path=socket_path or str(tmp_path / "merbridge-cni.sock"),
            cni_version=cni_version,
            subnet4=f"10.{octet}.{secrets.randbelow(256)}.0/24",
            subnet6=f"fd00:{tag[:4]}:{index[0]:x}::/64", bridge=f"mb{tag}{index[0]}"[:15])
        net.write()
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.cleanup_cache()


@pytest.fixture
def cnitool(node, plugin_dir) -> Cnitool:
    if not os.access(CNITOOL, os.X_OK):
        pytest.fail(f"{CNITOOL} missing: run scripts/prepare-host (conformance/build-cnitool)")
    return Cnitool(node, plugin_dir)


@pytest.fixture
def run_plugin(plugin_exe, node):
    """Invoke the plugin executable directly in the node netns.

    Returns (exit code, stdout JSON or None, stderr)."""

    def invoke(env: dict, stdin: bytes):
        p = subprocess.run(["nsenter", f"--net={netns_path(node)}", plugin_exe], input=stdin,
                           capture_output=True, timeout=60,
                           env={"PATH": NODE_PATH, **env})
        assert b"Traceback" not in p.stderr
        return p.returncode, (json.loads(p.stdout) if p.stdout else None), p.stderr.decode()

    return invoke


@pytest.fixture
def fake_daemon(tmp_path):
    """(server, handler) on ``<tmp>/merbridge-cni.sock``; root-only, as in production."""
    handler = RecordingHandler()
    server = CniServer(str(tmp_path / "merbridge-cni.sock"), handler, allowed_uids=(0,))
    server.start()
    try:
        yield server, handler
    finally:
        server.stop()


# -- the real daemon ------------------------------------------------------------
#: pod and uplink addressing of daemon_world (only inside its own namespaces)
DAEMON_SUBNET4, DAEMON_SUBNET6 = "10.232.1.0/24", "fd00:232:1::/64"
UPLINK4, UPLINK6 = "10.232.254.{}", "fd00:232:fe::{}"


@dataclasses.dataclass
class DaemonWorld:
    tag: str
    node: str                 # netns: the daemon, cnitool, the bridge, host-side veths
    remote: str               # netns: another node, routed to the pods via node
    remote_ip4: str
    remote_ip6: str
    cgroup: str               # --cgroup-path (pods' processes go in children of it)
    daemon: RealDaemon
    net: CniNetwork           # conf_dir is the daemon's: the conflist it chained into
    cnitool: Cnitool
    maps: object              # typed handles on the daemon's pinned maps


@pytest.fixture(scope="module")
def daemon_world(request, tmp_path_factory, plugin_dir):
    """The module's real daemon; a module may set ``DAEMON_ARGS`` (extra
    ``merbridge run`` options, e.g. ``("--hardware-checksum=true",)``)."""
    from merbridge.bpf import loader
    from merbridge.lab import netns

    if not os.access(CNITOOL, os.X_OK):
        pytest.fail(f"{CNITOOL} missing: run scripts/prepare-host (conformance/build-cnitool)")
    if not CGROUP_ROOT:
        pytest.fail("no cgroup v2 mount in /proc/mounts")
    tag = secrets.token_hex(4)
    node, remote = f"mbt-{tag}-dnode", f"mbt-{tag}-drem"
    cgroup = ""
    root = str(tmp_path_factory.mktemp(f"daemon-{tag}"))
    bpffs = tempfile.mkdtemp(prefix=f"mbt-{tag}-bpffs-")
    namespaces: list[str] = []
    mounted = False
    daemon = net = maps = None
    try:
        run("mount", "-t", "bpf", "bpf", bpffs)
        mounted = True
        cgroup = make_cgroup(f"mbt-{tag}-conf")
        for ns in (node, remote):
            netns.create_netns(ns)
            namespaces.append(ns)
        # the two "nodes" share an uplink; remote reaches the pod subnets via node
        netns.create_veth("uplink", "uplink", ns=node, peer_ns=remote)
        for ns, i in ((node, 1), (remote, 2)):
            netns.add_address(ns, "uplink", f"{UPLINK4.format(i)}/24")
            netns.add_address(ns, "uplink", f"{UPLINK6.format(i)}/64")
            netns.link_up(ns, "uplink")
        netns.add_route(remote, DAEMON_SUBNET4, gateway=UPLINK4.format(1))
        netns.add_route(remote, DAEMON_SUBNET6, gateway=UPLINK6.format(1))
        netns.set_sysctl(node, "net.ipv4.ip_forward", 1)
        netns.set_sysctl(node, "net.ipv6.conf.all.forwarding", 1)

        daemon = RealDaemon(os.path.join(bpffs, "merbridge"), cgroup, root=root,
                            netns=netns.netns_path(node), node_name=NODE_NAME,
                            args=tuple(getattr(request.module, "DAEMON_ARGS", ())))
        net = CniNetwork(name=f"mbt-{tag}-d", conf_dir=daemon.conf_dir,
                         ipam_dir=os.path.join(root, "ipam"), socket_path=daemon.socket,
                         cni_version="1.0.0", subnet4=DAEMON_SUBNET4, subnet6=DAEMON_SUBNET6,
                         bridge=f"mbd{tag}")
        net.write(chained=False)              # the node's primary CNI, before us
        daemon.start()
        maps = loader.open_maps(daemon.pin_dir)
        yield DaemonWorld(tag, node, remote, UPLINK4.format(2), UPLINK6.format(2), cgroup,
                          daemon, net, Cnitool(node, daemon.bin_dir), maps)
    finally:
        if maps is not None:
            maps.close()
        if daemon is not None:
            try:
                daemon.stop()
            except DaemonError:
                pass      # killed: close() detaches what it left on our cgroup
            daemon.close()
        if net is not None:
            net.cleanup_cache()
        if cgroup:
            remove_cgroup(cgroup)
        for ns in reversed(namespaces):
            netns.remove_netns(ns)
        if mounted:
            run("umount", bpffs, check=False)
        os.rmdir(bpffs)


@pytest.fixture
def pods(daemon_world):
    """``make(name, in_mesh=True, annotations=None)``: a bare pod netns + cgroup and
    its manifest in the pods dir; afterwards cnitool DEL, netns and cgroup removed."""
    w = daemon_world
    made: list[Pod] = []

    def make(name: str, in_mesh: bool = True, annotations: dict | None = None) -> Pod:
        pod = make_pod(w, f"{name}-{secrets.token_hex(2)}", in_mesh, annotations)
        made.append(pod)
        return pod

    try:
        yield make
    finally:
        for pod in made:
            remove_pod(w, pod)
