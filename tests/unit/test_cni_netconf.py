"""netconf: our config keys, CNI_ARGS and prevResult extraction."""
from __future__ import annotations

import pytest

from merbridge.cni import errors, netconf
from merbridge.cni.errors import CniError

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


@pytest.mark.parametrize("v", VERSIONS)
def test_defaults(v):
    c = netconf.parse_netconf({"name": "n", "cniVersion": v})
    assert (c.name, c.cni_version) == ("n", v)
    assert c.socket_path == "/var/run/merbridge-cni.sock"
    assert c.timeout == 10.0
    assert c.exclude_namespaces == ("kube-system", "istio-system")
    assert c.log_level == "info" and c.prev_result is None


def test_all_keys():
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    c = netconf.parse_netconf({"name": "n", "cniVersion": "1.0.0", "socketPath": "/tmp/x.sock",
                               "timeoutSeconds": 2, "excludeNamespaces": ["a"],
                               "logLevel": "debug", "prevResult": prev})
    assert (c.socket_path, c.timeout, c.exclude_namespaces, c.log_level) == \
        ("/tmp/x.sock", 2.0, ("a",), "debug")
    assert c.prev_result is prev


@pytest.mark.parametrize("key,value", [
    ("socketPath", "relative.sock"), ("socketPath", 5), ("socketPath", "/" + "x" * 200),
    ("socketPath", "/a\0b"),
    ("timeoutSeconds", 0), ("timeoutSeconds", -1), ("timeoutSeconds", "5"),
    ("timeoutSeconds", True), ("timeoutSeconds", 1e9),
    ("excludeNamespaces", "kube-system"), ("excludeNamespaces", [1]),
    ("logLevel", "loud"), ("logLevel", None),
    ("prevResult", []), ("prevResult", "x"),
])
def test_bad_keys(key, value):
    with pytest.raises(CniError) as e:
        netconf.parse_netconf({"name": "n", "cniVersion": "1.0.0", key: value})
    assert e.value.code == errors.INVALID_NETWORK_CONFIG and key in e.value.msg


KUBELET = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;" \
          "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678"


@pytest.mark.parametrize("text,expected", [
    (KUBELET, ("default", "web-0", "1234-5678")),
    ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", ("ns", "p", "")),
    ("IgnoreUnknown=true;Foo=bar;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", ("ns", "p", "")),
    ("", None),
    ("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns", None),
    ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=", None),
])
def test_pod_from_args(text, expected):
    pod = netconf.pod_from_args(text)
    assert (pod and (pod.namespace, pod.name, pod.uid)) == expected


@pytest.mark.parametrize("text", ["K8S_POD_NAME", "=x", "a=b=c", "K8S_POD_NAME=p;", "Foo=bar",
                                  "IgnoreUnknown=0;Foo=bar"])
def test_bad_args(text):
    with pytest.raises(CniError) as e:
        netconf.parse_cni_args(text)
    assert e.value.code == errors.INVALID_ENVIRONMENT_VARIABLES


def test_prev_result_extraction():
    prev = {"interfaces": [{"name": "cni0", "mac": "x"}, {"name": "veth1"},
                           {"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": [{"interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
                    {"address": "fd00::2/64", "version": "6"}]}
    assert netconf.prev_result_ips(prev) == ["10.244.1.2/24", "fd00::2/64"]
    assert netconf.prev_result_interfaces(prev) == [("eth0", "/var/run/netns/p")]
    assert netconf.prev_result_ips({}) == [] and netconf.prev_result_interfaces({}) == []


@pytest.mark.parametrize("prev", [{"ips": {}}, {"ips": [{"address": 1}]}, {"ips": ["10.0.0.1/8"]},
                                  {"interfaces": "x"}, {"interfaces": [{"name": 3}]}])
def test_prev_result_malformed(prev):
    with pytest.raises(CniError) as e:
        netconf.prev_result_ips(prev)
        netconf.prev_result_interfaces(prev)
    assert e.value.code == errors.INVALID_NETWORK_CONFIG


@pytest.mark.parametrize("key", netconf.GC_ATTACHMENT_KEYS)
def test_gc_attachments(key):
    c = {key: [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]}
    assert netconf.gc_attachments(c) == [("c1", "eth0"), ("c2", "net1")]
    assert netconf.gc_attachments({}) == []
    for bad in ({key: {}}, {key: [{"containerID": 1, "ifname": "x"}]}, {key: ["c1"]}):
        with pytest.raises(CniError):
            netconf.gc_attachments(bad)
