"""merbridge's datapath on a benchmark lab, set up the way the daemon does it.

One ``Datapath`` per lab node (its own pin dir under /sys/fs/bpf, so node 1's
pods are *not* local pods of node 0: cross-node traffic really leaves the
node), attached to the cgroups of that node's pods. Pods are registered as
the daemon's registry would:

- CNI mode: ``mb_local_pods[ip] = PodPolicy()``, ``mb_mark_pod_ips[key] = ip``,
  the 39807 marker listener with ``SO_MARK = key`` in the pod netns, and the
  inbound rewrite of traffic from other nodes (``daemon.podnet.PodNet``): tc
  on the host-side veth (default) or XDP on eth0 + host-side veth.
- legacy mode: ``mb_local_pods[ip]`` only; the pod's IP is learned from its
  traffic. Legacy mode cannot intercept inbound traffic from other nodes (no
  XDP; upstream leaves that to Istio's iptables, which stay installed), so
  the cross-node server pod (node 1) keeps Istio's rules (``legacy_iptables``).
  Node 0's pods get none: with the full rule set in the client pod, legacy
  mode's 127.128.x.y redirect collides with ISTIO_INBOUND (connection refused).
"""
from __future__ import annotations

import os
import uuid

from common import BenchError, log
from merbridge.bpf import types as t
from merbridge.bpf.loader import Datapath, netns_cookie_of
from merbridge.bpf.mesh import MESHES
from merbridge.bpf.policy import PodPolicy
from merbridge.daemon import netns
from merbridge.lab import netns as labns
from merbridge.daemon.podnet import PodNet

BPFFS = "/sys/fs/bpf"


class MeshDatapath:
    def __init__(self, lab, cni_mode: bool, sockmap: bool = True,
                 legacy_iptables: bool = True, hardware_checksum: bool = False,
                 inbound_hook: str = "tc"):
        self.lab, self.cni_mode, self.sockmap = lab, cni_mode, sockmap
        self.inbound_hook = inbound_hook
        self.hardware_checksum = hardware_checksum
        self.legacy_iptables = legacy_iptables
        self.dps: list[Datapath] = []
        self.pins: list[str] = []
        self.markers = []
        self.xdp: list[tuple[PodNet, str]] = []

    def node_pods(self, node):
        return [p for p in self.lab.pods.values() if p.node is node]

    def setup(self) -> None:
        for node in self.lab.nodes:
            pin = os.path.join(BPFFS, f"{self.lab.name}-n{node.index}-{uuid.uuid4().hex[:4]}")
            dp = Datapath(pin, MESHES["istio"], cni_mode=self.cni_mode)
            self.dps.append(dp)
            self.pins.append(pin)
            dp.load()
            if not self.sockmap:
                dp.maps.settings.set(t.MB_SET_SKMSG_OFF, 1)
            pods = self.node_pods(node)
            for k, pod in enumerate(pods):
                dp.maps.local_pods.put(pod.ip4, PodPolicy())
                if self.cni_mode:
                    key = 0x4D420000 + k + 1
                    dp.maps.mark_pod_ips.put(key, pod.ip4)
                    self.markers.append(netns.open_marker_listener(labns.netns_path(pod.ns), key))
                    dp.maps.netns_pod.put(netns_cookie_of(self.markers[-1]), pod.ip4, key)
            for pod in pods:
                dp.attach(pod.cgroup)
            if self.cni_mode:
                if not hasattr(dp, "xdp_programs"):
                    log("  loader has no xdp_programs(): cross-node inbound not intercepted")
                    continue
                podnet = PodNet(dp.xdp_programs, peer_netns=labns.netns_path(node.ns),
                                hardware_checksum=self.hardware_checksum,
                                inbound_hook=self.inbound_hook, tc_programs=dp.tc_programs)
                for pod in pods:
                    podnet.attach_xdp(labns.netns_path(pod.ns), "eth0")
                    self.xdp.append((podnet, pod.ns))
            elif self.legacy_iptables and node.index > 0:
                # the cross-node server's inbound: Istio's rules catch it, as in
                # an upstream legacy deployment (same-node needs none)
                for pod in pods:
                    pod.apply_istio_iptables()

    def counters(self) -> dict:
        out: dict[str, int] = {}
        for dp in self.dps:
            for k, v in dp.maps.counters().items():
                out[k] = out.get(k, 0) + v
        return {k: v for k, v in out.items() if v}

    def close(self) -> None:
        errors = []
        for podnet, ns in self.xdp:
            try:
                podnet.detach_xdp(labns.netns_path(ns), "eth0")
            except Exception as e:
                errors.append(f"xdp {ns}: {e}")
        self.xdp.clear()
        for m in self.markers:
            m.close()
        self.markers.clear()
        for dp, pin in zip(self.dps, self.pins):
            try:
                dp.detach()
            except Exception as e:
                errors.append(f"detach {pin}: {e}")
            try:
                dp.unpin()
            except Exception as e:
                errors.append(f"unpin {pin}: {e}")
            dp.close()
        self.dps.clear()
        if errors:
            raise BenchError("; ".join(errors))
