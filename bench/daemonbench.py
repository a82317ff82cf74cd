"""The daemon's own costs.

- map updates per second: ``maps.local_pods.put`` (and ``delete``) in a loop
  on a freshly loaded datapath in a private pin dir (no cgroup attached);
- ``merbridge run`` in legacy mode with a ``--pods-dir`` of 1,000 dual-stack
  in-mesh pods: start to ready (the daemon's "merbridge ready" log line, which
  it writes just after ``mb_local_pods`` holds both addresses of all 1,000
  pods from its first listing; checked), its RSS then, and
  the latency from one more pod manifest appearing in the directory to its
  map entries (both families; p50/p99 of several). The RSS is the daemon's
  as on a node where no other process maps LLVM (see ``daemon_figures``).
"""
from __future__ import annotations

import os
import time
import uuid

from common import BENCH_NODE, BenchError, bench_pod, log, percentiles

BPFFS = "/sys/fs/bpf"


def map_updates(n: int) -> dict:
    from merbridge.bpf.loader import Datapath
    from merbridge.bpf.mesh import MESHES
    from merbridge.bpf.policy import PodPolicy
    pin = os.path.join(BPFFS, f"mbb-{uuid.uuid4().hex[:8]}")
    dp = Datapath(pin, MESHES["istio"], cni_mode=True)
    try:
        dp.load()
        lp = dp.maps.local_pods
        ips = [f"10.233.{i // 250}.{i % 250 + 1}" for i in range(1000)]
        pol = PodPolicy()
        t0 = time.perf_counter()
        for i in range(n):
            lp.put(ips[i % 1000], pol)
        put_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for ip in ips:
            lp.delete(ip)
        del_s = time.perf_counter() - t0
        return {"puts": n, "puts_per_s": n / put_s, "deletes_per_s": len(ips) / del_s}
    finally:
        try:
            dp.unpin()
        finally:
            dp.close()


def daemon_figures(pods: int, events: int) -> dict:
    from merbridge.daemon import memory
    from merbridge.lab.node import RealDaemon
    # The daemon pages out the compiler's code once its programs are loaded
    # (memory.page_out_code), which the kernel does only for pages no other
    # process maps. On a node nothing else runs LLVM; this process compiled
    # earlier suites' programs, so it first gives its own copies back (it
    # compiles again to read the maps, once the daemon is ready).
    memory.page_out_code()
    d = RealDaemon(cni_mode=False, node_name=BENCH_NODE, private_netns=False)
    try:
        for i in range(pods):
            d.publish(bench_pod(f"p{i}", f"10.234.{i // 250}.{i % 250 + 1}",
                                f"fd00:234::{i + 1:x}"))
        d.start(wait=False)
        # ready: the daemon's own word (logged just after it wrote mb_local_pods
        # from its first listing), read from its log; the maps are opened only
        # then, checked to hold all the pods, so this process's compile of
        # their declarations does not share the daemon's compiler pages
        deadline = time.monotonic() + 60
        while not d.ready():
            if d.proc.poll() is not None:
                raise BenchError(f"merbridge run exited rc={d.proc.returncode}: {d.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"daemon not ready within 60 s: {d.tail()}")
            time.sleep(0.01)
        ready = time.perf_counter() - d.started
        maps = d.maps()
        if len(maps.local_pods.items()) < 2 * pods:
            raise BenchError(f"daemon ready with {len(maps.local_pods.items())} of "
                             f"{2 * pods} pod addresses in mb_local_pods: {d.tail()}")
        time.sleep(0.5)
        rss = d.rss_mb()
        lat = []
        for k in range(events):
            ip, ip6 = f"10.235.0.{k + 1}", f"fd00:235::{k + 1:x}"
            t0 = time.perf_counter()
            d.publish(bench_pod(f"ev{k}", ip, ip6))
            while maps.local_pods.get(ip) is None or maps.local_pods.get(ip6) is None:
                if time.perf_counter() - t0 > 30:
                    raise BenchError(f"pod event -> map entry took more than 30 s: {d.tail()}")
                time.sleep(0.0005)
            lat.append((time.perf_counter() - t0) * 1000)
        rss_after = d.rss_mb()
        maps.close()
        return {"ready_s": ready, "rss_mb": max(rss, rss_after), "pods_listed": pods,
                "event_to_map_ms": percentiles(lat), "events": events}
    finally:
        d.close()


def run(a, workdir: str) -> dict:
    out = {}
    n = 20_000 if a.quick else 100_000
    log(f"daemon: {n} local_pods.put")
    out.update(map_updates(n))
    pods = 200 if a.quick else 1000
    import importlib.util
    if importlib.util.find_spec("merbridge.daemon.cli") is None:
        out["daemon_error"] = "merbridge run is not available yet (no daemon/cli.py)"
        return out
    try:
        log(f"daemon: merbridge run (legacy, pods-dir with {pods} dual-stack pods)")
        fig = daemon_figures(pods, 5 if a.quick else 20)
        ev = fig.pop("event_to_map_ms")
        out.update(fig)
        out["event_to_map_p50_ms"] = ev.get("p50")
        out["event_to_map_p99_ms"] = ev.get("p99")
    except BenchError as e:
        out["daemon_error"] = str(e)[:500]
    return out
