"""DNS capture and the proxy's identity, read from the pod as istio-cni reads them.

istio-cni (cni/pkg/plugin/sidecar_redirect.go) takes ISTIO_META_DNS_CAPTURE
from the istio-proxy container's env (strconv.ParseBool; a value it rejects
leaves capture off) and the proxy UID/GID from that container's
securityContext.runAsUser / runAsGroup when set and non-zero, 1337 otherwise
(0 here: the datapath's mesh default). Both travel in mb_pod_config.
"""
import copy

import pytest

from merbridge.bpf import maps
from merbridge.bpf import mesh as meshes
from merbridge.bpf import types as t
from merbridge.bpf.policy import PodPolicy, describe
from merbridge.daemon import annotations as an

ISTIO = meshes.get("istio")

POD = {
    "metadata": {"name": "app", "namespace": "shop",
                 "annotations": {"sidecar.istio.io/status": "{}"}},
    "spec": {"containers": [{"name": "app"},
                            {"name": "istio-proxy", "args": ["proxy", "sidecar"]}]},
}


def with_proxy(env=None, security=None, native=False, mesh_container="istio-proxy"):
    p = copy.deepcopy(POD)
    proxy = p["spec"]["containers"].pop()
    proxy["name"] = mesh_container
    if env is not None:
        proxy["env"] = [{"name": "OTHER", "value": "x"}, *env]
    if security is not None:
        proxy["securityContext"] = security
    p["spec"].setdefault("initContainers" if native else "containers", []).append(proxy)
    return p


def dns_env(value):
    return [{"name": "ISTIO_META_DNS_CAPTURE", "value": value}]


@pytest.mark.parametrize("value,on", [
    ("true", True), ("True", True), ("1", True), ("t", True),
    ("false", False), ("0", False), ("yes", False), ("", False), (" true", False),
])
def test_dns_capture_is_parsebool_of_the_proxy_env(value, on):
    p = with_proxy(env=dns_env(value))
    assert an.dns_capture(p, ISTIO) is on
    assert an.pod_policy(p, ISTIO).dns_capture is on


def test_dns_capture_off_without_the_env_or_elsewhere():
    assert an.dns_capture(with_proxy(), ISTIO) is False
    # the app container's env, or a pod annotation, is not where istio-cni looks
    p = with_proxy()
    p["spec"]["containers"][0]["env"] = dns_env("true")
    p["metadata"]["annotations"]["proxy.istio.io/config"] = (
        '{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}')
    assert an.dns_capture(p, ISTIO) is False


def test_dns_capture_native_sidecar():
    assert an.dns_capture(with_proxy(env=dns_env("true"), native=True), ISTIO) is True


def test_other_meshes_dns():
    linkerd, kuma, osm = (meshes.get(n) for n in ("linkerd", "kuma", "osm"))
    assert linkerd.dns_port == 0 and osm.dns_port == 0 and kuma.dns_port == 15053
    p = with_proxy(env=dns_env("true"), mesh_container="linkerd-proxy")
    assert an.dns_capture(p, linkerd) is False
    k = with_proxy(mesh_container="kuma-sidecar")
    assert an.dns_capture(k, kuma) is False
    k["metadata"]["annotations"]["kuma.io/builtin-dns"] = "enabled"
    assert an.dns_capture(k, kuma) is True
    assert an.pod_policy(k, kuma).dns_capture is True


@pytest.mark.parametrize("security,ids", [
    (None, (0, 0)),
    ({}, (0, 0)),
    ({"runAsUser": 1000670000, "runAsGroup": 1000670001}, (1000670000, 1000670001)),
    ({"runAsUser": 1000670000}, (1000670000, 0)),
    ({"runAsUser": 0, "runAsGroup": 0}, (0, 0)),   # root: istio-cni falls back to 1337
    ({"runAsGroup": 4000}, (0, 4000)),
])
def test_proxy_identity_from_the_proxy_container(security, ids):
    p = with_proxy(security=security)
    assert an.proxy_identity(p, ISTIO) == ids
    policy = an.pod_policy(p, ISTIO)
    assert (policy.proxy_uid, policy.proxy_gid) == ids


