"""The benchmark topology, built one way per interception mode.

Two "nodes" (network namespaces with a bridge, joined by a link), three pods
from ``merbridge.lab.lab``: ``cli`` and ``srv`` on node 0 (same-node) and
``srvx`` on node 1 (cross-node). ``srv``/``srvx`` run a fast HTTP app
(haproxy ``http-request return``) on 8080 whose body names the peer it saw.

Modes:
- ``direct``: no sidecars, no interception.
- ``iptables``: haproxy sidecars (UID 1337) in every pod plus Istio's
  REDIRECT rule set in every pod netns (``Pod.apply_istio_iptables``).
- ``ebpf-cni`` / ``ebpf-legacy``: the same sidecars, no iptables; merbridge's
  datapath loaded once per node (its own pin dir), attached to that node's pod
  cgroups, pods registered the way the daemon does (``ebpf.py``).
- ``ebpf-cni-xdp``: CNI mode with ``--inbound-hook=xdp`` (the default before
  tc: generic XDP, the pods' tx checksum offload off), for comparison with
  ``ebpf-cni`` (the default hook, tc).
- ``ebpf-cni-nosockmap``: CNI mode with sk_msg redirection switched off.
- ``ebpf-cni-hwcsum``: CNI mode with the pods' tx checksum offload left on
  (``--hardware-checksum=true``): what turning it off costs same-node.
- ``explicit``: the same haproxy sidecars (same log line per connection) with
  no interception at all: the client addresses its own sidecar on 127.0.0.1,
  which forwards to the server pod's inbound listener by a static address,
  which forwards to the app from 127.0.0.6. No hook, no NAT, no conntrack
  entry is on the path: interception can only add to its cost, unless it
  takes TCP out of the path (sk_msg between local sockets). It bounds what
  any interception can reach where sk_msg does not pay off (a connection
  per request).

A fresh topology per (repetition, mode) keeps modes from leaking state into
each other (conntrack, nat tables, sockets in TIME_WAIT).
"""
from __future__ import annotations

import subprocess
import time

from common import BenchError, log
from merbridge.lab import labconfig
from merbridge.lab.labconfig import ISTIO
from merbridge.lab.lab import Lab

APP_PORT = 8080
BULK_PORT = 5201
PASSTHROUGH = "127.0.0.6"

MODES = ("direct", "iptables", "ebpf-cni", "ebpf-cni-xdp", "ebpf-legacy",
         "ebpf-cni-nosockmap", "ebpf-cni-hwcsum", "explicit")
#: CNI-mode variants measured same-node only: sk_msg shortcuts sockets on one
#: node, and with tx checksum offload on, XDP's rewrite of cross-node replies
#: is not checksum-safe (docs/datapath.md)
SAME_NODE_ONLY = ("ebpf-cni-nosockmap", "ebpf-cni-hwcsum")
DEFAULT_MODES = ("direct", "iptables", "ebpf-cni", "ebpf-cni-xdp", "ebpf-legacy", "explicit")

#: explicit mode: the client's sidecar listens on 127.0.0.1 at one port per
#: target ("bulk" is iperf3's), each server's sidecar on its pod IP at one
#: port per app port
EXPLICIT_OUT = {"same": 15001, "cross": 15002, "bulk": 15003}
EXPLICIT_IN = {APP_PORT: 15006, BULK_PORT: 15007}

_GET = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while True:
    c = s.recv(4096)
    if not c:
        break
    data += c
