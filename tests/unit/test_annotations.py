"""Pod membership and annotation policy, with istio-iptables as the oracle.

``verdict_out``/``verdict_in`` evaluate a PodPolicy in the decision order
documented in merbridge.bpf.policy (the ISTIO_OUTPUT / ISTIO_INBOUND order);
the expected verdicts below are what the iptables rules of the reference
(§2.2) would do for the same annotations.
"""
import copy
import ipaddress

import pytest

from merbridge.bpf import mesh as meshes
from merbridge.daemon import annotations as an
from merbridge.daemon.annotations import AnnotationError, mesh_membership, pod_ips, pod_policy

ISTIO = meshes.get("istio")

BASE_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "app", "namespace": "shop",
                 "annotations": {"sidecar.istio.io/status": '{"initContainers":["istio-init"]}'},
                 "labels": {}},
    "spec": {"initContainers": [{"name": "istio-init", "image": "proxyv2"}],
             "containers": [{"name": "app", "image": "nginx"},
                            {"name": "istio-proxy", "image": "proxyv2",
                             "args": ["proxy", "sidecar", "--domain", "x"]}]},
    "status": {"podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}]},
}


def pod(annotations=None, labels=None, mutate=None):
    p = copy.deepcopy(BASE_POD)
    p["metadata"]["annotations"].update(annotations or {})
    p["metadata"]["labels"].update(labels or {})
    if mutate:
        mutate(p)
    return p


MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def in_cidrs(ip, cidrs):
    """As helpers.h:mb_cidr_match: IPv4 as ::ffff:a.b.c.d, and an IPv6 CIDR
    (any not inside ::ffff:0:0/96) never matches IPv4 (Istio: ip6tables)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        addr = ipaddress.IPv6Address("::ffff:" + ip)
    for packed, plen in cidrs:
        net = ipaddress.IPv6Network((packed, plen))
        if ipaddress.ip_address(ip).version == 4 and not net.subnet_of(MAPPED):
            continue
        if addr in net:
            return True
    return False


def verdict_out(p, ip, port):
    if port in p.exclude_outbound_ports:
        return False
    if in_cidrs(ip, p.exclude_outbound_cidrs):
        return False
    if port in p.include_outbound_ports:
        return True
    return p.include_outbound_all or in_cidrs(ip, p.include_outbound_cidrs)


def verdict_in(p, port):
    if port == 15008 or (p.include_inbound_all and port in p.exclude_inbound_ports):
        return False
    return p.include_inbound_all or port in p.include_inbound_ports


# ------------------------------------------------------------ membership

def _drop_proxy(p):
    p["spec"]["containers"] = [c for c in p["spec"]["containers"] if c["name"] != "istio-proxy"]


def _native_sidecar(p):
    proxy = p["spec"]["containers"].pop()
    p["spec"]["initContainers"].append(dict(proxy, restartPolicy="Always"))


def _no_init(p):
    p["spec"].pop("initContainers")


def _env(name, value):
    def f(p):
        p["spec"]["containers"][1]["env"] = [{"name": name, "value": value}]
    return f


def _args(*args):
    def f(p):
        p["spec"]["containers"][1]["args"] = list(args)
    return f


def _drop_status(p):
    p["metadata"]["annotations"].pop("sidecar.istio.io/status")


MEMBERSHIP = [
    ("injected, istio-init present", pod(), True, "istio-init"),
    ("injected, CNI mode (no istio-init)", pod(mutate=_no_init), True, "injected"),
    ("native sidecar in initContainers", pod(mutate=_native_sidecar), True, "injected"),
    ("no istio-proxy", pod(mutate=_drop_proxy), False, "no istio-proxy"),
    ("DISABLE_ENVOY=true", pod(mutate=_env("DISABLE_ENVOY", "true")), False, "DISABLE_ENVOY"),
    ("DISABLE_ENVOY=1", pod(mutate=_env("DISABLE_ENVOY", "1")), False, "DISABLE_ENVOY"),
    ("DISABLE_ENVOY=false", pod(mutate=_env("DISABLE_ENVOY", "false")), True, "injected"),
    ("DISABLE_ENVOY unparsable", pod(mutate=_env("DISABLE_ENVOY", "yes")), True, "injected"),
    ("gateway proxy", pod(mutate=_args("proxy", "router")), False, "router"),
    ("no args: sidecar assumed", pod(mutate=_args()), True, "injected"),
    ("inject annotation false", pod({"sidecar.istio.io/inject": "false"}), False, "annotation"),
    ("inject annotation F", pod({"sidecar.istio.io/inject": "F"}), False, "annotation"),
    ("inject label false", pod(labels={"sidecar.istio.io/inject": "false"}), False, "label"),
    ("label true beats annotation false",
     pod({"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "true"}), True, "injected"),
    ("label false beats annotation true",
     pod({"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}), False, "label"),
    ("unparsable label replaces annotation false",
     pod({"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "nope"}), True, "injected"),
    ("inject 'no' is not a ParseBool false", pod({"sidecar.istio.io/inject": "no"}), True, "injected"),
    ("no status annotation", pod(mutate=_drop_status), False, "not injected"),
    ("TPROXY", pod({"sidecar.istio.io/interceptionMode": "TPROXY"}), False, "REDIRECT only"),
    ("NONE", pod({"sidecar.istio.io/interceptionMode": "NONE"}), False, "not supported"),
    ("REDIRECT explicit", pod({"sidecar.istio.io/interceptionMode": "REDIRECT"}), True, "injected"),
]


@pytest.mark.parametrize("name,p,expected,reason_part", MEMBERSHIP, ids=[m[0] for m in MEMBERSHIP])
def test_membership(name, p, expected, reason_part):
    m = mesh_membership(p, ISTIO, exclude_namespaces=["kube-system"])
    assert m.in_mesh is expected
    assert reason_part in m.reason


def test_excluded_namespace_wins_over_everything():
    p = pod()
    p["metadata"]["namespace"] = "kube-system"
    m = mesh_membership(p, ISTIO, exclude_namespaces=["kube-system"])
    assert not m.in_mesh and "kube-system" in m.reason


def test_missing_namespace_is_default():
    p = pod()
    del p["metadata"]["namespace"]
    assert not mesh_membership(p, ISTIO, ["default"]).in_mesh


def test_invalid_interception_mode_is_an_error():
    with pytest.raises(AnnotationError, match="interceptionMode.*BOGUS"):
        mesh_membership(pod({"sidecar.istio.io/interceptionMode": "BOGUS"}), ISTIO)


@pytest.mark.parametrize("mesh_name,container,opt_out", [
    ("linkerd", "linkerd-proxy", {"linkerd.io/inject": "disabled"}),
    ("kuma", "kuma-sidecar", {"kuma.io/sidecar-injection": "disabled"}),
    ("osm", "envoy", {"openservicemesh.io/sidecar-injection": "false"}),
])
def test_other_meshes_need_their_sidecar_not_istio_status(mesh_name, container, opt_out):
    mesh = meshes.get(mesh_name)
    p = {"metadata": {"name": "a", "namespace": "x"},
         "spec": {"containers": [{"name": "app"}, {"name": container}]}}
    # upstream's defect: Linkerd pods lack sidecar.istio.io/status and were
    # always skipped; here the mesh's own sidecar container decides
    assert mesh_membership(p, mesh).in_mesh
    p["metadata"]["annotations"] = opt_out
    assert not mesh_membership(p, mesh).in_mesh
    assert not mesh_membership({"spec": {"containers": [{"name": "app"}]}}, mesh).in_mesh


# ------------------------------------------------------------ policy (oracle: §2.2)

TP = "traffic.sidecar.istio.io/"

OUTBOUND = [
    # (annotations, destination ip, port, redirected?)
    ({}, "1.2.3.4", 80, True),                       # default: -i '*'
    ({}, "1.2.3.4", 15020, False),                   # CNI default -o 15020
    ({}, "fd00::9", 443, True),
    ({TP + "includeOutboundIPRanges": ""}, "1.2.3.4", 80, False),      # empty: no outbound
    # includeOutboundPorts is OR-ed with the ranges (rule 8 before rule 9)
    ({TP + "includeOutboundIPRanges": "", TP + "includeOutboundPorts": "8080"}, "1.2.3.4", 8080, True),
    ({TP + "includeOutboundIPRanges": "", TP + "includeOutboundPorts": "8080"}, "1.2.3.4", 80, False),
    ({TP + "includeOutboundIPRanges": "10.0.0.0/8", TP + "includeOutboundPorts": "8080"},
     "192.168.0.1", 8080, True),
    ({TP + "includeOutboundIPRanges": "10.0.0.0/8"}, "10.9.9.9", 80, True),
    ({TP + "includeOutboundIPRanges": "10.0.0.0/8"}, "11.0.0.1", 80, False),
    ({TP + "includeOutboundIPRanges": " 10.0.0.0/8 , fd00::/8 "}, "fd00::1", 80, True),
    ({TP + "includeOutboundIPRanges": "10.0.0.0/8"}, "fd00::1", 80, False),
    # exclusions RETURN before the includes, whatever the include form
    ({TP + "excludeOutboundIPRanges": "10.96.0.0/12"}, "10.96.0.1", 443, False),
    ({TP + "excludeOutboundIPRanges": "10.96.0.0/12"}, "10.112.0.1", 443, True),
    ({TP + "excludeOutboundIPRanges": "10.0.0.0/8", TP + "includeOutboundPorts": "8080"},
     "10.1.1.1", 8080, False),
    ({TP + "includeOutboundIPRanges": "10.0.0.0/8", TP + "excludeOutboundIPRanges": "10.1.0.0/16"},
     "10.1.2.3", 80, False),
    ({TP + "excludeOutboundIPRanges": "*"}, "1.2.3.4", 80, False),
    ({TP + "excludeOutboundIPRanges": "*"}, "fd00::1", 80, False),
    # the families stay apart, as istio-iptables' v4 and v6 rules do
    ({TP + "excludeOutboundIPRanges": "::/0"}, "1.2.3.4", 80, True),
    ({TP + "excludeOutboundIPRanges": "::/0"}, "fd00::1", 80, False),
    ({TP + "excludeOutboundIPRanges": "::ffff:0:0/96"}, "1.2.3.4", 80, True),
    ({TP + "excludeOutboundIPRanges": "0.0.0.0/0"}, "fd00::1", 80, True),
    ({TP + "includeOutboundIPRanges": "::/0"}, "1.2.3.4", 80, False),
    ({TP + "includeOutboundIPRanges": "::/0"}, "fd00::1", 80, True),
    ({TP + "excludeOutboundPorts": "5432, 6379"}, "1.2.3.4", 6379, False),
    # istio-cni: 15020 is the default only when the annotation is absent
    ({TP + "excludeOutboundPorts": "5432"}, "1.2.3.4", 15020, True),
    ({TP + "excludeOutboundPorts": "5432"}, "1.2.3.4", 5432, False),
    ({TP + "excludeOutboundPorts": ""}, "1.2.3.4", 15020, True),
    ({TP + "excludeOutboundPorts": "8080", TP + "includeOutboundPorts": "8080"}, "1.2.3.4", 8080, False),
    # host bits are cleared the way iptables -d does
    ({TP + "includeOutboundIPRanges": "10.1.2.3/16"}, "10.1.200.1", 80, True),
]


@pytest.mark.parametrize("annotations,ip,port,expected", OUTBOUND)
def test_outbound_verdicts(annotations, ip, port, expected):
    assert verdict_out(pod_policy(pod(annotations), ISTIO), ip, port) is expected


INBOUND = [
    ({}, 8080, True),
    ({}, 15008, False), ({}, 15020, False), ({}, 15021, False), ({}, 15090, False),
    ({TP + "excludeInboundPorts": "9000"}, 9000, False),
    ({TP + "excludeInboundPorts": "9000"}, 9001, True),
    ({TP + "includeInboundPorts": ""}, 8080, False),
    ({TP + "includeInboundPorts": "8080,9090"}, 8080, True),
    ({TP + "includeInboundPorts": "8080,9090"}, 7070, False),
    ({TP + "includeInboundPorts": "*", TP + "excludeInboundPorts": "7070"}, 7070, False),
    ({"status.sidecar.istio.io/port": "16000"}, 16000, False),
    ({"status.sidecar.istio.io/port": "0"}, 16000, True),
]


@pytest.mark.parametrize("annotations,port,expected", INBOUND)
def test_inbound_verdicts(annotations, port, expected):
    assert verdict_in(pod_policy(pod(annotations), ISTIO), port) is expected


def test_default_policy_fields():
    p = pod_policy(pod(), ISTIO)
    assert p.include_inbound_all and p.include_outbound_all
    assert p.status_port == 15020
    assert {15008, 15020, 15021, 15090} <= p.exclude_inbound_ports
    assert p.exclude_outbound_ports == {15020}
    assert pod_policy(pod({"status.sidecar.istio.io/port": "0"}), ISTIO).status_port == 0


def test_host_network_pods_are_never_enrolled():
    """A hostNetwork pod shares the node's netns, which the datapath never
    acts for; a policy for its IP (the node's) would catch every sidecar's
    calls to the node. Never a member, legacy or CNI mode."""
    def host_net(p):
        p["spec"]["hostNetwork"] = True
    m = mesh_membership(pod(mutate=host_net), ISTIO)
    assert not m.in_mesh and "hostNetwork" in m.reason
    assert mesh_membership(pod(), ISTIO).in_mesh


def test_cidrs_are_packed_ipv4_mapped():
    p = pod_policy(pod({TP + "includeOutboundIPRanges": "10.0.0.0/8,fd00::/64"}), ISTIO)
    assert (bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 0]), 104) in p.include_outbound_cidrs
    assert (bytes([0xfd]) + bytes(15), 64) in p.include_outbound_cidrs
    assert all(len(a) == 16 for a, _ in p.include_outbound_cidrs)
    v4_all = (bytes(10) + b"\xff\xff" + bytes(4), 96)
    assert pod_policy(pod({TP + "excludeOutboundIPRanges": "*"}), ISTIO).exclude_outbound_cidrs == (
        v4_all, (bytes(16), 0))
    # an IPv6 range of IPv4-mapped addresses names nothing an IPv6 packet carries
    assert pod_policy(pod({TP + "excludeOutboundIPRanges": "::ffff:10.0.0.0/104"}),
                      ISTIO).exclude_outbound_cidrs == ()


BAD = [
    (TP + "includeOutboundIPRanges", "10.0.0.0/33"),
    (TP + "includeOutboundIPRanges", "10.0.0.1"),          # no prefix length
    (TP + "includeOutboundIPRanges", "10.0.0.0/8,*"),      # '*' only on its own
    (TP + "includeOutboundIPRanges", "banana/8"),
    (TP + "excludeOutboundIPRanges", "1.2.3/24"),
    (TP + "includeInboundPorts", "80,http"),
    (TP + "excludeInboundPorts", "70000"),
    (TP + "excludeInboundPorts", "*"),                     # no wildcard for excludes
    (TP + "includeOutboundPorts", "-1"),
    (TP + "excludeOutboundPorts", "80;443"),
    # strconv.ParseUint: ASCII digits only
    (TP + "includeInboundPorts", "\u0668\u0660\u0668\u0660"),   # Arabic-Indic 8080
    (TP + "excludeOutboundPorts", "\uff18\uff10"),                # fullwidth 80
    (TP + "excludeInboundPorts", "\u00b2"),                        # superscript two
    ("status.sidecar.istio.io/port", "\u0661\u0665\u0660\u0662\u0660"),
    ("status.sidecar.istio.io/port", "abc"),
    ("status.sidecar.istio.io/port", "1,2"),
    ("status.sidecar.istio.io/port", ""),
    # an empty list item fails the ADD, as istio-cni's ParseUint("")/ParsePrefix("")
    (TP + "includeInboundPorts", "80,,90"),
    (TP + "excludeOutboundPorts", "80,"),
    (TP + "excludeInboundPorts", ",80"),
    (TP + "includeOutboundPorts", "80, ,90"),
    (TP + "includeOutboundIPRanges", "10.0.0.0/8,,10.1.0.0/16"),
    (TP + "excludeOutboundIPRanges", "10.0.0.0/8,"),
]


@pytest.mark.parametrize("key,value", BAD)
def test_invalid_values_name_the_annotation(key, value):
    with pytest.raises(AnnotationError) as err:
        pod_policy(pod({key: value}), ISTIO)
    assert key in str(err.value) and repr(value) in str(err.value)
    assert err.value.annotation == key


def test_empty_item_error_says_why():
    with pytest.raises(AnnotationError, match="empty list item"):
        pod_policy(pod({TP + "includeInboundPorts": "80,,90"}), ISTIO)


def test_blank_value_is_the_empty_list():
    p = pod_policy(pod({TP + "includeInboundPorts": " ", TP + "excludeOutboundPorts": " "}), ISTIO)
    assert not p.include_inbound_all and p.include_inbound_ports == frozenset()
    assert p.exclude_outbound_ports == frozenset()      # present, so no 15020 default


def test_list_limits_are_errors_not_truncation():
    many_ports = ",".join(str(1000 + i) for i in range(an.MAX_PORTS + 1))
    with pytest.raises(AnnotationError, match="at most"):
        pod_policy(pod({TP + "includeInboundPorts": many_ports}), ISTIO)
    many_cidrs = ",".join(f"10.{i}.0.0/16" for i in range(0, 2 * (an.MAX_CIDRS + 1), 2))
    with pytest.raises(AnnotationError, match="at most"):
        pod_policy(pod({TP + "excludeOutboundIPRanges": many_cidrs}), ISTIO)
    # the defaults count against the exclude list's capacity
    near = ",".join(str(2000 + i) for i in range(an.MAX_PORTS - 2))
    with pytest.raises(AnnotationError, match="defaults"):
        pod_policy(pod({TP + "excludeInboundPorts": near}), ISTIO)
    exact = ",".join(str(1000 + i) for i in range(an.MAX_PORTS))
    assert len(pod_policy(pod({TP + "includeInboundPorts": exact}), ISTIO).include_inbound_ports) == an.MAX_PORTS


def test_adjacent_cidrs_merge_before_counting():
    p = pod_policy(pod({TP + "includeOutboundIPRanges": "10.0.0.0/9,10.128.0.0/9,10.0.0.0/8"}), ISTIO)
    assert len(p.include_outbound_cidrs) == 1


def test_osm_uses_its_own_annotation_names():
    osm = meshes.get("osm")
    p = pod({"openservicemesh.io/outbound-port-exclusion-list": "6379",
             "openservicemesh.io/port": "15999"})
    pol = pod_policy(p, osm)
    assert 6379 in pol.exclude_outbound_ports and pol.status_port == 15999


def test_pod_ips_dual_stack_and_fallback():
    assert pod_ips(pod()) == ["10.244.1.7", "fd00::7"]
    assert pod_ips({"status": {"podIP": "10.0.0.5"}}) == ["10.0.0.5"]
    assert pod_ips({"status": {}}) == []
    assert pod_ips({}) == []
    assert pod_ips({"status": {"podIP": "::"}}) == []   # unspecified: no pod's address
    assert pod_ips({"status": {"podIPs": [{"ip": "0.0.0.0"}, {"ip": "fd00::7"}]}}) == ["fd00::7"]
