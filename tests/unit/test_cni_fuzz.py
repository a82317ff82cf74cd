"""Fuzzing the plugin: every generated call ends in a result or the spec's error JSON.

Generated: the stdin JSON (structure, types, sizes, encodings) and the CNI_*
environment, plus how the daemon behaves (up, down, failing, not ready). The
skel runs in-process with injected I/O (>= 1000 cases per run); a few cases run
the node zipapp as a real process. Invariants: exit code 0 or 1, nothing but
one JSON document on stdout, no traceback, no code 999 (every bad input has a
specific code), DEL never fails once the skel accepted the call, and ADD's
output is prevResult unchanged.

Here the daemon is a fake or down; ``conformance/test_daemon_fuzz.py`` runs the
installed plugin against the real daemon and checks that no case leaves state.
"""
from __future__ import annotations

import io
import json
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merbridge.cni import errors, plugin, protocol, skel, version
from merbridge.cni.client import DaemonUnavailable
from merbridge.cni.errors import CniError

COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"]
KEYS = ["cniVersion", "name", "type", "socketPath", "timeoutSeconds", "excludeNamespaces",
        "logLevel", "prevResult", "cni.dev/valid-attachments", "cni.dev/attachments", "args",
        "runtimeConfig"]
SKEL_CODES = {1, 4, 5, 6, 7, 8}  # errors raised before the plugin or by config checks

text = st.text(max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) \
    | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(json_scalars,
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(text, kids, max_size=4), max_leaves=10)


def mostly(good, *bad):
    """Usually ``good`` (a strategy), sometimes one of ``bad``: most cases get deep."""
    # (one_of would merge repeated branches, so weight with an explicit draw)
    choices = [good] * 6 + list(bad)
    return st.integers(0, len(choices) - 1).flatmap(lambda i: choices[i])


def maybe(strategy):
    return mostly(strategy, json_values)


ABSENT = object()
ips = st.one_of(st.ip_addresses(v=4).map(lambda a: f"{a}/24"),
                st.ip_addresses(v=6).map(lambda a: f"{a}/64"), text)
prev_results = st.fixed_dictionaries(
    {"cniVersion": maybe(st.sampled_from(version.SUPPORTED)),
     "interfaces": maybe(st.lists(st.fixed_dictionaries(
         {"name": maybe(st.sampled_from(["eth0", "veth1", "cni0"]))},
         optional={"sandbox": maybe(st.just("/var/run/netns/p")), "mac": text}), max_size=4)),
     "ips": maybe(st.lists(st.fixed_dictionaries(
         {"address": maybe(ips)},
         optional={"interface": json_values, "gateway": text,
                   "version": st.sampled_from(["4", "6"])}), max_size=4))},
    optional={"routes": json_values, "dns": json_values, "x-other": json_values})
attachments = st.lists(st.fixed_dictionaries(
    {"containerID": maybe(st.sampled_from(["c1", "c2"])), "ifname": maybe(st.just("eth0"))}),
    max_size=4)
configs = st.fixed_dictionaries(
    {"cniVersion": mostly(st.sampled_from(version.SUPPORTED),
                          st.sampled_from(["", "0.2.0", "2.0.0", "1.0"]), json_values),
     "name": mostly(st.sampled_from(["k8s-pod-network", "net_1.x"]),
                    st.sampled_from(["", "-bad", "a b"]), json_values),
     "prevResult": mostly(prev_results, json_values, st.just(ABSENT))},
    optional={"type": st.just("merbridge-cni"),
              "socketPath": maybe(st.sampled_from(["/run/mb-fuzz.sock", "rel.sock", "/" * 200])),
              "timeoutSeconds": maybe(st.sampled_from([0.5, 10, 0, -1, 1e9])),
              "excludeNamespaces": maybe(st.lists(st.sampled_from(["kube-system", "default"]))),
              "logLevel": maybe(st.sampled_from(["debug", "info", "error", "loud"])),
              "cni.dev/valid-attachments": maybe(attachments),
              "cni.dev/attachments": maybe(attachments),
              "args": json_values}).map(
    lambda c: {k: v for k, v in c.items() if v is not ABSENT})


def encode(conf, how):
    data = json.dumps(conf).encode()
    if how == "utf8":
        return data
    if how == "utf16":
        return json.dumps(conf).encode("utf-16")
    if how == "truncated":
        return data[:len(data) // 2]
    if how == "latin1-garbage":
        return data.replace(b'"', b'"\xe9', 1)
    return data + b" " * (skel.MAX_STDIN + 1 - len(data))  # "huge": just over the cap


encodings = st.sampled_from(["utf8"] * 12 + ["utf16", "truncated", "latin1-garbage", "huge"])
stdins = mostly(st.tuples(configs, encodings).map(lambda t: encode(*t)),
                json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))

