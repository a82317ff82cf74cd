"""skel: env table, config decoding, version checks and error JSON, with injected I/O."""
from __future__ import annotations

import io
import json

import pytest

from merbridge.cni import errors, skel, version
from merbridge.cni.errors import CniError

VERSIONS = version.SUPPORTED


class Recorder:
    """A plugin that records calls and answers from a table."""

    def __init__(self, result=None, raise_=None):
        self.calls = []
        self.result = result
        self.raise_ = raise_

    def _do(self, name, cmd):
        self.calls.append((name, cmd))
        if self.raise_ is not None:
            raise self.raise_
        return self.result if name == "add" else None

    def add(self, cmd):
        return self._do("add", cmd)

    def delete(self, cmd):
        return self._do("delete", cmd)

    def check(self, cmd):
        return self._do("check", cmd)

    def status(self, cmd):
        return self._do("status", cmd)

    def gc(self, cmd):
        return self._do("gc", cmd)


def full_env(command, **over):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": ""}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def conf(v="1.0.0", **over):
    c = {"cniVersion": v, "name": "net1", "type": "merbridge-cni"}
    c.update(over)
    return json.dumps(c).encode()


def run(env, stdin=b"", plugin=None, same_netns=lambda p: False):
    out, err = io.BytesIO(), io.BytesIO()
    d = skel.Dispatcher(env.get, io.BytesIO(stdin), out, err, same_netns=same_netns,
                        about="merbridge-cni test")
    rc = d.run(plugin if plugin is not None else Recorder())
    return rc, out.getvalue(), err.getvalue()


def error_of(rc, out, err):
    assert rc == 1
    assert b"Traceback" not in err
    obj = json.loads(out)
    assert set(obj) <= {"cniVersion", "code", "msg", "details"}
    assert isinstance(obj["msg"], str) and obj["cniVersion"] in VERSIONS
    return obj


@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("command,method", [("ADD", "add"), ("DEL", "delete"),
                                            ("CHECK", "check"), ("STATUS", "status"),
                                            ("GC", "gc")])
def test_dispatch_calls_the_method(v, command, method):
    p = Recorder(result={"cniVersion": v, "ips": []})
    rc, out, err = run(full_env(command), conf(v), p)
    allowed = version.parse(v) >= version.parse(version.MIN_VERSION[command])
    if not allowed:
        obj = error_of(rc, out, err)
        assert obj["code"] == errors.INCOMPATIBLE_CNI_VERSION
        assert obj["cniVersion"] == v
        assert p.calls == []
        return
    assert rc == 0, (out, err)
    assert [c[0] for c in p.calls] == [method]
    cmd = p.calls[0][1]
    assert cmd.cni_version == v and cmd.config["name"] == "net1"
    assert cmd.container_id == "abc123" and cmd.ifname == "eth0"
    if command == "ADD":
        assert json.loads(out) == {"cniVersion": v, "ips": []}
    else:
        assert out == b""


def test_version_ignores_stdin_and_lists_versions():
    rc, out, _ = run({"CNI_COMMAND": "VERSION"}, b"\xff not json")
    assert rc == 0
    assert json.loads(out) == {"cniVersion": "1.1.0",
                               "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("command,env_over,missing", [
    ("ADD", {"CNI_CONTAINERID": None, "CNI_NETNS": None, "CNI_PATH": None},
     "CNI_CONTAINERID,CNI_NETNS,CNI_PATH"),
    ("ADD", {"CNI_IFNAME": ""}, "CNI_IFNAME"),
    ("CHECK", {"CNI_NETNS": None}, "CNI_NETNS"),
    ("DEL", {"CNI_CONTAINERID": None, "CNI_IFNAME": None}, "CNI_CONTAINERID,CNI_IFNAME"),
    ("GC", {"CNI_PATH": None}, "CNI_PATH"),
])
def test_missing_env_reported_together(command, env_over, missing):
    obj = error_of(*run(full_env(command, **env_over), conf("1.1.0")))
    assert obj["code"] == errors.INVALID_ENVIRONMENT_VARIABLES
    assert obj["msg"] == f"required env variables [{missing}] missing"


