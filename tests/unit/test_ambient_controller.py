"""Ambient mode without root: the membership decision, the cgroup path and
netlink parsing helpers, the map encodings, and AmbientController against
in-memory maps and a directory tree laid out like kubelet's cgroups."""
import json
import os
import struct
import time
import uuid

import pytest

from merbridge.bpf import ambient as bpfambient
from merbridge.bpf import maps as bpfmaps
from merbridge.bpf import types as bpft
from merbridge.daemon import procwatch
from merbridge.daemon.ambient import DATAPLANE_MODE, AmbientController, ambient_state
from merbridge.daemon.config import DaemonConfig
from test_k8s_source import write_kubeconfig


def pod(name="p", ns="default", uid=None, ips=("10.0.0.5",), labels=None, notes=None,
        containers=("app",), host_network=False):
    return {"metadata": {"name": name, "namespace": ns, "uid": uid or str(uuid.uuid4()),
                         "labels": dict(labels or {}), "annotations": dict(notes or {})},
            "spec": {"containers": [{"name": c} for c in containers],
                     "hostNetwork": host_network},
            "status": {"podIPs": [{"ip": ip} for ip in ips]}}


AMBIENT = {DATAPLANE_MODE: "ambient"}


@pytest.mark.parametrize("kwargs, ns_labels, want", [
    ({"labels": AMBIENT}, None, True),
    ({}, AMBIENT, True),
    ({}, None, False),
    ({"labels": {DATAPLANE_MODE: "none"}}, AMBIENT, False),
    ({"labels": {DATAPLANE_MODE: "AMBIENT"}}, None, True),
    ({"labels": {"ambient.istio.io/redirection": "disabled"}}, AMBIENT, False),
    ({"notes": {"ambient.istio.io/redirection": "disabled"}, "labels": AMBIENT}, None, False),
    ({"containers": ("app", "istio-proxy"), "labels": AMBIENT}, None, False),
    ({"notes": {"sidecar.istio.io/status": "{}"}}, AMBIENT, False),
    ({"host_network": True, "labels": AMBIENT}, None, False),
    ({"ns": "kube-system", "labels": AMBIENT}, None, False),
    ({"ns": "istio-system", "labels": AMBIENT}, None, False),     # excluded by default too
])
def test_ambient_state(kwargs, ns_labels, want):
    st = ambient_state(pod(**kwargs), ns_labels)
    assert st.in_mesh is want and not st.ztunnel and st.reason


def test_ztunnel_is_never_in_the_mesh():
    st = ambient_state(pod(ns="istio-system", labels={"app": "ztunnel", **AMBIENT}), AMBIENT)
    assert st.ztunnel and not st.in_mesh


@pytest.mark.parametrize("ns", ["default", "shop", "kube-system"])
def test_ztunnel_label_outside_the_ztunnel_namespace_is_an_ordinary_pod(ns):
    impostor = pod(ns=ns, labels={"app": "ztunnel", **AMBIENT})
    st = ambient_state(impostor)
    assert not st.ztunnel
    assert st.in_mesh is (ns != "kube-system")       # it cannot opt out of the mesh by label
    # a configured ztunnel namespace moves the identity with it
    assert ambient_state(impostor, ztunnel_namespace=ns).ztunnel
    assert not ambient_state(pod(ns="istio-system", labels={"app": "ztunnel"}),
                             ztunnel_namespace=ns).ztunnel


def test_uids_in_paths_both_kubelet_drivers():
    u = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert procwatch.uids_in_path(f"kubepods/burstable/pod{u}/abc") == [u]
    systemd = "kubepods.slice/kubepods-besteffort.slice/" \
              f"kubepods-besteffort-pod{u.replace('-', '_')}.slice/cri-containerd-x.scope"
    assert procwatch.uids_in_path(systemd) == [u]
    assert procwatch.uids_in_path("system.slice/sshd.service") == []
    assert procwatch.normalize_uid(u.upper()) == u
    assert procwatch.normalize_uid("not-a-uid") == ""


