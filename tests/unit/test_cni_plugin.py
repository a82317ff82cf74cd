"""The plugin's commands through the skel, against a real socket server with a fake handler.

Every test runs for every CNI version we speak; the daemon side is
``CniServer`` on a unix socket in a tmp dir, the handler an in-memory fake.
"""
from __future__ import annotations

import io
import json
import os

import pytest

from merbridge.cni import errors, plugin, skel, version
from merbridge.cni.errors import CniError
from merbridge.daemon.cniserver import CniServer
from test_cniserver import FakeHandler

VERSIONS = version.SUPPORTED
KUBELET_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1")


def prev_result(v):
    """A bridge-like result in the shape of version ``v`` (0.3.x/0.4.0 carry ips[].version)."""
    ips = [{"interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
           {"interface": 2, "address": "fd00:10::2/64", "gateway": "fd00:10::1"}]
    if version.parse(v) < (1, 0, 0):
        ips[0]["version"], ips[1]["version"] = "4", "6"
    return {"cniVersion": v,
            "interfaces": [{"name": "cni0", "mac": "d2:9f:c8:08:c8:07"},
                           {"name": "veth19cab692", "mac": "12:ac:39:53:3d:76"},
                           {"name": "eth0", "mac": "62:e9:37:89:ba:9b",
                            "sandbox": "/var/run/netns/pod1"}],
            "ips": ips, "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}}


@pytest.fixture
def handler():
    return FakeHandler()


@pytest.fixture
def sock(tmp_path, handler):
    path = str(tmp_path / "mb.sock")
    with CniServer(path, handler, allowed_uids=(os.getuid(),), owner=None, request_timeout=2):
        yield path


def config(v, sock, prev=True, **over):
    c = {"cniVersion": v, "name": "k8s-pod-network", "type": "merbridge-cni",
         "socketPath": sock, "timeoutSeconds": 2, "failOpen": False}
    if prev:
        c["prevResult"] = prev_result(v) if prev is True else prev
    c.update(over)
    return c


def env(command, args=KUBELET_ARGS, **over):
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/pod1",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


def run(environ, conf):
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    out, err = io.BytesIO(), io.BytesIO()
    rc = skel.Dispatcher(environ.get, io.BytesIO(stdin), out, err,
                         same_netns=lambda p: False).run(plugin.Plugin())
    assert b"Traceback" not in err.getvalue()
    return rc, out.getvalue(), err.getvalue().decode()


def failed(rc, out, err, code):
    assert rc == 1 and f"code {code}" in err
    obj = json.loads(out)
    assert obj["code"] == code, obj
    return obj


@pytest.mark.parametrize("v", VERSIONS)
def test_add_passes_prev_result_through_byte_for_byte(v, sock, handler):
    conf = config(v, sock)
    rc, out, _ = run(env("ADD"), conf)
    assert rc == 0
    assert out == json.dumps(conf["prevResult"]).encode() + b"\n"
    (name, req), = handler.calls
    assert name == "add"
    assert (req.container_id, req.netns, req.ifname) == ("c0ffee", "/var/run/netns/pod1", "eth0")
    assert (req.pod_namespace, req.pod_name, req.pod_uid) == ("default", "web-0", "uid-1")
    assert req.ips == ("10.244.1.2/24", "fd00:10::2/64")
    assert [(i.name, i.sandbox) for i in req.interfaces] == [("eth0", "/var/run/netns/pod1")]
    assert (req.cni_version, req.network) == (v, "k8s-pod-network")


@pytest.mark.parametrize("v", VERSIONS)
def test_add_sets_cni_version_and_keeps_everything_else(v, sock):
    prev = prev_result(v)
    del prev["cniVersion"]
    prev["x-extra"] = {"kept": [1, 2]}
    rc, out, _ = run(env("ADD"), config(v, sock, prev=prev))
    assert rc == 0
    assert json.loads(out) == {"cniVersion": v, **prev}


@pytest.mark.parametrize("v", VERSIONS)
def test_add_without_prev_result_fails(v, sock, handler):
    obj = failed(*run(env("ADD"), config(v, sock, prev=False)), errors.INVALID_NETWORK_CONFIG)
    assert "chained plugin" in obj["msg"] and obj["cniVersion"] == v
    assert handler.calls == []


@pytest.mark.parametrize("v", VERSIONS)
def test_add_with_daemon_down_is_try_again_later(v, tmp_path):
    obj = failed(*run(env("ADD"), config(v, str(tmp_path / "gone.sock"))), errors.TRY_AGAIN_LATER)
    assert "gone.sock" in obj["details"]


@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("args", ["IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
                                  "IgnoreUnknown=1;K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=x",
                                  "", "IgnoreUnknown=1"])
def test_excluded_or_non_pod_passes_through_without_daemon(v, tmp_path, args):
    conf = config(v, str(tmp_path / "gone.sock"))
    rc, out, _ = run(env("ADD", args=args), conf)
    assert rc == 0 and json.loads(out) == conf["prevResult"]


@pytest.mark.parametrize("v", VERSIONS)
def test_custom_exclude_namespaces(v, sock, handler):
    conf = config(v, sock, excludeNamespaces=["default"])
    assert run(env("ADD"), conf)[0] == 0
    assert handler.calls == []
    conf = config(v, sock, excludeNamespaces=[])
    assert run(env("ADD", args="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"), conf)[0] == 0
    assert [n for n, _ in handler.calls] == ["add"]


@pytest.mark.parametrize("v", VERSIONS)
def test_daemon_error_is_re_emitted(v, sock, handler):
    handler.fail["add"] = CniError(101, "invalid annotations",
                                          "traffic.sidecar.istio.io/includeInboundPorts: x")
    obj = failed(*run(env("ADD"), config(v, sock)), 101)
    assert obj == {"cniVersion": v, "code": 101, "msg": "invalid annotations",
                   "details": "traffic.sidecar.istio.io/includeInboundPorts: x"}


@pytest.mark.parametrize("v", VERSIONS)
def test_del_twice_succeeds(v, sock, handler):
    assert run(env("ADD"), config(v, sock))[0] == 0
    for _ in range(2):
        rc, out, _ = run(env("DEL"), config(v, sock))
        assert (rc, out) == (0, b"")
    assert [n for n, _ in handler.calls] == ["add", "delete", "delete"]
    assert handler.enrolled == {}


@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("case", ["daemon-down", "daemon-error", "no-netns-no-prev", "bad-conf",
                                  "bad-prev"])
def test_del_always_succeeds(v, sock, tmp_path, handler, case):
    e, conf = env("DEL"), config(v, sock)
    if case == "daemon-down":
        conf["socketPath"] = str(tmp_path / "gone.sock")
    elif case == "daemon-error":
        handler.fail["delete"] = RuntimeError("maps are gone")
    elif case == "no-netns-no-prev":
        del e["CNI_NETNS"], conf["prevResult"]
    elif case == "bad-conf":
        conf["timeoutSeconds"] = "soon"
    elif case == "bad-prev":
        conf["prevResult"] = {"ips": [{"address": "not-an-ip"}]}
    rc, out, err = run(e, conf)
    assert (rc, out) == (0, b"")
    if case != "no-netns-no-prev":
        assert "reporting success anyway" in err
    if case in ("no-netns-no-prev", "bad-prev"):
        (name, req), = handler.calls
        assert name == "delete" and req.ips == ()


@pytest.mark.parametrize("v", VERSIONS)
def test_check(v, sock, handler):
    if version.parse(v) < (0, 4, 0):
        failed(*run(env("CHECK"), config(v, sock)), errors.INCOMPATIBLE_CNI_VERSION)
        return
    failed(*run(env("CHECK"), config(v, sock)), 103)   # our state is missing
    assert run(env("ADD"), config(v, sock))[0] == 0
    assert run(env("CHECK"), config(v, sock))[:2] == (0, b"")
    failed(*run(env("CHECK"), config(v, sock, prev=False)), errors.INVALID_NETWORK_CONFIG)
    failed(*run(env("CHECK"), config(v, sock + ".gone")), errors.TRY_AGAIN_LATER)


@pytest.mark.parametrize("v", VERSIONS)
def test_status(v, sock, handler, tmp_path):
    if v != "1.1.0":
        failed(*run(env("STATUS"), config(v, sock, prev=False)), errors.INCOMPATIBLE_CNI_VERSION)
        return
    assert run({"CNI_COMMAND": "STATUS"}, config(v, sock, prev=False))[:2] == (0, b"")
    obj = failed(*run(env("STATUS"), config(v, str(tmp_path / "gone.sock"), prev=False)),
                 errors.PLUGIN_NOT_AVAILABLE)
    assert "not available" in obj["msg"]
    handler.ready = (False, "pinning maps")
    obj = failed(*run(env("STATUS"), config(v, sock, prev=False)), errors.PLUGIN_NOT_AVAILABLE)
    assert obj["details"] == "pinning maps"


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_forwards_valid_attachments(sock, handler, key):
    for cid in ("keep1", "drop1"):
        assert run(env("ADD", CNI_CONTAINERID=cid), config("1.1.0", sock))[0] == 0
    conf = config("1.1.0", sock, prev=False,
                  **{key: [{"containerID": "keep1", "ifname": "eth0"}]})
    assert run({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, conf)[:2] == (0, b"")
    assert set(handler.enrolled) == {"keep1"}
    name, req = handler.calls[-1]
    assert name == "gc" and [(a.container_id, a.ifname) for a in req.attachments] == \
        [("keep1", "eth0")]


def test_gc_errors(sock, tmp_path):
    e = {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}
    failed(*run(e, config("1.0.0", sock, prev=False)), errors.INCOMPATIBLE_CNI_VERSION)
    failed(*run(e, config("1.1.0", str(tmp_path / "gone.sock"), prev=False)),
           errors.TRY_AGAIN_LATER)
    bad = config("1.1.0", sock, prev=False, **{"cni.dev/valid-attachments": [{"containerID": 1}]})
    failed(*run(e, bad), errors.INVALID_NETWORK_CONFIG)


@pytest.mark.parametrize("over,code", [
    ({"socketPath": "relative"}, errors.INVALID_NETWORK_CONFIG),
    ({"logLevel": "chatty"}, errors.INVALID_NETWORK_CONFIG),
    ({"prevResult": {"ips": [{"address": "10.0.0.1"}]}}, errors.INVALID_NETWORK_CONFIG),
    ({"prevResult": {"ips": "10.0.0.1/8"}}, errors.INVALID_NETWORK_CONFIG),
])
def test_add_bad_config(sock, handler, over, code):
    failed(*run(env("ADD"), config("1.0.0", sock, **over)), code)
    assert handler.calls == []


def test_add_bad_cni_args(sock):
    failed(*run(env("ADD", args="K8S_POD_NAME=x;Bogus=1"), config("1.0.0", sock)),
           errors.INVALID_ENVIRONMENT_VARIABLES)


def test_log_level_debug_logs_to_stderr_only(sock):
    rc, out, err = run(env("ADD", args="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=x"),
                       config("1.0.0", sock, logLevel="debug"))
    assert rc == 0 and "namespace excluded" in err and b"excluded" not in out
    rc, out, err = run(env("ADD"), config("1.0.0", sock, logLevel="error"))
    assert rc == 0 and err == ""
