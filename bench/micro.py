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

Rounds alternate the cases to spread machine noise evenly. The figure for
the target is p50(hooked-redirect) - p50(bare). During one extra redirect
round kernel.bpf_stats_enabled=1 (restored after) gives the programs' own
run time from ``bpftool prog show``.
"""
from __future__ import annotations

import json
import os
import subprocess

import common
from common import BenchError, log
from merbridge.bpf import types as t
from merbridge.lab import netns
from merbridge.lab.lab import Lab

CASES = ("bare", "hooked-loopback", "hooked-redirect")


def build(workdir: str) -> str:
    exe = os.path.join(workdir, "connect_bench")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connect_bench.c")
    res = subprocess.run(["gcc", "-O2", "-o", exe, src], capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"gcc connect_bench.c: {res.stderr.strip()[-400:]}")
    return exe


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


def run(a, workdir: str) -> dict:
    import ebpf
    total = 20_000 if a.quick else 100_000
    rounds = 4 if a.quick else 10
    per = total // rounds
    exe = build(workdir)
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
        after = dp.counters()
        # the same with sk_msg off for new connections (MB_SET_SKMSG_OFF): what
        # the two psocks (sock_hash_update) cost, from the programs' side and
        # in connect() time
        settings = dp.dps[0].maps.settings
        settings.set(t.MB_SET_SKMSG_OFF, 1)
        try:
            off = [_run(exe, mc.ns, mc.cgroup, per, *dst["hooked-redirect"])
                   for _ in range(max(1, rounds // 2))]
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
        delta = cases["hooked-redirect"]["p50"] - cases["bare"]["p50"]
        per_conn_bpf = sum(s["run_time_ns"] for s in stats) / max(1, per)
        off_p50 = sorted(o["p50"] for o in off)[len(off) // 2]
        return {
            "delta_skmsg_off_ns": off_p50 - cases["bare"]["p50"],
            "prog_stats_skmsg_off": stats_off,
            "bpf_ns_per_connect_skmsg_off": sum(s["run_time_ns"] for s in stats_off) / max(1, per),
            "samples": rounds * per, "rounds": rounds, "cases": cases,
            "delta_ns": delta,
            "delta_loopback_ns": cases["hooked-loopback"]["p50"] - cases["bare"]["p50"],
            "prog_stats": stats, "bpf_ns_per_connect": per_conn_bpf,
            "method": (f"{rounds} rounds x {per} blocking connect() to a listener in the same "
                       "pod netns (C client, SO_LINGER 0); figures are medians over rounds. "
                       f"Hook cost = p50(hooked-redirect) - p50(bare) = {delta:.0f} ns; "
                       f"the programs' own run time (bpf_stats) is {per_conn_bpf:.0f} ns "
                       "per redirected connection (connect4 + sockops callbacks of both "
                       "ends)."),
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
