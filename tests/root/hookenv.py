"""Scaffolding for the datapath root tests (tests/root/test_hooks*.py).

A Pod is a network namespace plus a child cgroup of the cgroup v2 mount, both
with a unique mbt-<hex> name (addresses on a veth kept inside the netns), and processes started inside both with
``sh -c 'echo $$ > cgroup.procs; exec nsenter --net=... python3 ...'``.
Servers reply with one JSON line saying who they are and what
SO_ORIGINAL_DST said, so a test sees where a connect really landed.
Everything created is removed by Pod.close() (processes by PID).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid

from merbridge.lab.cgroups import CGROUP_ROOT  # the cgroup v2 mount

PY = sys.executable

# SO_ORIGINAL_DST of an accepted socket, as a proxy asks it (both families)
ORIG_DST = r'''
import socket, struct
def orig_dst(c):
    try:
        if c.family == socket.AF_INET:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)  # SOL_IPV6
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    except OSError as e:
        return "errno %d" % e.errno
'''

SERVER = ORIG_DST + r'''
import json, socket, sys
import time
tag, fam, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mark = int(sys.argv[5]) if len(sys.argv) > 5 else 0
accept_delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0
af = socket.AF_INET6 if fam in ("6", "6only") else socket.AF_INET
s = socket.socket(af, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == "6only":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.bind((addr, port)); s.listen(64)
print("ready", flush=True)
time.sleep(accept_delay)   # connections wait in the backlog meanwhile
while True:
    c, peer = s.accept()
    orig = orig_dst(c)
    data = c.recv(100).decode()
    c.sendall(json.dumps({"tag": tag, "orig": orig, "peer": list(peer[:2]),
                          "local": list(c.getsockname()[:2]), "data": data}).encode())
    c.close()
'''

CLIENT = r'''
import json, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
bind = sys.argv[3] if len(sys.argv) > 3 else ""
af = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(af, socket.SOCK_STREAM)
s.settimeout(5)
if bind:
    s.bind((bind, 0))
# a link-local "fe80::x%dev" needs its scope id: getaddrinfo gives the 4-tuple
target = socket.getaddrinfo(addr, port, af)[0][4] if "%" in addr else (addr, port)
try:
    s.connect(target)
    s.sendall(b"hello")
    buf = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    print(json.dumps({"reply": json.loads(buf), "sock": list(s.getsockname()[:2])}))
except OSError as e:
    print(json.dumps({"error": e.errno}))
'''


# Istio's iptables validation probe (istio-iptables' validation/validator.go),
# run as the proxy's UID and GID: listen on 127.0.0.1 (v6: ::1) :15001 and
# :15006, dial 127.0.0.6 (::6) :15002 from 127.0.0.1 (::1) port 0. It passes
# when the connection lands on one of the two listeners and SO_ORIGINAL_DST
# says port 15002. Prints where it landed (port, local, peer, orig) or the
# error. Usage: PROBE 4|6
PROBE = ORIG_DST + r'''
import json, select, sys
v6 = sys.argv[1] == "6"
af = socket.AF_INET6 if v6 else socket.AF_INET
listen, dial = ("::1", "::6") if v6 else ("127.0.0.1", "127.0.0.6")
listeners = {}
for port in (15001, 15006):
    l = socket.socket(af, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((listen, port))
    l.listen(8)
    listeners[l] = port
c = socket.socket(af, socket.SOCK_STREAM)
c.settimeout(5)
c.bind((listen, 0))
try:
    c.connect((dial, 15002))
except OSError as e:
    print(json.dumps({"error": e.errno}))
    sys.exit()
ready = select.select(list(listeners), [], [], 5)[0]
if not ready:
    print(json.dumps({"error": "not accepted"}))
    sys.exit()
a, peer = ready[0].accept()
print(json.dumps({"port": listeners[ready[0]], "local": list(a.getsockname()[:2]),
                  "peer": list(peer[:2]), "orig": orig_dst(a)}))
'''


@contextlib.contextmanager
def datapath(cni_mode: bool = True):
    """A loaded Datapath on its own pin dir; detached, closed and unpinned after."""
    from merbridge.bpf import loader, mesh
    pin = f"/sys/fs/bpf/mbt-{uuid.uuid4().hex[:10]}"
    d = loader.Datapath(pin, mesh.get("istio"), cni_mode=cni_mode)
    try:
        d.load()
        yield d
    finally:
        d.detach()
        d.close()
        loader.remove_pins(pin)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Pod:
    def __init__(self, v4: list[str] = (), v6: list[str] = (), cgroup: bool = True) -> None:
        self.name = f"mbt-{uuid.uuid4().hex[:10]}"
        self.netns = f"/var/run/netns/{self.name}"
        self.cgroup = os.path.join(CGROUP_ROOT, self.name) if cgroup else None
        self.procs: list[subprocess.Popen] = []
        sh("ip", "netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
            # no dummy driver on every kernel: a veth pair kept in the netns
            self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            self.ip("link", "set", "eth0", "up")
            self.ip("link", "set", "eth0p", "up")
            for a in v4:
                self.ip("addr", "add", f"{a}/24", "dev", "eth0")
            for a in v6:
                self.ip("addr", "add", f"{a}/64", "dev", "eth0", "nodad")
            if self.cgroup:
                os.mkdir(self.cgroup)
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.name, *args)

    def _argv(self, code: str, args: list[str], uid: int | None, gid: int | None,
              in_cgroup: bool) -> list[str]:
        priv: list[str] = []
        if uid is not None or gid is not None:
            priv = ["setpriv", f"--reuid={uid if uid is not None else 0}",
                    f"--regid={gid if gid is not None else 0}", "--clear-groups"]
        inner = ["nsenter", f"--net={self.netns}", *priv, PY, "-c", code, *args]
        if in_cgroup and self.cgroup:
            return ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs; exec "$@"', "sh", *inner]
        return inner

    def serve(self, tag: str, addr: str, port: int, fam: str = "4", mark: int = 0,
              uid: int | None = None, gid: int | None = None, in_cgroup: bool = True,
              accept_delay: float = 0) -> None:
        """fam: "4", "6" (dual-stack) or "6only" (IPV6_V6ONLY). accept_delay:
        seconds before the first accept() (connections queue in the backlog)."""
        argv = self._argv(SERVER, [tag, fam, addr, str(port), str(mark), str(accept_delay)],
                          uid, gid, in_cgroup)
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"server {tag} did not start: {line!r} {p.stderr.read()}")

    def connect(self, addr: str, port: int, bind: str = "", uid: int | None = None,
                gid: int | None = None, in_cgroup: bool = True) -> dict:
        return self.finish(self.connect_async(addr, port, bind, uid, gid, in_cgroup))

    def connect_async(self, addr: str, port: int, bind: str = "", uid: int | None = None,
                      gid: int | None = None, in_cgroup: bool = True) -> subprocess.Popen:
        """connect() in the background; its result comes from finish()."""
        argv = self._argv(CLIENT, [addr, str(port), bind], uid, gid, in_cgroup)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finish(p: subprocess.Popen) -> dict:
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        if p.returncode != 0:
            raise RuntimeError(err)
        return json.loads(out)

    def netns_cookie(self) -> int:
        """SO_NETNS_COOKIE of this pod's netns (bpf_get_netns_cookie there)."""
        code = ("import socket, struct; s = socket.socket(); "
                "print(struct.unpack('=Q', s.getsockopt(socket.SOL_SOCKET, 71, 8))[0])")
        out = subprocess.run(self._argv(code, [], None, None, False), capture_output=True,
                             text=True, check=True)
        return int(out.stdout)

    def enrol(self, dp, mark: int, *ips: str) -> int:
        """What the daemon does at CNI ADD for this netns: mb_mark_pod_ips[mark]
        = ips and mb_netns_pod[netns cookie] = (ips, mark). Returns the cookie."""
        cookie = self.netns_cookie()
        dp.maps.mark_pod_ips.put(mark, *ips)
        dp.maps.netns_pod.put(cookie, ips, mark)
        return cookie

    @staticmethod
    def forget(dp, mark: int) -> None:
        """What the daemon does at CNI DEL: mark and netns records go."""
        dp.maps.mark_pod_ips.delete(mark)
        for cookie, _, m in dp.maps.netns_pod.all_items():
            if m == mark:
                dp.maps.netns_pod.delete(cookie)

    def sysctl(self, name: str, value: str) -> None:
        sh("nsenter", f"--net={self.netns}", "sysctl", "-qw", f"{name}={value}")

    def apply_iptables(self, version: int, rules: str) -> None:
        """iptables-restore (version 4) or ip6tables-restore (6) inside this netns only."""
        tool = "iptables-restore" if version == 4 else "ip6tables-restore"
        subprocess.run(["nsenter", f"--net={self.netns}", tool], input=rules, text=True,
                       check=True, capture_output=True)

    def run(self, code: str, *args: str, uid: int | None = None,
            gid: int | None = None) -> str:
        argv = self._argv(code, list(args), uid, gid, True)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return out.stdout

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        self.procs.clear()
        if self.cgroup and os.path.isdir(self.cgroup):
            for _ in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)
        sh("ip", "netns", "del", self.name, check=False)
