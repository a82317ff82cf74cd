"""The registry across a daemon restart: CNI commands held back while the state
file is restored, restore racing pod events, and adopting pods that started
while no daemon ran (against the in-memory maps and fake podnet of test_pods)."""
from __future__ import annotations

import threading
import time

import pytest

from merbridge.cni.errors import TRY_AGAIN_LATER, CniError
from merbridge.daemon.adopt import ADOPTED
from merbridge.daemon.state import StateStore
from test_pods import att, gc, lp, meshed_pod, mk


#: the attachment of the second pod, "api"
API = dict(cid="c2", netns="ns-b", name="api", ips=("10.240.0.7",))


def crashed(w, enrol_api: bool = False):
    """Pods web (enrolled) and api in the pod source, then kill -9 of the daemon
    (its sockets die; pins, XDP and the state file stay): the next daemon's registry."""
    w.pods[("default", "web")] = meshed_pod()
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.reg.add(att(w))
    if enrol_api:
        w.reg.add(att(w, **API))
    w.net.listeners.clear()
    return w.make()


def test_commands_wait_while_restoring_del_until_done(world):
    w = world
    reg2 = crashed(w)
    done = threading.Event()

    def deleting():
        reg2.delete(att(w))
        done.set()

    with reg2.restoring():
        t = threading.Thread(target=deleting)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(CniError) as exc:        # ADD: add_wait (0.3 s), then 11
            reg2.add(att(w, **API))
        assert exc.value.code == TRY_AGAIN_LATER and time.monotonic() - t0 >= 0.3
        assert "c2" not in reg2.records
        for check in (lambda: reg2.check(att(w)), lambda: reg2.gc(gc())):
            with pytest.raises(CniError) as exc:
                check()
            assert exc.value.code == TRY_AGAIN_LATER
        assert not done.is_set()                     # DEL keeps waiting
        reg2.restore(w.store.load())
        assert w.net.listeners                       # c1 restored, DEL not served yet
    t.join(timeout=5)
    assert done.is_set()
    assert reg2.records == {} and w.net.listeners == {} and mk(w) == {} and lp(w) == {}


def test_restore_skips_a_record_a_pod_event_withdrew_meanwhile(world):
    w = world
    reg2 = crashed(w, enrol_api=True)
    api = w.pods[("default", "api")]
    events = []

    def lookup(ns, name):
        # the pod source delivers api's deletion while restore handles c1
        if name == "web" and not events:
            events.append("DELETED")
            del w.pods[("default", "api")]
            reg2.on_pod_event("DELETED", api)
        return w.pods.get((ns, name))
    reg2.lookup = lookup
    with reg2.restoring():
        reg2.restore(w.store.load())
    assert events == ["DELETED"]
    assert set(reg2.records) == {"c1"} and set(w.store.load()) == {"c1"}
    assert list(w.net.listeners) == [str(w.dir / "ns-a")]      # no listener for c2
    assert set(reg2.enroller.markers) == {"c1"}
    assert set(lp(w)) == {"10.240.0.5"} and list(mk(w).values()) == ["10.240.0.5"]


def test_an_add_during_the_restore_is_served_after_it(world):
    w = world
    reg2 = crashed(w)
    reg2.add_wait = 5
    api = att(w, **API)
    with reg2.restoring():
        t = threading.Thread(target=reg2.add, args=(api,))
        t.start()
        time.sleep(0.2)
        assert "c2" not in reg2.records              # neither overwritten nor swept
        reg2.restore(w.store.load())
    t.join(timeout=5)
    assert set(reg2.records) == {"c1", "c2"} and set(w.store.load()) == {"c1", "c2"}
    assert set(lp(w)) == {"10.240.0.5", "10.240.0.7"} and len(mk(w)) == 2
    reg2.check(api)


@pytest.fixture
def adopting(world):
    """world whose fake podnet answers adopt's search: ``w.net.addrs[netns]
    = [(ifname, ip), ...]``; ``w.net.searched`` lists the directories searched."""
    return world


