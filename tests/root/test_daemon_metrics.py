"""A real daemon's /metrics (scraped over HTTP in the node netns): enrolled pods,
CNI requests by command and result, map occupancy equal to what bpftool reads
from the pinned maps, and errors by the module that logged them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import daemonhttp
from daemonenv import Env
from merbridge.bpf import types as t
from merbridge.daemon import metrics
from merbridge.lab import netns
from merbridge.lab.lab import Lab
from test_daemon_lifecycle import ok

pytestmark = pytest.mark.root

#: maps whose contents only the daemon changes (the LRU ones also learn from traffic)
DAEMON_MAPS = (t.MAP_LOCAL_PODS, t.MAP_MARK_POD_IPS, t.MAP_NETNS_POD, t.MAP_SETTINGS,
               t.MAP_COUNTERS)


def bpftool(env: Env, name: str) -> tuple[int, int]:
    """(entries, max_entries) of a pinned map, as bpftool sees it."""
    path = os.path.join(env.pin_dir, name)
    show = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                                     capture_output=True, text=True, check=True).stdout)
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned", path],
                                     capture_output=True, text=True, check=True).stdout)
    return len(dump), show["max_entries"]


def until(pred, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def assert_occupancy(env: Env, m: dict[str, float]) -> None:
    for name in DAEMON_MAPS:
        entries, capacity = bpftool(env, name)
        assert m[f'merbridge_map_entries{{map="{name}"}}'] == entries, name
        assert m[f'merbridge_map_capacity{{map="{name}"}}'] == capacity, name
    # every map the daemon owns is there (the sockhash has no typed handle)
    assert {k for k in m if k.startswith("merbridge_map_capacity")} == {
        f'merbridge_map_capacity{{map="{n}"}}' for n in t.ALL_MAPS if n not in t.SOCKET_MAPS}


def counted(env: Env, proc) -> dict[str, float]:
    """A scrape whose map counts have caught up with the maps: the daemon
    counts map entries in the background, at most every MAP_COUNT_MAX_AGE
    seconds, never inside a scrape."""
    def matches() -> bool:
        m = daemonhttp.scrape(env, proc)
        return all(m.get(f'merbridge_map_entries{{map="{n}"}}') == bpftool(env, n)[0]
                   for n in DAEMON_MAPS)
    until(matches, "map counts never caught up", timeout=3 * metrics.MAP_COUNT_MAX_AGE)
    return daemonhttp.scrape(env, proc)


def test_cni_mode_metrics(two_pods):
    env, a, b = two_pods
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    ok(env.cni("CHECK", a))
    ok(env.cni("DEL", b))
    assert env.cni("CHECK", b).returncode != 0          # in the mesh but not enrolled
    ok(env.cni("GC", attachments=["ctr-a"]))
    m = counted(env, proc)
    assert m["merbridge_pods_enrolled"] == 1
    req = 'merbridge_cni_requests_total{{command="{}",result="{}"}}'
    assert m[req.format("ADD", "ok")] == 2
    assert m[req.format("CHECK", "ok")] == 1 and m[req.format("CHECK", "error")] == 1
    assert m[req.format("DEL", "ok")] == 1
    assert m[req.format("GC", "ok")] == 1
    assert m[req.format("STATUS", "ok")] >= 1           # env.start() waited with STATUS
    assert m['merbridge_cni_request_duration_seconds_count{command="ADD"}'] == 2
    assert m['merbridge_map_entries{map="mb_local_pods"}'] == 2     # a's IPv4 and IPv6
    assert m['merbridge_map_entries{map="mb_mark_pod_ips"}'] == 1
    assert_occupancy(env, m)
    assert not [k for k in m if k.startswith("merbridge_errors_total")]
    # an enrolled pod's annotations go bad: logged as an error, counted by module
    env.publish_pod(a, {"traffic.sidecar.istio.io/includeInboundPorts": "not-a-port"})
    until(lambda: daemonhttp.scrape(env, proc).get('merbridge_errors_total{kind="pods"}') == 1,
          f"no error counted:\n{env.log(proc)}")
    assert env.stop(proc) == 0


def test_legacy_mode_counts_the_pods_it_writes(pin_dir):
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        env = Env(lab, pin_dir, cni_mode=False)
        try:
            env.publish_pod(a)
            env.publish_pod(b)
            proc = env.start()
            m = counted(env, proc)
            assert m["merbridge_pods_enrolled"] == 2
            assert m['merbridge_map_entries{map="mb_local_pods"}'] == 4
            assert_occupancy(env, m)
            env.unpublish(b.name)
            until(lambda: daemonhttp.scrape(env, proc)["merbridge_pods_enrolled"] == 1,
                  "pods_enrolled did not follow the pod source")
            m = counted(env, proc)
            assert m['merbridge_map_entries{map="mb_local_pods"}'] == 2
            assert not [k for k in m if k.startswith("merbridge_cni_requests_total")]
            assert env.stop(proc) == 0
        finally:
            env.close()


# Opens n TCP connections to the metrics port and sends nothing; prints
# "open" when all are made, then holds them until stdin closes.
IDLE = """\
import resource, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
socks = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
    except OSError:
        pass
    socks.append(s)
print("open", flush=True)
sys.stdin.read()
"""


def test_idle_connections_leave_adds_and_scrapes_answered(two_pods):
    """1,000 idle connections to the metrics port (any pod could make them:
    the endpoint is on the node's loopback only in the manifests, but a
    flag can change that): CNI ADDs and scrapes are still answered, and the
    daemon's threads stay bounded (metrics.MAX_CONNECTIONS connections at
    once, each with a deadline)."""
    env, a, b = two_pods
    proc = env.start()
    base = len(os.listdir(f"/proc/{proc.pid}/task"))
    host, port = re.search(r"metrics and health on ([\d.]+):(\d+)", env.log(proc)).groups()
    idle = netns.spawn([sys.executable, "-c", IDLE, host, port, "1000"], ns=env.lab.nodes[0].ns,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline().strip() == "open"
        peak = 0
        for pod in (a, b):
            t0 = time.monotonic()
            ok(env.cni("ADD", pod))
            assert time.monotonic() - t0 < 10
            m = daemonhttp.scrape(env, proc)
            assert m['merbridge_cni_requests_total{command="ADD",result="ok"}'] >= 1
            peak = max(peak, len(os.listdir(f"/proc/{proc.pid}/task")))
        assert peak - base <= 2 * metrics.MAX_CONNECTIONS + 4, (base, peak)
        status, _ = daemonhttp.get(env, proc, "/readyz")
        assert status == 200
    finally:
        idle.stdin.close()
        idle.wait(timeout=30)
        idle.stdout.close()
    assert env.stop(proc) == 0


def test_empty_metrics_addr_disables_the_endpoint(two_pods):
    """`--metrics-addr ''` (documented as "disables") starts a daemon with no
    metrics or health listener at all; CNI requests are served as ever."""
    env, a, _ = two_pods
    before = netns.listening(env.lab.nodes[0].ns)
    proc = env.start("--metrics-addr=")
    assert "metrics and health endpoint disabled" in env.log(proc)
    assert "metrics and health on" not in env.log(proc)
    assert netns.listening(env.lab.nodes[0].ns) == before
    ok(env.cni("ADD", a))
    assert env.stop(proc) == 0
