"""Security: who may talk to the daemon, which netns paths it accepts, and
the limits of what a pod may make it write.

One ``merbridge run --cni-mode=true`` for the module (daemonenv.Env), lab pods
``a`` (in the mesh) and ``b``. Each refusal is checked for its CNI code and for
leaving nothing behind (no record, no map entry, no marker, no XDP).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from daemonenv import Env
from merbridge.bpf import types as bpftypes
from merbridge.cni import protocol
from merbridge.cni.client import DaemonClient
from merbridge.cni.errors import CniError
from merbridge.lab import netns
from merbridge.lab.lab import Lab

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(make_bpffs):
    with make_bpffs() as bpffs, Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        env = Env(lab, bpffs)
        # traversable by uid 1337, so that only the socket's own mode and the
        # peer-credential check stand between it and the daemon
        os.chmod(env.root, 0o711)
        try:
            for pod in (a, b):
                env.publish_pod(pod)
            proc = env.start()
            yield env, proc, a, b
        finally:
            env.close()


def request(pod, netns_path, cid="ctr-sec"):
    return protocol.CniRequest(command="ADD", container_id=cid, netns=netns_path,
                               ifname="eth0", pod_namespace="default", pod_name=pod.name,
                               pod_uid=f"uid-{pod.name}-{pod.lab.name}",
                               ips=(f"{pod.ip4}/24",))


def nothing_enrolled(env, pod):
    maps = env.maps()
    try:
        assert pod.ip4 not in [ip for _, ip in maps.mark_pod_ips.items()]
        assert pod.ip4 not in [ip for ip, _ in maps.local_pods.items()]
    finally:
        maps.close()
    state = json.load(open(os.path.join(env.state_dir, "enrolled.json")))
    assert pod.name not in [r["name"] for r in state["containers"]]
    assert env.marker(pod) == [] and env.xdp(pod) == (0, 0)


def as_uid(argv, uid=1337, **kw):
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "--", *argv], capture_output=True, text=True, timeout=30, **kw)


CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT", e.errno); sys.exit(0)
body = sys.stdin.buffer.read()
s.sendall(b"POST /v1/cni/add HTTP/1.1\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
out = b""
while True:
    c = s.recv(65536)
    if not c: break
    out += c
sys.stdout.write(out.decode())
"""


def test_socket_is_root_only(world):
    env, proc, a, b = world
    st = os.stat(env.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)
    # a non-root process cannot even connect (file permissions) ...
    res = as_uid(["/usr/bin/python3", "-c", CLIENT, env.socket],
                 input=request(a, netns.netns_path(a.ns)).to_json().decode())
    assert res.stdout.strip() == "CONNECT 13", res          # EACCES
    # ... and its plugin run fails with "try again later" (failOpen false) or passes
    # prevResult through (failOpen), enrolling nothing and remembering nothing
    pending = os.path.join(env.state_dir, "pending")
    for fail_open in (False, True):
        res = as_uid([os.path.join(env.bin_dir, "merbridge-cni")], env={
            "PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-x",
            "CNI_NETNS": netns.netns_path(a.ns), "CNI_IFNAME": "eth0", "CNI_PATH": env.bin_dir,
            "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={a.name}"},
            input=json.dumps({"cniVersion": "1.0.0", "name": "mbtest", "type": "merbridge-cni",
                              "socketPath": env.socket, "prevResult": {"ips": []},
                              "failOpen": fail_open, "pendingDir": pending}))
        if fail_open:
            assert res.returncode == 0 and json.loads(res.stdout) == {
                "cniVersion": "1.0.0", "ips": []}, res
            assert "permission denied" in res.stderr
        else:
            assert res.returncode == 1 and json.loads(res.stdout)["code"] == 11, res
        assert not os.path.exists(pending) or os.listdir(pending) == []
        nothing_enrolled(env, a)


def test_peer_credentials_are_checked_even_if_the_mode_is_loosened(world):
    env, proc, a, b = world
    os.chmod(env.socket, 0o666)        # an operator mistake: the uid check still holds
    try:
        res = as_uid(["/usr/bin/python3", "-c", CLIENT, env.socket],
                     input=request(a, netns.netns_path(a.ns)).to_json().decode())
    finally:
        os.chmod(env.socket, 0o600)
    assert res.stdout.startswith("HTTP/1.1 403"), res
    body = res.stdout.replace("\r\n", "\n").split("\n\n", 1)[1]   # (text mode)
    assert "uid 1337" in protocol.ErrorReply.from_json(body.encode()).details
    nothing_enrolled(env, a)


@pytest.mark.parametrize("trick", ["relative", "dotdot", "symlink-own", "own", "mnt-ns",
                                   "regular-file", "directory", "dev-null", "missing"])
def test_netns_path_tricks_are_refused(world, tmp_path, trick):
    env, proc, a, b = world
    good = netns.netns_path(a.ns)
    link = tmp_path / "ns-link"
    if trick == "symlink-own":
        link.symlink_to(env.node_netns)        # the daemon's own (node) netns
    (tmp_path / "file").write_text("")
    path = {"relative": good.lstrip("/"),
            "dotdot": f"/var/run/netns/../netns/{a.ns}",
            "symlink-own": str(link),
            "own": f"/proc/{proc.pid}/ns/net",
            "mnt-ns": f"/proc/{proc.pid}/ns/mnt",
            "regular-file": str(tmp_path / "file"),
            "directory": str(tmp_path),
            "dev-null": "/dev/null",
            "missing": "/var/run/netns/mbt-does-not-exist"}[trick]
    with pytest.raises(CniError) as err:
        DaemonClient(env.socket, 10).call(request(a, path))
    assert err.value.code == 8, err.value
    nothing_enrolled(env, a)
    assert proc.poll() is None


def test_port_list_over_the_datapath_limit_is_refused(world):
    env, proc, a, b = world
    ports = ",".join(str(1000 + i) for i in range(bpftypes.MB_MAX_PORTS + 1))
    env.publish_pod(b, {"traffic.sidecar.istio.io/excludeInboundPorts": ports})
    try:
        for _ in range(20):                   # until the pod source has the new manifest
            res = env.cni("ADD", b, container_id="ctr-limit")
            err = json.loads(res.stdout or "{}")
            if err.get("code") == 101:
                break
        assert res.returncode == 1 and err["code"] == 101, res
        assert f"at most {bpftypes.MB_MAX_PORTS}" in err["msg"] + err.get("details", "")
        nothing_enrolled(env, b)
    finally:
        env.publish_pod(b)


def test_full_node_is_refused_with_a_code_and_nothing_left(world):
    env, proc, a, b = world
    maps = env.maps()
    fillers = [0x40000000 + i for i in range(bpftypes.MB_MAX_PODS)]
    try:
        for key in fillers:
            try:
                maps.mark_pod_ips.put(key, "10.255.0.1")
            except Exception:
                break                           # the map is full
        res = env.cni("ADD", a, container_id="ctr-full")
        assert res.returncode == 1 and json.loads(res.stdout)["code"] == 104, res
        nothing_enrolled(env, a)
    finally:
        for key in fillers:
            maps.mark_pod_ips.delete(key)
        maps.close()
    res = env.cni("ADD", a, container_id="ctr-full")
    assert res.returncode == 0, res
    assert env.cni("DEL", a, container_id="ctr-full").returncode == 0
    nothing_enrolled(env, a)
