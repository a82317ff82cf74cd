"""CNI ADD/DEL latency through the real cnitool.

Chains compared, same node namespace, same pods:
- ``bridge``: bridge + host-local alone (Debian's plugins);
- ``bridge+merbridge``: the same conflist after a running ``merbridge run
  --cni-mode=true`` installed ``merbridge-cni`` into it, so every ADD/DEL also
  goes to the daemon over its unix socket (mark key, marker listener, XDP).
  The daemon keeps its state file on tmpfs (/dev/shm), as a node's
  /var/run/merbridge is.

Per chain: N sequential ADD then DEL (wall time of each cnitool process,
which includes cnitool's own start-up, identical for both chains), then 50
concurrent ADDs and 50 concurrent DELs, while a few resident pods stay added
as on a node that already runs pods. cnitool runs inside a node netns we
create (the bridge plugin puts the bridge in its caller's netns); libcni's
result cache files for our uniquely named network are removed afterwards.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

from common import BENCH_NODE, BenchError, bench_pod, log, percentiles
from merbridge.lab import netns
from merbridge.lab.lab import LabError

LIBCNI_CACHE = "/var/lib/cni/results"
#: the PATH a container runtime gives its CNI plugins (systemd's default), so
#: the plugin's ``#!/usr/bin/env -S python3 -IS`` finds the node's python3 and not
#: whatever the benchmarking shell has first (a pyenv shim costs ~170 ms)
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: a tmpfs for the daemon's state dir, as a node's /var/run
STATE_TMPFS = "/dev/shm"
#: kill -9 / remembered ADD / restart rounds
RESTARTS = 3
#: pods that stay enrolled while the sequential and concurrent ADD/DELs run
RESIDENTS = 4


class CniNode:
    """A node netns, a conf dir with a bridge conflist, pods to ADD."""

    def __init__(self, workdir: str, tag: str):
        self.name = f"mbb-{uuid.uuid4().hex[:8]}"
        self.dir = os.path.join(workdir, f"cni-{tag}")
        self.conf_dir = os.path.join(self.dir, "net.d")
        self.bin_dir = os.path.join(self.dir, "bin")
        os.makedirs(self.conf_dir)
        os.makedirs(self.bin_dir)
        self.node_ns = f"{self.name}-node"
        self.pods: list[str] = []
        netns.create_netns(self.node_ns)
        conf = {
            "cniVersion": "1.0.0", "name": self.name,
            "plugins": [{
                "type": "bridge", "bridge": "mbbcni0", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": os.path.join(self.dir, "ipam"),
                         "ranges": [[{"subnet": "10.232.0.0/16"}]]},
            }],
        }
        self.conflist = os.path.join(self.conf_dir, "10-bench.conflist")
        with open(self.conflist, "w") as f:
            json.dump(conf, f, indent=1)

    def new_pod(self, i: int) -> str:
        ns = f"{self.name}-p{i}"
        netns.create_netns(ns)
        self.pods.append(ns)
        return ns

    def cnitool(self, op: str, pod_ns: str, pod_name: str) -> tuple[float, subprocess.CompletedProcess]:
        env = dict(os.environ, PATH=RUNTIME_PATH, NETCONFPATH=self.conf_dir,
                   CNI_PATH=f"/usr/lib/cni:{self.bin_dir}",
                   CNI_ARGS=(f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod_name};"
                             f"K8S_POD_INFRA_CONTAINER_ID={pod_ns}"))
        argv = netns.command(["cnitool", op, self.name, netns.netns_path(pod_ns)], ns=self.node_ns)
        t0 = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        return time.perf_counter() - t0, res

    def close(self) -> None:
        for ns in self.pods + [self.node_ns]:
            try:
                netns.remove_netns(ns)
            except Exception as e:  # keep going: every namespace must go
                log(f"cni cleanup: {ns}: {e}")
        for path in glob.glob(os.path.join(LIBCNI_CACHE, f"{self.name}-*")):
            os.unlink(path)
        shutil.rmtree(self.dir, ignore_errors=True)


def check(op: str, res: subprocess.CompletedProcess, pod: str) -> None:
    """A cnitool run that failed stops the benchmark, with the plugin's words."""
    if res.returncode != 0:
        raise BenchError(f"cnitool {op} {pod}: rc={res.returncode} "
                         f"{(res.stderr or res.stdout).strip()[-400:]}")