def test_adopt_enrols_a_pod_found_by_ip_and_its_del_withdraws_it(adopting):
    w = adopting
    w.pods[("default", "web")] = meshed_pod()
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.reg.add(att(w))
    nsb = str(w.dir / "ns-b")
    w.net.addrs = {str(w.dir / "ns-a"): [("eth0", "10.240.0.5")],
                   nsb: [("eth0", "10.240.0.7"), ("eth0", "fe80::1")]}
    w.reg.adopt(w.pods.values(), "/netns")
    assert w.net.searched == ["/netns"]
    rec = w.reg.records[f"{ADOPTED}default/api/u-2"]
    assert (rec.netns, rec.ifname, rec.ips, rec.phase) == (nsb, "eth0", ("10.240.0.7",),
                                                           "enrolled")
    assert w.net.listeners[nsb].key == rec.key and (nsb, "eth0") in w.net.xdp
    assert mk(w)[rec.key] == "10.240.0.7" and "10.240.0.7" in lp(w)
    assert set(w.store.load()) == {"c1", rec.container_id}
    # the runtime's commands name a container id we never saw: found by netns
    real = att(w, cid="real-api", netns="ns-b", name="api", ips=("10.240.0.7",))
    w.reg.check(real)
    w.reg.gc(gc("c1"))                      # GC leaves adopted records alone
    assert rec.container_id in w.reg.records
    w.reg.delete(real)
    assert set(w.reg.records) == {"c1"} and nsb not in w.net.listeners
    assert set(lp(w)) == {"10.240.0.5"} and list(mk(w).values()) == ["10.240.0.5"]


def test_an_add_gives_an_adopted_record_its_container_id(adopting):
    w = adopting
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")
    w.net.addrs = {str(w.dir / "ns-b"): [("eth0", "10.240.0.7")]}
    w.reg.adopt(w.pods.values(), "/netns")
    key = w.reg.records[f"{ADOPTED}default/api/u-2"].key
    w.reg.add(att(w, cid="real-api", netns="ns-b", name="api", ips=("10.240.0.7",)))
    assert list(w.reg.records) == ["real-api"] and w.reg.records["real-api"].key == key
    assert list(w.reg.enroller.markers) == ["real-api"] and set(w.store.load()) == {"real-api"}
    assert mk(w) == {key: "10.240.0.7"}


def test_adopt_leaves_ambiguous_missing_and_outside_pods_alone(adopting, caplog):
    w = adopting
    w.pods[("default", "twice")] = meshed_pod(name="twice", ip="10.240.0.8", uid="u-3")
    w.pods[("default", "nowhere")] = meshed_pod(name="nowhere", ip="10.240.0.9", uid="u-4")
    w.pods[("default", "noip")] = meshed_pod(name="noip", ip="", uid="u-5")
    w.pods[("default", "plain")] = {"metadata": {"name": "plain", "namespace": "default"},
                                    "spec": {"containers": [{"name": "app"}]},
                                    "status": {"podIP": "10.240.0.10"}}
    w.net.addrs = {str(w.dir / "ns-a"): [("eth0", "10.240.0.8")],
                   str(w.dir / "ns-b"): [("eth0", "10.240.0.8")],
                   str(w.dir / "ns-c"): [("eth0", "10.240.0.10")]}
    w.reg.adopt(w.pods.values(), "/netns")
    assert w.reg.records == {} and w.net.listeners == {} and mk(w) == {} and lp(w) == {}
    assert "10.240.0.8 is on eth0 in" in caplog.text


def test_adopt_survives_a_search_that_fails(adopting, caplog):
    w = adopting
    w.pods[("default", "api")] = meshed_pod(name="api", ip="10.240.0.7", uid="u-2")

    w.net.fail = "netns_addresses"
    w.reg.adopt(w.pods.values(), "/netns")
    assert w.reg.records == {}
    assert "cannot search /netns for the netns of 1 pod(s): injected failure" in caplog.text


def test_only_a_clean_shutdown_marks_the_state_file(world):
    w = world
    w.pods[("default", "web")] = meshed_pod()
    w.reg.add(att(w))
    assert set(w.store.load()) == {"c1"} and not w.store.stopped_cleanly   # kill -9
    w.reg.shutdown()
    assert set(w.store.load()) == {"c1"} and w.store.stopped_cleanly
    w.make().restore(w.store.load())     # the next daemon's first save clears the mark
    assert set(w.store.load()) == {"c1"} and not w.store.stopped_cleanly


def test_a_missing_state_file_is_not_a_clean_stop(tmp_path):
    store = StateStore(tmp_path / "none")
    assert store.load() == {} and not store.stopped_cleanly
