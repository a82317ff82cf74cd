"""A pod is never blocked by merbridge, and always ends up enrolled; the plugin needs
nothing from the node.

* The installed plugin (the static build) in a mount namespace whose root holds
  nothing but itself and the daemon's socket serves every CNI command against
  the real daemon.
* kill -9: pods started while no daemon runs pass (failOpen) and are remembered;
  the next daemon replays their ADDs within 5 s, traffic goes through the
  sidecars, and the runtime's DEL withdraws them by their real container id.
* First install: pods that started before any daemon ran (bridge alone) are
  found by their IP in the netns of their processes (``--proc-path``) at the
  first start, and later ones by the reconciler while it runs; counted in
  /metrics and shown by ``merbridge status``; nothing is enrolled twice.
* ``--cni-fail-open=false`` keeps the fail-closed behaviour: code 11, nothing
  remembered.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from daemonenv import MERBRIDGE, Env
from daemonhttp import scrape as metrics_of
from merbridge.lab import netns
from merbridge.lab.lab import Lab
from reliabilityenv import CNITOOL, ChurnNet, wire_bare_pod
from test_daemon_lifecycle import intercepted, ok
from test_daemon_restart import records

pytestmark = pytest.mark.root

ENROL_WITHIN = 5.0


def chained_pod(lab, net, env, name, conf_dir=None):
    """A bare lab pod networked by the chain (cnitool, as a runtime), with a sidecar,
    published with the IPs the chain gave it. ``conf_dir``: another NETCONFPATH."""
    pod = lab.add_bare_pod(name)
    extra = {} if conf_dir is None else {"NETCONFPATH": conf_dir}
    res = subprocess.run(["nsenter", f"--net={env.node_netns}", CNITOOL, "add", net.name,
                          netns.netns_path(pod.ns)],
                         env={**net.node_env(name), "NETCONFPATH": env.conf_dir, **extra,
                              # the uid env.publish gives it
                              "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
                                          f"K8S_POD_NAME={name};K8S_POD_UID=uid-{name}-{lab.name}"},
                         capture_output=True, text=True, timeout=60)
    ok(res)
    wire_bare_pod(pod, env, res.stdout)
    pod.start_app(8080)
    pod.start_sidecar()
    env.publish_pod(pod)
    return pod, res


def wait_for(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def lab_net(pin_dir):
    with Lab("mbt") as lab:
        a = lab.add_pod("a")
        a.start_app(8080)
        a.start_sidecar()
        env = Env(lab, pin_dir, fail_open=True)
        net = ChurnNet(env, tag=lab.name.split("-", 1)[1])
        try:
            env.publish_pod(a)
            yield lab, env, net, a
        finally:
            net.close()
            env.close()


def test_static_plugin_in_an_empty_root(lab_net):
    """The installed plugin, chrooted into a private mount namespace whose root holds
    only itself and a bind mount of the daemon's socket: every command works."""
    lab, env, net, a = lab_net
    proc = env.start()
    installed = os.path.join(env.bin_dir, "merbridge-cni")
    assert open(installed, "rb").read(4) == b"\x7fELF"
    root = tempfile.mkdtemp(prefix="mbt-root-")
    try:
        shutil.copy2(installed, os.path.join(root, "merbridge-cni"))
        open(os.path.join(root, "cni.sock"), "w").close()     # the bind-mount point

        def run(command, pod=None, **kw):
            conf, environ = env._cni_call(command, pod, "", "1.1.0", kw.get("attachments"),
                                          None)
            conf["socketPath"] = "/cni.sock"
            script = (f"mount --bind {env.socket} {root}/cni.sock && "
                      f"ls -A {root} >&2 && exec chroot {root} /merbridge-cni")
            return subprocess.run(["unshare", "--mount", "--propagation", "private",
                                   "sh", "-c", script], input=json.dumps(conf),
                                  env={**environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                  capture_output=True, text=True, timeout=60)

        res = run("VERSION")
        ok(res)
        assert res.stderr.split() == ["cni.sock", "merbridge-cni"]   # nothing else there
        assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]
        ok(run("STATUS"))
        res = run("ADD", a)
        ok(res)
        assert json.loads(res.stdout)["ips"][0]["address"].startswith(a.ip4)
        assert records(env)["a"]["container_id"] == "ctr-a" and env.marker(a)
        ok(run("CHECK", a))
        ok(run("GC", attachments=["ctr-a"]))
        assert "a" in records(env)
        ok(run("DEL", a))
        assert records(env) == {} and env.marker(a) == []
        res = run("CHECK", a)                                    # in the mesh, not enrolled
        assert res.returncode == 1 and json.loads(res.stdout)["code"] == 103
        assert env.stop(proc) == 0, env.log(proc)
    finally:
        shutil.rmtree(root)
    # nothing mounted was left behind by the private namespaces
    assert env.socket not in open("/proc/self/mountinfo").read()


