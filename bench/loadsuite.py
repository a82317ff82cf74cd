"""The load matrix: every mode, interleaved, repeated.

Per repetition the mode order is rotated (so no mode always runs first or
right after the same neighbour); per mode a fresh ``Topology`` is built,
checked (the app must see the sidecar's 127.0.0.6, or the client in direct
mode), then: wrk saturation at each connection count, keep-alive and
Connection: close, same- and cross-node; the fixed-rate latency run; and
iperf3 same-node with socket memory sampling.
"""
from __future__ import annotations

import load
import topo
from common import BenchError, log

#: fixed-rate run: 16 connections, one request each every 16 ms ~ 1000 req/s
RATE_CONNS = 16
RATE_INTERVAL_MS = 16


def placements(mode: str, wanted: list[str]) -> list[str]:
    if mode in topo.SAME_NODE_ONLY:
        return [w for w in wanted if w == "same"]
    return wanted


def run(a, workdir: str) -> dict:
    runs, lat, bulk, checks, counters, failed, handoffs = [], [], [], [], [], [], []
    nodes = 2 if "cross" in a.where else 1
    bulk_s = 1.0 if a.quick else 3.0
    for rep in range(a.reps):
        k = rep % len(a.modes)
        order = a.modes[k:] + a.modes[:k]
        # what the chain of wake-ups of a request costs whatever the datapath
        handoffs.append(load.handoff_ns(workdir))
        for mode in order:
            log(f"rep {rep + 1}/{a.reps} mode {mode}")
            try:
                _one_mode(a, workdir, rep, mode, nodes, bulk_s, runs, lat, bulk, checks,
                          counters, failed)
            except BenchError as e:
                log(f"  mode {mode} failed: {e}")
                failed.append({"rep": rep, "mode": mode, "error": str(e)})
    if failed and not runs:
        raise BenchError("every mode failed: " + "; ".join(f["error"] for f in failed))
    return {"load": {"runs": runs, "checks": checks, "counters": counters, "failed": failed,
                     "handoff_ns": handoffs},
            "latency": {"runs": lat, "conns": RATE_CONNS, "interval_ms": RATE_INTERVAL_MS},
            "bulk": {"runs": bulk, "seconds": bulk_s}}


def _one_mode(a, workdir, rep, mode, nodes, bulk_s, runs, lat, bulk, checks, counters,
              failed):
    with topo.Topology(mode, nodes=nodes) as t:
        seen = t.check(placements(mode, a.where))
        checks.append({"rep": rep, "mode": mode, "setup_s": round(t.setup_s, 2), "seen": seen})
        for where in placements(mode, a.where):
            if not seen[where]["ok"]:
                log(f"  {where}: not intercepted as expected: {seen[where]['body']}")
                failed.append({"rep": rep, "mode": mode, "where": where,
                               "error": f"app saw {seen[where]['body']!r}"})
                continue
            for close in (False, True):
                for conns in a.conns:
                    r = load.wrk(t.cli, t.url(where), conns, a.duration, close, workdir)
                    r.update(rep=rep, mode=mode, where=where, close=close, conns=conns)
                    runs.append(r)
                    log(f"  {where:5} {'close' if close else 'ka':5} c={conns:<3} "
                        f"{r['rps']:9.0f} req/s p50 {r['p50_us']:6d} us "
                        f"p99 {r['p99_us']:6d} us err {r['errors']}")
            r = load.wrk(t.cli, t.url(where), RATE_CONNS, max(a.duration, 2.0), False,
                         workdir, rate_per_conn_ms=RATE_INTERVAL_MS)
            r.update(rep=rep, mode=mode, where=where)
            lat.append(r)
            log(f"  {where:5} rate  {r['rps']:9.0f} req/s p50 {r['p50_us']:6d} us "
                f"p99 {r['p99_us']:6d} us")
        if "same" in a.where and seen["same"]["ok"]:
            try:
                dst, dst_port = t.bulk_dst()
                b = load.iperf3(t.cli, t.srv, dst, bulk_s, port=topo.BULK_PORT,
                                dst_port=dst_port)
                b.update(rep=rep, mode=mode)
                bulk.append(b)
                log(f"  bulk  {b['sender_gbps']:.2f}/{b['receiver_gbps']:.2f} Gbit/s "
                    f"server rmem peak {b['peak_server_rmem']}")
            except BenchError as e:
                log(f"  bulk failed: {e}")
        if t.datapath is not None:
            counters.append({"rep": rep, "mode": mode, **t.counters()})
