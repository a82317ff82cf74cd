"""The node executable: a static Go forwarder (cni/static) whose semantics are the Python plugin's.

* its constants are generated from the Python definitions (``cni/gocontract.py``);
* it is a static ELF with no interpreter and no shared library;
* with the daemon up it is the Python plugin: the daemon runs the invocation
  through ``merbridge.cni`` in-process (``/v1/cni/exec``), so its output is the
  Python plugin's, byte for byte, whatever the input;
* with the daemon down it decides by itself: the same generated inputs as
  ``test_cni_fuzz`` go to it and to the Python plugin (zipapp) with no daemon,
  and both give the same exit status, the same error code, the same result
  (keys in the same order) and the same remembered ADD, byte for byte.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import merbridge.cni
from merbridge.cni import gocontract, inprocess, pending, protocol, skel
from merbridge.cni.zipapp import build_zipapp
from merbridge.daemon.cniserver import CniServer
from test_cni_fuzz import KUBELET, configs, encode, encodings, environments
from test_cniserver import FakeHandler

TOP = pathlib.Path(merbridge.cni.__file__).resolve().parent.parent
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
        "ips": [{"interface": 0, "address": "10.244.1.2/24"},
                {"interface": 0, "address": "fd00::2/64"}], "dns": {}}


@pytest.fixture(scope="module")
def static(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("static") / "merbridge-cni")
    subprocess.run([str(TOP / "scripts" / "build-cni"), exe], check=True)
    return exe


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory) -> str:
    return build_zipapp(str(tmp_path_factory.mktemp("zipapp") / "merbridge-cni"))


def call(exe, environ, stdin: bytes) -> subprocess.CompletedProcess:
    argv = ["/usr/bin/python3", "-IS", exe] if exe.endswith(".pyz") or _is_zip(exe) else [exe]
    return subprocess.run(argv, input=stdin, capture_output=True, env=environ, timeout=30)


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def test_contract_is_generated_from_the_python_definitions(monkeypatch):
    monkeypatch.undo()          # the real defaults, not tests/unit/conftest.py's
    with open(gocontract.OUTPUT) as f:
        assert f.read() == gocontract.render(), \
            "cni/static/contract.go is stale: python -m merbridge.cni.gocontract"
    assert protocol.MAX_STDIN == skel.MAX_STDIN
    assert protocol.EXEC_ENV == tuple(name for name, _ in skel.ENV_TABLE)


def test_static_elf_without_interpreter_or_libraries(static):
    with open(static, "rb") as f:
        head = f.read(4096)
    assert head[:4] == b"\x7fELF"
    p = subprocess.run(["readelf", "-lW", static], capture_output=True, text=True, check=True)
    assert "INTERP" not in p.stdout and "DYNAMIC" not in p.stdout, p.stdout
    assert os.stat(static).st_mode & 0o777 == 0o755


def test_version_without_stdin_or_daemon(static):
    p = subprocess.run([static], capture_output=True, env={"CNI_COMMAND": "VERSION"},
                       stdin=subprocess.DEVNULL, timeout=10)
    assert p.returncode == 0 and json.loads(p.stdout) == {
        "cniVersion": "1.1.0", "supportedVersions": list(merbridge.cni.version.SUPPORTED)}


def _normal(p: subprocess.CompletedProcess):
    """What must agree: exit status and stdout (parsed keeping key order; an error's
    code, version and message)."""
    if not p.stdout:
        return p.returncode, None
    obj = json.loads(p.stdout, object_pairs_hook=list)
    if p.returncode:
        d = dict(obj)
        return p.returncode, (d["cniVersion"], d["code"], d["msg"])
    return p.returncode, obj


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(environ=environments, conf=configs, how=encodings, fail_open=st.booleans())
def test_offline_matches_the_python_plugin(static, zipapp, tmp_path, environ, conf, how,
                                           fail_open):
    conf["socketPath"] = str(tmp_path / "no-daemon.sock")
    conf["failOpen"] = fail_open
    conf["pendingDir"] = str(tmp_path / "pending")      # emptied after each run
    results = []
    for exe in (zipapp, static):
        stdin = encode(conf, how)
        p = call(exe, environ, stdin)
        assert b"Traceback" not in p.stderr and b"panic" not in p.stderr
        records = {n: open(path, "rb").read() for n, path in
                   pending.entries(conf["pendingDir"])}
        for _, path in pending.entries(conf["pendingDir"]):
            os.unlink(path)
        results.append((_normal(p), records, p.stdout.count(b"\n")))
    assert results[0] == results[1], (environ, conf, how)


def test_fail_open_add_is_remembered_and_del_forgets_it(static, tmp_path):
    pend = tmp_path / "pending"
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "merbridge-cni",
            "socketPath": str(tmp_path / "none.sock"), "pendingDir": str(pend),
            "prevResult": PREV}
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": KUBELET}
    p = call(static, environ, json.dumps(conf).encode())
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == PREV
    assert b"passing through (failOpen)" in p.stderr
    [(cid, path)] = pending.entries(str(pend))
    req = protocol.ExecRequest.from_json(open(path, "rb").read())
    assert cid == "c1" and req.getenv("CNI_ARGS") == KUBELET
    assert json.loads(req.stdin) == conf
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(pend).st_mode & 0o777 == 0o700
    # fail-closed: code 11 and nothing remembered
    os.unlink(path)
    p = call(static, environ, json.dumps(dict(conf, failOpen=False)).encode())
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 11
    assert pending.entries(str(pend)) == []
    # DEL forgets a remembered ADD, daemon or not
    call(static, environ, json.dumps(conf).encode())
    assert len(pending.entries(str(pend))) == 1
    p = call(static, dict(environ, CNI_COMMAND="DEL"), json.dumps(conf).encode())
    assert (p.returncode, p.stdout) == (0, b"")
    assert pending.entries(str(pend)) == []


def test_online_output_is_the_python_plugins(static, zipapp, tmp_path):
    """Against the daemon's socket server, both executables print the same bytes,
    and the handler sees the same requests."""
    sock = str(tmp_path / "mb.sock")
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "merbridge-cni", "socketPath": sock,
            "prevResult": PREV, "pendingDir": str(tmp_path / "pending")}
    base = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": KUBELET}
    cases = [("ADD", conf), ("CHECK", conf), ("STATUS", conf), ("VERSION", conf),
             ("GC", dict(conf, **{"cni.dev/valid-attachments": [
                 {"containerID": "c1", "ifname": "eth0"}]})),
             ("DEL", conf), ("ADD", dict(conf, prevResult=None)), ("ADD", dict(conf, name=5)),
             ("BOGUS", conf), ("CHECK", dict(conf, cniVersion="0.3.1"))]
    # (stdin that is not JSON names no socket: the default one is asked, else the
    # executable answers itself -- same code, 6, see the offline test)
    for exe in (zipapp, static):
        handler = FakeHandler()
        outputs = []
        with CniServer(sock, handler, allowed_uids=(os.getuid(),), owner=None):
            for command, c in cases:
                stdin = c if isinstance(c, bytes) else json.dumps(c).encode()
                p = call(exe, dict(base, CNI_COMMAND=command), stdin)
                outputs.append((command, p.returncode, p.stdout))
        if exe == zipapp:
            expected, calls = outputs, [(n, r) for n, r in handler.calls]
        else:
            assert outputs == expected
            assert [(n, r) for n, r in handler.calls] == calls
    assert [o[1] for o in expected] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_a_daemon_that_refuses_the_peer_is_reported_not_bypassed(static, tmp_path):
    """A daemon answering 403 (peer uid not allowed) is an answer: its code, no fail-open."""
    sock = str(tmp_path / "mb.sock")
    conf = {"cniVersion": "1.0.0", "name": "n", "socketPath": sock, "prevResult": PREV,
            "pendingDir": str(tmp_path / "pending")}
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": KUBELET}
    with CniServer(sock, FakeHandler(), allowed_uids=(os.getuid() + 1,), owner=None):
        p = call(static, environ, json.dumps(conf).encode())
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 999
    assert pending.entries(str(tmp_path / "pending")) == []


def test_replay_runs_a_remembered_add_through_the_plugin(tmp_path):
    handler = FakeHandler()
    server = CniServer(str(tmp_path / "unused.sock"), handler, allowed_uids=(os.getuid(),),
                       owner=None)
    conf = {"cniVersion": "1.0.0", "name": "n", "prevResult": PREV}
    env = {"CNI_COMMAND": b"ADD", "CNI_CONTAINERID": b"c9", "CNI_NETNS": b"/var/run/netns/p",
           "CNI_IFNAME": b"eth0", "CNI_PATH": b"/x", "CNI_ARGS": KUBELET.encode()}
    data = protocol.ExecRequest(env, json.dumps(conf).encode()).to_json()
    assert inprocess.replay(data, server.local_post, server.local_status) == (0, "")
    assert handler.enrolled["c9"].ips == ("10.244.1.2/24", "fd00::2/64")
    assert inprocess.replay(b"{", server.local_post, server.local_status)[0] == 6
    delete = protocol.ExecRequest(dict(env, CNI_COMMAND=b"DEL"), b"{}").to_json()
    assert inprocess.replay(delete, server.local_post, server.local_status)[0] == 4
