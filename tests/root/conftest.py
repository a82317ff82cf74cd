"""Shared fixtures for root tests: unique names, a private cgroup, a private
bpffs pin directory, a lab, two pods for a daemon and the whole datapath on a
test cgroup. Each removes exactly what it created."""
import contextlib
import os
import subprocess
import tempfile
import uuid

import pytest

from daemonenv import Env
from merbridge.bpf import loader, mesh
from merbridge.lab.cgroups import CGROUP_ROOT, make_cgroup, remove_cgroup
from merbridge.lab.lab import Lab


@pytest.fixture(scope="session", autouse=True)
def static_plugin(tmp_path_factory) -> str:
    """The node's merbridge-cni (``scripts/build-cni``, static) built from this checkout;
    every daemon the tests start installs it (MERBRIDGE_CNI_PLUGIN)."""
    exe = str(tmp_path_factory.mktemp("cni-static") / "merbridge-cni")
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([os.path.join(top, "scripts", "build-cni"), exe], check=True)
    os.environ["MERBRIDGE_CNI_PLUGIN"] = exe
    return exe


@pytest.fixture
def unique() -> str:
    """A fresh ``mbt-<hex>`` name for anything the test creates."""
    return f"mbt-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cgroup(unique):
    """A child cgroup of the cgroup v2 mount (never the root cgroup)."""
    path = make_cgroup(unique)
    try:
        yield path
    finally:
        remove_cgroup(path)


@contextlib.contextmanager
def private_bpffs():
    """A private bpffs instance: pins in it vanish with the unmount."""
    path = tempfile.mkdtemp(prefix="mbt-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)


@pytest.fixture
def pin_dir():
    with private_bpffs() as path:
        yield path


@pytest.fixture
def two_pods(pin_dir):
    """Pods a and b with an app on 8080 and a sidecar, published to a daemon
    environment (daemonenv.Env) on private pins; the daemon is not started."""
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        for pod in (a, b):
            pod.start_app(8080)
            pod.start_sidecar()
        env = Env(lab, pin_dir)
        try:
            for pod in (a, b):
                env.publish_pod(pod)
            yield env, a, b
        finally:
            env.close()


@pytest.fixture
def lab():
    """A one-node lab; pods are added by the test."""
    with Lab("mbt") as lb:
        yield lb


@pytest.fixture(scope="module")
def datapath():
    """The whole datapath (test_xdp, test_inbound_flows), pinned in a unique
    directory, with its cgroup programs on a test cgroup that the pods' servers
    run in (so their getsockopt(SO_ORIGINAL_DST) is answered by mb_getsockopt)."""
    tag = os.urandom(4).hex()
    cgroup = os.path.join(CGROUP_ROOT, f"mbt-{tag}-xdp")
    dp = loader.Datapath(f"/sys/fs/bpf/mbt-{tag}", mesh.get("istio"), cni_mode=True)
    os.mkdir(cgroup)
    try:
        dp.load()
        dp.attach(cgroup)
        yield dp, cgroup
    finally:
        dp.detach()
        dp.close()
        dp.unpin()
        os.rmdir(cgroup)


@pytest.fixture(scope="session")
def make_bpffs():
    """``with make_bpffs() as pin_dir:`` -- for fixtures wider than one test."""
    return private_bpffs
