"""Ambient mode end to end: pods join and leave the mesh by label, with no
restart and no CNI call, and their traffic goes to the node's ztunnel.

(Over 450 lines: one module-scoped topology -- ztunnel stand-in, datapath,
pods -- serves every case; split files would each build it again.)

Topology (one lab node, datapath attached to the lab's cgroup, CNI mode and
ambient on): a ztunnel stand-in in its own netns with its own address
(haproxy for IPv4 and the lab's sidecar6.py for IPv6, both reading
SO_ORIGINAL_DST; listening on :15001 and :15006), ambient pods whose
processes run in kubelet-like cgroups (``<pod cgroup>/pod<uid>/<container>``),
a pod that opts out, a sidecar pod with its sidecar, and a host process in
the node netns in a non-pod cgroup. The daemon side is the real
``AmbientController`` with its process watcher; label flips are pod and
namespace events given to it while everything keeps running.
"""
import contextlib
import json
import os
import subprocess
import time
import uuid

import pytest

from merbridge.bpf import loader
from merbridge.bpf import types as bpft
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns, procwatch
from merbridge.lab import labconfig, netns as labns
from merbridge.lab.cgroups import remove_cgroup
from merbridge.daemon.ambient import DATAPLANE_MODE, AmbientController
from merbridge.lab.lab import PYTHON, Lab

pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
APP = 8080


def ztunnel_cfg(ip4: str) -> str:
    return f"""\
global
{labconfig.HAPROXY_GLOBAL}    log stdout format raw local0
defaults
    mode tcp
    log global
    option logasap
    log-format "{labconfig.LOG_FORMAT}"
    timeout connect 3s
    timeout client 30s
    timeout server 30s
frontend outbound4
    bind {ip4}:15001
    tcp-request connection reject if {{ dst_port 15001 }}
    default_backend orig
frontend inbound4
    bind {ip4}:15006
    tcp-request connection reject if {{ dst_port 15006 }}
    default_backend orig
backend orig
    server orig 0.0.0.0:0
"""