def test_proc_cgroup(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("4:memory:/x\n0::/kubepods/pod1/c\n")
    assert procwatch.proc_cgroup(42, "/sys/fs/cgroup", proc=str(tmp_path)) == \
        "/sys/fs/cgroup/kubepods/pod1/c"
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cgroup").write_text("0::/\n")
    assert procwatch.proc_cgroup(43, "/m", proc=str(tmp_path)) == "/m"
    assert procwatch.proc_cgroup(44, "/m", proc=str(tmp_path)) is None


def _event(what, pid, tgid):
    body = struct.pack("=IIQ", what, 0, 0) + struct.pack("=ii", pid, tgid) + b"\0" * 8
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0) + body
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_parse_proc_events():
    data = (_event(procwatch.PROC_EVENT_EXEC, 10, 10) + _event(procwatch.PROC_EVENT_FORK, 11, 11)
            + _event(procwatch.PROC_EVENT_EXIT, 12, 12) + _event(procwatch.PROC_EVENT_EXIT, 13, 12))
    assert procwatch.parse(data) == [("exec", 10), ("exit", 12)]
    assert procwatch.parse(b"\x01\x02") == []


def test_map_encodings():
    m = bpfmaps.Maps({n: bpfmaps.DictBackend() for n in bpft.ALL_MAPS})
    m.cgroup_info.put(7, True, "10.0.0.5", "fd00::5", bpft.MB_CG_F_ZTUNNEL)
    e = m.cgroup_info.get(7)
    assert (e.in_mesh, str(e.ip4), str(e.ip6), e.flags) == (1, "10.0.0.5", "fd00::5", 1)
    with pytest.raises(ValueError):
        m.cgroup_info.put(8, True, "fd00::5")          # wrong family
    assert m.cgroup_info.get(8) is None
    s = bpfambient.ztunnel_settings("10.1.2.3", "fd00::1")
    assert struct.pack("=I", s[bpft.MB_SET_ZTUNNEL_IP4]) == bytes([10, 1, 2, 3])
    assert struct.pack("=QQ", s[bpft.MB_SET_ZTUNNEL_IP6_HI], s[bpft.MB_SET_ZTUNNEL_IP6_LO]) == \
        bpft.addr_pack("fd00::1")
    assert set(bpfambient.ztunnel_settings().values()) == {0}


class Tree:
    """A kubelet-like cgroup tree in a plain directory (ids are inode numbers)."""

    def __init__(self, root):
        self.root = root

    def pod(self, uid, containers=("c1",)):
        base = os.path.join(self.root, "kubepods", "burstable", f"pod{uid}")
        for c in containers:
            os.makedirs(os.path.join(base, c), exist_ok=True)
        return base

    @staticmethod
    def id(path):
        return os.stat(path).st_ino


@pytest.fixture
def env(tmp_path):
    m = bpfmaps.Maps({n: bpfmaps.DictBackend() for n in bpft.ALL_MAPS})
    ctl = AmbientController(m, str(tmp_path), cgroup_mount=str(tmp_path), watch_processes=False)
    return m, ctl, Tree(str(tmp_path))


def test_label_flip_rewrites_every_cgroup(env):
    m, ctl, tree = env
    uid = str(uuid.uuid4())
    base = tree.pod(uid, ("c1", "c2"))
    p = pod(uid=uid, ips=("10.0.0.5", "fd00::5"))
    ctl.on_pod_event("ADDED", p)
    ids = {tree.id(base), tree.id(base + "/c1"), tree.id(base + "/c2")}
    assert {k for k, _ in m.cgroup_info.items()} == ids
    assert all(e.in_mesh == 0 for _, e in m.cgroup_info.items())
    assert m.ambient_ips.items() == []
    ctl.on_pod_event("MODIFIED", pod(uid=uid, ips=("10.0.0.5", "fd00::5"), labels=AMBIENT))
    assert all(e.in_mesh == 1 and str(e.ip6) == "fd00::5" for _, e in m.cgroup_info.items())
    assert sorted(m.ambient_ips.items()) == ["10.0.0.5", "fd00::5"]
    ctl.on_pod_event("MODIFIED", p)
    assert all(e.in_mesh == 0 for _, e in m.cgroup_info.items())
    assert m.ambient_ips.items() == []
    ctl.on_pod_event("DELETED", p)
    assert m.cgroup_info.items() == []


