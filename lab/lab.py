"""A throw-away pod topology on the real kernel, for tests, the demo and benchmarks.
(Just over 450 lines: nodes, pods and their sidecars are one lifecycle, torn down together.)

``Lab`` builds one or two "node" network namespaces, each with a bridge, and
"pods": a netns with ``eth0`` on a node bridge (IPv4 + IPv6), a child cgroup
below the lab's own cgroup, and helpers to run an echo app, a haproxy sidecar
(the Envoy stand-in, UID/GID 1337) and clients inside the pod's netns+cgroup.
``Pod.apply_istio_iptables`` installs the istio-iptables REDIRECT rule set in
the pod netns: the baseline for benchmarks and the oracle for the eBPF path.

Addressing (namespaces isolate it, so concurrent labs may reuse it):
node *n* bridge 10.231.n.1/24 + fd00:231:n::1/64; pod *k* on node *n* gets
.(k+2) in both; nodes are linked by 10.231.254.0/24 + fd00:231:fe::/64.

Everything a Lab creates carries its unique name and is removed by
``close()`` -- processes by PID, then cgroups, then namespaces -- even when
construction failed half-way.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from merbridge.bpf.mesh import MESHES
from merbridge.lab import labconfig, netns
from merbridge.lab.cgroups import CGROUP_ROOT, remove_cgroup

ISTIO = MESHES["istio"]
#: IPv6 inbound-passthrough source; istio-iptables adds it to lo the same way.
PASSTHROUGH6 = "::6"
#: stdlib-only helper scripts run under the system interpreter (fast start)
PYTHON = "/usr/bin/python3"

class LabError(RuntimeError):
    pass


# -- steps an interrupt must not split ---------------------------------------
# A step that creates something (a netns, a cgroup, a process, a mount) and
# records it for close() runs whole: a signal handler that lands inside one
# (the demo's SIGTERM/SIGINT handler) calls ``interrupt_later()`` instead of
# raising, and the interrupt is raised when the step ends.  Otherwise a thing
# made by a helper process (pyroute2 creates a netns in a forked child) could
# appear after the interrupted parent looked for it, and be left behind.
_steps = 0
_interrupted = False


@contextlib.contextmanager
def uninterrupted():
    global _steps, _interrupted
    _steps += 1
    try:
        yield
    finally:
        _steps -= 1
        if not _steps and _interrupted:
            _interrupted = False
            raise KeyboardInterrupt


def interrupt_later() -> bool:
    """For a signal handler: True when a step is running; the interrupt is then
    raised as KeyboardInterrupt at its end."""
    global _interrupted
    if _steps:
        _interrupted = True
    return bool(_steps)


@dataclass
class Reply:
    """What one client connection saw (``pod.connect``)."""
    ok: bool
    error: str | None = None
    #: the app that answered: its pod name, the peer it saw, its local address
    pod: str | None = None
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    client_local: tuple[str, int] | None = None
    client_peer: tuple[str, int] | None = None


@dataclass
class Node:
    index: int
    ns: str
    bridge: str
    ip4: str
    ip6: str


@dataclass
class Pod:
    lab: "Lab"
    name: str
    node: Node
    ns: str
    ip4: str
    ip6: str
    cgroup: str
    host_if: str
    in_mesh: bool
    sidecar: "Sidecar | None" = None

    def ips(self) -> tuple[str, str]:
        return self.ip4, self.ip6

    # -- processes -------------------------------------------------------
    def spawn(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None,
              **popen) -> subprocess.Popen:
        """Start a long-running process in this pod (netns + cgroup); stopped at close."""
        with uninterrupted():
            proc = netns.spawn(argv, ns=self.ns, cgroup=self.cgroup, uid=uid, gid=gid, **popen)
            self.lab._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None,
            timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command to completion in this pod's netns + cgroup."""
        return netns.run(argv, ns=self.ns, cgroup=self.cgroup, uid=uid, gid=gid,
                         timeout=timeout, input=input)

    def wait_listening(self, port: int, addr: str | None = None, timeout: float = 10,
                       proc: subprocess.Popen | None = None, log: str | None = None) -> None:
        """Wait until something listens on ``port`` (optionally on ``addr``), via ss;
        fail early, with ``log``'s tail, if ``proc`` exits."""
        deadline = time.monotonic() + timeout * labconfig.READY_SCALE
        while True:
            socks = netns.listening(self.ns)
            if any(p == port and (addr is None or a == addr) for a, p in socks):
                return
            if proc is not None and proc.poll() is not None:
                tail = _tail(log) if log else ""
                raise LabError(f"{self.name}: {proc.args[-3:]} exited rc={proc.returncode} "
                               f"before listening on {port}: {tail}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: nothing listens on {addr or '*'}:{port}; "
                               f"listening: {sorted(socks)}")
            time.sleep(0.05)

    def start_app(self, port: int = 8080, uid: int | None = None) -> subprocess.Popen:
        """The echo app on [::]:port (dual stack); returns once it listens."""
        log = open(os.path.join(self.lab.workdir, f"app-{self.name}-{port}.log"), "wb")
        proc = self.spawn([PYTHON, "-I", "-c", labconfig.ECHO_APP, str(port), self.name],
                          uid=uid,
                          stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_listening(port, proc=proc, log=log.name)
        return proc

    def start_http_app(self, port: int = 8080) -> subprocess.Popen:
        """A fast HTTP app (haproxy ``http-request return``) for load generators;
        the body is ``peer=<src>``."""
        cfg = self.lab._write(f"http-{self.name}-{port}.cfg", labconfig.http_app(port))
        proc = self.spawn(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        self.wait_listening(port, proc=proc)
        return proc

    def start_dns(self, port: int, addrs: Sequence[str], answers: dict[str, str],
                  uid: int | None = None, upstream: str | None = None) -> subprocess.Popen:
        """A DNS server (dnsmasq) on ``addrs``:``port``, UDP and TCP, answering each
        name of ``answers`` with its address; other names go to ``upstream`` (if
        any). As ``uid``/``gid`` (the DNS proxy stand-in: the proxy's UID).
        Returns once it listens."""
        argv = ["dnsmasq", "--keep-in-foreground", "--no-hosts", "--no-resolv",
                "--conf-file=/dev/null", "--pid-file", f"--port={port}", "--bind-dynamic",
                "--log-facility=-", *(f"--listen-address={a}" for a in addrs),
                *(f"--address=/{name}/{ip}" for name, ip in answers.items())]
        if upstream:
            argv.append(f"--server={upstream}")
        log = os.path.join(self.lab.workdir, f"dns-{self.name}-{port}.log")
        with open(log, "ab") as f:
            proc = self.spawn(argv, uid=uid, gid=uid, stdout=f, stderr=subprocess.STDOUT)
        self.wait_listening(port, proc=proc, log=log)
        return proc

    def dns_query(self, how: str, server: str, name: str, uid: int | None = None,
                  gid: int | None = None) -> dict:
        """One A query for ``name`` to ``server``:53 (``how``: "udp" sendto/recvfrom,
        "connected" UDP, "tcp"): {"answer": ip, "from": [addr, port]} or {"error"}."""
        res = self.run([PYTHON, "-I", "-c", labconfig.DNS_QUERY, how, server, name],
                       uid=uid, gid=uid if gid is None else gid)
        try:
            return json.loads(res.stdout)
        except ValueError:
            return {"error": f"query failed: rc={res.returncode} {res.stderr.strip()}"}

    def start_sidecar(self, mode: str = "tcp", threads: int = 1) -> "Sidecar":
        """The sidecar as UID/GID 1337: haproxy for IPv4 (0.0.0.0:15001 outbound,
        0.0.0.0:15006 inbound) plus ``sidecar6.py`` for IPv6 ([::]:15001,
        [::]:15006), both logging to one file; returns once all four listen."""
        if self.sidecar is not None:
            raise LabError(f"{self.name} already has a sidecar")
        cfg = self.lab._write(f"sidecar-{self.name}.cfg",
                              labconfig.sidecar(mode=mode, threads=threads))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sidecar6.py")
        script = self.lab._write("sidecar6.py", open(script).read())
        log_path = os.path.join(self.lab.workdir, f"sidecar-{self.name}.log")
        ids = {"uid": ISTIO.proxy_uid, "gid": ISTIO.proxy_gid}
        with open(log_path, "ab") as log:
            procs = [
                self.spawn(["haproxy", "-db", "-f", cfg], stdout=log,
                           stderr=subprocess.STDOUT, **ids),
                self.spawn([PYTHON, "-I", "-u", script, str(ISTIO.out_port),
                            str(ISTIO.in_port), PASSTHROUGH6], stdout=log,
                           stderr=subprocess.STDOUT, **ids),
            ]
        self.sidecar = Sidecar(self, procs, log_path)
        for proc, addr, port in ((procs[0], "0.0.0.0", ISTIO.out_port),
                                 (procs[0], "0.0.0.0", ISTIO.in_port),
                                 (procs[1], "::", ISTIO.out_port),
                                 (procs[1], "::", ISTIO.in_port)):
            self.wait_listening(port, addr, proc=proc, log=log_path)
        return self.sidecar

    def connect(self, dst: str, port: int, payload: str = "hello", uid: int | None = None,
                timeout: float = 5) -> Reply:
        """One TCP connection from this pod to dst:port; the app's answer."""
        res = self.run([PYTHON, "-I", "-c", labconfig.CLIENT, dst, str(port), payload,
                        str(timeout)],
                       uid=uid, timeout=timeout + 10)
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return Reply(ok=False, error=f"client failed: rc={res.returncode} {res.stderr.strip()}")
        reply = out.get("reply") or {}
        as_pair = lambda v: (v[0], v[1]) if v else None  # noqa: E731
        return Reply(ok=out["ok"], error=out.get("error"), pod=reply.get("pod"),
                     peer=as_pair(reply.get("peer")), local=as_pair(reply.get("local")),
                     client_local=as_pair(out.get("client_local")),
                     client_peer=as_pair(out.get("client_peer")))

    # -- iptables baseline -----------------------------------------------
    def apply_istio_iptables(self, **options) -> None:
        """Install istio-iptables' REDIRECT rules (v4 and v6) in this pod's netns only.
        Options: see ``labconfig.istio_iptables``."""
        for version, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            rules = labconfig.istio_iptables(version, **options)
            res = netns.run([tool], ns=self.ns, input=rules)
            if res.returncode != 0:
                raise LabError(f"{tool} in {self.name}: {res.stderr.strip()}")

    def iptables_nat(self, version: int = 4) -> str:
        tool = "iptables-save" if version == 4 else "ip6tables-save"
        return netns.run([tool, "-t", "nat"], ns=self.ns).stdout


@dataclass
class Sidecar:
    pod: Pod
    #: haproxy (IPv4) and sidecar6.py (IPv6), both UID/GID 1337
    procs: list[subprocess.Popen]
    log_path: str

    def entries(self, since: int = 0) -> list[dict]:
        """One dict per logged connection (from the ``since``-th on): ``dir``
        (outbound/inbound), ``fe`` (outbound4/inbound4/outbound6/inbound6),
        ``src``/``sport``, ``dst``/``dport`` (the original destination the proxy
        saw, i.e. the SO_ORIGINAL_DST answer), ``bsrc``/``bsport`` (its upstream
        source), ``server``/``sdport`` and ``term`` (``reject``: self-loop guard)."""
        with open(self.log_path, errors="replace") as f:
            return [e for e in map(labconfig.parse_log_line, f) if e][since:]

    def wait_entries(self, count: int = 1, timeout: float = 5, since: int = 0,
                     **match) -> list[dict]:
        """Wait for at least ``count`` entries (from the ``since``-th on) whose
        fields equal ``match``; returns those found by then."""
        deadline = time.monotonic() + timeout * labconfig.READY_SCALE
        while True:
            found = [e for e in self.entries(since)
                     if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@dataclass
class Lab:
    """A set of node and pod namespaces; use as a context manager."""
    prefix: str = "mbt"
    nodes_count: int = 1
    cgroup_root: str | None = CGROUP_ROOT
    name: str = ""
    cgroup: str = ""
    workdir: str = ""
    nodes: list[Node] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)
    _cgroups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes_count not in (1, 2):
            raise LabError("a lab has one or two nodes")
        if not self.cgroup_root:
            raise LabError("no cgroup v2 mount in /proc/mounts: a lab makes its cgroups "
                           "below it (mount -t cgroup2 none /sys/fs/cgroup)")
        self.name = self.name or f"{self.prefix}-{uuid.uuid4().hex[:8]}"
        self.cgroup = os.path.join(self.cgroup_root, self.name)
        try:
            with uninterrupted():
                self.workdir = tempfile.mkdtemp(prefix=self.name + "-")
            os.chmod(self.workdir, 0o755)  # the sidecar (UID 1337) reads its config here
            self._mkcgroup(self.cgroup)
            for i in range(self.nodes_count):
                self._add_node(i)
            if self.nodes_count == 2:
                self._link_nodes()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building --------------------------------------------------------
    @staticmethod
    def _make(thing: str, exists, create, made: list[str]) -> None:
        """``create()`` a thing that must not exist yet and note it in ``made`` for
        close(), also when create() fails half-way."""
        with uninterrupted():
            existed = exists(thing)   # someone else's: create() refuses, never ours to remove
            try:
                create(thing)
            finally:
                if not existed and exists(thing) and thing not in made:
                    made.append(thing)

    def _mkcgroup(self, path: str) -> None:
        self._make(path, os.path.isdir, os.mkdir, self._cgroups)

    def _mkns(self, name: str) -> str:
        self._make(name, netns.netns_exists, netns.create_netns, self._netns)
        return name

    def _write(self, fname: str, text: str) -> str:
        path = os.path.join(self.workdir, fname)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        return path

    def _add_node(self, i: int) -> None:
        ns = self._mkns(f"{self.name}-n{i}")
        node = Node(index=i, ns=ns, bridge="mbbr0", ip4=f"10.231.{i}.1", ip6=_v6(f"fd00:231:{i}::1"))
        netns.create_bridge(ns, node.bridge)
        netns.add_address(ns, node.bridge, f"{node.ip4}/24")
        netns.add_address(ns, node.bridge, f"{node.ip6}/64")
        self.nodes.append(node)

    def _link_nodes(self) -> None:
        a, b = self.nodes
        netns.create_veth("uplink", "uplink", ns=a.ns, peer_ns=b.ns)
        for node, other in ((a, b), (b, a)):
            n, o = node.index, other.index
            netns.add_address(node.ns, "uplink", f"10.231.254.{n + 1}/24")
            netns.add_address(node.ns, "uplink", f"fd00:231:fe::{n + 1}/64")
            netns.link_up(node.ns, "uplink")
            netns.add_route(node.ns, f"10.231.{o}.0/24", gateway=f"10.231.254.{o + 1}")
            netns.add_route(node.ns, f"fd00:231:{o}::/64", gateway=f"fd00:231:fe::{o + 1}")
            netns.set_sysctl(node.ns, "net.ipv4.ip_forward", 1)
            netns.set_sysctl(node.ns, "net.ipv6.conf.all.forwarding", 1)

    def add_pod(self, name: str, node: int = 0, in_mesh: bool = True) -> Pod:
        if name in self.pods or not name.replace("-", "").isalnum():
            raise LabError(f"bad or duplicate pod name {name!r}")
        nd = self.nodes[node]
        k = sum(1 for p in self.pods.values() if p.node is nd) + 2
        if k > 250:
            raise LabError("too many pods on one node")
        ns = self._mkns(f"{self.name}-{name}")
        cg = os.path.join(self.cgroup, name)
        self._mkcgroup(cg)
        pod = Pod(lab=self, name=name, node=nd, ns=ns, ip4=f"10.231.{nd.index}.{k}",
                  ip6=_v6(f"fd00:231:{nd.index}::{k}"), cgroup=cg, host_if=f"vp{k}",
                  in_mesh=in_mesh)
        netns.create_veth(pod.host_if, "eth0", ns=nd.ns, peer_ns=ns)
        netns.enslave(nd.ns, pod.host_if, nd.bridge)
        netns.link_up(nd.ns, pod.host_if)
        netns.add_address(ns, "eth0", f"{pod.ip4}/24")
        netns.add_address(ns, "eth0", f"{pod.ip6}/64")
        netns.add_address(ns, "lo", f"{PASSTHROUGH6}/128")
        netns.link_up(ns, "eth0")
        netns.add_route(ns, "default", gateway=nd.ip4)
        netns.add_route(ns, "default6", gateway=nd.ip6)
        self.pods[name] = pod
        return pod

    def add_bare_pod(self, name: str, node: int = 0, in_mesh: bool = True) -> Pod:
        """A pod whose ``eth0`` someone else makes (the demo: a CNI ADD via cnitool):
        netns with lo (+ ::6 for the v6 passthrough) and cgroup only, removed by
        close() like any pod.  Fill ``ip4``/``ip6``/``host_if`` once eth0 exists."""
        if name in self.pods or not name.replace("-", "").isalnum():
            raise LabError(f"bad or duplicate pod name {name!r}")
        ns = self._mkns(f"{self.name}-{name}")
        cg = os.path.join(self.cgroup, name)
        self._mkcgroup(cg)
        netns.add_address(ns, "lo", f"{PASSTHROUGH6}/128")
        pod = Pod(lab=self, name=name, node=self.nodes[node], ns=ns, ip4="", ip6="",
                  cgroup=cg, host_if="", in_mesh=in_mesh)
        self.pods[name] = pod
        return pod

    # -- teardown --------------------------------------------------------
    def close(self) -> None:
        """Stop processes (SIGTERM, then SIGKILL), remove cgroups, namespaces, files."""
        errors: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        for cg in reversed(self._cgroups):
            try:
                remove_cgroup(cg)
            except OSError as e:
                errors.append(f"cgroup {cg}: {e}")
        self._cgroups.clear()
        for ns in reversed(self._netns):
            try:
                netns.remove_netns(ns)
            except OSError as e:
                errors.append(f"netns {ns}: {e}")
        self._netns.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))


def _v6(addr: str) -> str:
    """Canonical (compressed) text, as the kernel and sockets report it."""
    return str(ipaddress.ip_address(addr))


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