@pytest.mark.parametrize("env", [
    {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_PATH": "/p"},
    {"CNI_COMMAND": "STATUS"},
])
def test_optional_env(env):
    rc, out, err = run(env, conf("1.1.0"))
    assert rc == 0, out


def test_missing_command_prints_about_and_code_4():
    rc, out, err = run({}, conf())
    obj = error_of(rc, out, err)
    assert obj["code"] == 4 and "CNI_COMMAND" in obj["msg"]
    assert b"merbridge-cni test" in err


def test_unknown_command():
    obj = error_of(*run(full_env("FROB"), conf()))
    assert obj["code"] == 4 and "unknown CNI_COMMAND" in obj["msg"]


@pytest.mark.parametrize("stdin,code", [
    (b"", errors.DECODING_FAILURE),
    (b"{not json", errors.DECODING_FAILURE),
    (b"[1, 2]", errors.DECODING_FAILURE),
    (b'"name"', errors.DECODING_FAILURE),
    (b'{"name": 5, "cniVersion": "1.0.0"}', errors.DECODING_FAILURE),
    (b'{"name": "n", "cniVersion": 1}', errors.DECODING_FAILURE),
    (b'{"name": "n", "cniVersion": "1.0.0", "x": NaN}', errors.DECODING_FAILURE),
    (b'{"name": "n", "cniVersion": "1.0.0", "x": 1e999}', errors.DECODING_FAILURE),
    (b'{"name": "n", "cniVersion": "1.0.0", "x": 1' + b"0" * 5000 + b'}', errors.DECODING_FAILURE),
    (b'\xff\xfe{"name": "n"}', errors.DECODING_FAILURE),
    (b'{"name": "n\xc3", "cniVersion": "1.0.0"}', errors.DECODING_FAILURE),
    (b"[" * 100000, errors.DECODING_FAILURE),
    (b" " * (skel.MAX_STDIN + 1), errors.DECODING_FAILURE),
    (b'{"cniVersion": "1.0.0"}', errors.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion": "1.0.0", "name": ""}', errors.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion": "1.0.0", "name": "a b"}', errors.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion": "1.0.0", "name": "-x"}', errors.INVALID_NETWORK_CONFIG),
    (b'{"name": "n"}', errors.INCOMPATIBLE_CNI_VERSION),
    (b'{"name": "n", "cniVersion": ""}', errors.INCOMPATIBLE_CNI_VERSION),
    (b'{"name": "n", "cniVersion": "0.2.0"}', errors.INCOMPATIBLE_CNI_VERSION),
    (b'{"name": "n", "cniVersion": "9.9.9"}', errors.INCOMPATIBLE_CNI_VERSION),
    (b'{"name": "n", "cniVersion": "banana"}', errors.INCOMPATIBLE_CNI_VERSION),
])
def test_bad_config(stdin, code):
    p = Recorder()
    obj = error_of(*run(full_env("ADD"), stdin, p))
    assert obj["code"] == code, obj
    assert p.calls == []


@pytest.mark.parametrize("over,code", [
    ({"CNI_CONTAINERID": "-bad"}, 4),
    ({"CNI_CONTAINERID": "a/b"}, 4),
    ({"CNI_IFNAME": "x" * 16}, 4),
    ({"CNI_IFNAME": "a:b"}, 4),
    ({"CNI_IFNAME": ".."}, 4),
    ({"CNI_IFNAME": "e th0"}, 4),
])
def test_bad_container_env(over, code):
    obj = error_of(*run(full_env("ADD", **over), conf()))
    assert obj["code"] == code


def test_own_netns_is_refused_unless_overridden():
    obj = error_of(*run(full_env("ADD"), conf(), same_netns=lambda p: True))
    assert obj["code"] == errors.INVALID_NETNS
    rc, _, _ = run(full_env("ADD", CNI_NETNS_OVERRIDE="1"), conf(), same_netns=lambda p: True)
    assert rc == 0


def test_real_netns_check_sees_our_own_netns():
    assert skel.same_netns_as_self("/proc/self/ns/net")
    assert not skel.same_netns_as_self("/nonexistent/netns")


@pytest.mark.parametrize("v", VERSIONS)
def test_plugin_cni_error_is_printed_with_config_version(v):
    p = Recorder(raise_=CniError(errors.TRY_AGAIN_LATER, "daemon down", "dial: refused"))
    obj = error_of(*run(full_env("ADD"), conf(v), p))
    assert obj == {"cniVersion": v, "code": 11, "msg": "daemon down", "details": "dial: refused"}


def test_unexpected_exception_becomes_999_without_traceback():
    p = Recorder(raise_=ZeroDivisionError("boom"))
    rc, out, err = run(full_env("ADD"), conf(), p)
    obj = error_of(rc, out, err)
    assert obj["code"] == errors.INTERNAL and "ZeroDivisionError" in obj["details"]
    assert b"boom" in err


def test_stdin_read_failure_is_io_error():
    class Broken(io.RawIOBase):
        def read(self, n=-1):
            raise OSError(5, "EIO")
    out, err = io.BytesIO(), io.BytesIO()
    rc = skel.Dispatcher(full_env("ADD").get, Broken(), out, err).run(Recorder())
    assert rc == 1 and json.loads(out.getvalue())["code"] == errors.IO_FAILURE


def test_error_json_shape_from_cnierror():
    e = CniError(7, "m")
    assert e.to_dict("0.4.0") == {"cniVersion": "0.4.0", "code": 7, "msg": "m"}
    assert str(CniError(7, "m", "d")) == "m; d"
    assert errors.valid_code(11) and errors.valid_code(150)
    assert not errors.valid_code(True) and not errors.valid_code(42) and not errors.valid_code("7")


@pytest.mark.parametrize("text", ["1.0", "1.0.0.0", "a.b.c", "", "1.0.x", "١.0.0"])
def test_version_parse_rejects(text):
    with pytest.raises(CniError) as e:
        version.parse(text)
    assert e.value.code == errors.DECODING_FAILURE
