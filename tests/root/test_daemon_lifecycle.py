"""The daemon's life: clean shutdown, kill -9 and restart, a second daemon,
and legacy mode following the pod source.

Each test starts its own ``merbridge run`` (daemonenv.py) on private paths in a
fresh lab; what is asserted is what the kernel and the file system show.
"""
import json
import os
import signal
import subprocess
import time

import pytest

import daemonhttp
from daemonenv import MERBRIDGE, Env
from merbridge.lab import netns
from merbridge.lab.lab import Lab

pytestmark = pytest.mark.root


def intercepted(src, dst) -> bool:
    """Did src-app -> dst:8080 pass src's outbound and dst's inbound sidecar?"""
    n_out, n_in = len(src.sidecar.entries()), len(dst.sidecar.entries())
    r = src.connect(dst.ip4, 8080)
    assert r.ok, r.error
    out = src.sidecar.wait_entries(since=n_out, dir="outbound", timeout=2)
    inb = dst.sidecar.wait_entries(since=n_in, dir="inbound", timeout=2)
    return bool(out) and bool(inb) and r.peer[0] == "127.0.0.6"


def ok(res):
    assert res.returncode == 0, f"rc={res.returncode} out={res.stdout} err={res.stderr}"


def test_sigterm_leaves_nothing_behind(two_pods):
    env, a, b = two_pods
    primary = open(env.primary, "rb").read()
    proc = env.start()
    conf = json.load(open(env.primary))
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "merbridge-cni"]
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    assert intercepted(a, b)
    assert env.attached()
    assert env.stop(proc) == 0, env.log(proc)
    assert env.attached() == []                              # no program on the cgroup
    assert not os.path.exists(env.pin_dir) or os.listdir(env.pin_dir) == []
    assert open(env.primary, "rb").read() == primary         # conflist byte-identical
    assert sorted(os.listdir(env.conf_dir)) == [os.path.basename(env.primary)]
    assert not os.path.exists(os.path.join(env.bin_dir, "merbridge-cni"))
    assert not os.path.exists(env.socket)
    for pod in (a, b):
        assert env.marker(pod) == []
        assert env.xdp(pod) == (0, 0)
    # traffic flows as without us: b's app sees a itself
    r = a.connect(b.ip4, 8080)
    assert r.ok and r.peer[0] == a.ip4


def test_kill_9_and_restart_keeps_pods_intercepted(two_pods):
    env, a, b = two_pods
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    keys = {r["name"]: r["key"] for r in
            json.load(open(f"{env.state_dir}/enrolled.json"))["containers"]}
    n_attached = len(env.attached())
    assert env.stop(proc, signal.SIGKILL) == -signal.SIGKILL
    # the kernel keeps programs, pins and XDP; only the marker sockets died
    assert len(env.attached()) == n_attached
    assert all(env.xdp(p) != (0, 0) for p in (a, b))
    assert env.marker(a) == []
    proc2 = env.start()
    assert len(env.attached()) == n_attached                 # replaced, not added twice
    for pod in (a, b):
        assert set(env.marker(pod)) == {hex(keys[pod.name])}
        ingress, egress = env.xdp(pod)
        assert ingress and egress
    ok(env.cni("CHECK", a))
    assert intercepted(a, b) and intercepted(b, a)
    # DEL after the restart uses the key ADD chose before it
    ok(env.cni("DEL", a))
    maps = env.maps()
    try:
        assert keys["a"] not in dict(maps.mark_pod_ips.items())
        assert keys["b"] in dict(maps.mark_pod_ips.items())
    finally:
        maps.close()
    assert env.stop(proc2) == 0


def test_restart_drops_pods_that_went_away_meanwhile(two_pods):
    env, a, b = two_pods
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    env.stop(proc, signal.SIGKILL)
    netns.remove_netns(a.ns)                 # a's sandbox is gone (the lab tolerates it)
    proc2 = env.start()
    state = json.load(open(f"{env.state_dir}/enrolled.json"))
    assert [r["name"] for r in state["containers"]] == ["b"]
    maps = env.maps()
    try:
        assert sorted(ip for ip, _ in maps.local_pods.items()) == sorted([b.ip4, b.ip6])
        assert [ip for _, ip in maps.mark_pod_ips.items()] == [b.ip4]
    finally:
        maps.close()
    env.stop(proc2)


