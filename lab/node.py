"""The real node daemon, for the demo, the root tests, conformance and bench:
``merbridge run`` as a subprocess with every production path pointed at our
own: pins (``pin_dir``, in a bpffs the caller mounted, or a unique directory
of /sys/fs/bpf), a child cgroup of the cgroup v2 mount, and under ``root``
the CNI bin and conf dirs, the state dir, the socket and a ``--pods-dir`` of
Pod manifests. Optionally inside a "node" netns (``nsenter --net``), the way
the DaemonSet runs with hostNetwork in the node's: there the host-side veths
of the lab's pods are its own interfaces.

A daemon may be started several times on the same paths (a restart); each
start has its own log (``daemon-N.log``). ``close()`` kills what still runs
and removes what this object made (the pins and cgroup it chose itself, a
temp root), detaching programs a killed daemon left on the cgroup.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Sequence

from merbridge.lab import cgroups, labconfig
from merbridge.lab.lab import LabError, uninterrupted

#: the venv's console script (sys.executable is the venv's python, not its target)
MERBRIDGE = os.path.join(os.path.dirname(sys.executable), "merbridge")


class DaemonError(LabError):
    """The daemon exited, did not become ready, or did not stop when asked."""


class RealDaemon:
    """``merbridge run`` on private paths (see the module's docstring).

    ``pin_dir``/``cgroup``/``root``: None makes our own (removed by close()).
    ``netns``: a netns path to run in (None: ours). ``args``: further flags of
    every start. ``private_netns``: look for pods' namespaces only where a test
    puts them (``--netns-dir=<root>/netns --proc-path=``), not among the host's.
    ``conf_dir``/``bin_dir``: the CNI dirs, when they are not ours under root;
    ``state_dir`` likewise (a node keeps it on tmpfs: /var/run/merbridge).
    """

    def __init__(self, pin_dir: str | None = None, cgroup: str | None = None, *,
                 root: str | None = None, netns: str | None = None, cni_mode: bool = True,
                 node_name: str = "lab", args: Sequence[str] = (), private_netns: bool = True,
                 conf_dir: str | None = None, bin_dir: str | None = None,
                 state_dir: str | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.procs: list[subprocess.Popen] = []
        self._own_root, self._own_pins, self._own_cgroup = root is None, pin_dir is None, False
        self.root = root or tempfile.mkdtemp(prefix="mbt-daemon-")
        self.pin_dir = pin_dir or f"/sys/fs/bpf/mbt-{tag}"
        self.cgroup = cgroup or ""
        self.netns, self.cni_mode, self.node_name = netns, cni_mode, node_name
        self.args, self.private_netns = tuple(args), private_netns
        self.bin_dir = bin_dir or os.path.join(self.root, "bin")
        self.conf_dir = conf_dir or os.path.join(self.root, "net.d")
        self.state_dir = state_dir or os.path.join(self.root, "state")
        self.pods_dir = os.path.join(self.root, "pods")
        self.socket = os.path.join(self.root, "cni.sock")
        self.started = 0.0
        for d in (self.bin_dir, self.conf_dir, self.pods_dir):
            os.makedirs(d, exist_ok=True)
        if cgroup is None:
            with uninterrupted():
                self.cgroup = cgroups.make_cgroup(f"mbt-daemon-{tag}")
                self._own_cgroup = True

    def __enter__(self) -> "RealDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def plugin(self) -> str:
        """The merbridge-cni the daemon installs into its CNI bin dir."""
        return os.path.join(self.bin_dir, "merbridge-cni")

    @property
    def proc(self) -> subprocess.Popen | None:
        """The latest start's process."""
        return self.procs[-1] if self.procs else None

    # -- the process ---------------------------------------------------------
    def argv(self, *extra: str) -> list[str]:
        exe = [MERBRIDGE] if os.path.exists(MERBRIDGE) else [sys.executable, "-m",
                                                               "merbridge.daemon.cli"]
        argv = [*exe, "run", "--mode=istio", f"--cni-mode={str(self.cni_mode).lower()}",
                f"--bpffs-path={self.pin_dir}", f"--cgroup-path={self.cgroup}",
                f"--state-dir={self.state_dir}", f"--cni-bin-dir={self.bin_dir}",
                f"--cni-conf-dir={self.conf_dir}", f"--socket-path={self.socket}",
                f"--pods-dir={self.pods_dir}", "--metrics-addr=127.0.0.1:0",
                f"--node-name={self.node_name}"]
        if self.private_netns:
            argv += [f"--netns-dir={self.root}/netns", "--proc-path="]
        argv += [*self.args, *extra]
        return ["nsenter", f"--net={self.netns}", *argv] if self.netns else argv

    def start(self, *extra: str, wait: bool = True, timeout: float | None = None
              ) -> subprocess.Popen:
        """Start ``merbridge run`` (with ``extra`` flags for this start only); by
        default return once it is ready (``wait_ready``)."""
        log_path = os.path.join(self.root, f"daemon-{len(self.procs)}.log")
        with open(log_path, "wb") as log, uninterrupted():
            self.started = time.perf_counter()
            proc = subprocess.Popen(self.argv(*extra), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            proc.log_path = log_path  # type: ignore[attr-defined]
            self.procs.append(proc)
        if wait:
            self.wait_ready(proc, timeout)
        return proc

    def log(self, proc: subprocess.Popen | None = None) -> str:
        """What ``proc`` (default: the latest start) logged."""
        proc = proc or self.proc
        try:
            with open(proc.log_path, errors="replace") as f:  # type: ignore[union-attr]
                return f.read()
        except (OSError, AttributeError):
            return ""

    def tail(self, proc: subprocess.Popen | None = None, lines: int = 15) -> str:
        return "\n".join(self.log(proc).splitlines()[-lines:])

    def status(self) -> subprocess.CompletedProcess:
        """The CNI STATUS command, through the installed plugin as a runtime runs it."""
        conf = {"cniVersion": "1.1.0", "name": "status", "type": "merbridge-cni",
                "socketPath": self.socket}
        return subprocess.run([self.plugin], input=json.dumps(conf), capture_output=True,
                              text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                          "CNI_COMMAND": "STATUS",
                                                          "CNI_PATH": self.bin_dir})

    def ready(self, proc: subprocess.Popen | None = None) -> bool:
        """CNI mode: the plugin is installed and STATUS says ready (so it is chained
        in too); else the daemon logged that it is ready."""
        if self.cni_mode:
            return os.path.exists(self.plugin) and self.status().returncode == 0
        return "merbridge ready" in self.log(proc)

    def wait_ready(self, proc: subprocess.Popen | None = None,
                   timeout: float | None = None) -> float:
        """Wait until ``proc`` (default: the latest start) is ready; the seconds
        since its start. DaemonError when it exits or takes longer."""
        proc = proc or self.proc
        timeout = (timeout or 120) * labconfig.READY_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DaemonError(f"merbridge run exited with {proc.returncode}:\n"
                                  + self.log(proc)[-3000:])
            if self.ready(proc):
                return time.perf_counter() - self.started
            time.sleep(0.05)
        raise DaemonError(f"merbridge run did not become ready in {timeout:.0f} s:\n"
                          + self.log(proc)[-3000:])

    def stop(self, proc: subprocess.Popen | None = None, sig: int = signal.SIGTERM,
             timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit status; a daemon that ignores it for
        ``timeout`` s is killed and DaemonError raised."""
        proc = proc or self.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise DaemonError(f"the daemon ignored signal {sig} for {timeout:.0f} s; "
                              "killed") from None

    def rss_mb(self, proc: subprocess.Popen | None = None) -> float:
        with open(f"/proc/{(proc or self.proc).pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    # -- what it reads and writes ----------------------------------------------
    def publish(self, manifest: dict) -> dict:
        """Put a Pod manifest into the ``--pods-dir`` (atomically)."""
        name = manifest["metadata"]["name"]
        tmp = os.path.join(self.pods_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.pods_dir, f"{name}.json"))
        return manifest

    def unpublish(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.pods_dir, f"{name}.json"))
        except FileNotFoundError:
            pass

    def conflists(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.conf_dir)):
            if name.endswith(".conflist"):
                with open(os.path.join(self.conf_dir, name)) as f:
                    out.append(json.load(f))
        return out

    def chained(self) -> bool:
        """merbridge-cni is in one of the conf dir's conflists."""
        try:
            return any(p.get("type") == "merbridge-cni"
                       for c in self.conflists() for p in c.get("plugins", []))
        except (OSError, ValueError):
            return False

    def records(self) -> dict[str, dict]:
        """The state file's records by container id (empty when there is no file)."""
        try:
            with open(os.path.join(self.state_dir, "enrolled.json")) as f:
                return {r["container_id"]: r for r in json.load(f)["containers"]}
        except FileNotFoundError:
            return {}

    def maps(self):
        from merbridge.bpf import loader
        return loader.open_maps(self.pin_dir)

    def attached(self) -> list:
        from merbridge.bpf import loader
        return loader.attached(self.cgroup)

    # -- teardown --------------------------------------------------------------
    def close(self) -> None:
        """Kill what still runs (a test that wanted a clean stop called stop());
        detach the programs a killed daemon leaves on the cgroup; remove the
        pins, cgroup and root this object made itself."""
        from merbridge.bpf import loader
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        try:
            loader.detach_cgroup(self.cgroup)
        except Exception:
            pass
        if self._own_pins and os.path.isdir(self.pin_dir):
            loader.detach_sockhash(self.pin_dir)
            loader.remove_pins(self.pin_dir)
        if self._own_cgroup:
            cgroups.remove_cgroup(self.cgroup)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
