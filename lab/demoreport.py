"""What ``merbridge-lab demo`` says about each connection: the rule that applies, and
the table / JSON it prints.  Pure (no root, no I/O), so it is unit-tested.

The demo measures the facts (sidecar logs, the app's view of its peer, kernel
counters) and hands them here with two inputs that come from the daemon's own
decisions, never from the demo's script:

* ``PodView.enrolled``/``policy``: what the daemon wrote into the pinned
  ``mb_local_pods`` map for the pod (no entry: not in the mesh);
* ``PodView.reason``: ``annotations.mesh_membership`` on the pod's manifest,
  the function the daemon calls for its ADD decision.

``expect_outbound``/``expect_inbound`` replay the datapath's decision order
(docs/datapath.md, ``connect.h:mb_decide``; XDP uses the inbound half) on that
policy, so each row can say *why*, and whether what happened agrees.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from merbridge.bpf.mesh import Mesh
from merbridge.bpf.policy import PodPolicy

HBONE_PORT = 15008
#: bpf/progs/inbound.c's counter slots (merbridge.h reserves 24..31 for it)
XDP_COUNTERS = {"c24": "xdp_new_flow", "c25": "xdp_bypass", "c26": "xdp_flow_fail",
                "c27": "xdp_rst_delete"}
EXCLUDE_OUTBOUND_PORTS = "excludeOutboundPorts"
EXCLUDE_OUTBOUND_IP_RANGES = "excludeOutboundIPRanges"


@dataclass
class PodView:
    name: str
    ips: tuple[str, ...]
    #: the daemon's decision, read back from mb_local_pods
    enrolled: bool
    policy: PodPolicy | None
    #: annotations.mesh_membership(manifest).reason
    reason: str
    #: traffic.sidecar.istio.io/<name> -> value, for naming the rule that applied
    annotations: dict[str, str] = field(default_factory=dict)
    #: mesh_membership agrees with what the daemon wrote
    consistent: bool = True


@dataclass
class Decision:
    captured: bool
    rule: str


def _v6int(ip: str) -> int:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        addr = ipaddress.IPv6Address("::ffff:" + str(addr))
    return int(addr)


def cidr_contains(cidr: tuple[bytes, int], ip: str) -> bool:
    """Is ``ip`` inside a datapath CIDR (16 bytes, IPv4 as ::ffff:a.b.c.d/96+n)?"""
    net, plen = cidr
    mapped = (0xFFFF << 32, ((1 << 128) - 1) ^ ((1 << 32) - 1))   # ::ffff:0:0/96
    if (_v6int(ip) & mapped[1]) == mapped[0] and not (
            plen >= 96 and (int.from_bytes(net, "big") & mapped[1]) == mapped[0]):
        return False   # an IPv6 CIDR never matches IPv4 (helpers.h:mb_cidr_match)
    mask = ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1) if plen else 0
    return (_v6int(ip) & mask) == (int.from_bytes(net, "big") & mask)


def _annotation_rule(pod: PodView, key: str, default: str) -> str:
    value = pod.annotations.get(key)
    return f"{key}={value}" if value is not None else default


def inbound_captures(policy: PodPolicy, port: int) -> Decision:
    """The inbound half of the policy (istio-iptables' ISTIO_INBOUND order)."""
    if port == HBONE_PORT:
        return Decision(False, f"port {port} (HBONE) is never captured inbound")
    if policy.include_inbound_all:
        if port in policy.exclude_inbound_ports or port == policy.status_port:
            return Decision(False, f"inbound port {port} is excluded (excludeInboundPorts)")
        return Decision(True, f"inbound :{port} captured (includeInboundPorts=*)")
    if port in policy.include_inbound_ports:
        return Decision(True, f"inbound :{port} listed in includeInboundPorts")
    return Decision(False, f"inbound :{port} not in includeInboundPorts")


def expect_outbound(src: PodView, dst_ip: str, port: int, uid: int | None,
                    local: dict[str, PodView], mesh: Mesh) -> Decision:
    """Will ``src``'s connect to dst_ip:port go to its own sidecar (15001)?"""
    if not src.enrolled:
        return Decision(False, f"{src.name} is not in the mesh: {src.reason}")
    pol = src.policy or PodPolicy()
    if port in pol.exclude_outbound_ports:
        rule = (_annotation_rule(src, EXCLUDE_OUTBOUND_PORTS, "")
                if str(port) in src.annotations.get(EXCLUDE_OUTBOUND_PORTS, "").split(",")
                else f"mesh default exclusion of port {port}")
        return Decision(False, f"{src.name}: {rule}")
    if port == HBONE_PORT:
        return Decision(False, f"port {port} (HBONE) is never captured")
    if uid is not None and uid == mesh.proxy_uid:
        target = local.get(dst_ip)
        if target is not None and target.enrolled and target.policy is not None \
                and inbound_captures(target.policy, port).captured:
            return Decision(False, f"proxy UID {uid} -> local mesh pod: straight to "
                                   f"{target.name}'s inbound :{mesh.in_port}")
        return Decision(False, f"proxy UID {uid}: the sidecar's own connection "
                               "is never captured again")
    ip = ipaddress.ip_address(dst_ip)
    if ip.is_loopback or dst_ip in src.ips:
        return Decision(False, "loopback or the pod's own IP")
    for cidr in pol.exclude_outbound_cidrs:
        if cidr_contains(cidr, dst_ip):
            return Decision(False, f"{src.name}: "
                            + _annotation_rule(src, EXCLUDE_OUTBOUND_IP_RANGES, "excluded CIDR"))
    if port in pol.include_outbound_ports:
        return Decision(True, f"{src.name} in mesh; includeOutboundPorts has {port}")
    if pol.include_outbound_all:
        return Decision(True, f"{src.name} in mesh ({src.reason}); all outbound captured")
    if any(cidr_contains(c, dst_ip) for c in pol.include_outbound_cidrs):
        return Decision(True, f"{src.name} in mesh; includeOutboundIPRanges has {dst_ip}")
    return Decision(False, f"{src.name}: {dst_ip} not in includeOutboundIPRanges")


def expect_inbound(dst: PodView, port: int) -> Decision:
    """Will a connection to dst:port (from another pod) reach dst's sidecar on 15006?"""
    if not dst.enrolled:
        return Decision(False, f"{dst.name} is not in the mesh: {dst.reason}")
    d = inbound_captures(dst.policy or PodPolicy(), port)
    return Decision(d.captured, f"{dst.name}: {d.rule}")


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved, XDP slots under their names."""
    out = {}
    for name, value in after.items():
        diff = value - before.get(name, 0)
        if diff:
            out[XDP_COUNTERS.get(name, name)] = diff
    return out


def _hop(direction: str, new: dict[str, list[dict]], delta: dict[str, int]) -> dict[str, Any]:
    """What the sidecars logged for one direction of one connection."""
    seen = [(n, e) for n, entries in new.items() for e in entries if e.get("dir") == direction]
    if not seen:
        return {"intercepted": False, "sidecar": None, "original_dst": None, "entries": 0}
    name, e = seen[0]
    via = None
    if direction == "inbound":   # which hook sent it to 15006, from the kernel's counters
        via = ("tc/XDP" if delta.get("xdp_new_flow") else
               "connect hook" if delta.get("redirect_in") else None)
    return {"intercepted": True, "sidecar": name, "via": via,
            "original_dst": hostport(e.get("dst"), e.get("dport")),
            "original_dst_ip": e.get("dst"), "original_dst_port": e.get("dport"),
            "client": hostport(e.get("src"), e.get("sport")), "entries": len(seen)}


def connection_row(*, title: str, src: str, dst: str, dst_ip: str, port: int, family: int,
                   uid: int | None, reply: Any, new: dict[str, list[dict]],
                   delta: dict[str, int], out_exp: Decision, in_exp: Decision) -> dict[str, Any]:
    """One connection's facts (``reply``: the lab's Reply; ``new``: sidecar name ->
    its log entries made meanwhile; ``delta``: counters that moved) beside the
    daemon's expectation; ``agrees`` says whether they match, sidecar and original
    destination included."""
    outbound, inbound = _hop("outbound", new, delta), _hop("inbound", new, delta)
    agrees = (reply.ok and outbound["intercepted"] == out_exp.captured
              and inbound["intercepted"] == in_exp.captured
              and outbound["sidecar"] in (None, src) and inbound["sidecar"] in (None, dst)
              and outbound["entries"] <= 1 and inbound["entries"] <= 1
              and all(h["original_dst_ip"] == dst_ip and h["original_dst_port"] == port
                      for h in (outbound, inbound) if h["intercepted"]))
    return {"title": title, "source": src, "uid": uid, "destination": dst,
            "dst_ip": dst_ip, "dst_port": port, "family": f"ipv{family}",
            "ok": reply.ok, "error": reply.error, "answered_by": reply.pod,
            "app_peer": reply.peer[0] if reply.peer else None,
            "app_peer_port": reply.peer[1] if reply.peer else None,
            # the client's own getpeername(): under iptables the destination it
            # asked for, whoever intercepted (bpf/progs/peername.c)
            "client_peer": list(reply.client_peer) if reply.client_peer else None,
            "outbound": outbound, "inbound": inbound, "counters": delta,
            "expected": {"outbound": out_exp.captured, "outbound_rule": out_exp.rule,
                         "inbound": in_exp.captured, "inbound_rule": in_exp.rule},
            "agrees": bool(agrees)}


def dns_row(*, title: str, src: str, uid: int | None, how: str, server: str, got: dict,
            want: str, captured: bool, delta: dict[str, int]) -> dict[str, Any]:
    """One DNS query's facts (``got``: the lab's dns_query result) beside the
    daemon's expectation: captured queries get the DNS proxy's answer, the
    others the server's, and every reply comes from the server asked."""
    frm = got.get("from")
    moved = delta.get("dns_captured", 0)
    agrees = (got.get("answer") == want and frm == [server, 53]
              and moved == int(captured))
    return {"title": title, "source": src, "uid": uid, "how": how, "server": server,
            "answer": got.get("answer"), "reply_from": frm, "error": got.get("error"),
            "expected_answer": want, "captured": captured, "counters": delta,
            "agrees": bool(agrees)}


