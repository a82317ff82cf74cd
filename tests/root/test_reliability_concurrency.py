"""Concurrency: the same container ADDed twice at once, DEL racing ADD, and
(in test_daemon_lifecycle) two daemons on one pin dir.

Driven through the installed plugin processes against a real daemon; after
each race the kernel must agree with the daemon's record: a container is
either wholly enrolled (one marker with its key, one map entry, XDP on both
veth ends, CHECK passes) or wholly absent.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemonenv import Env
from merbridge.lab.lab import Lab

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(make_bpffs):
    with make_bpffs() as bpffs, Lab("mbt") as lab:
        a = lab.add_pod("a")
        env = Env(lab, bpffs)
        try:
            env.publish_pod(a)
            proc = env.start()
            yield env, proc, a
        finally:
            env.close()


def state(env, pod):
    """('enrolled', key) or ('absent', None), after checking the kernel agrees."""
    recs = [r for r in json.load(open(os.path.join(env.state_dir, "enrolled.json")))
            ["containers"] if r["name"] == pod.name]
    maps = env.maps()
    try:
        marks = {k: ip for k, ip in maps.mark_pod_ips.items() if ip == pod.ip4}
        local = {ip for ip, _ in maps.local_pods.items()} & {pod.ip4, pod.ip6}
    finally:
        maps.close()
    if not recs:
        assert marks == {} and local == set()
        assert env.marker(pod) == [] and env.xdp(pod) == (0, 0)
        return "absent", None
    assert len(recs) == 1 and recs[0]["phase"] == "enrolled"
    key = recs[0]["key"]
    assert marks == {key: pod.ip4} and local == {pod.ip4, pod.ip6}
    assert env.marker(pod) == [hex(key)]
    assert all(env.xdp(pod))
    assert env.cni("CHECK", pod).returncode == 0
    return "enrolled", key


def test_same_container_added_twice_at_once(world):
    env, proc, a = world
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: env.cni("ADD", a), range(4)))
        assert all(r.returncode == 0 for r in results), results
        assert state(env, a)[0] == "enrolled"
        assert env.cni("DEL", a).returncode == 0
        assert state(env, a) == ("absent", None)


def test_del_racing_add(world):
    env, proc, a = world
    outcomes = set()
    for i in range(6):
        with ThreadPoolExecutor(2) as pool:
            add = pool.submit(env.cni, "ADD", a)
            delete = pool.submit(env.cni, "DEL", a)
            assert delete.result().returncode == 0
            add_rc = add.result().returncode
        now = state(env, a)              # consistent, whichever won
        outcomes.add(now[0])
        if now[0] == "enrolled":
            assert add_rc == 0
        assert env.cni("DEL", a).returncode == 0
        assert state(env, a) == ("absent", None)
    assert proc.poll() is None


def test_repeated_add_keeps_its_key(world):
    """A repeated ADD (a runtime retry) repairs in place: the same key, one entry."""
    env, proc, a = world
    assert env.cni("ADD", a).returncode == 0
    _, key = state(env, a)
    assert env.cni("ADD", a).returncode == 0          # idempotent: the same key
    assert state(env, a) == ("enrolled", key)
    assert env.cni("DEL", a).returncode == 0
