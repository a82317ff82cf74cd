"""The pod registry's state machine against in-memory maps and a fake podnet.

(Over 450 lines: the registry is one state machine, pods.py, and its fake
PodNet and world are shared by every case; a split would import them around.)

Everything the registry writes is observable here: the dict-backed maps, the
fake podnet's open listeners and XDP attachments, and the state file.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from merbridge.bpf import maps
from merbridge.bpf import types as bpftypes
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.cni.errors import (INTERNAL, INVALID_ANNOTATIONS, INVALID_ENVIRONMENT_VARIABLES,
                                  INVALID_NETNS, NOT_ENROLLED, PLUGIN_NOT_AVAILABLE,
                                  TRY_AGAIN_LATER, CniError)
from merbridge.cni.protocol import Attachment, CniRequest
from merbridge.daemon import annotations
from merbridge.daemon.pods import Registry, allocate_key
from merbridge.daemon.state import ENROLLED, StateStore

ISTIO = MESHES["istio"]


def real_maps():
    """The datapath's typed map handles over in-memory backends (the MapBackend seam)."""
    return maps.Maps({name: maps.DictBackend() for name in bpftypes.ALL_MAPS})


def lp(w):
    return dict(w.maps.local_pods.items())


def mk(w):
    return dict(w.maps.mark_pod_ips.items())


class Marker:
    def __init__(self, net, netns, key):
        self.net, self.netns, self.key, self.closed = net, netns, key, False

    def close(self):
        self.closed = True
        self.net.listeners.pop(self.netns, None)


class Rtnl:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class FakePodNet:
    """The whole ``enroll.PodNet`` protocol in memory. Per netns: one marker
    listener, an XDP flag and the tx checksum offload; ``fail`` names a method
    to break; ``addrs[netns] = [(ifname, ip), ...]`` answers adopt's search
    (``searched`` lists the directories searched); ``not_veth`` holds the
    interfaces that are not a pod's veth (an attach answers code 4)."""

    inbound_hook = "xdp"

    def __init__(self):
        self.listeners, self.xdp, self.csum_off = {}, set(), set()
        self.fail = None
        self.hardware_checksum = False
        self.addrs, self.searched, self.not_veth = {}, [], set()

    def _maybe_fail(self, what):
        if self.fail == what:
            raise OSError(f"injected failure in {what}")

    def check_netns(self, netns):
        """As podnet.PodNet: an absolute path to something that exists (a file here)."""
        if not os.path.isabs(netns) or ".." in netns.split("/") or not os.path.exists(netns):
            raise ValueError(f"{netns!r} is not a pod network namespace")
        return netns

    def open_marker(self, netns, key):
        self._maybe_fail("open_marker")
        if netns in self.listeners:
            raise OSError("EADDRINUSE")
        m = self.listeners[netns] = Marker(self, netns, key)
        return m

    def open_marker_and_rtnl(self, netns, key):
        return self.open_marker(netns, key), Rtnl()

    def marker_ok(self, marker, key):
        return not marker.closed and marker.key == key

    def attach_xdp(self, netns, ifname, pod_rtnl=None):
        if pod_rtnl is not None:
            pod_rtnl.close()
        if ifname in self.not_veth:        # as PodNet: refused before anything changes
            raise CniError(INVALID_ENVIRONMENT_VARIABLES, f"invalid CNI_IFNAME {ifname!r}",
                           "not a veth")
        if not self.hardware_checksum:     # as PodNet: offload off before the programs
            self.tx_checksum_off(netns, ifname)
        self._maybe_fail("attach_xdp")
        self.xdp.add((netns, ifname))

    def detach_xdp(self, netns, ifname):
        self.xdp.discard((netns, ifname))

    def xdp_attached(self, netns, ifname):
        return (netns, ifname) in self.xdp

    def tx_checksum_off(self, netns, ifname):
        self._maybe_fail("tx_checksum_off")
        self.csum_off.add((netns, ifname))

    def tx_checksum(self, netns, ifname):
        self._maybe_fail("tx_checksum")
        return {"tx-checksum-ip-generic": (netns, ifname) not in self.csum_off}

    def addresses(self, netns, ifname):
        return []

    def netns_addresses(self, netns_dir, proc_path=None):
        self._maybe_fail("netns_addresses")
        self.searched.append(netns_dir)
        return dict(self.addrs)

    def netns_cookie(self, marker):
        return 1000 + sum(marker.netns.encode())


