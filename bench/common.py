"""Shared helpers of the benchmark: statistics, the machine description,
kernel knobs that must be restored, and subprocess timing.

Nothing here touches the network; the suites (load, micro, cnibench,
daemonbench) build their own namespaces and clean them up.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: the --node-name of the benchmark's daemon, and the nodeName of its pods
BENCH_NODE = "bench-node"


def bench_pod(name: str, ip: str | None = None, ip6: str | None = None) -> dict:
    """An in-mesh pod of namespace "bench" (dual-stack with ``ip6``); without ``ip``
    it is a pod the CNI has not networked yet (CNI mode takes the address from
    ADD's prevResult)."""
    from merbridge.lab.manifests import pod_manifest
    ips = [a for a in (ip, ip6) if a] if ip else []
    return pod_manifest(name, namespace="bench", node=BENCH_NODE, ips=ips)


class BenchError(RuntimeError):
    """A suite could not run; the message says why (never a traceback for users)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- statistics -----------------------------------------------------------

def summarize(values: Iterable[float]) -> dict:
    """Median, min, max and spread ((max-min)/median, %) of repeated runs."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0}
    med = statistics.median(vals)
    spread = (max(vals) - min(vals)) / med * 100 if med else None
    return {"median": med, "min": min(vals), "max": max(vals),
            "spread_pct": spread, "n": len(vals)}


def percentiles(samples: list[float], qs=(50, 90, 99, 99.9)) -> dict:
    """Nearest-rank percentiles of raw samples (sorted copy)."""
    if not samples:
        return {}
    s = sorted(samples)
    out = {}
    for q in qs:
        k = min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))
        out[f"p{q:g}"] = s[k]
    out["mean"] = statistics.fmean(s)
    out["n"] = len(s)
    return out


# -- machine --------------------------------------------------------------

def machine() -> dict:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()
    info = {
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": [round(x, 2) for x in load],
        "hostname": platform.node(),
        "python": platform.python_version(),
    }
    for tool, argv in (("wrk", ["wrk", "-v"]), ("haproxy", ["haproxy", "-v"]),
                       ("iperf3", ["iperf3", "-v"])):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            first = (res.stdout or res.stderr).strip().splitlines()
            info[tool] = first[0] if first else "?"
        except (OSError, subprocess.TimeoutExpired):
            info[tool] = "missing"
    try:
        res = subprocess.run(["git", "-C", TOP, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        info["commit"] = res.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def host_cpu() -> dict:
    """Whole-host CPU time and context switches so far (/proc/stat): every
    process of a bench topology (load generator, both sidecars, the app)
    and the kernel work they cause run on this host's CPUs."""
    out = {"busy_s": 0.0, "idle_s": 0.0, "ctxt": 0}
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name == "cpu":
                ticks = [int(x) for x in fields[:8]]   # user .. steal; guest is inside user
                idle = ticks[3] + ticks[4]            # idle + iowait
                out["busy_s"] = (sum(ticks) - idle) / hz
                out["idle_s"] = idle / hz
            elif name == "ctxt":
                out["ctxt"] = int(fields[0])
    return out


# -- kernel knobs ---------------------------------------------------------

def read_sysctl(key: str) -> str:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def write_sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(str(value))


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the block, then the previous value again."""
    key = "kernel.bpf_stats_enabled"
    old = read_sysctl(key)
    write_sysctl(key, "1")
    try:
        yield
    finally:
        write_sysctl(key, old)


def bpftool_json(*args: str) -> object:
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise BenchError(f"bpftool {' '.join(args)}: {res.stderr.strip()}")
    return json.loads(res.stdout or "null")


def cgroup_prog_ids(cgroup: str) -> list[dict]:
    """Programs attached to ``cgroup`` (id, attach_type, name)."""
    out = bpftool_json("cgroup", "show", cgroup)
    return list(out or [])


def prog_stats(prog_id: int) -> dict:
    p = bpftool_json("prog", "show", "id", str(prog_id))
    return {"id": prog_id, "name": p.get("name"), "type": p.get("type"),
            "run_time_ns": p.get("run_time_ns", 0), "run_cnt": p.get("run_cnt", 0)}


def build_c(workdir: str, name: str) -> str:
    """gcc -O2 bench/<name>.c into workdir; the executable's path."""
    exe = os.path.join(workdir, name)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.c")
    res = subprocess.run(["gcc", "-O2", "-o", exe, src], capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"gcc {name}.c: {res.stderr.strip()[-400:]}")
    return exe


def timed(argv: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv; wall seconds and the completed process."""
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, res