# ------------------------------------------------------------------ rendering

def hostport(ip: str | None, port: int | None) -> str:
    if ip is None:
        return "-"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _cell(hop: dict[str, Any]) -> str:
    if not hop["intercepted"]:
        return "not intercepted"
    via = f" via {hop['via']}" if hop.get("via") else ""
    return f"{hop['sidecar']}{via} saw {hop['original_dst']}"


def render_table(report: dict[str, Any]) -> str:
    rows = report["connections"]
    head = ("#", "connection", "outbound (sidecar saw)", "inbound (sidecar saw)", "app saw peer")
    cells = []
    for i, r in enumerate(rows, 1):
        who = r["source"] + (f" (uid {r['uid']})" if r.get("uid") is not None else "")
        conn = f"{who} -> {r['destination']} {hostport(r['dst_ip'], r['dst_port'])}"
        app = r["app_peer"] or ("FAILED: " + (r.get("error") or "?"))
        cells.append((str(i), conn, _cell(r["outbound"]), _cell(r["inbound"]), app))
    widths = [max(len(c[k]) for c in cells + [head]) for k in range(len(head))]
    line = lambda c: "  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip()  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths))]
    pad = " " * (widths[0] + 2)
    for r, c in zip(rows, cells):
        out.append(line(c))
        out.append(f"{pad}why: out: {r['expected']['outbound_rule']}")
        out.append(f"{pad}     in:  {r['expected']['inbound_rule']}")
        moved = ", ".join(f"{k}+{v}" for k, v in sorted(r["counters"].items()))
        out.append(f"{pad}kernel counters: {moved or 'none moved'}"
                   + ("" if r["agrees"] else "   !! DISAGREES with the daemon's policy"))
    ok = sum(r["agrees"] for r in rows)
    out.append("")
    out.append(f"{ok}/{len(rows)} connections did what the daemon's policy says")
    return "\n".join(out) + "\n"


