"""Churn: many pods come and go through cnitool; nothing may accumulate.

A real ``merbridge run --cni-mode=true`` chained behind Debian's bridge +
host-local, driven by the reference cnitool in the lab's node netns, 20
cycles at a time (publish the pod, netns, ADD, DEL, netns gone). Afterwards
the kernel and the daemon must look as they did before: no map entries, no
XDP attachments, no marker listeners, no records; the daemon's fds and
threads back to their baseline, its RSS flat.

``MB_CHURN_CYCLES`` / ``MB_CHURN_PARALLEL`` change the size (default 200 / 20).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemonenv import Env
from merbridge.daemon.lab import Lab
from reliabilityenv import ChurnNet, Observer

pytestmark = pytest.mark.root

CYCLES = int(os.environ.get("MB_CHURN_CYCLES", "200"))
PARALLEL = int(os.environ.get("MB_CHURN_PARALLEL", "20"))
#: allowed RSS growth over the measured cycles after warm-up (allocator noise:
#: measured +5.5 MiB over 200 cycles and +5.8 MiB over 400 on a ~260 MiB daemon)
RSS_SLACK_KIB = 8 * 1024


def settle(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


@pytest.fixture
def node(pin_dir):
    with Lab("mbt") as lab:
        env = Env(lab, pin_dir)
        net = ChurnNet(env)
        try:
            yield env, net
        finally:
            net.close()
            env.close()


def run_cycles(net: ChurnNet, first: int, count: int, parallel: int, hold=None):
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda i: net.cycle(net.pod_name(i), hold),
                             range(first, first + count)))


def test_churn_leaves_nothing_behind(node, record_property):
    env, net = node
    proc = env.start()
    obs = Observer(env, proc.pid)
    ok_during = []

    def hold(pod):
        # while it lives, the pod is really enrolled: its marker and its XDP exist
        ok_during.append(bool(obs.markers_in(net.netns_name(pod))))

    # warm-up: first-use allocations (bcc tables, pyroute2, thread pools)
    warm = run_cycles(net, 0, PARALLEL * 2, PARALLEL)
    assert all(a and d for a, d in warm), warm
    assert settle(lambda: obs.threads() <= 12)
    base = {"fds": obs.fds(), "sockets": obs.sockets(), "threads": obs.threads(),
            "rss": obs.rss_kib()}

    t0 = time.monotonic()
    results = run_cycles(net, 1000, CYCLES // 2, PARALLEL, hold)
    mid_rss = obs.rss_kib()
    results += run_cycles(net, 2000, CYCLES - CYCLES // 2, PARALLEL, hold)
    elapsed = time.monotonic() - t0
    assert all(a and d for a, d in results), [r for r in results if r != (True, True)][:5]
    assert len(ok_during) == CYCLES and all(ok_during)

    assert settle(lambda: obs.threads() <= base["threads"]), obs.threads()
    after = {"fds": obs.fds(), "sockets": obs.sockets(), "threads": obs.threads(),
             "rss": obs.rss_kib()}
    record_property("churn", {"cycles": CYCLES, "parallel": PARALLEL,
                              "seconds": round(elapsed, 1), "base": base, "mid_rss": mid_rss,
                              "after": after})
    print(f"churn: {CYCLES} cycles x{PARALLEL} in {elapsed:.1f}s; base {base} "
          f"mid rss {mid_rss} after {after}")
    assert obs.map_entries() == {k: 0 for k in obs.map_entries()}
    assert obs.enrolled() == []
    assert obs.xdp_in_node() == []
    assert net.created == set()
    assert after["fds"] <= base["fds"] and after["sockets"] <= base["sockets"]
    # flat: the allocator's high-water mark settles in the first half; a leak
    # would keep growing through the second
    assert after["rss"] - base["rss"] < RSS_SLACK_KIB, (base, after)
    assert after["rss"] - mid_rss < RSS_SLACK_KIB // 3, (base, mid_rss, after)
    assert env.stop(proc) == 0, env.log(proc)
    assert open(env.primary, "rb").read() == net.original