def _measure(node: CniNode, n_seq: int, n_conc: int) -> dict:
    # a node's other pods: with none enrolled, every sequential ADD would be
    # the node's first XDP attachment and every DEL its last (11-16 ms each
    # here, against 0.6 ms while other interfaces have XDP programs), which a
    # node sees once, not per pod
    residents = [node.new_pod(2000 + i) for i in range(RESIDENTS)]
    for i, pod in enumerate(residents):
        check("add", node.cnitool("add", pod, f"res-{i}")[1], pod)
    add, dele = [], []
    for i in range(n_seq):
        pod = node.new_pod(i)
        dt, res = node.cnitool("add", pod, f"seq-{i}")
        check("add", res, pod)
        add.append(dt * 1000)
        dt, res = node.cnitool("del", pod, f"seq-{i}")
        check("del", res, pod)
        dele.append(dt * 1000)
    pods = [node.new_pod(1000 + i) for i in range(n_conc)]
    out = {"add": percentiles(add), "del": percentiles(dele)}
    for op in ("add", "del"):
        times: list[float] = []
        errors: list[str] = []

        def one(pod: str, i: int) -> None:
            dt, res = node.cnitool(op, pod, f"conc-{i}")
            if res.returncode != 0:
                errors.append((res.stderr or res.stdout).strip()[-200:])
            times.append(dt * 1000)

        threads = [threading.Thread(target=one, args=(p, i)) for i, p in enumerate(pods)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        st = percentiles(times)
        st["wall_ms"] = wall * 1000
        st["errors"] = len(errors)
        if errors:
            st["first_error"] = errors[0]
        out[f"{op} x{n_conc} concurrent"] = st
    for i, pod in enumerate(residents):
        check("del", node.cnitool("del", pod, f"res-{i}")[1], pod)
    return out


def _restarts(node: CniNode, d, reps: int) -> dict:
    """Pods started while the daemon was killed: ``kill -9``, a pod's ADD
    (the plugin passes it through and remembers it: fail-open), then a new
    ``merbridge run``; seconds from that process's start until the state file
    says the pod is enrolled. The pod is deleted again once the daemon is ready."""
    times = []
    for i in range(reps):
        name = f"rst-{i}"
        d.stop(sig=signal.SIGKILL)
        pod = node.new_pod(3000 + i)
        check("add", node.cnitool("add", pod, name)[1], pod)
        d.start(wait=False)
        while not any(r.get("name") == name and r.get("phase") == "enrolled"
                      for r in d.records().values()):
            if d.proc.poll() is not None:
                raise BenchError(f"merbridge run exited rc={d.proc.returncode}: {d.tail()}")
            if time.perf_counter() - d.started > 120:
                raise BenchError(f"{name} not enrolled 120 s after the start: {d.tail()}")
            time.sleep(0.01)
        times.append(time.perf_counter() - d.started)
        d.wait_ready()
        check("del", node.cnitool("del", pod, name)[1], pod)
    return {"enrolled_after_start_s": times, "max_s": max(times),
            "median_s": sorted(times)[len(times) // 2]}


def run(a, workdir: str) -> dict:
    if shutil.which("cnitool") is None:
        raise BenchError("cnitool not found (scripts/prepare-host builds it)")
    n_seq = 10 if a.quick else 100
    n_conc = 10 if a.quick else 50
    chains = {}
    node = CniNode(workdir, "bridge")
    try:
        log(f"cni: bridge + host-local, {n_seq} sequential, {n_conc} concurrent")
        chains["bridge"] = _measure(node, n_seq, n_conc)
    finally:
        node.close()
    notes = []
    restart: dict = {}
    try:
        from merbridge.lab.node import RealDaemon
        node = CniNode(workdir, "chained")
        # the state file where a node has it: /var/run/merbridge is on tmpfs
        # there (a rename on this machine's ext4 costs 0.54 ms, on tmpfs 0.10)
        state = tempfile.mkdtemp(prefix="mbb-state-", dir=STATE_TMPFS)
        try:
            d = RealDaemon(conf_dir=node.conf_dir, bin_dir=node.bin_dir,
                           netns=netns.netns_path(node.node_ns), node_name=BENCH_NODE,
                           private_netns=False, state_dir=state)
            try:
                # the pods exist in the pod source before their sandboxes are
                # networked, as a kubelet's pods do in the API server
                for name in ([f"seq-{i}" for i in range(n_seq)]
                             + [f"conc-{i}" for i in range(n_conc)]
                             + [f"res-{i}" for i in range(RESIDENTS)]
                             + [f"rst-{i}" for i in range(RESTARTS)]):
                    d.publish(bench_pod(name))
                d.start()          # ready: merbridge-cni is chained into node.conflist
                log("cni: bridge + host-local + merbridge-cni -> daemon")
                chains["bridge+merbridge"] = _measure(node, n_seq, n_conc)
                log(f"cni: {RESTARTS} x kill -9, a pod's ADD, merbridge run")
                restart = _restarts(node, d, RESTARTS)
                maps = d.maps()
                try:
                    chains["bridge+merbridge"]["daemon_enrolled"] = len(maps.mark_pod_ips.items())
                finally:
                    maps.close()
            finally:
                d.close()
        finally:
            node.close()
            shutil.rmtree(state, ignore_errors=True)
    except (BenchError, LabError, ImportError) as e:
        notes.append(f"chained merbridge-cni not measured: {e}")
    out = {"chains": {c: {op: st for op, st in v.items() if isinstance(st, dict)}
                      for c, v in chains.items()},
           "sequential": n_seq, "concurrent": n_conc, "notes": notes,
           "restart": restart}
    b = chains.get("bridge", {}).get("add", {}).get("p50")
    m = chains.get("bridge+merbridge", {}).get("add", {}).get("p50")
    if b and m:
        out["ratio_add_p50"] = m / b
    key = f"add x{n_conc} concurrent"
    b, m = (chains.get(c, {}).get(key, {}) for c in ("bridge", "bridge+merbridge"))
    if b.get("wall_ms") and m.get("wall_ms"):
        out["ratio_concurrent_wall"] = m["wall_ms"] / b["wall_ms"]
        out["ratio_concurrent_p50"] = m["p50"] / b["p50"]
    return out