def test_the_fake_and_the_real_podnet_implement_the_whole_protocol():
    """No optional members: the registry calls every one of them."""
    import inspect

    from merbridge.daemon import enroll, podnet
    wanted = {n for n in vars(enroll.PodNet) if not n.startswith("_")}
    wanted |= set(enroll.PodNet.__annotations__)
    for impl in (FakePodNet(), podnet.PodNet(lambda: (0, 0))):
        assert {n for n in wanted if not hasattr(impl, n)} == set(), type(impl)
        for name in wanted:
            proto = getattr(enroll.PodNet, name, None)
            if callable(proto):
                got = list(inspect.signature(getattr(impl, name)).parameters)
                want = list(inspect.signature(proto).parameters)[1:]
                assert len(got) == len(want), (type(impl), name)
                # passed by name: the same name
                assert [p for p in want if p in ("pod_rtnl", "proc_path")] == \
                    [p for p in got if p in ("pod_rtnl", "proc_path")], (type(impl), name)


def meshed_pod(name="web", ns="default", ip="10.240.0.5", uid="u-1", ann=None):
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid,
                     "annotations": {"sidecar.istio.io/status": "{}", **(ann or {})}},
        "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy",
                                                  "args": ["proxy", "sidecar"]}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {},
    }


def plain_pod(name="plain", ns="default", ip="10.240.0.9"):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "app"}]}, "status": {"podIP": ip}}


def make_world(tmp_path):
    """The registry over in-memory maps, the fake podnet and a state file in
    ``tmp_path``, and the pods its lookup finds (the ``world`` fixture)."""
    pods: dict = {}
    maps, net = real_maps(), FakePodNet()
    store = StateStore(tmp_path / "state")
    for ns in ("ns-a", "ns-b", "ns-c"):
        (tmp_path / ns).write_text("")

    def make(**kw):
        kw.setdefault("add_wait", 0.3)
        net.hardware_checksum = kw.get("hardware_checksum", False)
        return Registry(mesh=ISTIO, maps=maps, podnet=net,
                        lookup=lambda ns, name: pods.get((ns, name)), store=store, **kw)

    class W:
        pass
    w = W()
    w.pods, w.maps, w.net, w.store, w.make, w.dir = pods, maps, net, store, make, tmp_path
    w.reg = make()
    return w


