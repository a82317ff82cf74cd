"""Text the lab feeds to its tools: haproxy configs, istio-iptables rules and
the stdlib echo app / client scripts.

Pure (no root, no I/O) so the exact rule set and the sidecar's log format are
unit-tested; ``merbridge.lab.lab`` runs them in pod namespaces.

The IPv4 sidecar stand-in is haproxy: it asks the kernel for a connection's
original destination itself (getsockopt SOL_IP SO_ORIGINAL_DST, falling back to
getsockname; haproxy 2.6 never asks for IPv6, hence ``sidecar6.py``), and
``server orig 0.0.0.0:0`` connects to that address and port. Its log line
records the destination it saw per connection: what the tests compare.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Iterable

from merbridge.bpf.mesh import MESHES

ISTIO = MESHES["istio"]

# One line per connection, logged as soon as the server side is connected
# (option logasap). %[dst]/%[dst_port] are the frontend connection's
# destination, which haproxy fills from SO_ORIGINAL_DST when the kernel (or our
# getsockopt hook) answers it.
#: the vm tier (tests/vm) emulates its CPU, where everything starts tens of
#: times slower: the lab's waits for a process to come up (a listener, a log
#: line, the daemon's readiness) are multiplied by this
READY_SCALE = float(os.environ.get("MERBRIDGE_TEST_READY_SCALE", "1"))

#: the global lines every lab haproxy starts with. haproxy 2.6 loads the whole
#: system CA store (~150 files) at start for its built-in HTTP client unless told
#: not to verify: 74 ms of 84 here, and seconds under the vm tier's emulation
HAPROXY_GLOBAL = """\
    maxconn 4096
    httpclient.ssl.verify none
"""

LOG_FORMAT = ("mb fe=%ft src=%ci sport=%cp dst=%[dst] dport=%[dst_port] "
              "bsrc=%bi bsport=%bp server=%si sdport=%sp term=%ts")


def sidecar(mode: str = "tcp", out_port: int = ISTIO.out_port, in_port: int = ISTIO.in_port,
            passthrough4: str = ISTIO.inbound_passthrough_ip, threads: int = 1) -> str:
    """The IPv4 half of an Envoy-like sidecar: outbound and inbound listeners on
    0.0.0.0 as Envoy binds them (legacy mode redirects to 127.128.x.y, not only
    127.0.0.1), inbound passthrough from 127.0.0.6 (so iptables' ISTIO_OUTPUT does
    not loop it back to the inbound port), and a guard against self-loops: a
    connection made straight to the proxy port has no original destination.
    haproxy 2.6 reads SO_ORIGINAL_DST only for IPv4; ``sidecar6.py`` serves IPv6."""
    if mode not in ("tcp", "http"):
        raise ValueError(f"sidecar mode must be tcp or http, not {mode!r}")
    return f"""\
global
{HAPROXY_GLOBAL}    nbthread {threads}
    log stdout format raw local0
defaults
    mode {mode}
    log global
    option logasap
    log-format "{LOG_FORMAT}"
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend outbound4
    bind 0.0.0.0:{out_port}
    tcp-request connection reject if {{ dst_port {out_port} }}
    default_backend orig
backend orig
    server orig 0.0.0.0:0
frontend inbound4
    bind 0.0.0.0:{in_port}
    tcp-request connection reject if {{ dst_port {in_port} }}
    default_backend passthrough4
backend passthrough4
    server orig 0.0.0.0:0 source {passthrough4}
"""


def http_app(port: int, threads: int = 1) -> str:
    """A fast HTTP app for load tests: answers ``peer=<src>`` on [::]:port (v4+v6)."""
    return f"""\
global
{HAPROXY_GLOBAL}    nbthread {threads}
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend app
    bind [::]:{port} v4v6
    http-request return status 200 content-type text/plain lf-string "peer=%[src]\\n"
