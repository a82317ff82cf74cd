"""Per-connect cost of the hooks: connect() latency with and without the
programs, from a small C client (bench/connect_bench.c, built with gcc).

One lab pod ``mc`` in the mesh (CNI mode: policy, mark key, marker listener)
with the datapath attached to its cgroup, and a sibling cgroup ``bare`` with
nothing attached. The C client runs in mc's netns, in one cgroup or the
other, listens on 127.0.0.1:15001 itself and times N connects:

- ``bare``: no programs, connect to 127.0.0.1:15001;
- ``hooked-loopback``: programs attached, same destination (the hook looks
  the caller up and lets loopback through);
- ``hooked-redirect``: programs attached, connect to another pod's IP:8080,
  which connect4 rewrites to 127.0.0.1:15001 (and binds the pod IP); sockops
  then records the pair and both sockets enter the sockhash.

Many short rounds run the three cases back to back (order rotated). This
VM's speed drifts by a quarter from one second to the next, so a case's
cost is taken per round, against the bare case of the same round:
p50(case) - p50(bare), and the figure is the median of those differences
over all rounds, with their quartiles (a figure whose quartiles straddle
the target is reported as level). During one extra round of each hooked
case kernel.bpf_stats_enabled=1 (restored after) gives the programs' own
run time from ``bpftool prog show``, which drifts far less.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess

import common
from common import BenchError, log
from merbridge.bpf import types as t
from merbridge.lab import netns
from merbridge.lab.lab import Lab

CASES = ("bare", "hooked-loopback", "hooked-redirect")


def _run(exe: str, ns: str, cgroup: str, n: int, dst: str, dport: int) -> dict:
    argv = netns.command([exe, str(n), "127.0.0.1", "15001", dst, str(dport)], ns=ns,
                         cgroup=cgroup, uid=1000)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise BenchError(f"connect_bench: {res.stderr.strip()[-300:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stats_round(exe: str, mc, per: int, dst: tuple[str, int]) -> list[dict]:
    """One round of redirected connects with kernel.bpf_stats_enabled: each
    cgroup program's runs and run time in it."""
    with common.bpf_stats():
        progs = list(common.cgroup_prog_ids(mc.cgroup))
        base = {p["id"]: common.prog_stats(p["id"]) for p in progs}
        _run(exe, mc.ns, mc.cgroup, per, *dst)
        stats = []
        for p in progs:
            now = common.prog_stats(p["id"])
            stats.append({**now, "run_cnt": now["run_cnt"] - base[p["id"]]["run_cnt"],
                          "run_time_ns": now["run_time_ns"] - base[p["id"]]["run_time_ns"],
                          "attach_type": p.get("attach_type")})
    return stats


def _paired(cases: list[dict], bare: list[dict]) -> dict:
    """Median and quartiles of p50(case) - p50(bare), round by round."""
    d = sorted(c["p50"] - b["p50"] for c, b in zip(cases, bare))
    q = statistics.quantiles(d, n=4) if len(d) > 1 else [d[0], d[0], d[0]]
    return {"median": statistics.median(d), "q1": q[0], "q3": q[2], "rounds": len(d)}


def _per_conn(stats: list[dict], per: int) -> float:
    return sum(s["run_time_ns"] for s in stats) / max(1, per)