def test_a_second_daemon_on_the_same_pins_refuses(two_pods):
    env, a, b = two_pods
    proc = env.start()
    attached = sorted(x.name for x in env.attached())
    # its own state dir (and socket): only the pin dir lock, on the real bpffs, can refuse it
    own = os.path.join(env.root, "state-2")
    second = env.start(f"--state-dir={own}", f"--socket-path={env.root}/cni-2.sock", wait=False)
    rc = second.wait(timeout=60)
    assert rc != 0
    log = env.log(second)
    assert f"another merbridge daemon is running with pin dir {env.pin_dir}" in log, log
    assert proc.poll() is None
    assert sorted(x.name for x in env.attached()) == attached      # nothing attached twice
    assert not os.path.exists(f"{env.root}/cni-2.sock")
    ok(env.cni("ADD", a))                                    # the first still works
    assert env.stop(proc) == 0


def test_drain_removes_the_plugin_for_good_while_the_daemon_runs(two_pods):
    env, a, b = two_pods
    primary = open(env.primary, "rb").read()
    proc = env.start()
    for pod in (a, b):
        ok(env.cni("ADD", pod))
    assert b"merbridge-cni" in open(env.primary, "rb").read()
    assert daemonhttp.get(env, proc, "/readyz")[0] == 200
    res = subprocess.run([MERBRIDGE, "drain", f"--socket-path={env.socket}", "--timeout=20"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "merbridge drained" in res.stdout
    # done when drain returns, with the daemon still running
    assert proc.poll() is None
    assert open(env.primary, "rb").read() == primary                # byte for byte
    assert sorted(os.listdir(env.conf_dir)) == [os.path.basename(env.primary)]
    assert not os.path.exists(os.path.join(env.bin_dir, "merbridge-cni"))
    # the primary CNI rewrites its config: the installer would have reacted in
    # milliseconds (inotify); after a drain nothing chains the plugin in again
    with open(env.primary, "wb") as f:
        f.write(primary)
    time.sleep(3)
    assert open(env.primary, "rb").read() == primary
    assert not os.path.exists(os.path.join(env.bin_dir, "merbridge-cni"))
    assert daemonhttp.get(env, proc, "/readyz") == (503, "not ready\n")
    assert intercepted(a, b)                    # pods already enrolled: until SIGTERM
    again = subprocess.run([MERBRIDGE, "drain", f"--socket-path={env.socket}"],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "already drained" in again.stdout
    assert env.stop(proc) == 0, env.log(proc)
    assert "shutdown: failed" not in env.log(proc)
    assert env.attached() == []
    assert not os.path.exists(env.pin_dir) or os.listdir(env.pin_dir) == []
    assert open(env.primary, "rb").read() == primary
    assert not os.path.exists(env.socket)
    for pod in (a, b):
        assert env.marker(pod) == [] and env.xdp(pod) == (0, 0)
    # after the daemon is gone, drain has nothing to do (a preStop never fails)
    gone = subprocess.run([MERBRIDGE, "drain", f"--socket-path={env.socket}"],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 0 and "nothing to drain" in gone.stdout


def test_legacy_mode_follows_the_pod_source(pin_dir):
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        for pod in (a, b):
            pod.start_app(8080)
            pod.start_sidecar()
        env = Env(lab, pin_dir, cni_mode=False)
        try:
            env.publish_pod(a)
            env.publish_pod(b)
            proc = env.start()

            def local_pods():
                maps = env.maps()
                try:
                    return dict(maps.local_pods.items())
                finally:
                    maps.close()

            def until(pred, timeout=10):
                deadline = time.monotonic() + timeout
                while not pred():
                    assert time.monotonic() < deadline, local_pods()
                    time.sleep(0.1)

            assert set(local_pods()) == {a.ip4, a.ip6, b.ip4, b.ip6}
            assert intercepted(a, b)
            assert os.listdir(env.conf_dir) == [os.path.basename(env.primary)]
            env.publish_pod(b, {"traffic.sidecar.istio.io/includeInboundPorts": "9999"})
            until(lambda: local_pods().get(b.ip4) is not None
                  and local_pods()[b.ip4].include_inbound_ports == frozenset({9999}))
            r = a.connect(b.ip4, 8080)                       # 8080 no longer captured inbound
            assert r.ok and r.peer[0] == a.ip4
            env.unpublish(b.name)
            until(lambda: set(local_pods()) == {a.ip4, a.ip6})
            assert env.stop(proc) == 0
            assert env.attached() == []
        finally:
            env.close()