print(data.decode(errors="replace").split("\r\n\r\n", 1)[-1].strip())
"""


class Topology:
    """A lab in one mode; ``with Topology(mode) as t: t.cli ... t.url(...)``."""

    def __init__(self, mode: str, nodes: int = 2):
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.nodes = nodes
        self.lab: Lab | None = None
        self.datapath = None  # ebpf.MeshDatapath
        self.setup_s = 0.0

    # -- building ---------------------------------------------------------
    def __enter__(self) -> "Topology":
        t0 = time.perf_counter()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.setup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self.lab = Lab(prefix="mbb", nodes_count=self.nodes)
        self.cli = self.lab.add_pod("cli", node=0)
        self.srv = self.lab.add_pod("srv", node=0)
        self.srvx = self.lab.add_pod("srvx", node=1) if self.nodes == 2 else None
        self.servers = [p for p in (self.srv, self.srvx) if p is not None]
        for p in self.servers:
            p.start_http_app(APP_PORT)
        if self.mode == "direct":
            return
        if self.mode == "explicit":
            self._explicit_sidecars()
            return
        for p in self.pods():
            p.start_sidecar("tcp")
        if self.mode == "iptables":
            for p in self.pods():
                p.apply_istio_iptables()
        else:
            import ebpf  # only the eBPF modes need bcc and the loader
            xdp = self.mode in ("ebpf-cni-xdp", "ebpf-cni-hwcsum")
            self.datapath = ebpf.MeshDatapath(self.lab, cni_mode=self.mode.startswith("ebpf-cni"),
                                              sockmap=not self.mode.endswith("nosockmap"),
                                              hardware_checksum=self.mode.endswith("hwcsum"),
                                              inbound_hook="xdp" if xdp else "tc")
            self.datapath.setup()

    def _explicit_sidecars(self) -> None:
        outs = {"same": (self.srv, APP_PORT), "bulk": (self.srv, BULK_PORT)}
        if self.srvx is not None:
            outs["cross"] = (self.srvx, APP_PORT)
        fronts = [(f"out_{k}", f"127.0.0.1:{EXPLICIT_OUT[k]}",
                   f"{pod.ip4}:{EXPLICIT_IN[port]}", "")
                  for k, (pod, port) in outs.items()]
        self._explicit_proxy(self.cli, fronts)
        for p in self.servers:
            self._explicit_proxy(p, [(f"in_{port}", f"{p.ip4}:{inp}", f"{p.ip4}:{port}",
                                      f" source {PASSTHROUGH}")
                                     for port, inp in EXPLICIT_IN.items()])

    def _explicit_proxy(self, pod, fronts) -> None:
        """haproxy as UID/GID 1337 with the sidecar's defaults and log line
        (labconfig.sidecar), static backends instead of the original destination."""
        cfg = [labconfig.sidecar().split("\nfrontend ", 1)[0]]  # global + defaults
        for name, bind, server, extra in fronts:
            cfg += [f"frontend {name}", f"    bind {bind}", f"    default_backend b_{name}",
                    f"backend b_{name}", f"    server s {server}{extra}"]
        path = self.lab._write(f"explicit-{pod.name}.cfg", "\n".join(cfg) + "\n")
        proc = pod.spawn(["haproxy", "-db", "-f", path], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, uid=ISTIO.proxy_uid, gid=ISTIO.proxy_gid)
        for _, bind, _, _ in fronts:
            addr, port = bind.rsplit(":", 1)
            pod.wait_listening(int(port), addr, proc=proc)

    def pods(self):
        return [p for p in (self.cli, self.srv, self.srvx) if p is not None]

    def target(self, where: str):
        if where == "same":
            return self.srv
        if where == "cross":
            if self.srvx is None:
                raise BenchError("cross-node needs two nodes")
            return self.srvx
        raise BenchError(f"bad placement {where!r}")

    def url(self, where: str) -> str:
        self.target(where)
        if self.mode == "explicit":
            return f"http://127.0.0.1:{EXPLICIT_OUT[where]}/"
        return f"http://{self.target(where).ip4}:{APP_PORT}/"

    def bulk_dst(self) -> tuple[str, int]:
        """Where iperf3's client connects to reach the same-node server's BULK_PORT."""
        if self.mode == "explicit":
            return "127.0.0.1", EXPLICIT_OUT["bulk"]
        return self.srv.ip4, BULK_PORT

    def check(self, placements=("same", "cross")) -> dict:
        """One request per placement; the peer the app saw proves whether the
        sidecars carried it (127.0.0.6) or not (the client's own IP)."""
        want = self.cli.ip4 if self.mode == "direct" else PASSTHROUGH
        seen = {}
        for where in placements:
            host, port = self.url(where).split("/")[2].rsplit(":", 1)
            res = self.cli.run(["/usr/bin/python3", "-I", "-c", _GET, host, port],
                               uid=1000, timeout=20)
            body = res.stdout.strip() or res.stderr.strip()[-200:]
            ok = body.endswith(f"peer={want}") or body.endswith(f"peer=::ffff:{want}")
            seen[where] = {"ok": ok, "body": body}
        return seen

    def counters(self) -> dict:
        return self.datapath.counters() if self.datapath else {}

    def close(self) -> None:
        errors = []
        if self.datapath is not None:
            try:
                self.datapath.close()
            except Exception as e:  # keep tearing down
                errors.append(f"datapath: {e}")
            self.datapath = None
        if self.lab is not None:
            try:
                self.lab.close()
            except Exception as e:
                errors.append(f"lab: {e}")
            self.lab = None
        if errors:
            log("cleanup problems: " + "; ".join(errors))
