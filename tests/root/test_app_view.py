"""The app's own view of a redirected connection, against Istio's iptables.

Under istio-iptables (nat OUTPUT REDIRECT, conntrack reverses it) an app that
connects to B:8080 sees B:8080 as its peer and its pod IP with an ephemeral
port as its local address. merbridge rewrites the socket's destination at
connect (127.0.0.1:15001), so bpf/progs/peername.c answers getpeername and
getsockname from mb_sock_origin. Each case is run twice in the same topology,
once under the real Istio rules (no eBPF) and once under merbridge (no
iptables), and the app's getsockname/getpeername, before and after the
server closed, and what the server app saw must be the same. Sockets that
were not redirected (loopback, the proxy's own, a pod outside the mesh) are
compared too: they must be untouched. CNI and legacy mode; IPv4, IPv6 and
IPv4-mapped destinations on a dual-stack socket; connections made before and
after a restart of the datapath's owner (pins and attachments stay).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field

import pytest

from merbridge.bpf import loader
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.lab import netns
from merbridge.lab.lab import PYTHON, Lab, Pod
from test_e2e_sidecar import enrol

pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
MODES = [pytest.param(True, id="cni"), pytest.param(False, id="legacy")]

# connect, then report getsockname/getpeername; after the server's reply and
# close (CLOSE_WAIT) once more; with "hold", again after a line on stdin
VIEW = r"""
import json, socket, sys
host, port, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
s.connect((host, port))
out = {"sock": list(s.getsockname()[:2]), "peer": list(s.getpeername()[:2])}
s.sendall(b"hello\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
out["reply"] = json.loads(data)
out["peer_closed"] = list(s.getpeername()[:2])
print(json.dumps(out), flush=True)
if hold:
    sys.stdin.readline()
    print(json.dumps({"sock": list(s.getsockname()[:2]), "peer": list(s.getpeername()[:2])}),
          flush=True)
"""


def view(pod: Pod, host: str, port: int, uid: int | None = None) -> dict:
    res = pod.run([PYTHON, "-I", "-c", VIEW, host, str(port), "-"], uid=uid)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def comparable(v: dict) -> dict:
    """What must be equal under iptables and merbridge: everything but the
    ephemeral port, which must just be an ordinary one (not a proxy port)."""
    port = v["sock"][1]
    assert port not in (ISTIO.out_port, ISTIO.in_port, 0), v
    return {"sock": v["sock"][0], "peer": v["peer"], "peer_closed": v["peer_closed"],
            "server": v["reply"]["pod"], "server_peer": v["reply"]["peer"][0],
            "server_local": v["reply"]["local"]}


#: (case, client pod, destination (pod, family) or address, port, uid)
CASES = [
    ("mesh-ipv4", "a", ("b", "4"), 8080, None),
    ("mesh-ipv6", "a", ("b", "6"), 8080, None),
    ("mesh-v4-mapped", "a", ("b", "mapped"), 8080, None),
    ("outside-ipv4", "a", ("c", "4"), 8080, None),
    ("outside-ipv6", "a", ("c", "6"), 8080, None),
    ("outside-v4-mapped", "a", ("c", "mapped"), 8080, None),
    # not redirected: these sockets must be untouched
    ("loopback", "a", "127.0.0.1", 8080, None),
    ("proxy-own", "a", ("c", "4"), 8080, ISTIO.proxy_uid),
    ("not-in-mesh", "c", ("b", "4"), 8080, None),
]


def dest(lab: Lab, d) -> str:
    if isinstance(d, str):
        return d
    pod = lab.pods[d[0]]
    return {"4": pod.ip4, "6": pod.ip6, "mapped": "::ffff:" + pod.ip4}[d[1]]


@dataclass
class Env:
    lab: Lab
    dp: loader.Datapath
    cni_mode: bool
    pin_dir: str
    closers: list = field(default_factory=list)


def learn(e: Env) -> None:
    """Legacy mode: the pods' IPs (both families) are known once their
    proxies made connections of their own, as Envoy does at start."""
    if e.cni_mode:
        return
    c = e.lab.pods["c"]
    for name in ("a", "b"):
        for addr in (c.ip4, c.ip6):
            assert e.lab.pods[name].connect(addr, 8080, uid=ISTIO.proxy_uid).ok


@contextlib.contextmanager
def topology(bpffs: str, cni_mode: bool):
    """A and B with sidecars and apps, C outside the mesh with an app."""
    with Lab("mbt") as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        c = lab.add_pod("c", in_mesh=False)
        for pod in (a, b, c):
            pod.start_app(8080)
        a.start_sidecar()
        b.start_sidecar()
        e = Env(lab, loader.Datapath(os.path.join(bpffs, "merbridge"), ISTIO, cni_mode),
                cni_mode, os.path.join(bpffs, "merbridge"))
        try:
            yield e
        finally:
            for close in e.closers:
                close()
            e.dp.detach()
            e.dp.unpin()
            e.dp.close()


def flush_nat(pod: Pod) -> None:
    for tool in ("iptables-restore", "ip6tables-restore"):
        res = netns.run([tool], ns=pod.ns, input="*nat\nCOMMIT\n")
        assert res.returncode == 0, res.stderr


def attach(e: Env) -> None:
    e.dp.load()
    e.dp.attach(e.lab.cgroup)
    for key, name in ((1, "a"), (2, "b")):
        enrol(e.dp, e.lab.pods[name], key, PodPolicy(status_port=ISTIO.status_port),
              e.cni_mode, e.closers)
    learn(e)


@pytest.fixture(scope="module", params=MODES)
def views(request, make_bpffs):
    """{case: (view under Istio's iptables, view under merbridge)}, plus the env."""
    with make_bpffs() as bpffs, topology(bpffs, request.param) as e:
        lab = e.lab
        run = lambda: {name: view(lab.pods[src], dest(lab, d), port, uid)  # noqa: E731
                       for name, src, d, port, uid in CASES}
        for name in ("a", "b"):
            lab.pods[name].apply_istio_iptables()
        oracle = run()
        for name in ("a", "b"):
            flush_nat(lab.pods[name])
        attach(e)
        before = e.dp.maps.counters()
        ours = run()
        after = e.dp.maps.counters()
        yield {"cases": {k: (oracle[k], ours[k]) for k in oracle}, "env": e,
               "moved": {k: after[k] - before.get(k, 0) for k in after}}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_app_sees_what_iptables_would_show(views, case):
    oracle, ours = views["cases"][case]
    want, got = comparable(oracle), comparable(ours)
    if case == "not-in-mesh":
        # B's inbound capture of a non-mesh pod's connection is XDP's (set up
        # by the daemon per pod, not here): only the client's view counts
        want, got = ({k: v[k] for k in ("sock", "peer", "peer_closed")} for v in (want, got))
    assert got == want


def test_redirected_sockets_really_were_redirected(views):
    """The comparison means something: under merbridge the mesh cases went
    through A's sidecar by our rewrite (one redirect_out each)."""
    cases = views["cases"]
    assert views["moved"]["redirect_out"] == 6
    # the server app was reached through B's sidecar in the mesh cases
    for name in ("mesh-ipv4", "mesh-ipv6", "mesh-v4-mapped"):
        assert cases[name][1]["reply"]["peer"][0] in ("127.0.0.6", "::6")


@contextlib.contextmanager
def holding(pod: Pod, host: str, port: int):
    """A client whose connection stays open; yields (first view, ask-again)."""
    p = pod.spawn([PYTHON, "-I", "-c", VIEW, host, str(port), "hold"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    try:
        first = json.loads(p.stdout.readline() or "null")
        assert first, p.stderr.read()

        def again() -> dict:
            p.stdin.write("\n")
            p.stdin.flush()
            return json.loads(p.stdout.readline())
        yield first, again
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("cni_mode", MODES)
def test_views_survive_a_restart(make_bpffs, cni_mode):
    """A connection made before the datapath's owner restarts (objects closed,
    programs left attached, maps pinned; then loaded and attached again) keeps
    its view; one made after gets it too."""
    with make_bpffs() as bpffs, topology(bpffs, cni_mode) as e:
        attach(e)
        a, b = e.lab.pods["a"], e.lab.pods["b"]
        for host in (b.ip4, b.ip6, "::ffff:" + b.ip4):
            with holding(a, host, 8080) as (first, again):
                assert first["peer"] == [host, 8080]
                assert first["sock"][0] == (a.ip6 if ":" in host and "ffff" not in host
                                            else ("::ffff:" + a.ip4 if ":" in host else a.ip4))
                e.dp.close()
                e.dp = loader.Datapath(e.pin_dir, ISTIO, cni_mode).load()
                e.dp.attach(e.lab.cgroup)
                later = again()
                assert later == {"sock": first["sock"], "peer": first["peer"]}
            after = view(a, host, 8080)
            assert after["peer"] == [host, 8080] and after["sock"][0] == first["sock"][0]


V6_ONLY_LISTENER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::1", int(sys.argv[1])))
s.listen(8)
time.sleep(3600)
"""


# connect to argv[1]:argv[2] (refused), then the same socket to argv[3]:argv[4]
RECONNECT = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:  # blocking: a failed blocking connect disconnects the socket for another
    s.connect((sys.argv[1], int(sys.argv[2])))
    first = "connected"
except OSError as e:
    first = type(e).__name__
s.connect((sys.argv[3], int(sys.argv[4])))
s.sendall(b"hello\n")
reply = json.loads(s.makefile().readline())
print(json.dumps({"first": first, "peer": list(s.getpeername()), "reply": reply}), flush=True)
"""


def test_a_socket_connecting_again_after_a_failed_redirect_is_left_alone(views):
    """A redirected connect that fails (no outbound listener: the sidecar is
    down) leaves its record in the socket (mb_sock_origin). When the same
    socket then connects where nothing is redirected (its own pod through
    lo), the record must not follow it: getpeername answers the real peer,
    and sockops records no pair and adds no sk_msg shortcut for it."""
    e = views["env"]
    d = e.lab.add_pod("d")
    enrol(e.dp, d, 4, PodPolicy(status_port=ISTIO.status_port), e.cni_mode, e.closers)
    if not e.cni_mode:
        # legacy mode's mesh probe wants an outbound listener: an IPv6-only
        # one on [::1], which the IPv4 connect's rewrite cannot reach
        d.spawn([PYTHON, "-I", "-c", V6_ONLY_LISTENER, str(ISTIO.out_port)])
        d.wait_listening(ISTIO.out_port, "::1")
    d.start_app(9090)
    before = e.dp.maps.counters()
    res = d.run([PYTHON, "-I", "-c", RECONNECT, e.lab.pods["c"].ip4, "8080", "127.0.0.1",
                 "9090"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    after = e.dp.maps.counters()
    assert out["first"] == "ConnectionRefusedError"
    assert after["redirect_out"] == before["redirect_out"] + 1
    assert out["peer"] == ["127.0.0.1", 9090] and out["reply"]["pod"] == "d"
    assert after["pair_recorded"] == before["pair_recorded"]
    assert after["sockhash_add"] == before["sockhash_add"]