def render_dns(report: dict[str, Any]) -> str:
    out = ["DNS (port 53; captured queries go to the sidecar's DNS proxy on :15053):"]
    for i, r in enumerate(report.get("dns", []), 1):
        who = r["source"] + (f" (uid {r['uid']})" if r.get("uid") is not None else "")
        got = (f"answer {r['answer']} from {hostport(*r['reply_from'])}" if r["answer"]
               else "FAILED: " + (r.get("error") or "?"))
        whose = "the DNS proxy's" if r["captured"] else "the server's"
        out.append(f"  {i}. {r['title']}: {who} -> {hostport(r['server'], 53)} {r['how']}: "
                   f"{got} ({whose})" + ("" if r["agrees"] else "   !! DISAGREES"))
    ok = sum(r["agrees"] for r in report.get("dns", []))
    out.append(f"{ok}/{len(report.get('dns', []))} DNS queries did what the daemon's policy says")
    return "\n".join(out) + "\n"


def render_pods(report: dict[str, Any]) -> str:
    out = ["pods (the daemon's decision, read back from mb_local_pods):"]
    for p in report["pods"]:
        state = "in mesh" if p["enrolled"] else "not in mesh"
        extra = f"  [{', '.join(f'{k}={v}' for k, v in p['annotations'].items())}]" \
            if p["annotations"] else ""
        if p.get("dns_capture"):
            extra += "  [DNS captured]"
        out.append(f"  {p['name']:<9} {', '.join(p['ips']):<28} {state:<12} {p['reason']}{extra}")
    return "\n".join(out) + "\n"


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"
