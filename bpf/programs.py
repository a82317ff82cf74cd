"""The datapath's programs: which C function of which file in bpf/progs/ runs
on which hook.

A row names its hook as libbpf's section names do ("cgroup/connect4");
bpf/loader.py turns each hook into bcc's program and attach types. The
sidecar datapath's rows are here, always loaded; an optional feature keeps
its own rows in its module (bpf/ambient.py). Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prog:
    source: str   # file in bpf/progs/
    func: str     # C function == kernel program name (<= 15 chars)
    hook: str     # a key of loader.HOOKS

    @property
    def target(self) -> str:
        """What it attaches to: "sockhash" (the sk_msg verdict) or "cgroup"."""
        return "sockhash" if self.hook == "sk_msg" else "cgroup"


PROGRAMS: tuple[Prog, ...] = (
    Prog("connect4.c", "mb_connect4", "cgroup/connect4"),
    Prog("connect6.c", "mb_connect6", "cgroup/connect6"),
    Prog("sockops.c", "mb_sockops", "sockops"),
    Prog("getsockopt.c", "mb_getsockopt", "cgroup/getsockopt"),
    Prog("redir.c", "mb_msg_redir", "sk_msg"),
    # the app's view of a redirected socket (issue 16): getpeername answers
    # the original destination, getsockname the pod IP (mb_sock_origin, which
    # goes with the socket)
    Prog("peername.c", "mb_peername4", "cgroup/getpeername4"),
    Prog("peername.c", "mb_peername6", "cgroup/getpeername6"),
    Prog("peername.c", "mb_sockname4", "cgroup/getsockname4"),
    Prog("peername.c", "mb_sockname6", "cgroup/getsockname6"),
    # DNS capture to the sidecar's DNS proxy (mesh.Mesh.dns_port; no-ops for a
    # mesh without one): connect next to connect4/6, whichever runs first
    Prog("dns.c", "mb_dnsconn4", "cgroup/connect4"),
    Prog("dns.c", "mb_dnsconn6", "cgroup/connect6"),
    Prog("dns.c", "mb_dnssend4", "cgroup/sendmsg4"),
    Prog("dns.c", "mb_dnssend6", "cgroup/sendmsg6"),
    Prog("dns.c", "mb_dnsrecv4", "cgroup/recvmsg4"),
    Prog("dns.c", "mb_dnsrecv6", "cgroup/recvmsg6"),
)

#: programs earlier versions attached and this one no longer has: a new attach
#: detaches them (a daemon killed before its clean stop left them), and detach
#: and attached() count them as ours
RETIRED: tuple[Prog, ...] = (
    # until 2026-12-07: forgot mb_sock_peer entries (now sk_storage, mb_sock_origin)
    Prog("peername.c", "mb_sockrelease", "cgroup/sock_release"),
)