def run(a, workdir: str) -> dict:
    import ebpf
    total = 20_000 if a.quick else 90_000
    rounds = 8 if a.quick else 30
    per = total // rounds
    exe = common.build_c(workdir, "connect_bench")
    os.chmod(exe, 0o755)
    lab = Lab(prefix="mbb", nodes_count=1)
    bare = None
    dp = None
    try:
        mc = lab.add_pod("mc", node=0)
        other = lab.add_pod("other", node=0)  # an address connect4 redirects to 15001
        bare = os.path.join(lab.cgroup, "bare")
        os.mkdir(bare)
        # only mc's cgroup gets programs: MeshDatapath attaches per pod cgroup
        dp = ebpf.MeshDatapath(lab, cni_mode=True)
        dp.setup()
        dst = {"bare": ("127.0.0.1", 15001), "hooked-loopback": ("127.0.0.1", 15001),
               "hooked-redirect": (other.ip4, 8080)}
        cg = {"bare": bare, "hooked-loopback": mc.cgroup, "hooked-redirect": mc.cgroup}
        samples: dict[str, list[dict]] = {c: [] for c in CASES}
        log(f"connect: {rounds} rounds x {per} connects per case")
        for r in range(rounds):
            order = CASES[r % 3:] + CASES[:r % 3]
            for case in order:
                samples[case].append(_run(exe, mc.ns, cg[case], per, *dst[case]))
        before = dp.counters()
        stats = _stats_round(exe, mc, per, dst["hooked-redirect"])
        stats_lo = _stats_round(exe, mc, per, dst["hooked-loopback"])
        # the same with sk_msg off for new connections (MB_SET_SKMSG_OFF): what
        # the two psocks (sock_hash_update) cost, from the programs' side and
        # in connect() time (each round paired with a bare one)
        settings = dp.dps[0].maps.settings
        settings.set(t.MB_SET_SKMSG_OFF, 1)
        off, off_bare = [], []
        try:
            for _ in range(max(2, rounds // 2)):
                off_bare.append(_run(exe, mc.ns, bare, per, *dst["bare"]))
                off.append(_run(exe, mc.ns, mc.cgroup, per, *dst["hooked-redirect"]))
            stats_off = _stats_round(exe, mc, per, dst["hooked-redirect"])
        finally:
            settings.set(t.MB_SET_SKMSG_OFF, 0)
        after = dp.counters()
        redirected = after.get("redirect_out", 0) - before.get("redirect_out", 0)
        if redirected < per:
            raise BenchError(f"only {redirected} of {per} connects were redirected")

        def merged(case):
            # median over rounds of each round's percentile
            ss = samples[case]
            return {k: sorted(s[k] for s in ss)[len(ss) // 2] for k in ("p50", "p90", "p99",
                                                                           "mean", "min")}

        cases = {c: merged(c) for c in CASES}
        redirect = _paired(samples["hooked-redirect"], samples["bare"])
        loopback = _paired(samples["hooked-loopback"], samples["bare"])
        skmsg_off = _paired(off, off_bare)
        per_conn_bpf = _per_conn(stats, per)
        return {
            "delta_skmsg_off_ns": skmsg_off["median"], "delta_skmsg_off": skmsg_off,
            "prog_stats_skmsg_off": stats_off,
            "bpf_ns_per_connect_skmsg_off": _per_conn(stats_off, per),
            "samples": rounds * per, "rounds": rounds, "per_round": per, "cases": cases,
            "delta_ns": redirect["median"], "delta": redirect,
            "delta_loopback_ns": loopback["median"], "delta_loopback": loopback,
            "prog_stats": stats, "bpf_ns_per_connect": per_conn_bpf,
            "prog_stats_loopback": stats_lo,
            "bpf_ns_per_connect_loopback": _per_conn(stats_lo, per),
            "method": (f"{rounds} rounds x {per} blocking connect() per case to a listener in "
                       "the same pod netns (C client, SO_LINGER 0). Hook cost = median over "
                       "rounds of p50(hooked case) - p50(bare) of the same round: "
                       f"{redirect['median']:.0f} ns redirected (quartiles "
                       f"{redirect['q1']:.0f} to {redirect['q3']:.0f}), "
                       f"{loopback['median']:.0f} ns let through ({loopback['q1']:.0f} to "
                       f"{loopback['q3']:.0f}). The programs' own run time (bpf_stats) per "
                       f"connection: {per_conn_bpf:.0f} ns redirected (connect4 + sockops "
                       f"callbacks of both ends), {_per_conn(stats_lo, per):.0f} ns let "
                       "through."),
        }
    finally:
        if dp is not None:
            try:
                dp.close()
            except BenchError as e:
                log(f"connect cleanup: {e}")
        if bare is not None and os.path.isdir(bare):
            try:
                os.rmdir(bare)
            except OSError as e:
                log(f"connect cleanup: {bare}: {e}")
        lab.close()
