"""Fuzzing pod manifests and annotations through the pod registry.

Generated: whole pod objects (well-formed ones carrying fuzzed
``traffic.sidecar.istio.io/*`` annotations -- bad CIDRs, ports out of range,
huge lists, odd encodings -- and structurally broken ones: wrong types at
every level), and the YAML/JSON files a ``--pods-dir`` would hold.

Invariants, per case:
* CNI mode: ADD either enrols the pod (every map value encodes within the
  datapath's limits) or fails with a ``CniError`` of a known code and leaves
  nothing behind (maps, listeners, XDP, records, state file); DEL always
  succeeds and leaves nothing. Never another exception.
* Legacy mode: a pod event never raises; mb_local_pods holds only encodable
  policies; DELETED leaves the map empty.
* The pods-dir loader returns pods or raises ValueError, nothing else.
* Nothing reaches a shell: a manifest whose every string is a shell payload
  creates no file.
"""
from __future__ import annotations

import os
import string

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from merbridge.bpf import maps as bpfmaps
from merbridge.cni.errors import CniError
from merbridge.daemon import annotations as A
from merbridge.daemon import podsdir
from merbridge.daemon.pods import Registry
from merbridge.daemon.state import StateStore
from test_pods import ISTIO, FakePodNet, att, real_maps

#: codes an ADD may fail with on bad input: try again later, bad manifest, no IP
ADD_CODES = {11, 101, 102}
CASES = int(os.environ.get("MB_FUZZ_CASES", "600"))
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

text = st.text(max_size=30)
json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text
junk = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(text, kids, max_size=3), max_leaves=8)

port_items = st.one_of(st.integers(0, 70000).map(str), st.integers(-5, -1).map(str),
                       st.sampled_from(["*", "", " ", "http", "0x50", "1e3", "٣", "80 ", "+80"]),
                       text)
port_lists = st.one_of(st.lists(port_items, max_size=8).map(",".join),
                       # huge lists: past MB_MAX_PORTS
                       st.integers(1, 400).map(lambda n: ",".join(str(1 + i) for i in range(n))))
cidr_items = st.one_of(
    st.ip_addresses(v=4).flatmap(lambda a: st.integers(-1, 40).map(lambda p: f"{a}/{p}")),
    st.ip_addresses(v=6).flatmap(lambda a: st.integers(-1, 140).map(lambda p: f"{a}/{p}")),
    st.sampled_from(["*", "", "10.0.0.0/8", "10.0.0.1", "::/0", "10.0.0.0/33", "1.2.3/24",
                     "10.0.0.0/8/8", "fe80::1%eth0/64"]), text)
cidr_lists = st.one_of(st.lists(cidr_items, max_size=6).map(",".join),
                       st.integers(1, 200).map(
                           lambda n: ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(n))))
annotation_values = {
    A.INCLUDE_INBOUND_PORTS: port_lists, A.EXCLUDE_INBOUND_PORTS: port_lists,
    A.INCLUDE_OUTBOUND_PORTS: port_lists, A.EXCLUDE_OUTBOUND_PORTS: port_lists,
    A.INCLUDE_OUTBOUND_IP_RANGES: cidr_lists, A.EXCLUDE_OUTBOUND_IP_RANGES: cidr_lists,
    A.STATUS_PORT: port_items,
    A.INTERCEPTION_MODE: st.sampled_from(["REDIRECT", "TPROXY", "NONE", "redirect", ""]),
    A.INJECT: st.sampled_from(["true", "false", "yes", ""]),
}


def mostly(good, *bad):
    choices = [good] * 8 + list(bad)
    return st.integers(0, len(choices) - 1).flatmap(lambda i: choices[i])


annotation_maps = st.fixed_dictionaries(
    {A.STATUS: st.just("{}")},
    optional={k: mostly(v, junk) for k, v in annotation_values.items()})
ip_entries = st.one_of(st.ip_addresses().map(str), st.sampled_from(["", "10.0.0", "::g"]), junk)
statuses = st.fixed_dictionaries(
    {}, optional={"podIP": mostly(ip_entries, junk),
                  "podIPs": mostly(st.lists(st.fixed_dictionaries({"ip": ip_entries}),
                                            max_size=3), st.lists(junk, max_size=3), junk)})
containers = st.lists(st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["app", "istio-proxy"]), junk)},
    optional={"args": mostly(st.just(["proxy", "sidecar"]), junk),
              "env": mostly(st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["ISTIO_META_INTERCEPTION_MODE", "X"]),
                   "value": text}), max_size=2), junk)}), max_size=3)