def test_namespace_label_and_resync(env):
    m, ctl, tree = env
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    tree.pod(a)
    tree.pod(b)
    pa = pod("a", "shop", a, ("10.0.0.6",))
    pb = pod("b", "shop", b, ("10.0.0.7",), labels={DATAPLANE_MODE: "none"})
    ctl.resync([pa, pb], [{"metadata": {"name": "shop", "labels": AMBIENT}}])
    assert m.ambient_ips.items() == ["10.0.0.6"]
    ctl.on_namespace("MODIFIED", {"metadata": {"name": "shop", "labels": {}}})
    assert m.ambient_ips.items() == []
    ctl.on_namespace("MODIFIED", {"metadata": {"name": "shop", "labels": AMBIENT}})
    assert m.ambient_ips.items() == ["10.0.0.6"]
    ctl.resync([pb])      # a is gone from the listing
    assert m.ambient_ips.items() == []
    assert {k for k, _ in m.cgroup_info.items()} == {
        tree.id(os.path.join(tree.root, "kubepods", "burstable", f"pod{b}")),
        tree.id(os.path.join(tree.root, "kubepods", "burstable", f"pod{b}", "c1"))}


def test_ztunnel_address_and_flag(env):
    m, ctl, tree = env
    uid = str(uuid.uuid4())
    base = tree.pod(uid)
    z = pod("ztunnel-1", "istio-system", uid, ("10.0.0.2", "fd00::2"), labels={"app": "ztunnel"})
    ctl.on_pod_event("ADDED", z)
    assert m.settings.get(bpft.MB_SET_ZTUNNEL_IP4) == bpfambient.ztunnel_settings("10.0.0.2")[
        bpft.MB_SET_ZTUNNEL_IP4]
    assert m.settings.get(bpft.MB_SET_ZTUNNEL_IP6_HI) != 0
    assert m.cgroup_info.get(tree.id(base)).flags & bpft.MB_CG_F_ZTUNNEL
    ctl.on_pod_event("DELETED", z)
    assert all(m.settings.get(i) == 0 for i in (bpft.MB_SET_ZTUNNEL_IP4,
                                                bpft.MB_SET_ZTUNNEL_IP6_HI,
                                                bpft.MB_SET_ZTUNNEL_IP6_LO))


def test_ztunnel_impostor_gets_no_redirect_target_and_no_flag(env):
    m, ctl, tree = env
    real, fake = str(uuid.uuid4()), str(uuid.uuid4())
    tree.pod(real)
    fake_base = tree.pod(fake)
    ctl.on_pod_event("ADDED", pod("evil", "default", fake, ("10.0.0.66",),
                                  labels={"app": "ztunnel", **AMBIENT}))
    assert all(m.settings.get(i) == 0 for i in (bpft.MB_SET_ZTUNNEL_IP4,
                                                bpft.MB_SET_ZTUNNEL_IP6_HI))
    e = m.cgroup_info.get(tree.id(fake_base))
    assert not e.flags & bpft.MB_CG_F_ZTUNNEL and e.in_mesh == 1      # intercepted like any pod
    assert m.ambient_ips.items() == ["10.0.0.66"]
    ctl.on_pod_event("ADDED", pod("ztunnel-1", "istio-system", real, ("10.0.0.2",),
                                  labels={"app": "ztunnel"}))
    assert m.settings.get(bpft.MB_SET_ZTUNNEL_IP4) == bpfambient.ztunnel_settings("10.0.0.2")[
        bpft.MB_SET_ZTUNNEL_IP4]
    assert ctl.ztunnel_uid == real


def test_process_in_new_cgroup_and_prune(env, tmp_path):
    m, ctl, tree = env
    uid = str(uuid.uuid4())
    base = tree.pod(uid)
    ctl.on_pod_event("ADDED", pod(uid=uid, labels=AMBIENT))
    late = os.path.join(base, "late")
    os.mkdir(late)
    proc = tmp_path / "proc"
    (proc / "99").mkdir(parents=True)
    rel = os.path.relpath(late, tree.root)
    (proc / "99" / "cgroup").write_text(f"0::/{rel}\n")
    orig = procwatch.proc_cgroup
    procwatch.proc_cgroup = lambda pid, mount: orig(pid, mount, proc=str(proc))
    try:
        ctl.on_process("exec", 99)
    finally:
        procwatch.proc_cgroup = orig
    assert m.cgroup_info.get(tree.id(late)).in_mesh == 1
    late_id = tree.id(late)
    os.rmdir(late)
    ctl.prune()
    assert m.cgroup_info.get(late_id) is None
    assert m.cgroup_info.get(tree.id(base)) is not None


def test_pod_without_uuid_or_outside_root_is_ignored(env):
    m, ctl, tree = env
    ctl.on_pod_event("ADDED", pod(uid="static-pod-xyz", labels=AMBIENT))
    ctl.on_process("exec", os.getpid())   # our own cgroup is not below the tree
    assert m.cgroup_info.items() == [] and m.ambient_ips.items() == []