"""


def parse_log_line(line: str) -> dict | None:
    """A sidecar log line as a dict (``fe dir src sport dst dport bsrc bsport
    server sdport term``; ports are ints), or None for any other line."""
    if not line.startswith("mb "):
        return None
    out: dict = {}
    for tok in line.split()[1:]:
        key, _, val = tok.partition("=")
        if key in ("sport", "dport", "bsport", "sdport"):
            try:
                out[key] = int(val)
            except ValueError:
                out[key] = None
        else:
            out[key] = val
    # "dir": outbound/inbound whichever half (haproxy v4, sidecar6 v6) logged it
    out["dir"] = out.get("fe", "").rstrip("46")
    for key in ("src", "dst", "bsrc", "server"):
        if key in out and out[key].startswith("::ffff:"):
            out[key] = out[key][7:]
    return out


def istio_iptables(version: int, uid: int = ISTIO.proxy_uid, gid: int = ISTIO.proxy_gid,
                   out_port: int = ISTIO.out_port, in_port: int = ISTIO.in_port,
                   exclude_inbound_ports: Iterable[int] = (15020, 15021, 15090),
                   exclude_outbound_ports: Iterable[int] = ISTIO.default_exclude_outbound_ports,
                   exclude_outbound_cidrs: Iterable[str] = (),
                   capture_inbound: bool = True, capture_outbound: bool = True,
                   redirect_dns: bool = False) -> str:
    """istio-iptables' REDIRECT-mode nat table (CNI plugin defaults), for
    ``iptables-restore`` (version 4) or ``ip6tables-restore`` (version 6).

    Order follows istio's capture/run.go: inbound RETURNs for 15008 and excluded
    ports, then outbound: excluded ports, the inbound-passthrough source, the
    proxy UID then GID rules (proxy -> own pod IP over lo goes to the inbound
    port), loopback, excluded CIDRs, and finally everything else to 15001.
    ``redirect_dns``: istio-cni's DNS capture (ISTIO_META_DNS_CAPTURE, all
    port-53 traffic: cni/pkg/plugin/testdata/dns.txt.golden), the nat
    ISTIO_OUTPUT_DNS chain and the raw table's conntrack zones."""
    if version not in (4, 6):
        raise ValueError("version must be 4 or 6")
    lo_dst = "127.0.0.1/32" if version == 4 else "::1/128"
    passthrough = (f"{ISTIO.inbound_passthrough_ip}/32" if version == 4 else "::6/128")
    rules = ["*nat", ":ISTIO_INBOUND - [0:0]", ":ISTIO_IN_REDIRECT - [0:0]",
             ":ISTIO_OUTPUT - [0:0]", ":ISTIO_REDIRECT - [0:0]",
             *([":ISTIO_OUTPUT_DNS - [0:0]"] if redirect_dns else []),
             f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {out_port}",
             f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {in_port}"]
    if capture_inbound:
        rules.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
        for port in (15008, *exclude_inbound_ports):
            rules.append(f"-A ISTIO_INBOUND -p tcp --dport {int(port)} -j RETURN")
        rules.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    rules.append("-A OUTPUT -j ISTIO_OUTPUT")
    for port in exclude_outbound_ports:
        rules.append(f"-A ISTIO_OUTPUT -p tcp --dport {int(port)} -j RETURN")
        rules.append(f"-A ISTIO_OUTPUT -p udp --dport {int(port)} -j RETURN")
    rules.append(f"-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN")
    for kind, ident in (("uid", uid), ("gid", gid)):
        # with DNS capture the UID's rule leaves TCP 53 out too (not the GID's)
        not_ports = ("-m multiport ! --dports 53,15008" if redirect_dns and kind == "uid"
                     else "! --dport 15008")
        not_dns = "-p tcp ! --dport 53 " if redirect_dns else ""
        rules += [
            f"-A ISTIO_OUTPUT -o lo ! -d {lo_dst} -p tcp {not_ports} "
            f"-m owner --{kind}-owner {ident} -j ISTIO_IN_REDIRECT",
            f"-A ISTIO_OUTPUT -o lo {not_dns}-m owner ! --{kind}-owner {ident} -j RETURN",
            f"-A ISTIO_OUTPUT -m owner --{kind}-owner {ident} -j RETURN",
        ]
    if redirect_dns:
        rules += ["-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
                  f"-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports {ISTIO.dns_port}",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner {uid} -j RETURN",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner {gid} -j RETURN",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-ports {ISTIO.dns_port}"]
    rules.append(f"-A ISTIO_OUTPUT -d {lo_dst} -j RETURN")
    for cidr in exclude_outbound_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == version:
            rules.append(f"-A ISTIO_OUTPUT -d {net} -j RETURN")
    if capture_outbound:
        rules.append("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    rules.append("COMMIT")
    if redirect_dns:
        dns = ISTIO.dns_port
        rules += ["*raw", ":ISTIO_OUTPUT_DNS - [0:0]", ":ISTIO_INBOUND - [0:0]",
                  "-A OUTPUT -j ISTIO_OUTPUT_DNS",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner {uid} -j CT --zone 1",
                  f"-A ISTIO_OUTPUT_DNS -p udp --sport {dns} -m owner --uid-owner {uid} -j CT --zone 2",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner {gid} -j CT --zone 1",
                  f"-A ISTIO_OUTPUT_DNS -p udp --sport {dns} -m owner --gid-owner {gid} -j CT --zone 2",
                  "-A PREROUTING -j ISTIO_INBOUND",
                  "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2",
                  "-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1",
                  "COMMIT"]
    return "\n".join(rules) + "\n"


# The echo app: answers one line of JSON saying who it saw (peer and local
# address) -- a peer of 127.0.0.6/::6 means the inbound sidecar delivered it.
ECHO_APP = r"""
import json, socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2]
def norm(a):
    h = a[0][7:] if a[0].startswith("::ffff:") else a[0]
    return [h, a[1]]
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port)); srv.listen(256)
def handle(c, peer):
    try:
        c.settimeout(10)
        data = b""
        while b"\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        body = json.dumps({"pod": name, "port": port, "peer": norm(peer),
                           "local": norm(c.getsockname()),
                           "got": data.split(b"\n")[0][:200].decode(errors="replace")})
        if data.startswith(b"GET "):
            body = body.encode()
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        else:
            c.sendall(body.encode() + b"\n")
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, peer = srv.accept()
    threading.Thread(target=handle, args=(c, peer), daemon=True).start()
"""

# One client connection: prints a JSON line (never a traceback).
CLIENT = r"""
import json, socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
out = {"ok": False}
try:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    out["client_local"] = list(s.getsockname()[:2])
    out["client_peer"] = list(s.getpeername()[:2])
    s.sendall(payload.encode() + b"\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out["raw"] = data.decode(errors="replace")
    out["reply"] = json.loads(data) if data.strip() else None
    out["ok"] = out["reply"] is not None
    if not out["ok"]:
        out["error"] = "connection closed without a reply"
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


# One DNS A query (tests, the demo): how ("udp": sendto/recvfrom, "connected"
# UDP, "tcp"), the server, the name; prints the answer's IPv4 address and where
# the reply came from (recvfrom's source, or the connected socket's
# getpeername), or the error. Port 53.
DNS_QUERY = r"""
import json, random, socket, struct, sys
how, host = sys.argv[1], sys.argv[2]
af = socket.AF_INET6 if ":" in host else socket.AF_INET
qid = random.randrange(65536)
q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[3].split(".")) + b"\0"
q += struct.pack("!HH", 1, 1)
out = {}
try:
    if how == "tcp":
        s = socket.socket(af, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host, 53))
        s.sendall(struct.pack("!H", len(q)) + q)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        r, src = buf[2:], s.getpeername()
    else:
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.settimeout(5)
        if how == "connected":
            s.connect((host, 53))
            s.send(q)
            r, src = s.recv(4096), s.getpeername()
        else:
            s.sendto(q, (host, 53))
            r, src = s.recvfrom(4096)
    assert struct.unpack("!H", r[:2])[0] == qid
    out["from"] = [src[0], src[1]]
    out["answer"] = socket.inet_ntoa(r[-4:])
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""
