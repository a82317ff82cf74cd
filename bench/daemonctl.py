"""Start and stop a real ``merbridge run`` for the benchmark, with every
production path pointed at our own directories (pin dir, cgroup, CNI dirs,
socket, state, pods-dir) and the process stopped by PID in ``close()``."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import common
from common import BenchError

POD_TEMPLATE = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"namespace": "bench", "annotations": {"sidecar.istio.io/status": "{}"}},
    "spec": {"nodeName": "bench-node",
             "containers": [{"name": "app", "image": "app"},
                            {"name": "istio-proxy", "image": "proxyv2"}]},
    "status": {"phase": "Running"},
}


def pod_manifest(name: str, ip: str | None = None, ip6: str | None = None) -> dict:
    """An in-mesh pod (dual-stack with ``ip6``); without ``ip`` it is a pod the
    CNI has not networked yet (CNI mode takes the address from ADD's prevResult)."""
    pod = json.loads(json.dumps(POD_TEMPLATE))
    pod["metadata"]["name"] = name
    if ip is not None:
        pod["status"]["podIP"] = ip
        pod["status"]["podIPs"] = [{"ip": ip}] + ([{"ip": ip6}] if ip6 else [])
    return pod


class Daemon:
    def __init__(self, workdir: str, cni_mode: bool, cni_conf_dir: str | None = None,
                 cni_bin_dir: str | None = None, netns: str | None = None):
        """``netns``: a node netns (name) to run the daemon in, as on a node
        whose pods' host-side veths are there; None for this netns."""
        tag = uuid.uuid4().hex[:8]
        self.dir = os.path.join(workdir, f"daemon-{tag}")
        self.pods_dir = os.path.join(self.dir, "pods")
        self.state_dir = os.path.join(self.dir, "state")
        os.makedirs(self.pods_dir)
        os.makedirs(self.state_dir)
        self.pin_dir = f"/sys/fs/bpf/mbb-{tag}"
        self.cgroup = os.path.join(common.CGROUP_ROOT, f"mbb-{tag}")
        self.socket = os.path.join(self.dir, "cni.sock")
        self.cni_mode = cni_mode
        self.netns = netns
        self.cni_conf_dir = cni_conf_dir or os.path.join(self.dir, "net.d")
        self.cni_bin_dir = cni_bin_dir or os.path.join(self.dir, "bin")
        os.makedirs(self.cni_conf_dir, exist_ok=True)
        os.makedirs(self.cni_bin_dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.log_path = os.path.join(self.dir, "daemon.log")

    def write_pod(self, name: str, ip: str | None = None, ip6: str | None = None) -> None:
        """Put a pod manifest into the daemon's --pods-dir (atomically)."""
        tmp = os.path.join(self.pods_dir, f".{name}.json")
        with open(tmp, "w") as f:
            json.dump(pod_manifest(name, ip, ip6), f)
        os.rename(tmp, os.path.join(self.pods_dir, f"{name}.json"))

    def argv(self) -> list[str]:
        # the venv bench/run runs in (sys.executable unresolved: a venv's python
        # is a symlink to the system one), else this checkout's .venv
        exe = os.path.join(os.path.dirname(sys.executable), "merbridge")
        venv_exe = os.path.join(common.TOP, ".venv", "bin", "merbridge")
        exe = exe if os.path.exists(exe) else venv_exe
        from merbridge.lab import netns as nsutil
        return nsutil.command([exe, "run", f"--cni-mode={'true' if self.cni_mode else 'false'}",
                f"--bpffs-path={self.pin_dir}", f"--cgroup-path={self.cgroup}",
                f"--cni-bin-dir={self.cni_bin_dir}", f"--cni-conf-dir={self.cni_conf_dir}",
                f"--socket-path={self.socket}", f"--state-dir={self.state_dir}",
                f"--pods-dir={self.pods_dir}", "--node-name=bench-node"], ns=self.netns)

    def __enter__(self) -> "Daemon":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        os.mkdir(self.cgroup)
        log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            raise BenchError(f"cannot start merbridge run: {e}") from e
        finally:
            log.close()
        if self.cni_mode:
            self.wait_ready()

    def _tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-600:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60) -> float:
        """CNI mode: the CNI STATUS command over the daemon's socket says ready."""
        from merbridge.cni.client import DaemonClient
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"merbridge run exited rc={self.proc.returncode}: {self._tail()}")
            if os.path.exists(self.socket):
                try:
                    DaemonClient(self.socket, 2.0).status()
                    self.ready_s = time.perf_counter() - self.started
                    return self.ready_s
                except Exception:
                    pass
            time.sleep(0.02)
        raise BenchError(f"merbridge run not ready after {timeout}s: {self._tail()}")

    def wait_cni_installed(self, conflist: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(conflist) as f:
                    if "merbridge" in f.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError("the daemon did not install merbridge-cni into the conflist")

    def enrolled_count(self) -> int:
        from merbridge.bpf.loader import open_maps
        m = open_maps(self.pin_dir)
        try:
            return len(m.mark_pod_ips.items())
        finally:
            m.close()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # whatever the daemon left behind (it should remove it itself)
        from merbridge.bpf import loader
        if os.path.isdir(self.cgroup):
            try:
                loader.detach_cgroup(self.cgroup)
            except Exception:
                pass
            try:
                os.rmdir(self.cgroup)
            except OSError:
                pass
        if os.path.isdir(self.pin_dir):
            loader.detach_sockhash(self.pin_dir)
            loader.remove_pins(self.pin_dir)
        shutil.rmtree(self.dir, ignore_errors=True)