def test_pods_started_while_killed_are_enrolled_from_their_remembered_add(lab_net):
    lab, env, net, a = lab_net
    proc = env.start()
    ok(env.cni("ADD", a))
    assert env.stop(proc, 9) == -9
    # no daemon: the plugin is still chained in; the pod starts anyway
    d, res = chained_pod(lab, net, env, "d")
    assert "passing through (failOpen)" in res.stderr
    pending = os.listdir(os.path.join(env.state_dir, "pending"))
    assert len(pending) == 1 and pending[0].startswith("cnitool-")
    assert env.marker(d) == []
    t0 = time.monotonic()
    proc = env.start()
    ready = time.monotonic()
    assert wait_for(lambda: "d" in records(env) and records(env)["d"]["phase"] == "enrolled",
                    ENROL_WITHIN), env.log(proc)
    print(f"killed: d enrolled {time.monotonic() - ready:.2f} s after ready, "
          f"{time.monotonic() - t0:.2f} s after the daemon started")
    rec = records(env)["d"]
    assert rec["container_id"] == pending[0][:-len(".json")]    # its real container id
    assert os.listdir(os.path.join(env.state_dir, "pending")) == []
    assert env.marker(d) == [hex(rec["key"])] and all(env.xdp(d))
    assert intercepted(d, a) and intercepted(a, d)
    m = metrics_of(env, proc)
    assert m['merbridge_pods_recovered_total{how="replayed"}'] == 1
    assert m["merbridge_pods_pending"] == 0
    # the runtime's DEL knows it by that id
    ok(net.cnitool("del", "d"))
    assert sorted(records(env)) == ["a"] and env.marker(d) == []
    assert env.stop(proc) == 0, env.log(proc)


def test_first_install_finds_running_pods_by_their_processes(lab_net, tmp_path):
    """No daemon ever ran: pods networked by bridge alone are enrolled at the first
    start, found through the netns of their processes (a private --proc-path that
    shows only this lab's pods); a pod started later the same way is found by the
    reconciler; nothing is enrolled twice."""
    lab, env, net, a = lab_net
    proc_dir = tmp_path / "proc"

    def expose(pod):      # <proc>/<pid>/ns/net of the pod's processes, as the node's /proc
        for p in pod.sidecar.procs:
            os.makedirs(proc_dir / str(p.pid) / "ns", exist_ok=True)
            os.symlink(f"/proc/{p.pid}/ns/net", proc_dir / str(p.pid) / "ns" / "net")

    f, _ = chained_pod(lab, net, env, "f")
    g, _ = chained_pod(lab, net, env, "g")
    for pod in (a, f, g):
        expose(pod)
    assert not os.path.exists(env.state_dir)
    t0 = time.monotonic()
    proc = env.start(f"--proc-path={proc_dir}")
    ready = time.monotonic()
    assert wait_for(lambda: sorted(records(env)) == ["a", "f", "g"], ENROL_WITHIN), \
        env.log(proc)
    print(f"first install: a, f, g enrolled {time.monotonic() - ready:.2f} s after ready, "
          f"{time.monotonic() - t0:.2f} s after the daemon started")
    recs = records(env)
    assert all(r["container_id"].startswith("adopted:") and r["phase"] == "enrolled"
               for r in recs.values())
    assert all(r["netns"].startswith(str(proc_dir)) for r in recs.values())
    for pod in (a, f, g):
        assert env.marker(pod) == [hex(recs[pod.name]["key"])] and all(env.xdp(pod))
    assert intercepted(f, g) and intercepted(g, a) and intercepted(a, f)

    # while it runs, a pod the plugin did not see (bridge alone, e.g. before the
    # installer chained us in) is found by the reconciler
    bridge_only = tmp_path / "bridge-only"
    bridge_only.mkdir()
    (bridge_only / "10-net.conflist").write_bytes(net.original)
    h, _ = chained_pod(lab, net, env, "h", conf_dir=str(bridge_only))
    expose(h)
    t1 = time.monotonic()
    assert wait_for(lambda: "h" in records(env), ENROL_WITHIN), env.log(proc)
    print(f"running: h enrolled {time.monotonic() - t1:.2f} s after it started")
    assert intercepted(h, a)
    time.sleep(2.5)                        # more passes: nothing enrolled twice
    recs = records(env)
    assert sorted(recs) == ["a", "f", "g", "h"]
    keys = [r["key"] for r in recs.values()]
    assert len(set(keys)) == 4
    maps = env.maps()
    try:
        assert sorted(k for k, _ in maps.mark_pod_ips.items()) == sorted(keys)
    finally:
        maps.close()
    m = metrics_of(env, proc)
    assert m['merbridge_pods_recovered_total{how="adopted"}'] == 4
    assert m["merbridge_pods_unenrolled"] == 0 and m["merbridge_pods_enrolled"] == 4
    status = subprocess.run([MERBRIDGE, "status", f"--bpffs-path={env.pin_dir}",
                             f"--cgroup-path={lab.cgroup}", f"--state-dir={env.state_dir}"],
                            capture_output=True, text=True, timeout=60)
    assert "reconciled:" in status.stdout and "4 adopted" in status.stdout, status.stdout
    assert env.stop(proc) == 0, env.log(proc)


def test_fail_closed_keeps_code_11(pin_dir):
    with Lab("mbt") as lab:
        env = Env(lab, pin_dir, fail_open=False)
        net = ChurnNet(env, tag=lab.name.split("-", 1)[1])
        try:
            proc = env.start()
            entry = [p for p in json.load(open(env.primary))["plugins"]
                     if p["type"] == "merbridge-cni"][0]
            assert entry["failOpen"] is False
            assert env.stop(proc, 9) == -9
            pod = lab.add_bare_pod("x")
            res = net.cnitool("add", "x")
            assert res.returncode != 0 and "try again later" in res.stderr
            assert not os.path.exists(os.path.join(env.state_dir, "pending")) or \
                os.listdir(os.path.join(env.state_dir, "pending")) == []
            ok(net.cnitool("del", "x"))
            assert pod.ns
        finally:
            net.close()
            env.close()
