"""Named network namespaces for labs, the demo and the tests: create and remove
them, veth pairs, bridges, addresses, routes, sysctls, and programs run inside
them. The lab's only module that talks netlink (pyroute2).

Everything here works on *named* network namespaces (``/var/run/netns/NAME``)
without ever moving a long-lived thread into one: netlink sockets are opened
inside a namespace as the daemon opens them (``merbridge.daemon.netns.ipr_at``),
and programs run in a namespace through ``nsenter --net=...`` (never ``ip netns
exec``, which remounts /sys and would hide bpffs and the cgroup v2 tree).
Functions take ``ns=None`` to mean the caller's own namespace.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import uuid
from typing import Sequence

from pyroute2 import IPRoute, netns as _netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from merbridge.daemon.netns import NetnsError, ipr_at

__all__ = ["NetnsError"]  # raised by every helper here, as by the daemon's

NETNS_DIR = "/var/run/netns"


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str) -> None:
    """Create the named namespace; it must not exist yet (never adopt a stranger's)."""
    if "/" in name or not name:
        raise NetnsError(f"bad netns name {name!r}")
    if netns_exists(name):
        raise NetnsError(f"netns {name} already exists")
    _netns.create(name)
    # pyroute2 leaves a new namespace with lo down; nothing works without it.
    link_up(name, "lo")


def remove_netns(name: str) -> None:
    """Remove the named namespace (its interfaces go with it); missing is fine."""
    if netns_exists(name):
        _netns.remove(name)


def _ipr(ns: str | None) -> IPRoute:
    # flags=0: never create a namespace by accident when a name is mistyped;
    # groups=0: a configuration socket needs no broadcast subscriptions.
    if ns is None:
        return IPRoute(groups=0)
    if not netns_exists(ns):
        raise NetnsError(f"netns {ns} does not exist")
    return ipr_at(netns_path(ns), allow_own=True)


def link_exists(ns: str | None, ifname: str) -> bool:
    with _ipr(ns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def link_up(ns: str | None, ifname: str) -> None:
    with _ipr(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NetnsError(f"no interface {ifname} in netns {ns or '(current)'}")
        ipr.link("set", index=idx[0], state="up")


def delete_link(ns: str | None, ifname: str) -> bool:
    """Delete an interface (a veth takes its peer with it). Returns False if absent."""
    with _ipr(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
        return True


def create_veth(name: str, peer: str, ns: str | None = None,
                peer_ns: str | None = None) -> None:
    """Create a veth pair ``name`` (in ``ns``) <-> ``peer`` (in ``peer_ns``).

    Both ends are born under unique temporary names in the caller's namespace,
    moved, then renamed inside their target namespace: names like ``eth0``
    exist in every namespace, so the final name can only be taken there.
    """
    tag = uuid.uuid4().hex[:8]
    tmp_a, tmp_b = f"mbv{tag}a", f"mbv{tag}b"
    with IPRoute(groups=0) as ipr:
        ipr.link("add", ifname=tmp_a, kind="veth", peer={"ifname": tmp_b})
        try:
            for tmp, target_ns in ((tmp_a, ns), (tmp_b, peer_ns)):
                if target_ns is not None:
                    ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0],
                             net_ns_fd=target_ns)
            for tmp, final, target_ns in ((tmp_a, name, ns), (tmp_b, peer, peer_ns)):
                with _ipr(target_ns) as nsr:
                    nsr.link("set", index=nsr.link_lookup(ifname=tmp)[0], ifname=final)
        except Exception:
            # Deleting either end removes the pair, wherever it went.
            for tmp, target_ns in ((tmp_a, ns), (tmp_b, peer_ns), (tmp_a, None)):
                try:
                    if target_ns is None or netns_exists(target_ns):
                        if delete_link(target_ns, tmp):
                            break
                except NetlinkError:
                    pass
            raise


def create_bridge(ns: str | None, name: str) -> None:
    with _ipr(ns) as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def enslave(ns: str | None, ifname: str, bridge: str) -> None:
    with _ipr(ns) as ipr:
        master = ipr.link_lookup(ifname=bridge)
        port = ipr.link_lookup(ifname=ifname)
        if not master or not port:
            raise NetnsError(f"enslave {ifname} to {bridge}: interface missing in {ns}")
        ipr.link("set", index=port[0], master=master[0])


def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Add ``a.b.c.d/n`` or ``v6/n``. IPv6 gets IFA_F_NODAD so it is usable at once
    (duplicate address detection would otherwise keep it 'tentative' ~1-2 s)."""
    iface = ipaddress.ip_interface(cidr)
    kwargs = {}
    if iface.version == 6:
        kwargs["flags"] = IFA_F_NODAD
    with _ipr(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NetnsError(f"no interface {ifname} in netns {ns or '(current)'}")
        ipr.addr("add", index=idx[0], address=str(iface.ip),
                 prefixlen=iface.network.prefixlen, **kwargs)


def add_route(ns: str | None, dst: str, gateway: str | None = None,
              ifname: str | None = None) -> None:
    """Add a route; ``dst`` may be ``default``/``default6`` or a CIDR."""
    if dst in ("default", "default4"):
        dst = "0.0.0.0/0"
    elif dst == "default6":
        dst = "::/0"
    net = ipaddress.ip_network(dst, strict=False)
    spec: dict = {"dst": str(net.network_address), "dst_len": net.prefixlen,
                  "family": 10 if net.version == 6 else 2}
    if gateway:
        spec["gateway"] = gateway
    with _ipr(ns) as ipr:
        if ifname:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise NetnsError(f"no interface {ifname} in netns {ns}")
            spec["oif"] = idx[0]
        ipr.route("add", **spec)


def addresses(ns: str | None, ifname: str) -> list[str]:
    """The interface's addresses as ``addr/prefixlen`` strings."""
    with _ipr(ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NetnsError(f"no interface {ifname} in netns {ns}")
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=idx[0])]


def links(ns: str | None) -> list[str]:
    with _ipr(ns) as ipr:
        return [link.get("IFLA_IFNAME") for link in ipr.get_links()]


def set_sysctl(ns: str | None, key: str, value: str | int) -> None:
    """Write a sysctl (``net.ipv4.ip_forward``) as seen from inside ``ns``.

    /proc/sys/net resolves to the namespace of the process that opens the
    file, so a short-lived child that entered the namespace writes it.
    """
    path = "/proc/sys/" + key.replace(".", "/")
    res = run(["sh", "-c", 'printf "%s\\n" "$1" > "$0"', path, str(value)], ns=ns)
    if res.returncode != 0:
        raise NetnsError(f"sysctl {key}={value} in {ns}: {res.stderr.strip()}")


def get_sysctl(ns: str | None, key: str) -> str:
    res = run(["cat", "/proc/sys/" + key.replace(".", "/")], ns=ns)
    if res.returncode != 0:
        raise NetnsError(f"sysctl {key} in {ns}: {res.stderr.strip()}")
    return res.stdout.strip()


def command(argv: Sequence[str], ns: str | None = None, cgroup: str | None = None,
            uid: int | None = None, gid: int | None = None) -> list[str]:
    """The argv that runs ``argv`` inside netns ``ns`` and cgroup directory
    ``cgroup``, as ``uid``/``gid`` (supplementary groups cleared).

    Order matters: a tiny sh first joins the cgroup with its own pid (which the
    final program keeps through exec, so it starts inside the cgroup), then
    nsenter (needs root) enters the namespace, then setpriv drops privileges.
    """
    out: list[str] = []
    if cgroup is not None:
        procs = os.path.join(cgroup, "cgroup.procs")
        if not os.path.exists(procs):
            raise NetnsError(f"{cgroup} is not a cgroup v2 directory")
        out += ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs]
    if ns is not None:
        if not netns_exists(ns):
            raise NetnsError(f"netns {ns} does not exist")
        out += ["nsenter", f"--net={netns_path(ns)}", "--"]
    if uid is not None or gid is not None:
        uid = uid if uid is not None else os.getuid()
        gid = gid if gid is not None else uid
        out += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return out + list(argv)


def spawn(argv: Sequence[str], ns: str | None = None, cgroup: str | None = None,
          uid: int | None = None, gid: int | None = None, **popen) -> subprocess.Popen:
    """Start ``argv`` in ``ns``/``cgroup`` as ``uid``; the Popen's pid is the program's."""
    return subprocess.Popen(command(argv, ns, cgroup, uid, gid), **popen)


def run(argv: Sequence[str], ns: str | None = None, cgroup: str | None = None,
        uid: int | None = None, gid: int | None = None, timeout: float = 30,
        input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion in ``ns``/``cgroup``; output is captured."""
    return subprocess.run(command(argv, ns, cgroup, uid, gid), capture_output=True,
                          timeout=timeout, input=input, text=text, check=False)


def listening(ns: str | None, proto: str = "tcp") -> set[tuple[str, int]]:
    """Listening sockets in ``ns`` as (address, port), from ``ss`` -- never by
    connecting, since a proxy's own port must not be probed (self-loop)."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    res = run(["ss", flag], ns=ns)
    if res.returncode != 0:
        raise NetnsError(f"ss in {ns}: {res.stderr.strip()}")
    out = set()
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        addr, _, port = fields[3].rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        out.add((addr, int(port)))
    return out
