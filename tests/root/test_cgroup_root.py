"""Test cgroups live below the cgroup v2 mount the daemon itself would pick
(``find_cgroup2_mount``: /sys/fs/cgroup on a unified host such as a stock
Debian 12, /sys/fs/cgroup/unified on a hybrid one), one level down, never at
the mount (the root cgroup), and are gone afterwards."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

import hookenv
from merbridge.daemon.config import find_cgroup2_mount
from merbridge.lab import lab as labmod
from merbridge.lab.cgroups import CGROUP_ROOT
from merbridge.lab.lab import Lab, LabError

pytestmark = pytest.mark.root


def fs_type(path: str) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", path], check=True, capture_output=True,
                          text=True).stdout.strip()


def cgroup_of(pid: int) -> str:
    """The process's cgroup v2 path relative to the mount (the ``0::`` line)."""
    with open(f"/proc/{pid}/cgroup") as f:
        (line,) = [ln for ln in f.read().splitlines() if ln.startswith("0::")]
    return line[3:]


def test_root_is_the_discovered_cgroup2_mount():
    assert CGROUP_ROOT and CGROUP_ROOT == find_cgroup2_mount()
    assert fs_type(CGROUP_ROOT) == "cgroup2fs"


def test_lab_cgroups_are_below_the_mount_and_really_hold_its_processes():
    with Lab("mbt") as lab:
        pod = lab.add_bare_pod("a")
        assert os.path.dirname(lab.cgroup) == CGROUP_ROOT != lab.cgroup
        assert os.path.basename(lab.cgroup).startswith("mbt-")
        assert os.path.dirname(pod.cgroup) == lab.cgroup
        assert fs_type(pod.cgroup) == "cgroup2fs"
        proc = pod.spawn(["sleep", "30"])
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/comm").read().strip() != "sleep":   # joined, exec'd
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # the kernel puts it exactly there: the lab's path is the v2 hierarchy's
        assert cgroup_of(proc.pid) == "/" + os.path.relpath(pod.cgroup, CGROUP_ROOT)
    assert not os.path.exists(pod.cgroup) and not os.path.exists(lab.cgroup)


def test_fixture_and_hook_pods_use_the_mount(cgroup):
    assert os.path.dirname(cgroup) == CGROUP_ROOT and fs_type(cgroup) == "cgroup2fs"
    pod = hookenv.Pod()
    try:
        assert os.path.dirname(pod.cgroup) == CGROUP_ROOT
        assert os.path.isfile(os.path.join(pod.cgroup, "cgroup.procs"))
    finally:
        pod.close()
    assert not os.path.exists(pod.cgroup)


def test_lab_without_a_cgroup2_mount_refuses_and_creates_nothing(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(labmod.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(labmod.netns, "create_netns", made.append)
    with pytest.raises(LabError, match="no cgroup v2 mount"):
        Lab("mbt", cgroup_root=None)
    assert made == [] and list(tmp_path.iterdir()) == []