def test_doctor_ambient_check(tmp_path):
    from merbridge.daemon import doctor
    mounts = tmp_path / "mounts"
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.procs").write_text("")
    mounts.write_text(f"cgroup2 {cg} cgroup2 rw 0 0\n")

    def ambient(release, mounts_file):
        checks = doctor.run_checks(bpffs_path=str(tmp_path / "bpf"), mounts_file=str(mounts_file),
                                   kernel_release=release, probe=lambda: None,
                                   bcc=lambda: (True, "x"), caps=0)
        (c,) = [c for c in checks if c.name == "ambient mode"]
        assert not c.required
        return c.status
    assert ambient("6.1.0-13-amd64", mounts) == "ok"
    assert ambient("5.4.0", mounts) == "fail"
    empty = tmp_path / "nomounts"
    empty.write_text("proc /proc proc rw 0 0\n")
    assert ambient("6.1.0", empty) == "fail"


# ---- the daemon's wiring: both pod sources feed namespaces to the controller ---

def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def daemon_ambient(env):
    """runtime.Daemon's own ``_pod_source`` and ``_on_pod_event`` around ``env``'s controller."""
    from merbridge.daemon import runtime
    made = []

    def make(**cfg):
        d = runtime.Daemon(DaemonConfig(ambient=True, **cfg))
        d.ambient = env[1]
        d.source = d._pod_source(d._on_pod_event)
        made.append(d.source)
        d.source.start()
        assert d.source.wait_synced(10)
        return d
    yield make
    for src in made:
        src.stop()


def test_daemon_feeds_namespaces_from_the_pods_dir(env, daemon_ambient, tmp_path):
    m, ctl, tree = env
    pods_dir = tmp_path / "pods"
    pods_dir.mkdir()
    uid = str(uuid.uuid4())
    tree.pod(uid)
    (pods_dir / "a.json").write_text(json.dumps(dict(pod("a", "shop", uid), kind="Pod")))

    def label(value):
        ns = {"kind": "Namespace", "metadata": {"name": "shop", "labels": {DATAPLANE_MODE: value}}}
        (pods_dir / ".ns.tmp").write_text(json.dumps(ns))
        os.replace(pods_dir / ".ns.tmp", pods_dir / "ns.json")
    label("ambient")
    daemon_ambient(pods_dir=str(pods_dir))
    _until(lambda: m.ambient_ips.items() == ["10.0.0.5"])
    label("none")                 # the running pod leaves the mesh: no pod event at all
    _until(lambda: m.ambient_ips.items() == [])
    label("ambient")
    _until(lambda: m.ambient_ips.items() == ["10.0.0.5"])
    (pods_dir / "ns.json").unlink()
    _until(lambda: m.ambient_ips.items() == [])
    assert "shop" not in ctl.namespaces


def test_daemon_feeds_namespaces_from_kubernetes(env, server, daemon_ambient, tmp_path):
    m, ctl, tree = env
    uid = str(uuid.uuid4())
    tree.pod(uid)
    server.upsert(dict(pod("a", "shop", uid), spec={"nodeName": "n1", "containers": [{"name": "a"}]}))
    server.upsert_namespace({"metadata": {"name": "shop", "labels": AMBIENT}})
    daemon_ambient(node_name="n1", kubeconfig=write_kubeconfig(tmp_path / "kc", server))
    _until(lambda: m.ambient_ips.items() == ["10.0.0.5"])
    server.upsert_namespace({"metadata": {"name": "shop", "labels": {}}})
    _until(lambda: m.ambient_ips.items() == [])
    server.upsert_namespace({"metadata": {"name": "shop", "labels": AMBIENT}})
    _until(lambda: m.ambient_ips.items() == ["10.0.0.5"])


def test_empty_ztunnel_namespace_is_a_config_error(tmp_path):
    from merbridge.daemon.config import ConfigError
    cfg = DaemonConfig(ambient=True, ztunnel_namespace="", pods_dir=str(tmp_path),
                       cgroup_path=str(tmp_path))
    with pytest.raises(ConfigError, match="ztunnel-namespace"):
        cfg.validate()
    assert DaemonConfig(ztunnel_namespace="", pods_dir=str(tmp_path),
                        cgroup_path=str(tmp_path)).validate()     # ambient off: unused
