"""`merbridge doctor` on this (root, CI) machine: every required check passes."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

MERBRIDGE = os.path.join(os.path.dirname(sys.executable), "merbridge")


def test_doctor_passes_on_this_machine():
    r = subprocess.run([MERBRIDGE, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(r.stdout)
    failed = [c for c in report["checks"] if c["required"] and c["status"] != "ok"]
    assert failed == [] and report["ok"] and r.returncode == 0, r.stdout
    names = {c["name"] for c in report["checks"]}
    assert {"kernel", "privileges", "cgroup v2", "bpffs", "kernel headers", "bcc",
            "program type cgroup_sock_addr", "program type sk_msg", "map type sockhash"} <= names


def test_doctor_text_fails_for_a_bpffs_path_outside_bpffs(tmp_path):
    r = subprocess.run([MERBRIDGE, "doctor", f"--bpffs-path={tmp_path}/pins"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"FAIL bpffs: no bpf filesystem holds {tmp_path}/pins" in r.stdout
    assert "fix: mount -t bpf bpf" in r.stdout
