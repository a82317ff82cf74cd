"""Daemon restarts: CNI commands racing the restore, and pods that started while
no daemon ran.

1. After kill -9 the runtime's DEL of one pod and ADD of a new one are in
   flight while the restarted daemon restores its state file (the CNI socket
   serves before the restore is over). Whatever the interleaving, the kernel
   and the daemon's records agree afterwards: nothing of the deleted container
   is left (marker listener, XDP, map entries, record), the new pod is whole
   and intercepted.
2. A clean SIGTERM takes our plugin out of the CNI config, so a pod created
   while the daemon is down is networked by the bridge chain alone and its ADD
   never reaches us. The next daemon finds its netns by pod IP and enrols it
   like an ADD would; the runtime's later DEL (with a container id the daemon
   never saw) withdraws it.
"""
from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemonenv import Env, PendingCni
from merbridge.lab import netns
from merbridge.lab.lab import Lab
from reliabilityenv import ChurnNet, Observer, wire_bare_pod
from test_daemon_lifecycle import intercepted, ok
from test_reliability_crash import map_view

pytestmark = pytest.mark.root

#: enrolled before the crash; the restore walks them in this order (by container id)
RESTORED = "abcdef"


def records(env) -> dict[str, dict]:
    with open(f"{env.state_dir}/enrolled.json") as f:
        return {r["name"]: r for r in json.load(f)["containers"]}


def serving(env, proc, timeout: float = 120) -> None:
    """Wait until the daemon's CNI socket accepts a connection (the stale socket
    of a killed daemon refuses them)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(env.socket)
            return
        except OSError:
            pass
        finally:
            probe.close()
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"daemon not serving (rc={proc.poll()}):\n{env.log(proc)}")
        time.sleep(0.001)


@pytest.fixture
def race_pods(pin_dir):
    with Lab("mbt") as lab:
        pods = {n: lab.add_pod(n) for n in RESTORED + "x"}
        for name in "ax":
            pods[name].start_app(8080)
            pods[name].start_sidecar()
        env = Env(lab, pin_dir)
        try:
            for pod in pods.values():
                env.publish_pod(pod)
            yield env, pods
        finally:
            env.close()


def test_del_and_add_racing_the_restore_after_kill_9(race_pods):
    env, pods = race_pods
    gone, new = pods[RESTORED[-1]], pods["x"]     # gone: the last record restored
    proc = env.start()
    for name in RESTORED:
        ok(env.cni("ADD", pods[name]))
    assert env.stop(proc, signal.SIGKILL) == -signal.SIGKILL

    pending = [env.cni_pending("DEL", gone), env.cni_pending("ADD", new)]
    try:
        proc2 = env.start(wait=False)
        serving(env, proc2)
        # in flight while the daemon starts: the restore runs from here on
        assert "merbridge ready" not in env.log(proc2)
        with ThreadPoolExecutor(2) as pool:
            deleted, added = pool.map(PendingCni.go, pending)
    finally:
        for p in pending:
            p.kill()
    env.wait_ready(proc2)
    ok(deleted)
    if added.returncode != 0:        # code 11 only; then the runtime retries
        assert json.loads(added.stdout)["code"] == 11, added.stdout
        ok(env.cni("ADD", new))

    # the deleted container: nothing left, in the kernel or in the records
    live = [n for n in RESTORED if pods[n] is not gone] + ["x"]
    assert sorted(records(env)) == sorted(live)
    assert Observer(env, proc2.pid).enrolled() == sorted(live)
    assert env.marker(gone) == []                 # no listener (fd) kept in its netns
    assert env.xdp(gone) == (0, 0)
    marks, local, cached = map_view(env)
    assert marks == sorted(pods[n].ip4 for n in live) and cached == marks
    assert local == sorted(ip for n in live for ip in pods[n].ips())
    # the added pod and the restored ones: whole, and intercepted
    keys = {n: r["key"] for n, r in records(env).items()}
    for name in live:
        assert env.marker(pods[name]) == [hex(keys[name])], name
        assert all(env.xdp(pods[name])), name
    ok(env.cni("CHECK", new))
    assert intercepted(new, pods["a"]) and intercepted(pods["a"], new)
    assert env.stop(proc2) == 0, env.log(proc2)


def test_pod_started_while_stopped_is_enrolled_at_start(pin_dir):
    with Lab("mbt") as lab:
        a = lab.add_pod("a")
        a.start_app(8080)
        a.start_sidecar()
        env = Env(lab, pin_dir)
        # the node's primary network (bridge + host-local), named as the lab so
        # that its cnitool networks the lab's pod namespaces
        net = ChurnNet(env, tag=lab.name.split("-", 1)[1])
        try:
            env.publish_pod(a)
            proc = env.start()
            ok(env.cni("ADD", a))
            assert env.stop(proc) == 0, env.log(proc)
            assert open(env.primary, "rb").read() == net.original   # no merbridge-cni

            # while no daemon runs: a pod networked by the bridge chain alone
            d = lab.add_bare_pod("d")
            res = net.cnitool("add", "d")
            ok(res)
            wire_bare_pod(d, env, res.stdout)
            d.start_sidecar()
            env.publish_pod(d)
            assert env.marker(d) == [] and env.xdp(d) == (0, 0)

            proc2 = env.start(f"--netns-dir={netns.NETNS_DIR}")
            recs = records(env)
            assert sorted(recs) == ["a", "d"]
            rec = recs["d"]
            assert (rec["netns"], rec["ifname"], rec["phase"]) == (
                netns.netns_path(d.ns), "eth0", "enrolled")
            assert env.marker(d) == [hex(rec["key"])]
            ingress, egress = env.xdp(d)
            assert ingress and egress
            marks, local, cached = map_view(env)
            assert marks == sorted([a.ip4, d.ip4]) and cached == marks
            assert local == sorted([a.ip4, a.ip6, d.ip4, d.ip6])
            # its outbound traffic goes through its sidecar, which sees the
            # original destination
            n_out = len(d.sidecar.entries())
            assert intercepted(d, a)
            assert [(e["dst"], e["dport"]) for e in d.sidecar.entries(n_out)
                    if e["dir"] == "outbound"] == [(a.ip4, 8080)]

            # the runtime's DEL (its container id is new to the daemon) withdraws it
            ok(net.cnitool("del", "d"))
            assert sorted(records(env)) == ["a"]
            assert env.marker(d) == []
            assert map_view(env) == ([a.ip4], sorted([a.ip4, a.ip6]), [a.ip4])
            assert env.stop(proc2) == 0, env.log(proc2)
        finally:
            net.close()
            env.close()