def pod_dict(name, ns, uid, ips, labels=None, sidecar=False, app=None):
    labels = dict(labels or {})
    if app:
        labels["app"] = app
    containers = [{"name": "app"}] + ([{"name": "istio-proxy"}] if sidecar else [])
    notes = {"sidecar.istio.io/status": "{}"} if sidecar else {}
    return {"metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                         "annotations": notes},
            "spec": {"containers": containers},
            "status": {"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}


def namespace(name, labels=None):
    return {"metadata": {"name": name, "labels": dict(labels or {})}}


def connect(ns, cgroup, dst, port=APP, timeout=5.0):
    """One client connection from netns+cgroup; (ok, reply dict, peer the app saw)."""
    res = labns.run([PYTHON, "-I", "-c", labconfig.CLIENT, dst, str(port), "hi", str(timeout)],
                    ns=ns, cgroup=cgroup, timeout=timeout + 10)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return False, {"error": res.stderr}, None
    reply = out.get("reply") or {}
    return out["ok"], out, (reply.get("peer") or [None])[0]


class World:
    def __init__(self, lab, dp, ctl, zt, zlog, pods, host_cg, cgroups):
        self.lab, self.dp, self.ctl, self.zt, self.zlog = lab, dp, ctl, zt, zlog
        self.pods, self.host_cg, self.cgroups = pods, host_cg, cgroups

    def zentries(self, since=0):
        with open(self.zlog, errors="replace") as f:
            return [e for e in map(labconfig.parse_log_line, f) if e][since:]

    def zwait(self, since, count=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.zentries(since)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.zentries(since)

    def client(self, name, dst, port=APP, container="app"):
        pod, _uid, cg = self.pods[name]
        return connect(pod.ns, os.path.join(cg, container), dst, port)


@contextlib.contextmanager
def world(bpffs):
    pin_dir = os.path.join(bpffs, "merbridge")
    closers = []
    with Lab("mbt") as lab:
        made: list[str] = []        # cgroups we create inside the lab's pod cgroups
        procs: list[subprocess.Popen] = []
        try:
            def kube_cgroup(pod, uid, containers=("app",)):
                # kubelet's cgroupfs layout: .../pod<uid>/<container>
                base = os.path.join(pod.cgroup, f"pod{uid}")
                os.mkdir(base)
                made.append(base)
                for c in containers:
                    os.mkdir(os.path.join(base, c))
                return base

            zt = lab.add_pod("zt")
            names = ("a1", "a2", "n1", "s1")
            pods = {}
            for name in names:
                p = lab.add_pod(name)
                uid = str(uuid.uuid4())
                pods[name] = (p, uid, kube_cgroup(p, uid))
                p.start_app(APP)
            zuid = str(uuid.uuid4())
            zcg = kube_cgroup(zt, zuid, ("ztunnel",))
            zlog = os.path.join(lab.workdir, "ztunnel.log")
            cfg = os.path.join(lab.workdir, "ztunnel.cfg")
            with open(cfg, "w") as f:
                f.write(ztunnel_cfg(zt.ip4))
            six = os.path.join(os.path.dirname(labconfig.__file__), "sidecar6.py")
            with open(zlog, "ab") as log:
                for argv in (["haproxy", "-db", "-f", cfg], [PYTHON, "-I", "-u", six, "15001", "15006", ""]):
                    procs.append(labns.spawn(argv, ns=zt.ns, cgroup=os.path.join(zcg, "ztunnel"),
                                             stdout=log, stderr=subprocess.STDOUT))
            for addr, port in ((zt.ip4, 15001), (zt.ip4, 15006), ("::", 15001), ("::", 15006)):
                zt.wait_listening(port, addr, proc=procs[0], log=zlog)
            s1 = pods["s1"][0]
            sidecar = s1.start_sidecar()
            host_cg = os.path.join(lab.cgroup, "host")
            os.mkdir(host_cg)
            made.append(host_cg)

            dp = loader.Datapath(pin_dir, ISTIO, cni_mode=True, ambient=True)
            closers.append(lambda: (dp.detach(), dp.unpin(), dp.close()))
            dp.load()
            dp.attach(lab.cgroup)
            # the sidecar pod is enrolled as the CNI ADD would
            for addr in s1.ips():
                dp.maps.local_pods.put(addr, PodPolicy(status_port=ISTIO.status_port))
            marker = netns.open_marker_listener(labns.netns_path(s1.ns), 7)
            closers.append(marker.close)
            dp.maps.mark_pod_ips.put(7, s1.ip4)
            dp.maps.netns_pod.put(loader.netns_cookie_of(marker), s1.ip4, 7)

            ctl = AmbientController(dp.maps, lab.cgroup, rescan_interval=3600)
            closers.append(lambda: ctl.stop(clear=True))
            ctl.start()
            ctl.resync(
                [pod_dict("ztunnel-x", "istio-system", zuid, zt.ips(), app="ztunnel"),
                 pod_dict("a1", "default", pods["a1"][1], pods["a1"][0].ips()),
                 pod_dict("a2", "ambns", pods["a2"][1], pods["a2"][0].ips()),
                 pod_dict("n1", "ambns", pods["n1"][1], pods["n1"][0].ips(),
                          labels={DATAPLANE_MODE: "none"}),
                 pod_dict("s1", "ambns", pods["s1"][1], s1.ips(), sidecar=True)],
                [namespace("default"), namespace("ambns", {DATAPLANE_MODE: "ambient"}),
                 namespace("istio-system")])
            w = World(lab, dp, ctl, zt, zlog, pods, host_cg, made)
            w.sidecar = sidecar
            w.zuid, w.zcg = zuid, zcg
            yield w
        finally:
            for close in reversed(closers):
                try:
                    close()
                except Exception:   # keep tearing down
                    pass
            for proc in procs:
                proc.kill()
                proc.wait(timeout=5)
            for cg in reversed(made):
                remove_cgroup(cg)


@pytest.fixture(scope="module")
def w(make_bpffs):
    with make_bpffs() as bpffs, world(bpffs) as wd:
        yield wd


def test_controller_wrote_the_maps(w):
    zt = w.zt
    s = w.dp.maps.settings
    assert s.get(bpft.MB_SET_ZTUNNEL_IP4) != 0 and s.get(bpft.MB_SET_ZTUNNEL_IP6_HI) != 0
    assert sorted(w.dp.maps.ambient_ips.items()) == sorted(w.pods["a2"][0].ips())
    info = dict(w.dp.maps.cgroup_info.items())
    # pod dir + container dir of every pod, ztunnel flagged, only a2 in the mesh
    for name, (pod, _uid, cg) in w.pods.items():
        for path in (cg, os.path.join(cg, "app")):
            e = info[procwatch.cgroup_id(path)]
            assert (e.in_mesh, str(e.ip4)) == (int(name == "a2"), pod.ip4), (name, path)
    ze = info[procwatch.cgroup_id(os.path.join(w.zcg, "ztunnel"))]
    assert ze.flags & bpft.MB_CG_F_ZTUNNEL and not ze.in_mesh and str(ze.ip4) == zt.ip4
    assert procwatch.cgroup_id(w.host_cg) not in info


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ambient_pod_goes_through_ztunnel(w, family):
    a2, n1 = w.pods["a2"][0], w.pods["n1"][0]
    dst = n1.ip4 if family == "ipv4" else n1.ip6
    src = a2.ip4 if family == "ipv4" else a2.ip6
    zsrc = w.zt.ip4 if family == "ipv4" else w.zt.ip6
    since = len(w.zentries())
    ok, out, peer = w.client("a2", dst)
    assert ok, out
    assert peer == zsrc                       # n1's app was reached by ztunnel
    got = w.zwait(since)
    assert [(e["dir"], e["src"], e["dst"], e["dport"]) for e in got] == [
        ("outbound", src, dst, APP)]          # bound to the pod IP; SO_ORIGINAL_DST answered
    # the app sees the destination it asked for, as under ambient's in-pod
    # REDIRECT (conntrack reverses it): peername.c answers from the socket's
    # mb_sock_origin entry, which ambient4/6 write as connect4/6 do
    assert (out["client_peer"][0].removeprefix("::ffff:"), out["client_peer"][1]) == (dst, APP)


def test_label_flips_in_and_out_without_restart(w):
    a1, n1 = w.pods["a1"][0], w.pods["n1"][0]
    uid = w.pods["a1"][1]

    def via_ztunnel() -> bool:
        since = len(w.zentries())
        ok, out, peer = w.client("a1", n1.ip4)
        assert ok, out
        if peer == w.zt.ip4:
            assert [(e["src"], e["dst"], e["dport"]) for e in w.zwait(since)] == [
                (a1.ip4, n1.ip4, APP)]
            return True
        assert peer == a1.ip4 and w.zentries(since) == []
        return False

    base = pod_dict("a1", "default", uid, a1.ips())
    assert not via_ztunnel()
    w.ctl.on_pod_event("MODIFIED", pod_dict("a1", "default", uid, a1.ips(),
                                            labels={DATAPLANE_MODE: "ambient"}))
    assert via_ztunnel()
    # a host process now reaches a1 through ztunnel's inbound port as well
    since = len(w.zentries())
    ok, out, peer = connect(w.lab.nodes[0].ns, w.host_cg, a1.ip4)
    assert ok and peer == w.zt.ip4, out
    assert [(e["dir"], e["dst"], e["dport"]) for e in w.zwait(since)] == [
        ("inbound", a1.ip4, APP)]
    w.ctl.on_pod_event("MODIFIED", base)
    assert not via_ztunnel()
    assert a1.ip4 not in w.dp.maps.ambient_ips.items()
    # namespace label: in, then the pod's own "none" wins, then out again
    w.ctl.on_namespace("MODIFIED", namespace("default", {DATAPLANE_MODE: "ambient"}))
    assert via_ztunnel()
    w.ctl.on_pod_event("MODIFIED", pod_dict("a1", "default", uid, a1.ips(),
                                            labels={DATAPLANE_MODE: "none"}))
    assert not via_ztunnel()
    w.ctl.on_pod_event("MODIFIED", base)
    assert via_ztunnel()
    w.ctl.on_namespace("MODIFIED", namespace("default"))
    assert not via_ztunnel()


def test_host_to_ambient_pod_uses_ztunnel_inbound(w):
    a2, n1 = w.pods["a2"][0], w.pods["n1"][0]
    node = w.lab.nodes[0]
    for dst, zsrc in ((a2.ip4, w.zt.ip4), (a2.ip6, w.zt.ip6)):
        since = len(w.zentries())
        ok, out, peer = connect(node.ns, w.host_cg, dst)
        assert ok and peer == zsrc, out
        assert [(e["dir"], e["src"], e["dst"], e["dport"]) for e in w.zwait(since)] == [
            ("inbound", node.ip4 if ":" not in dst else node.ip6, dst, APP)]
    # a pod outside the mesh is reached directly by the host
    since = len(w.zentries())
    ok, out, peer = connect(node.ns, w.host_cg, n1.ip4)
    assert ok and peer == node.ip4, out
    # ... and by the opted-out pod itself, even towards an ambient pod
    ok, out, peer = w.client("n1", a2.ip4)
    assert ok and peer == n1.ip4, out
    assert w.zentries(since) == []


def test_a_marker_port_listener_on_the_node_does_not_turn_ztunnel_off(w):
    """An unprivileged user in the node's netns listens on 39807, where CNI
    mode's daemon keeps its marker listener: node processes' calls to an
    ambient pod still go through ztunnel (a sidecar pod is one the daemon
    recorded, never the node; docs/security.md)."""
    a2, node = w.pods["a2"][0], w.lab.nodes[0]
    listener = labns.spawn(["/usr/bin/python3", "-c", "import socket, sys, time; s = socket.socket(); "
                            "s.bind(('0.0.0.0', 39807)); s.listen(); print('ready', flush=True); "
                            "time.sleep(600)"], ns=node.ns, uid=65534, gid=65534,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        since = len(w.zentries())
        ok, out, peer = connect(node.ns, w.host_cg, a2.ip4)
        assert ok and peer == w.zt.ip4, out
        assert [e["dir"] for e in w.zwait(since)] == ["inbound"]
    finally:
        listener.kill()
        listener.wait()
        listener.stdout.close()
        listener.stderr.close()


def test_ztunnel_itself_is_never_intercepted(w):
    a2 = w.pods["a2"][0]
    since = len(w.zentries())
    ok, out, peer = connect(w.zt.ns, os.path.join(w.zcg, "ztunnel"), a2.ip4)
    assert ok and peer == w.zt.ip4, out
    assert w.zentries(since) == []


def test_sidecar_pod_keeps_its_sidecar(w):
    s1, a2, n1 = w.pods["s1"][0], w.pods["a2"][0], w.pods["n1"][0]
    # s1's app runs in s1's lab cgroup (no pod entry): like a host process, but
    # its netns has the sidecar marker, so the sidecar path wins even towards
    # an ambient pod
    for dst in (n1.ip4, a2.ip4):
        since, zs = len(w.sidecar.entries()), len(w.zentries())
        r = s1.connect(dst, APP)
        assert r.ok, r.error
        out = w.sidecar.wait_entries(since=since, dir="outbound")
        assert [(e["dst"], e["dport"]) for e in out] == [(dst, APP)]
        assert w.zentries(zs) == []
    # the same from its kubelet-like container cgroup (an entry, not in the mesh)
    since = len(w.sidecar.entries())
    ok, out, _ = w.client("s1", n1.ip4)
    assert ok, out
    assert [(e["dst"], e["dport"]) for e in w.sidecar.wait_entries(since=since, dir="outbound")] \
        == [(n1.ip4, APP)]


def test_new_container_cgroup_is_found_by_the_process_watcher(w):
    assert w.ctl.watching, "netlink process events should work as root here"
    a2, n1 = w.pods["a2"][0], w.pods["n1"][0]
    late = os.path.join(w.pods["a2"][2], "late")
    os.mkdir(late)
    try:
        cgid = procwatch.cgroup_id(late)
        assert w.dp.maps.cgroup_info.get(cgid) is None
        # no pod event, no rescan (1 h): only the exec event can tell
        sleeper = labns.spawn(["sleep", "30"], ns=a2.ns, cgroup=late)
        try:
            deadline = time.monotonic() + 5
            while w.dp.maps.cgroup_info.get(cgid) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            e = w.dp.maps.cgroup_info.get(cgid)
            assert e is not None and e.in_mesh == 1 and str(e.ip4) == a2.ip4
            since = len(w.zentries())
            ok, out, peer = w.client("a2", n1.ip4, container="late")
            assert ok and peer == w.zt.ip4, out
            assert [e["src"] for e in w.zwait(since)] == [a2.ip4]
        finally:
            sleeper.kill()
            sleeper.wait(timeout=5)
    finally:
        remove_cgroup(late)
    # the next process exit on the node prunes the entry of the removed cgroup
    deadline = time.monotonic() + 5
    while w.dp.maps.cgroup_info.get(cgid) is not None and time.monotonic() < deadline:
        subprocess.run(["true"], check=True)
        time.sleep(0.1)
    assert w.dp.maps.cgroup_info.get(cgid) is None


# ---- the real daemon: merbridge run --ambient=true with a --pods-dir ------------

def test_daemon_flag_follows_pod_labels(pin_dir):
    """``merbridge run --ambient=true`` (legacy mode, pods from --pods-dir, in
    the lab's node netns like a hostNetwork DaemonSet): the ztunnel address and
    pod cgroups come from the manifests, and editing a manifest's label moves
    the running pod in and out of the mesh; so does editing its Namespace
    manifest's label, unless the pod opts out with ``none``. All with the same
    daemon process. In a non-initial netns the process connector is
    unavailable, so this also runs the rescan fallback."""
    from daemonenv import Env

    with Lab("mbt") as lab:
        made = []
        zt, a, b = lab.add_pod("zt"), lab.add_pod("a"), lab.add_pod("b")
        b.start_app(APP)
        uids = {p.name: str(uuid.uuid4()) for p in (zt, a, b)}
        cgs = {}
        for p in (zt, a, b):
            base = os.path.join(p.cgroup, f"pod{uids[p.name]}")
            os.makedirs(os.path.join(base, "c"))
            made.append(base)
            cgs[p.name] = os.path.join(base, "c")
        cfg = os.path.join(lab.workdir, "ztunnel.cfg")
        zlog = os.path.join(lab.workdir, "ztunnel.log")
        with open(cfg, "w") as f:
            f.write(ztunnel_cfg(zt.ip4))
        with open(zlog, "ab") as log:
            zproc = labns.spawn(["haproxy", "-db", "-f", cfg], ns=zt.ns, cgroup=cgs["zt"],
                                stdout=log, stderr=subprocess.STDOUT)
        env = Env(lab, pin_dir, cni_mode=False)
        try:
            zt.wait_listening(15001, zt.ip4, proc=zproc, log=zlog)

            def write(name, m):
                tmp = os.path.join(env.pods_dir, f".{name}.tmp")
                with open(tmp, "w") as f:
                    json.dump(m, f)
                os.replace(tmp, os.path.join(env.pods_dir, f"{name}.json"))

            def publish(p, labels=None, app=None, ns="default"):
                m = pod_dict(p.name, ns, uids[p.name], p.ips(), labels=labels, app=app)
                m.update(apiVersion="v1", kind="Pod")
                write(p.name, m)

            def label_namespace(labels=None):
                write("ns-default", dict(namespace("default", labels), apiVersion="v1",
                                         kind="Namespace"))

            # ztunnel is identified by its label AND its namespace (istio-system)
            publish(zt, app="ztunnel", ns="istio-system")
            label_namespace()
            publish(a)
            publish(b)
            proc = env.start("--ambient=true")
            assert sorted(x.name for x in env.attached()) == sorted(
                ["mb_ambient4", "mb_ambient6"] + [p.func for p in loader.PROGRAMS
                                                  if p.target == "cgroup"])

            def peer_of_a():
                ok, out, peer = connect(a.ns, cgs["a"], b.ip4)
                assert ok, out
                return peer

            def wait_peer(want, timeout=15.0):
                deadline = time.monotonic() + timeout
                while (got := peer_of_a()) != want and time.monotonic() < deadline:
                    time.sleep(0.3)
                return got

            assert peer_of_a() == a.ip4
            publish(a, labels={DATAPLANE_MODE: "ambient"})
            assert wait_peer(zt.ip4) == zt.ip4, env.log(proc)
            publish(a)
            assert wait_peer(a.ip4) == a.ip4, env.log(proc)
            # the namespace label: in; the pod's own "none" opts it out; back; out
            label_namespace({DATAPLANE_MODE: "ambient"})
            assert wait_peer(zt.ip4) == zt.ip4, env.log(proc)
            publish(a, labels={DATAPLANE_MODE: "none"})
            assert wait_peer(a.ip4) == a.ip4, env.log(proc)
            publish(a)
            assert wait_peer(zt.ip4) == zt.ip4, env.log(proc)
            label_namespace()
            assert wait_peer(a.ip4) == a.ip4, env.log(proc)
            assert proc.poll() is None and len(env.procs) == 1      # nothing restarted
            assert env.stop(proc) == 0
            assert env.attached() == []
        finally:
            env.close()
            zproc.kill()
            zproc.wait(timeout=5)
            for cg in reversed(made):
                remove_cgroup(cg)