def test_pod_level_security_context_is_not_read():
    p = with_proxy()
    p["spec"]["securityContext"] = {"runAsUser": 5000}
    assert an.proxy_identity(p, ISTIO) == (0, 0)


@pytest.mark.parametrize("bad", ["1337", -1, 2 ** 32, True, 1.5])
def test_bad_proxy_identity_is_an_error(bad):
    with pytest.raises(an.AnnotationError, match="runAsUser"):
        an.proxy_identity(with_proxy(security={"runAsUser": bad}), ISTIO)


def test_policy_round_trips_through_the_struct():
    policy = PodPolicy(status_port=15020, dns_capture=True, proxy_uid=1000670000,
                       proxy_gid=1000670001)
    c = maps.encode_policy(policy)
    assert c.flags & t.MB_POD_F_DNS_CAPTURE
    assert (c.proxy_uid, c.proxy_gid) == (1000670000, 1000670001)
    assert maps.decode_policy(c) == policy
    assert maps.decode_policy(maps.encode_policy(PodPolicy())) == PodPolicy()
    with pytest.raises(maps.PolicyTooLarge, match="proxy_uid"):
        maps.encode_policy(PodPolicy(proxy_uid=2 ** 32))


def test_describe_shows_dns_and_identity():
    text = describe(PodPolicy(dns_capture=True, proxy_uid=2000, proxy_gid=2000))
    assert "dns captured" in text and "proxy uid 2000 gid 2000" in text
    assert "dns" not in describe(PodPolicy())


def test_metrics_count_captured_dns_queries():
    from merbridge.daemon import metrics
    m = metrics.Metrics()
    assert b"dns_queries_captured" not in m.render()   # no datapath yet
    counters = {"dns_captured": 7, "redirect_out": 3}
    m.set_datapath_counters(lambda: counters)
    assert "merbridge_dns_queries_captured_total 7.0" in m.render().decode().splitlines()

    def gone():
        raise OSError("map closed")
    m.set_datapath_counters(gone)   # a scrape never fails because a map is gone
    assert b"dns_queries_captured" not in m.render()


def _legacy(found):
    import threading

    from merbridge.bpf import maps as mapsmod
    from merbridge.daemon.legacy import LegacyPods
    m = mapsmod.Maps({name: mapsmod.DictBackend() for name in t.ALL_MAPS})
    decided = {}
    lp = LegacyPods(m, threading.RLock(), lambda pod: decided["v"],
                    lambda pod: ("ns", pod["name"], "uid"), ValueError)
    asked = []

    def find(ips):
        asked.append(ips)
        if isinstance(found, Exception):
            raise found
        return found
    lp.find_netns_cookie = find
    return lp, m, decided, asked


def test_legacy_daemon_seeds_the_netns_of_a_pod_with_its_own_proxy_uid():
    """Legacy mode learns a pod's IP only from traffic its datapath left alone;
    a proxy with its own UID would never make any, so the daemon writes
    mb_netns_ip itself, and only for such pods."""
    lp, m, decided, asked = _legacy(77)
    decided["v"] = (("10.0.0.5", "fd00::5"), PodPolicy(proxy_uid=2000))
    lp.event("ADDED", {"name": "a"})
    assert asked == [("10.0.0.5", "fd00::5")]
    assert m.netns_ip.all_items() == [(77, ("10.0.0.5", "fd00::5"))]
    decided["v"] = (("10.0.0.6",), PodPolicy())   # the mesh default: traffic teaches it
    lp.event("ADDED", {"name": "b"})
    assert len(asked) == 1 and len(m.netns_ip.all_items()) == 1
    assert m.local_pods.get("10.0.0.6") == PodPolicy()


@pytest.mark.parametrize("found", [None, OSError("netns gone")])
def test_legacy_seed_not_found_leaves_the_policy_written(found, caplog):
    lp, m, decided, _ = _legacy(found)
    decided["v"] = (("10.0.0.5",), PodPolicy(proxy_gid=4000))
    lp.event("ADDED", {"name": "a"})
    assert m.local_pods.get("10.0.0.5") == PodPolicy(proxy_gid=4000)
    assert m.netns_ip.all_items() == []
    assert "10.0.0.5" in caplog.text
