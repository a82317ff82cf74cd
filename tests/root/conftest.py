"""Shared fixtures for root tests: unique names, a private cgroup, a private
bpffs pin directory and a lab. Each removes exactly what it created."""
import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

from merbridge.lab.lab import CGROUP_ROOT, Lab


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


def remove_cgroup(path: str) -> None:
    """rmdir a test cgroup, killing (by PID) whatever the test left running in it."""
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


@pytest.fixture
def cgroup(unique):
    """A child cgroup of the cgroup v2 mount (never the root cgroup)."""
    if not CGROUP_ROOT:
        pytest.fail("no cgroup v2 mount in /proc/mounts")
    path = os.path.join(CGROUP_ROOT, unique)
    os.mkdir(path)
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
def lab():
    """A one-node lab; pods are added by the test."""
    with Lab("mbt") as lb:
        yield lb


@pytest.fixture(scope="session")
def make_bpffs():
    """``with make_bpffs() as pin_dir:`` -- for fixtures wider than one test."""
    return private_bpffs
