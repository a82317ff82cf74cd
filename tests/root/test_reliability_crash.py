"""Crashes: kill -9 of the daemon (alone and in the middle of churn), DEL while
it is down, a simulated node reboot, and the uninstall that follows.

What is asserted is what the kernel, the file system and real traffic show:
pods that keep running stay intercepted by their haproxy sidecars *while the
daemon is down* and after it is back (the connect programs find them through
mb_netns_pod, written at ADD); programs are attached once, never twice;
leftovers of containers deleted meanwhile are gone after the restart; a
SIGTERM after all that leaves zero programs and pins and the CNI config
byte-identical to before install.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemonenv import Env
from merbridge.bpf import loader
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import Lab
from reliabilityenv import ChurnNet, Observer
from test_daemon_lifecycle import intercepted, ok

pytestmark = pytest.mark.root


@pytest.fixture
def three_pods(pin_dir):
    with Lab("mbt") as lab:
        pods = [lab.add_pod(n) for n in ("a", "b", "c")]
        for pod in pods:
            pod.start_app(8080)
            pod.start_sidecar()
        env = Env(lab, pin_dir, fail_open=True)   # the default of --cni-fail-open
        net = ChurnNet(env)           # a real bridge+host-local primary conflist
        try:
            for pod in pods:
                env.publish_pod(pod)
            yield env, net, pods
        finally:
            net.close()
            env.close()


def map_view(env):
    maps = env.maps()
    try:
        return (sorted(ip for _, ip in maps.mark_pod_ips.items()),
                sorted(ip for ip, _ in maps.local_pods.items()),
                sorted(ip for _, ip, _ in maps.netns_pod.items()))
    finally:
        maps.close()


def assert_uninstalled(env, net, src, dst):
    assert env.attached() == []
    assert not os.path.exists(env.pin_dir) or os.listdir(env.pin_dir) == []
    assert open(env.primary, "rb").read() == net.original
    assert sorted(os.listdir(env.conf_dir)) == [os.path.basename(env.primary)]
    assert not os.path.exists(os.path.join(env.bin_dir, "merbridge-cni"))
    r = src.connect(dst.ip4, 8080)                     # traffic flows directly
    assert r.ok and r.peer[0] == src.ip4


def test_kill_9_del_while_down_restart_and_uninstall(three_pods):
    env, net, (a, b, c) = three_pods
    proc = env.start()
    for pod in (a, b, c):
        ok(env.cni("ADD", pod))
    assert intercepted(a, b) and intercepted(b, c)
    n_attached = len(env.attached())

    assert env.stop(proc, signal.SIGKILL) == -signal.SIGKILL
    # down: the marker listeners died with the daemon, the pods are still intercepted
    assert env.marker(a) == [] and env.marker(b) == []
    assert intercepted(a, b) and intercepted(b, c) and intercepted(c, a)
    # the runtime deletes a meanwhile: DEL succeeds, the sandbox and the pod go
    ok(env.cni("DEL", a))
    labns.remove_netns(a.ns)
    env.unpublish(a.name)

    proc2 = env.start()
    assert len(env.attached()) == n_attached             # replaced, not attached twice
    assert Observer(env, proc2.pid).enrolled() == ["b", "c"]
    marks, local, cached = map_view(env)
    assert marks == sorted([b.ip4, c.ip4]) and cached == marks
    assert local == sorted([b.ip4, b.ip6, c.ip4, c.ip6])
    assert intercepted(b, c) and intercepted(c, b)
    ok(env.cni("CHECK", b))

    assert env.stop(proc2) == 0, env.log(proc2)
    assert_uninstalled(env, net, b, c)


def test_node_reboot_rebuilds_from_the_pod_source(three_pods):
    env, net, (a, b, c) = three_pods
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    n_attached = len(env.attached())
    env.stop(proc, signal.SIGKILL)
    # the reboot: programs, pins and tc/XDP attachments gone; the pods and the
    # daemon's state dir (a hostPath) are there when it comes back
    loader.detach_cgroup(env.lab.cgroup)
    loader.remove_pins(env.pin_dir, rmdir=True)
    for pod in (a, b):
        netns.detach_xdp(labns.netns_path(pod.ns), "eth0", peer_netns=env.node_netns)
        netns.detach_tc(labns.netns_path(pod.ns), "eth0", peer_netns=env.node_netns)
    assert env.attached() == [] and env.xdp(a) == (0, 0)

    proc2 = env.start()
    assert len(env.attached()) == n_attached
    for pod in (a, b):
        assert env.marker(pod) and all(env.xdp(pod))
        ok(env.cni("CHECK", pod))
    assert map_view(env)[0] == sorted([a.ip4, b.ip4])
    assert intercepted(a, b) and intercepted(b, a)
    assert env.stop(proc2) == 0
    assert_uninstalled(env, net, a, b)


def test_kill_9_in_the_middle_of_churn(three_pods):
    env, net, (a, b, c) = three_pods
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    n_attached = len(env.attached())
    results, stop, done = [], threading.Event(), threading.Semaphore(0)

    def one(i):
        try:
            return net.cycle(net.pod_name(i), retry_for=60)
        finally:
            done.release()

    def churn():
        with ThreadPoolExecutor(10) as pool:
            results.extend(pool.map(one, range(120)))
        stop.set()

    worker = threading.Thread(target=churn)
    worker.start()
    survived = 0
    try:
        # the kill lands mid-churn by count, not by a guess of how long ADDs take
        for _ in range(10):
            assert done.acquire(timeout=120)
        assert not stop.is_set()
        assert env.stop(proc, signal.SIGKILL) == -signal.SIGKILL
        survived += 1
        assert intercepted(a, b) and intercepted(b, a)     # while down, mid-churn
        time.sleep(1.0)
        proc = env.start()
        assert len(env.attached()) == n_attached
        assert intercepted(a, b)
    finally:
        worker.join(timeout=300)
    assert stop.is_set()
    # every DEL succeeded, even while down; every ADD at once: none was refused,
    # those while no daemon answered passed through (failOpen) and were remembered
    assert all(d for _, d in results), results
    assert all(a_ for a_, _ in results), (results, getattr(net, "last_refusal", None))
    print(f"churn with kill -9: {len(results)} pods, {net.refused} ADD attempts refused, "
          f"{net.passed_open} passed while down, {survived} crash survived")
    assert net.refused == 0
    assert net.passed_open > 0                             # the crash did hit the churn
    obs = Observer(env, proc.pid)
    # all leftovers of the churn pods are gone; a and b are whole
    deadline = time.monotonic() + 10
    while obs.enrolled() != ["a", "b"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert obs.enrolled() == ["a", "b"]
    marks, local, cached = map_view(env)
    assert marks == sorted([a.ip4, b.ip4]) and cached == marks
    assert local == sorted([a.ip4, a.ip6, b.ip4, b.ip6])
    assert sorted(obs.xdp_in_node()) == sorted([a.host_if, b.host_if])
    assert intercepted(a, b) and intercepted(b, a)
    assert env.stop(proc) == 0
    assert_uninstalled(env, net, a, b)