env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=20)
pod_args = st.lists(st.tuples(st.sampled_from(["IgnoreUnknown", "K8S_POD_NAMESPACE",
                                               "K8S_POD_NAME", "K8S_POD_UID", "Other"]),
                              st.sampled_from(["1", "default", "kube-system", "web-0", ""])),
                    max_size=5).map(lambda kv: ";".join(f"{k}={v}" for k, v in kv))
KUBELET = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1"
environments = st.fixed_dictionaries(
    {"CNI_COMMAND": mostly(st.sampled_from(COMMANDS), env_text),
     "CNI_CONTAINERID": mostly(st.sampled_from(["c1", "cnitool-0a1b"]), env_text,
                               st.just(ABSENT)),
     "CNI_NETNS": mostly(st.just("/var/run/netns/p"), env_text, st.just(ABSENT)),
     "CNI_IFNAME": mostly(st.just("eth0"), env_text, st.just(ABSENT)),
     "CNI_PATH": mostly(st.just("/opt/cni/bin"), env_text, st.just(ABSENT)),
     "CNI_ARGS": mostly(st.just(KUBELET), pod_args, env_text, st.just(ABSENT)),
     "CNI_NETNS_OVERRIDE": st.sampled_from([ABSENT, "", "1", "true"])}).map(
    lambda e: {k: v for k, v in e.items() if v is not ABSENT})

daemons = st.one_of(st.just("up"), st.just("up"), st.just("down"), st.just("not-ready"),
                    st.tuples(st.just("error"),
                              st.sampled_from([3, 7, 11, 50, 51, 101, 102, 103]), text))


class FakeClient:
    """Stands in for DaemonClient: checks what it is sent, behaves as told."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def call(self, req):
        assert isinstance(req, protocol.CniRequest)
        assert protocol.CniRequest.from_json(req.to_json(), req.command) == req
        if self.behaviour == "down":
            raise DaemonUnavailable("connection refused")
        if isinstance(self.behaviour, tuple):
            raise CniError(self.behaviour[1], "daemon says no", self.behaviour[2])
        return {"key": 1}

    def status(self):
        if self.behaviour == "down":
            raise DaemonUnavailable("connection refused")
        return protocol.StatusReply(self.behaviour == "up", "detail")


def check_outcome(environ, stdin, rc, out, err, daemon=None):
    assert rc in (0, 1)
    assert b"Traceback" not in err
    assert out.endswith(b"\n") and out.count(b"\n") == 1 or out == b""
    command = environ.get("CNI_COMMAND")
    if rc == 1:
        obj = json.loads(out)
        assert set(obj) <= {"cniVersion", "code", "msg", "details"}
        assert obj["cniVersion"] in version.SUPPORTED and isinstance(obj["msg"], str)
        assert obj["code"] != errors.INTERNAL, obj
        assert errors.valid_code(obj["code"])
        if command == "DEL":
            assert obj["code"] in SKEL_CODES, obj
        if daemon == "up" and command != "STATUS":
            assert obj["code"] in SKEL_CODES | {3}, obj
        return obj
    if command == "VERSION":
        assert json.loads(out) == version.info()
    elif command == "ADD":
        conf = json.loads(stdin.decode("utf-8"))
        expected = dict(conf["prevResult"], cniVersion=conf["cniVersion"])
        assert json.loads(out) == expected
    else:
        assert out == b""
    return None


@settings(max_examples=1200, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(environ=environments, stdin=stdins, daemon=daemons)
def test_fuzz_in_process(environ, stdin, daemon):
    out, err = io.BytesIO(), io.BytesIO()
    t0 = time.monotonic()
    rc = skel.Dispatcher(environ.get, io.BytesIO(stdin), out, err, same_netns=lambda p: False
                         ).run(plugin.Plugin(client_factory=lambda conf: FakeClient(daemon)))
    assert time.monotonic() - t0 < 5
    check_outcome(environ, stdin, rc, out.getvalue(), err.getvalue(), daemon)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    from merbridge.cni.zipapp import build_zipapp
    return build_zipapp(str(tmp_path_factory.mktemp("bin") / "merbridge-cni"))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(environ=environments, conf=configs, how=encodings)
def test_fuzz_as_a_process(exe, tmp_path, environ, conf, how):
    # a socket path that never exists (never the default path, where a real
    # daemon may listen): the daemon is down for every real-process case
    conf["socketPath"] = str(tmp_path / "no-daemon.sock")
    conf["pendingDir"] = str(tmp_path / "pending")     # never the node's (failOpen)
    stdin = encode(conf, how)
    p = subprocess.run(["/usr/bin/python3", "-IS", exe], input=stdin, capture_output=True,
                       env=environ, timeout=20)
    check_outcome(environ, stdin, p.returncode, p.stdout, p.stderr)
