"""The proxy's identity per pod, as istio-cni takes it from the pod spec.

istio-cni exempts the UID/GID the istio-proxy container runs as
(securityContext.runAsUser / runAsGroup when set and non-zero; OpenShift
takes them from the namespace's range), 1337 otherwise. Pod P's proxy runs as
2000:2000 (PodPolicy.proxy_uid/gid, mb_pod_config.proxy_uid/gid); pod Q is the
oracle, the real istio-iptables rules with ``--proxy-uid 2000 --proxy-gid
2000`` and no eBPF. In each, the outbound listener (15001) is an echo app
running as 2000, so a reply from port 15001 means "captured". The proxy's
UID, or its GID alone, is never captured; a process of the pod running as
1337 (only the mesh default) is, in P exactly as in Q. Pod R keeps the default
(1337) and shows the per-pod setting does not leak to other pods. Legacy mode:
P's netns -> IPs entry is written the way the legacy daemon does it (found by
pod IP, daemon/legacy.py), since its proxy's own traffic cannot teach it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading

import pytest

from merbridge.bpf import loader
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.lab.lab import Lab, Pod
from merbridge.daemon.legacy import LegacyPods
from test_e2e_sidecar import enrol

pytestmark = pytest.mark.root

ISTIO = MESHES["istio"]
MODES = [pytest.param(True, id="cni"), pytest.param(False, id="legacy")]
PROXY = 2000       # this pod's proxy UID and GID
OTHER = 3000       # an app UID of no importance


def landed(pod: Pod, dst: str, uid: int, gid: int) -> tuple[str, int]:
    """(app that answered, port it answered on) for a connect as uid:gid.
    The oracle's clients run outside the lab cgroup (no eBPF at all: legacy
    mode would take Q for a mesh pod, its outbound listener being there)."""
    argv = ["/usr/bin/python3", "-I", "-c", CLIENT, dst]
    if pod.name == "q":
        res = labns.run(argv, ns=pod.ns, uid=uid, gid=gid)
    else:
        res = pod.run(argv, uid=uid, gid=gid)
    assert res.returncode == 0, res.stderr
    pod_name, port = res.stdout.split()
    return pod_name, int(port)


CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
s.sendall(b"hi\n")
r = json.loads(s.makefile().readline())
print(r["pod"], r["local"][1])
"""


@contextlib.contextmanager
def setup(bpffs: str, cni_mode: bool):
    closers: list = []
    nsdir = tempfile.mkdtemp(prefix="mbt-netns-")   # our pods' netns only, as --netns-dir
    closers.append(lambda: shutil.rmtree(nsdir))
    with Lab("mbt") as lab:
        p, q, r = lab.add_pod("p"), lab.add_pod("q", in_mesh=False), lab.add_pod("r")
        c = lab.add_pod("c", in_mesh=False)
        c.start_app(8080)
        p.start_app(ISTIO.out_port, uid=PROXY)
        q.start_app(ISTIO.out_port, uid=PROXY)
        r.start_app(ISTIO.out_port, uid=ISTIO.proxy_uid)
        q.apply_istio_iptables(uid=PROXY, gid=PROXY)
        dp = loader.Datapath(os.path.join(bpffs, "merbridge"), ISTIO, cni_mode)
        try:
            dp.load()
            dp.attach(lab.cgroup)
            for key, pod, uid in ((1, p, PROXY), (2, r, 0)):
                policy = PodPolicy(status_port=ISTIO.status_port, proxy_uid=uid, proxy_gid=uid)
                if cni_mode:
                    enrol(dp, pod, key, policy, cni_mode, closers)
                elif uid:
                    # legacy mode learns a pod's IP (hence its policy) from a
                    # connection left alone, which a proxy of its own UID
                    # cannot make: the daemon finds the netns by pod IP
                    legacy_pod(dp, pod, policy, nsdir)
                else:
                    # the default proxy's own connection teaches it
                    enrol(dp, pod, key, policy, cni_mode, closers)
                    assert landed(pod, c.ip4, ISTIO.proxy_uid, ISTIO.proxy_gid) == ("c", 8080)
            yield lab, dp
        finally:
            for close in closers:
                close()
            dp.detach()
            dp.unpin()
            dp.close()


@pytest.fixture(scope="module", params=MODES)
def env(request, make_bpffs):
    with make_bpffs() as bpffs, setup(bpffs, request.param) as e:
        yield e


def legacy_pod(dp, pod: Pod, policy: PodPolicy, nsdir: str) -> None:
    """The legacy daemon's handling of an in-mesh pod (daemon/legacy.py), its
    netns found in ``nsdir`` (links to the lab's: other labs on the machine
    may use the same addresses)."""
    for other in pod.lab.pods.values():
        os.symlink(labns.netns_path(other.ns), os.path.join(nsdir, other.ns))
    legacy = LegacyPods(dp.maps, threading.RLock(), lambda _: (pod.ips(), policy),
                        lambda _: ("default", pod.name, "uid"), ValueError)
    legacy.find_netns_cookie = lambda ips: netns.find_netns_cookie(nsdir, ips)
    legacy.event("ADDED", {})
    cookie = netns.netns_cookie(labns.netns_path(pod.ns))
    assert dict(dp.maps.netns_ip.all_items())[cookie] == pod.ips()
    assert dp.maps.counters()["learned_ip"] == 0   # the daemon told it, no traffic did


CAPTURED = ("p", ISTIO.out_port)


@pytest.mark.parametrize("who,uid,gid,captured", [
    ("proxy", PROXY, PROXY, False),
    ("proxy-gid-only", OTHER, PROXY, False),
    ("mesh-default-uid", ISTIO.proxy_uid, ISTIO.proxy_gid, True),
    ("app", OTHER, OTHER, True),
])
def test_pod_proxy_identity(env, who, uid, gid, captured):
    lab, dp = env
    c = lab.pods["c"]
    before = dp.maps.counters()
    ours = landed(lab.pods["p"], c.ip4, uid, gid)
    oracle = landed(lab.pods["q"], c.ip4, uid, gid)
    assert ours == (("p", ISTIO.out_port) if captured else ("c", 8080))
    assert oracle == (("q", ISTIO.out_port) if captured else ("c", 8080))
    moved = {k: v - before[k] for k, v in dp.maps.counters().items()}
    assert moved["redirect_out"] == int(captured)
    assert moved["bypass_proxy"] == int(not captured)


def test_default_pod_keeps_1337(env):
    """R has no per-pod identity: 1337 is its proxy, 2000 an app."""
    lab, _ = env
    r, c = lab.pods["r"], lab.pods["c"]
    assert landed(r, c.ip4, ISTIO.proxy_uid, ISTIO.proxy_gid) == ("c", 8080)
    assert landed(r, c.ip4, PROXY, PROXY) == ("r", ISTIO.out_port)