def cidr(ip):
    """A pod IP as prevResult gives it to the plugin: "addr/prefix"."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def att(w, cid="c1", netns="ns-a", name="web", ips=("10.240.0.5",), ifname="eth0", uid="",
        command="ADD"):
    """The plugin's validated request for one container (``command`` does not
    matter to the registry: its methods are the commands)."""
    return CniRequest(command=command, container_id=cid, netns=str(w.dir / netns),
                      ifname=ifname, pod_namespace="default", pod_name=name, pod_uid=uid,
                      ips=tuple(cidr(ip) for ip in ips))


def gc(*keep):
    return CniRequest(command="GC", attachments=tuple(Attachment(c, "eth0") for c in keep))


def assert_nothing_left(w):
    assert lp(w) == {}
    assert mk(w) == {}
    assert w.maps.netns_pod.items() == []
    assert w.net.listeners == {}
    assert w.net.xdp == set()
    assert w.reg.records == {}
    assert w.store.load() == {}


def test_add_enrols_everything_and_del_removes_it(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    a = att(w)
    w.reg.add(a)
    rec = w.reg.records["c1"]
    assert rec.key != 0 and rec.phase == ENROLLED
    assert mk(w) == {rec.key: "10.240.0.5"}
    assert lp(w) == {"10.240.0.5": annotations.pod_policy(meshed_pod(), ISTIO)}
    assert w.net.listeners[a.netns].key == rec.key
    assert w.net.xdp == {(a.netns, "eth0")}
    assert w.net.csum_off == {(a.netns, "eth0")}
    assert w.store.load()["c1"].key == rec.key
    w.reg.check(a)
    # a flow the datapath recorded for this pod, and one of another pod
    origin = bpftypes.MbOrigin(bpftypes.MbAddr.of("10.96.0.10"), 0, 80, 0)
    w.maps.pair_orig_dst.put(bpftypes.MbPair.of("10.240.0.5", 40000, "127.0.0.1", 15001), origin)
    w.maps.pair_orig_dst.put(bpftypes.MbPair.of("10.240.0.77", 40000, "127.0.0.1", 15001), origin)
    w.reg.delete(a)
    assert_nothing_left(w)
    assert [str(p.sip) for p, _ in w.maps.pair_orig_dst.items()] == ["10.240.0.77"]


def test_a_dual_stack_add_encodes_the_policy_once(world, monkeypatch):
    """Checked against the datapath's limits before any write, then written for
    both IPs: one encoding (bpf.maps.policy_value)."""
    from merbridge.bpf import maps as bpfmaps
    calls = []
    real = bpfmaps.encode_policy
    monkeypatch.setattr(bpfmaps, "encode_policy", lambda p: calls.append(p) or real(p))
    bpfmaps.policy_value.cache_clear()
    w = world
    pod = meshed_pod()
    pod["status"]["podIPs"].append({"ip": "fd00::5"})
    w.pods[("default", "web")] = pod
    w.reg.add(att(w, ips=("10.240.0.5", "fd00::5")))
    assert sorted(lp(w)) == ["10.240.0.5", "fd00::5"]
    assert len(calls) == 1


def test_del_uses_the_key_add_chose_even_after_restart(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.reg.add(att(w))
    key = w.reg.records["c1"].key
    # a new daemon process: same pinned maps, records from the state file only
    reg2 = w.make()
    reg2.restore(w.store.load())
    assert reg2.records["c1"].key == key
    assert mk(w) == {key: "10.240.0.5"}
    reg2.delete(att(w))
    assert mk(w) == {} and lp(w) == {}


def test_keys_are_unique_and_nonzero():
    used = set()
    for i in range(2000):
        k = allocate_key(f"container-{i}", used)
        assert k and k not in used and k <= 0x7FFFFFFF
        used.add(k)
    first = allocate_key("x", set())
    assert allocate_key("x", {first}) != first


def test_key_collision_with_a_leftover_map_entry_is_avoided(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    taken = allocate_key("c1", set())
    w.maps.mark_pod_ips.put(taken, "10.9.9.9")
    w.reg.add(att(w))
    assert w.reg.records["c1"].key != taken


def test_add_twice_is_idempotent_and_repairs(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    a = att(w)
    w.reg.add(a)
    key = w.reg.records["c1"].key
    w.net.detach_xdp(a.netns, "eth0")           # something removed a piece
    w.reg.add(a)
    assert w.reg.records["c1"].key == key
    assert w.net.xdp == {(a.netns, "eth0")}
    assert len(mk(w)) == 1
    w.reg.check(a)


def test_del_of_unknown_container_succeeds(world):
    world.reg.delete(att(world, cid="never-added"))
    world.reg.delete(att(world, cid="never-added"))


def test_del_twice_and_del_after_netns_gone(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    a = att(w)
    w.reg.add(a)
    (w.dir / "ns-a").unlink()                   # the runtime already tore the netns down
    w.reg.delete(a)
    w.reg.delete(a)
    assert lp(w) == {} and mk(w) == {}
    assert w.net.listeners == {} and w.reg.records == {}


def test_add_of_unknown_pod_is_try_again_after_the_wait(world):
    w = world
    t0 = time.monotonic()
    with pytest.raises(CniError) as exc:
        w.reg.add(att(w))
    assert exc.value.code == TRY_AGAIN_LATER
    assert time.monotonic() - t0 >= 0.3
    assert_nothing_left(w)


def test_add_waits_for_a_pod_that_arrives_late(world):
    w = world
    reg = w.make(add_wait=5)
    pod = meshed_pod()

    def arrive():
        time.sleep(0.2)
        w.pods[("default", "web")] = pod
        reg.on_pod_event("ADDED", pod)
    threading.Thread(target=arrive).start()
    reg.add(att(w))
    assert "c1" in reg.records


def test_add_for_a_recreated_pod_waits_for_the_new_uid(world):
    w = world
    w.pods[("default", "web")] = meshed_pod(uid="old")
    a = att(w, uid="new")
    with pytest.raises(CniError) as exc:
        w.reg.add(a)
    assert exc.value.code == TRY_AGAIN_LATER


def test_pod_outside_the_mesh_is_left_alone(world):
    w = world
    w.pods[("default", "plain")] = plain_pod()
    a = att(w, name="plain", ips=("10.240.0.9",))
    w.reg.add(a)
    assert_nothing_left(w)
    w.reg.check(a)
    w.reg.delete(a)


def test_invalid_annotation_fails_add_and_writes_nothing(world):
    w = world
    w.pods[("default", "web")] = meshed_pod(
        ann={"traffic.sidecar.istio.io/excludeInboundPorts": "80,notaport"})
    with pytest.raises(CniError) as exc:
        w.reg.add(att(w))
    assert exc.value.code == INVALID_ANNOTATIONS
    assert "excludeInboundPorts" in str(exc.value)
    assert_nothing_left(w)


@pytest.mark.parametrize("step", ["open_marker", "attach_xdp", "tx_checksum_off", "put"])
def test_failure_at_each_step_rolls_everything_back(world, step):
    w = world
    w.pods[("default", "web")] = meshed_pod(ip="10.240.0.5")
    if step == "put":
        def broken(k, v):
            if k == "10.240.0.6":          # the second IP: the first entries are written
                raise OSError("map full")
            maps.LocalPods.put(w.maps.local_pods, k, v)
        w.maps.local_pods.put = broken
    else:
        w.net.fail = step
    with pytest.raises(CniError) as exc:
        w.reg.add(att(w, ips=("10.240.0.5", "10.240.0.6")))
    assert exc.value.code == INTERNAL
    assert_nothing_left(w)
    # and the container can be added once the fault is gone
    w.net.fail = None
    if step == "put":
        del w.maps.local_pods.put
    w.reg.add(att(w, ips=("10.240.0.5", "10.240.0.6")))
    assert len(lp(w)) == 2


def test_hardware_checksum_leaves_offload_alone(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    reg = w.make(hardware_checksum=True)
    reg.add(att(w))
    assert w.net.csum_off == set()


def test_check_reports_each_missing_piece(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    a = att(w)
    w.reg.add(a)
    w.net.detach_xdp(a.netns, "eth0")
    [w.maps.local_pods.delete(ip) for ip in lp(w)]
    with pytest.raises(CniError) as exc:
        w.reg.check(a)
    assert exc.value.code == NOT_ENROLLED
    assert "XDP" in exc.value.details and "local_pods" in exc.value.details
    # CHECK for an in-mesh pod the registry never enrolled is an error too
    with pytest.raises(CniError):
        w.reg.check(att(w, cid="other"))


def test_add_refuses_what_is_no_pod_netns_before_anything_else(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    for netns in (str(w.dir / "ns-gone"), "ns-a", str(w.dir / ".." / w.dir.name / "ns-a")):
        req = CniRequest(command="ADD", container_id="c1", netns=netns, ifname="eth0",
                         pod_namespace="default", pod_name="web")
        t0 = time.monotonic()
        with pytest.raises(CniError) as exc:
            w.reg.add(req)
        assert (exc.value.code, exc.value.msg) == (INVALID_NETNS, "invalid netns")
        assert repr(netns) in exc.value.details
        assert time.monotonic() - t0 < 0.3           # no wait for the pod source
    assert_nothing_left(w)


def test_an_interface_that_is_no_pod_veth_is_code_4_and_rolled_back(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.net.not_veth = {"lo"}
    with pytest.raises(CniError) as exc:
        w.reg.add(att(w, ifname="lo"))
    assert (exc.value.code, exc.value.msg) == (INVALID_ENVIRONMENT_VARIABLES,
                                               "invalid CNI_IFNAME 'lo'")
    assert_nothing_left(w)


def test_check_reports_tx_checksum_offload_turned_back_on(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    a = att(w)
    w.reg.add(a)
    w.reg.check(a)
    w.net.csum_off.clear()                      # something turned the offload on again
    with pytest.raises(CniError) as exc:
        w.reg.check(a)
    assert exc.value.code == NOT_ENROLLED
    assert exc.value.details == ("tx checksum offload is on for eth0 (tx-checksum-ip-generic); "
                                 "merbridge needs it off unless --hardware-checksum=true")
    w.reg.add(a)                                # a repeated ADD repairs it
    w.reg.check(a)
    w.net.fail = "tx_checksum"
    with pytest.raises(CniError) as exc:
        w.reg.check(a)
    assert "cannot read the tx checksum offload of eth0: injected failure" in exc.value.details


def test_hardware_checksum_check_does_not_read_the_offload(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    reg = w.make(hardware_checksum=True)
    a = att(w)
    reg.add(a)
    w.net.fail = "tx_checksum"
    reg.check(a)


def test_gc_removes_only_containers_not_listed(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.reg.add(att(w, cid="c1"))
    w.reg.add(att(w, cid="c2", netns="ns-b", name="api", ips=("10.240.0.7",)))
    w.reg.gc(gc("c2"))
    assert set(w.reg.records) == {"c2"}
    assert list(lp(w)) == ["10.240.0.7"]
    assert set(w.net.listeners) == {str(w.dir / "ns-b")}


def test_gc_keeps_going_and_reports_errors(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.reg.add(att(w, cid="c1"))
    w.reg.add(att(w, cid="c2", netns="ns-b", name="api", ips=("10.240.0.7",)))
    real_delete = maps.LocalPods.delete

    def broken(k):
        if k == "10.240.0.5":
            raise OSError("EPERM")
        real_delete(w.maps.local_pods, k)
    w.maps.local_pods.delete = broken
    with pytest.raises(CniError) as exc:
        w.reg.gc(gc())
    assert "c1" in exc.value.details
    assert set(w.reg.records) == {"c1"}          # c2 was still removed


def test_status_until_ready_and_when_draining(world):
    with pytest.raises(CniError, match="merbridge is starting") as exc:
        world.reg.status()
    assert exc.value.code == PLUGIN_NOT_AVAILABLE
    world.reg.ready = True
    assert world.reg.status() == (True, "ready")
    world.reg.draining = True
    with pytest.raises(CniError, match="merbridge is draining") as exc:
        world.reg.status()
    assert exc.value.code == PLUGIN_NOT_AVAILABLE


def test_parallel_adds_and_a_del_racing_its_add(world):
    w = world
    for i in range(8):
        (w.dir / f"ns-p{i}").write_text("")
        w.pods[("default", f"p{i}")] = meshed_pod(name=f"p{i}", ip=f"10.240.1.{i}", uid=f"u{i}")
    atts = [att(w, cid=f"c{i}", netns=f"ns-p{i}", name=f"p{i}", ips=(f"10.240.1.{i}",))
            for i in range(8)]
    threads = [threading.Thread(target=w.reg.add, args=(a,)) for a in atts]
    threads += [threading.Thread(target=w.reg.delete, args=(atts[0],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    enrolled = set(w.reg.records)
    # c0's DEL ran before or after its ADD: either way the maps agree with the registry
    assert enrolled >= {f"c{i}" for i in range(1, 8)}
    assert set(lp(w)) == {ip for r in w.reg.records.values() for ip in r.ips}
    assert set(mk(w)) == {r.key for r in w.reg.records.values()}
    assert len(w.net.listeners) == len(enrolled)
    assert set(w.store.load()) == enrolled


def test_cni_mode_pod_update_rewrites_policy_and_delete_cleans_up(world):
    w = world
    pod = meshed_pod()
    w.pods[("default", "web")] = pod
    w.reg.add(att(w))
    changed = meshed_pod(ann={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})
    w.reg.on_pod_event("MODIFIED", changed)
    assert 5432 in lp(w)["10.240.0.5"].exclude_outbound_ports
    bad = meshed_pod(ann={"traffic.sidecar.istio.io/excludeOutboundPorts": "x"})
    w.reg.on_pod_event("MODIFIED", bad)          # logged; the previous policy stays
    assert 5432 in lp(w)["10.240.0.5"].exclude_outbound_ports
    w.reg.on_pod_event("DELETED", meshed_pod(uid="someone-else"))
    assert "c1" in w.reg.records
    w.reg.on_pod_event("DELETED", changed)       # the DEL never came
    assert_nothing_left(w)


def test_restore_drops_records_whose_netns_is_gone_and_stale_entries(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.reg.add(att(w, cid="c1"))
    w.reg.add(att(w, cid="c2", netns="ns-b", name="api", ips=("10.240.0.7",)))
    key2 = w.reg.records["c2"].key
    w.maps.mark_pod_ips.put(12345, "10.250.0.1")   # leaked by someone long ago
    w.maps.local_pods.put("10.250.0.1", PodPolicy())
    # kill -9: the process and its sockets die; pins and XDP stay
    w.net.listeners.clear()
    (w.dir / "ns-a").unlink()
    reg2 = w.make()
    reg2.restore(w.store.load())
    assert set(reg2.records) == {"c2"}
    assert mk(w) == {key2: "10.240.0.7"}
    assert set(lp(w)) == {"10.240.0.7"}
    assert w.net.listeners[str(w.dir / "ns-b")].key == key2
    reg2.check(att(w, cid="c2", netns="ns-b", name="api"))
    assert set(w.store.load()) == {"c2"}


def test_restore_completes_a_half_done_add(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.net.fail = "attach_xdp"
    # simulate a kill -9 between the state write and the XDP attach: the record
    # is on disk as "adding" and the maps have entries
    orig_apply = w.reg.enroller.apply

    def dying(rec, policy, undo):
        try:
            orig_apply(rec, policy, undo)
        except OSError:
            raise SystemExit("killed")            # no rollback runs for a killed process
    w.reg.enroller.apply = dying
    with pytest.raises(SystemExit):
        w.reg._add(att(w))
    assert w.store.load()["c1"].phase == "adding"
    w.net.fail = None
    w.net.listeners.clear()
    reg2 = w.make()
    reg2.restore(w.store.load())
    reg2.check(att(w))


def test_shutdown_closes_listeners_detaches_xdp_and_keeps_records(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.reg.add(att(w))
    w.reg.ready = True
    w.reg.shutdown()
    assert w.net.listeners == {} and w.net.xdp == set()
    assert set(w.store.load()) == {"c1"}
    with pytest.raises(CniError):
        w.reg.status()


# ---------------------------------------------------------------- legacy mode

def test_legacy_mode_follows_pod_events(world):
    w = world
    reg = w.make(cni_mode=False)
    pod = meshed_pod()
    reg.on_pod_event("ADDED", plain_pod())
    reg.on_pod_event("ADDED", meshed_pod(ip=None))     # no IP yet: nothing to write
    assert lp(w) == {}
    reg.on_pod_event("MODIFIED", pod)
    assert set(lp(w)) == {"10.240.0.5"}
    upd = meshed_pod(ann={"traffic.sidecar.istio.io/includeInboundPorts": "8080"})
    reg.on_pod_event("MODIFIED", upd)
    assert lp(w)["10.240.0.5"].include_inbound_ports == frozenset({8080})
    moved = meshed_pod(ip="10.240.0.8")
    reg.on_pod_event("MODIFIED", moved)
    assert set(lp(w)) == {"10.240.0.8"}
    left = meshed_pod(ip="10.240.0.8", ann={"sidecar.istio.io/inject": "false"})
    left["metadata"]["labels"] = {"sidecar.istio.io/inject": "false"}
    reg.on_pod_event("MODIFIED", left)
    assert lp(w) == {}
    reg.on_pod_event("ADDED", moved)
    reg.on_pod_event("DELETED", moved)
    assert lp(w) == {}
    assert mk(w) == {} and w.net.listeners == {}


def test_host_network_pods_get_no_policy_in_legacy_mode(world):
    """A hostNetwork pod with a sidecar has the node's IP: no mb_local_pods
    entry for it (it would catch every sidecar's calls to the node)."""
    w = world
    reg = w.make(cni_mode=False)
    host = meshed_pod(name="hostnet", ip="192.168.1.10")
    host["spec"]["hostNetwork"] = True
    reg.on_pod_event("ADDED", host)
    reg.on_pod_event("ADDED", meshed_pod())
    assert set(lp(w)) == {"10.240.0.5"}


def test_legacy_resync_removes_what_the_snapshot_does_not_have(world):
    w = world
    reg = w.make(cni_mode=False, exclude_namespaces=("kube-system",))
    w.maps.local_pods.put("10.250.0.1", PodPolicy())      # from a previous daemon
    reg.on_pod_event("ADDED", meshed_pod(name="gone", ip="10.240.0.2"))
    reg.resync_legacy([meshed_pod(), plain_pod(),
                       meshed_pod(name="sys", ns="kube-system", ip="10.240.0.3")])
    assert set(lp(w)) == {"10.240.0.5"}


# ---------------------------------------------------------------- runtime lock

def test_a_second_daemon_on_the_same_directory_is_refused(tmp_path):
    import os
    from merbridge.daemon.runtime import DaemonError, _dir_lock
    pid_file = tmp_path / "daemon.lock"
    pid_file.write_text("4242\n")
    fd = _dir_lock(str(tmp_path / "pins"), "pin dir", str(pid_file))
    try:
        with pytest.raises(DaemonError, match=r"pid 4242.*pin dir"):
            _dir_lock(str(tmp_path / "pins"), "pin dir", str(pid_file))
    finally:
        os.close(fd)
    os.close(_dir_lock(str(tmp_path / "pins"), "pin dir"))   # free again once released


def test_metrics_count_enrolled_pods(world):
    """(CNI requests are counted by the server: test_cniserver.)"""
    from merbridge.daemon import metrics
    w = world
    m = metrics.Metrics()
    reg = w.make(metrics=m)
    w.pods[("default", "web")] = meshed_pod()
    reg.add(att(w))
    reg.delete(att(w, cid="unknown"))
    text = m.render().decode()
    assert "merbridge_pods_enrolled 1.0" in text
    assert "merbridge_cni_requests_total{" not in text
    reg.delete(att(w))
    assert "merbridge_pods_enrolled 0.0" in m.render().decode()


def test_state_file_keeps_the_newest_snapshot_whatever_order_they_are_written_in(tmp_path):
    """ADD/DEL write the state file after releasing the registry lock: a snapshot
    taken earlier but written later must not put an older state back."""
    from merbridge.daemon.state import Record
    store = StateStore(tmp_path / "state")
    recs = {"a": Record("a", "/proc/1/ns/net", "eth0", "ns", "p", ips=("10.0.0.1",), key=1)}
    older = store.snapshot(recs)
    recs["b"] = Record("b", "/proc/2/ns/net", "eth0", "ns", "q", ips=("10.0.0.2",), key=2,
                       phase=ENROLLED, netns_id=(3, 4), extra={"x": [1]})
    newer = store.snapshot(recs)
    store.write(newer)
    store.write(older)
    assert sorted(store.load()) == ["a", "b"]
    assert store.load()["b"] == recs["b"]
    store.write(store.snapshot({}))
    assert store.load() == {}