SIDECAR = st.just([{"name": "app"}, {"name": "istio-proxy", "args": ["proxy", "sidecar"]}])
pods = st.fixed_dictionaries({
    "metadata": mostly(st.fixed_dictionaries(
        {"name": st.just("web"), "namespace": st.just("default"),
         "annotations": mostly(annotation_maps, junk)},
        optional={"uid": mostly(st.just("u-1"), junk), "labels": junk}), junk),
    "spec": mostly(st.fixed_dictionaries({"containers": mostly(SIDECAR, containers, junk)}),
                   junk),
    "status": mostly(statuses, junk)})


def fresh(tmp_path, cni_mode=True):
    m, net = real_maps(), FakePodNet()
    store = StateStore(tmp_path / "state")
    store.remove()
    (tmp_path / "ns-a").write_text("")
    box = {}
    reg = Registry(mesh=ISTIO, maps=m, podnet=net, lookup=lambda ns, name: box.get("pod"),
                   store=store, cni_mode=cni_mode, add_wait=0)
    return reg, m, net, store, box


def assert_empty(reg, m, net, store):
    assert dict(m.local_pods.items()) == {}
    assert dict(m.mark_pod_ips.items()) == {}
    assert m.netns_pod.items() == []
    assert net.listeners == {} and net.xdp == set()
    assert reg.records == {} and store.load() == {} and reg._ctr_locks == {}


class W:  # what test_pods.att() expects
    def __init__(self, d):
        self.dir = d


@FUZZ
@given(pod=pods, with_ips=st.booleans())
def test_add_with_fuzzed_manifests(tmp_path, pod, with_ips):
    reg, m, net, store, box = fresh(tmp_path)
    box["pod"] = pod
    a = att(W(tmp_path), ips=("10.240.0.5", "fd00::5") if with_ips else ())
    try:
        reg.add(a)
    except CniError as exc:
        event(f"ADD failed with code {exc.code}")
        assert exc.code in ADD_CODES, exc
        assert_empty(reg, m, net, store)
    else:
        event("ADD enrolled" if reg.records else "ADD: not in the mesh")
        for ip, policy in m.local_pods.items():
            bpfmaps.encode_policy(policy)
        if reg.records:
            assert len(m.mark_pod_ips.items()) == 1 and net.listeners
    reg.delete(a)
    assert_empty(reg, m, net, store)


@FUZZ
@given(pod=pods)
def test_legacy_events_with_fuzzed_manifests(tmp_path, pod):
    reg, m, net, store, box = fresh(tmp_path, cni_mode=False)
    reg.on_pod_event("ADDED", pod)
    reg.on_pod_event("MODIFIED", pod)
    for ip, policy in m.local_pods.items():
        bpfmaps.encode_policy(policy)
    reg.on_pod_event("DELETED", pod)
    assert dict(m.local_pods.items()) == {}
    reg.resync_legacy([pod])
    reg.resync_legacy([])
    assert dict(m.local_pods.items()) == {}


yaml_docs = st.one_of(
    st.binary(max_size=300),
    st.text(string.printable, max_size=300).map(str.encode),
    pods.map(lambda p: __import__("json").dumps({"kind": "Pod", **p}).encode()),
    st.sampled_from([b"a: &a [*a]", b"!!python/object:os.system {}", b"- - - -", b"\xff\xfe",
                     b"kind: PodList\nitems: 7", b"kind: Pod\nmetadata: {name: [x]}",
                     b"a: " + b"[" * 5000, b"---\n" * 100]))


@settings(max_examples=min(CASES, 300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=yaml_docs)
def test_pods_dir_files(tmp_path, data):
    path = tmp_path / "pod.yaml"
    path.write_bytes(data)
    try:
        found = podsdir.load_file(str(path))
    except ValueError:
        return
    for pod in found:
        assert isinstance(pod, dict) and isinstance(pod["metadata"]["name"], str)


def test_nothing_from_a_manifest_reaches_a_shell(tmp_path):
    canary = tmp_path / "pwned"
    payloads = [f"$(touch {canary})", f"`touch {canary}`", f"; touch {canary}",
                f"| touch {canary}", f"&& touch {canary}"]
    for payload in payloads:
        reg, m, net, store, box = fresh(tmp_path)
        ann = {k: payload for k in annotation_values}
        ann[A.STATUS] = "{}"
        box["pod"] = {"metadata": {"name": payload, "namespace": payload, "uid": payload,
                                   "annotations": ann, "labels": {"app": payload}},
                      "spec": {"containers": [{"name": "istio-proxy", "args": [payload]}]},
                      "status": {"podIP": payload}}
        a = att(W(tmp_path))
        try:
            reg.add(a)
        except CniError as exc:
            assert exc.code in ADD_CODES
        reg.on_pod_event("ADDED", box["pod"])
        reg.delete(a)
        assert not canary.exists()
