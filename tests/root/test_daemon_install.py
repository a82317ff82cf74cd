"""A real daemon (CNI mode) whose node has a bad primary CNI config: the
reason is in its log, in /readyz and in `merbridge status`; it installs once
the file is fixed. (The installer's crash safety: tests/unit/test_install.py.)"""
from __future__ import annotations

import subprocess
import time

import pytest

import daemonhttp
from daemonenv import MERBRIDGE, PRIMARY_CONFIG, Env
from merbridge.daemon import install
from merbridge.lab.lab import Lab

pytestmark = pytest.mark.root


def test_bad_conflist_is_reported_and_retried(pin_dir):
    with Lab("mbt") as lab:
        env = Env(lab, pin_dir)
        try:
            install.atomic_write(env.primary, b"[" * 100000 + b"]" * 100000)
            proc = env.start(wait=False)
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, env.log(proc)
                if "metrics and health on" in env.log(proc):
                    status, body = daemonhttp.get(env, proc, "/readyz")
                    if "nested too deeply" in body:
                        break
                assert time.monotonic() < deadline, env.log(proc)
                time.sleep(0.3)
            assert status == 503 and body.startswith("not ready: CNI install:"), body
            assert "CNI install failed" in env.log(proc)
            out = subprocess.run([MERBRIDGE, "status", f"--bpffs-path={env.pin_dir}",
                                  f"--cgroup-path={lab.cgroup}", f"--state-dir={env.state_dir}"],
                                 capture_output=True, text=True, timeout=60).stdout
            assert "cni:      install failed (not ready):" in out and "nested too deeply" in out
            install.atomic_write(env.primary, PRIMARY_CONFIG)     # the file changes: retried
            env.wait_ready(proc)
            assert daemonhttp.get(env, proc, "/readyz") == (200, "ready\n")
            out = subprocess.run([MERBRIDGE, "status", f"--bpffs-path={env.pin_dir}",
                                  f"--cgroup-path={lab.cgroup}", f"--state-dir={env.state_dir}"],
                                 capture_output=True, text=True, timeout=60).stdout
            assert "cni:" not in out
            assert env.stop(proc) == 0
            with open(env.primary, "rb") as f:
                assert f.read() == PRIMARY_CONFIG
        finally:
            env.close()
