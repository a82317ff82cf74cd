"""Turn a results dict (bench.py) into the markdown report, the target
verdicts and the PNG plots. Pure function of the JSON: ``bench/run --report
DIR`` re-renders an old run."""
from __future__ import annotations

import os
from collections import defaultdict

from common import summarize

EBPF_MODES = ("ebpf-cni", "ebpf-legacy")
LABEL = {"direct": "direct (no sidecar)", "iptables": "iptables + sidecars",
         "ebpf-cni": "eBPF CNI mode + sidecars", "ebpf-legacy": "eBPF legacy mode + sidecars",
         "ebpf-cni-nosockmap": "eBPF CNI mode, sk_msg off",
         "ebpf-cni-xdp": "eBPF CNI mode, --inbound-hook=xdp (the old default)",
         "ebpf-cni-hwcsum": "eBPF CNI mode, tx checksum offload on",
         "explicit": "sidecars addressed explicitly, no interception (the bound)"}
CONN = {False: "keep-alive", True: "Connection: close"}


def _group(runs, keys):
    g = defaultdict(list)
    for r in runs:
        g[tuple(r[k] for k in keys)].append(r)
    return g


def load_summary(results: dict) -> dict:
    """(mode, where, close, conns) -> {rps, p50_us, p99_us: summarize()}."""
    out = {}
    for key, rs in _group(results.get("load", {}).get("runs", []),
                          ("mode", "where", "close", "conns")).items():
        out[key] = {m: summarize(r[m] for r in rs) for m in ("rps", "p50_us", "p99_us")}
        # host CPU per request (runs before 2026-12-08 did not record it)
        for m in ("cpu_us_per_req", "ctxt_per_req", "idle_share"):
            if all(m in r for r in rs):
                out[key][m] = summarize(r[m] for r in rs)
        out[key]["errors"] = sum(r.get("errors", 0) for r in rs)
    return out


#: issue 17's "must" per load figure: (placement, Connection: close) ->
#: (req/s ratio at least, p99 ratio at most; None: no bound)
MUST = {("same", True): (1.2, 1.0), ("cross", True): (1.2, 1.0),
        ("cross", False): (1.5, 0.8), ("same", False): (2.0, None)}
#: modes judged against iptables: the default eBPF modes and the old XDP default
TARGET_MODES = EBPF_MODES + ("ebpf-cni-xdp",)


def level(a: dict, b: dict) -> bool:
    """Two summaries whose ranges (min..max over the repetitions) overlap: the
    difference is inside the noise, reported as "level", never as a gain. One
    repetition has no range: never level."""
    if not a or not b or a.get("n", 0) < 2 or b.get("n", 0) < 2 or a.get("min") is None \
            or b.get("min") is None:
        return False
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def ratio_text(r: float, is_level: bool) -> str:
    return f"x{r:.2f}" + (" (level)" if is_level else "")


def targets(results: dict) -> list[dict]:
    """Every target of the brief, with the figures it was judged on. A ratio
    inside the noise ("level") does not meet a target that asks for a gain."""
    rows = []
    s = load_summary(results)
    for mode in TARGET_MODES:
        for (m, where, close, conns), v in sorted(s.items(), key=lambda kv: str(kv[0])):
            if m != mode or ("iptables", where, close, conns) not in s:
                continue
            base = s[("iptables", where, close, conns)]
            if not base["rps"]["median"] or not base["p99_us"]["median"]:
                continue
            rr = v["rps"]["median"] / base["rps"]["median"]
            pr = v["p99_us"]["median"] / base["p99_us"]["median"]
            rl, pl = level(v["rps"], base["rps"]), level(v["p99_us"], base["p99_us"])
            want_r, want_p = MUST[(where, close)]
            met = rr >= want_r and not (rl and want_r >= 1.0)
            value = f"req/s {ratio_text(rr, rl)} (>={want_r})"
            if want_p is not None:
                met = met and pr <= want_p and not (pl and want_p < 1.0)
                value += f", p99 {ratio_text(pr, pl)} (<={want_p})"
            bound = s.get(("explicit", where, close, conns))
            if bound and bound["rps"]["median"] and bound["p99_us"]["median"]:
                value += (f"; no-interception bound: req/s "
                          f"x{bound['rps']['median'] / base['rps']['median']:.2f}, p99 "
                          f"x{bound['p99_us']['median'] / base['p99_us']['median']:.2f}")
            if "cpu_us_per_req" in v and "cpu_us_per_req" in base:
                c, cb = v["cpu_us_per_req"], base["cpu_us_per_req"]
                value += (f"; CPU per request "
                          f"{ratio_text(c['median'] / cb['median'], level(c, cb))}, "
                          f"CPUs idle {v['idle_share']['median'] * 100:.0f} %")
            rows.append({"target": f"{mode} vs iptables, {where}-node, {CONN[close]}, c={conns}",
                         "kind": "load", "mode": mode, "where": where, "close": close,
                         "conns": conns, "rps_ratio": rr, "p99_ratio": pr, "rps_level": rl,
                         "p99_level": pl, "met": met, "value": value})
    bulk = _group(results.get("bulk", {}).get("runs", []), ("mode",))
    if ("iptables",) in bulk:
        base = summarize(r["receiver_gbps"] for r in bulk[("iptables",)])
        for mode in TARGET_MODES:
            if (mode,) not in bulk or not base["median"]:
                continue
            v = summarize(r["receiver_gbps"] for r in bulk[(mode,)])
            rr, lv = v["median"] / base["median"], level(v, base)
            value = f"Gbit/s {ratio_text(rr, lv)} (>=1.0)"
            if ("explicit",) in bulk:
                b = summarize(r["receiver_gbps"] for r in bulk[("explicit",)])["median"]
                value += f"; no-interception bound x{b / base['median']:.2f}"
            rows.append({"target": f"{mode} vs iptables, bulk (iperf3) through both sidecars",
                         "kind": "bulk", "mode": mode, "rps_ratio": rr, "rps_level": lv,
                         "met": rr >= 1.0, "value": value})
    c = results.get("connect") or {}
    for key, bpf_key, target, limit in (
            ("delta", "bpf_ns_per_connect", "hooks add <= 2.5 us per redirected connect()", 2500),
            ("delta_loopback", "bpf_ns_per_connect_loopback",
             "hooks add <= 0.5 us per connect() let through", 500)):
        if c.get(f"{key}_ns") is None:
            continue
        d = c.get(key) or {}
        straddles = bool(d) and d["q1"] <= limit <= d["q3"]
        value = f"{c[f'{key}_ns']:.0f} ns"
        if d:
            value += (f" (quartiles {d['q1']:.0f} to {d['q3']:.0f} over {d['rounds']} rounds"
                      + ("; level" if straddles else "") + ")")
        if c.get(bpf_key) is not None:
            value += f"; the programs' own time {c[bpf_key]:.0f} ns"
        rows.append({"target": target, "kind": "connect", "met": c[f"{key}_ns"] <= limit,
                     "value": value})
    cni = results.get("cni") or {}
    if cni.get("ratio_add_p50") is not None:
        rows.append({"target": "CNI ADD p50 <= 1.5x bridge alone", "kind": "cni",
                     "met": cni["ratio_add_p50"] <= 1.5,
                     "value": f"x{cni['ratio_add_p50']:.2f}"})
    if cni.get("ratio_concurrent_wall") is not None:
        rows.append({"target": f"{cni.get('concurrent')} concurrent CNI ADDs <= 2x bridge alone "
                               "(time until all are done)", "kind": "cni",
                     "met": cni["ratio_concurrent_wall"] <= 2.0,
                     "value": f"x{cni['ratio_concurrent_wall']:.2f} (each ADD's p50: "
                              f"x{cni['ratio_concurrent_p50']:.2f})"})
    rst = cni.get("restart") or {}
    if rst.get("max_s") is not None:
        rows.append({"target": "pod started while the daemon was killed: enrolled <= 5 s after "
                               "the daemon's start", "kind": "cni",
                     "met": rst["max_s"] <= 5.0,
                     "value": "max " + f"{rst['max_s']:.2f} s ("
                              + ", ".join(f"{t:.2f}" for t in rst["enrolled_after_start_s"])
                              + ")"})
    d = results.get("daemon") or {}
    if d.get("ready_s") is not None:
        rows.append({"target": f"daemon ready <= 5 s ({d.get('pods_listed', '?')} dual-stack pods)",
                     "kind": "daemon",
                     "met": d["ready_s"] <= 5, "value": f"{d['ready_s']:.2f} s"})
    if d.get("rss_mb") is not None:
        rows.append({"target": "daemon RSS <= 150 MB", "kind": "daemon",
                     "met": d["rss_mb"] <= 150, "value": f"{d['rss_mb']:.0f} MB"})
    if d.get("event_to_map_p99_ms") is not None:
        rows.append({"target": "pod event -> map p99 <= 50 ms", "kind": "daemon",
                     "met": d["event_to_map_p99_ms"] <= 50,
                     "value": f"{d['event_to_map_p99_ms']:.1f} ms "
                              f"({d.get('pods_listed', '?')} dual-stack pods)"})
    return rows


def _f(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}".replace(",", " ")


def _ms(st):
    if not st or st.get("median") is None:
        return "–"
    sp = st.get("spread_pct")
    return f"{_f(st['median'])} ({_f(sp, 0)} %)" if sp is not None else _f(st["median"])


def _table_order(keys):
    """(mode, where, close, conns) keys as the load tables list them: same node
    first, keep-alive first, by connections, modes in LABEL's order."""
    order = {mo: i for i, mo in enumerate(LABEL)}
    return sorted(keys, key=lambda k: (k[1] != "same", k[2], k[3], order.get(k[0], 9)))


def markdown(results: dict, img_prefix: str = "") -> str:
    m = results.get("machine", {})
    cfg = results.get("config", {})
    L = []
    L.append("# Benchmark: eBPF interception vs Istio's iptables\n")
    L.append(f"Run `{cfg.get('argv', 'bench/run')}` from {results.get('started', '?')} to "
             f"{results.get('finished', '?')}.\n")
    L.append("| machine | |\n|---|---|")
    for k in ("kernel", "cpu_model", "cores", "mem_gb", "loadavg_at_start", "wrk", "haproxy",
              "iperf3", "commit"):
        L.append(f"| {k} | {m.get(k, '?')} |")
    L.append("")
    L.append(f"Repetitions: {cfg.get('reps')}, modes interleaved (order rotated every "
             f"repetition), wrk -t1 -d{cfg.get('duration')}s per point, fresh topology per "
             "mode and repetition. Figures are medians; (x %) is the spread, "
             "(max-min)/median over the repetitions.\n")

    tg = targets(results)
    if tg:
        L.append("## Targets\n")
        L.append("The \"no-interception bound\" is mode `explicit`: the same sidecars, the "
                 "client addressing its sidecar and each sidecar the next hop by a static "
                 "address, with no hook, NAT or conntrack on the path, over ordinary TCP. "
                 "Interception can only add cost to that path; a datapath beats it only by "
                 "taking TCP out of the path, as sk_msg does between local sockets "
                 "(keep-alive same node). Where sk_msg cannot pay off (a connection per "
                 "request: the psocks cost more than the few bytes they carry), a target "
                 "above the bound cannot be met by any interception with these proxies.\n")
        L.append("| target | figure | met |\n|---|---|---|")
        for t in tg:
            L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
        L.append("")

    s = load_summary(results)
    if s:
        L.append("## Saturation (wrk, HTTP through both sidecars)\n")
        if img_prefix is not None:
            L.append(f"![req/s]({img_prefix}bench-rps.png) ![p99]({img_prefix}bench-p99.png)\n")
        L.append("| placement | connection | conns | mode | req/s | p50 µs | p99 µs | errors |")
        L.append("|---|---|---:|---|---:|---:|---:|---:|")
        for key in _table_order(s):
            mode, where, close, conns = key
            v = s[key]
            L.append(f"| {where}-node | {CONN[close]} | {conns} | {mode} | {_ms(v['rps'])} | "
                     f"{_ms(v['p50_us'])} | {_ms(v['p99_us'])} | {v['errors']} |")
        L.append("")

    cpu = {k: v for k, v in s.items() if "cpu_us_per_req" in v}
    if cpu:
        L.append("## What each request cost the host (same runs)\n")
        L.append("All CPU time of the host while wrk ran (/proc/stat: wrk, both sidecars, "
                 "the app and the kernel work they cause) per request served, the context "
                 "switches per request, and the share of the two CPUs left idle. A rate "
                 "set by CPU leaves little idle; a rate set by a chain of wake-ups (each "
                 "request waits for wrk, the sidecars and the app in turn) leaves the CPUs "
                 "idle between them, whatever each hop costs.\n")
        ho = results.get("load", {}).get("handoff_ns")
        if ho:
            st = summarize(ho)
            L.append(f"One hand-off between two processes (bench/wakeup.c: a byte over a pipe "
                     f"and back, one wakes the other) costs {_f(st['median'] / 1000, 1)} µs "
                     f"here (median of {len(ho)}, one per repetition, range "
                     f"{_f(st['min'] / 1000, 1)}–{_f(st['max'] / 1000, 1)} µs): a request "
                     "pays that per context switch above, in latency, on any datapath.\n")
        L.append("| placement | connection | conns | mode | CPU µs per request | "
                 "context switches per request | CPUs idle % |")
        L.append("|---|---|---:|---|---:|---:|---:|")
        for key in _table_order(cpu):
            mode, where, close, conns = key
            v = cpu[key]
            idle = v["idle_share"]
            L.append(f"| {where}-node | {CONN[close]} | {conns} | {mode} | "
                     f"{_ms(v['cpu_us_per_req'])} | {_f(v['ctxt_per_req']['median'], 2)} | "
                     f"{_f(idle['median'] * 100, 0)} |")
        L.append("")

    failed = results.get("load", {}).get("failed", [])
    if failed:
        L.append("Points not measured because the interception check failed:\n")
        for f in failed:
            L.append(f"- rep {f['rep'] + 1}, {f['mode']}, {f.get('where', 'all')}: "
                     f"{f['error'][:200]}")
        L.append("")

    lat = results.get("latency", {}).get("runs", [])
    if lat:
        L.append("## Fixed rate (wrk with a Lua delay: 16 connections, one request per "
                 f"connection every {results['latency'].get('interval_ms')} ms, ~1000 req/s)\n")
        L.append("| placement | mode | achieved req/s | p50 µs | p90 µs | p99 µs | p99.9 µs |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for (mode, where), rs in sorted(_group(lat, ("mode", "where")).items(),
                                        key=lambda kv: (kv[0][1], kv[0][0])):
            L.append(f"| {where}-node | {mode} | {_ms(summarize(r['rps'] for r in rs))} | "
                     + " | ".join(_ms(summarize(r[k] for r in rs))
                                  for k in ("p50_us", "p90_us", "p99_us", "p999_us")) + " |")
        L.append("")

    bulk = results.get("bulk", {}).get("runs", [])
    if bulk:
        L.append("## Bulk transfer (iperf3, same node, through both sidecars) and socket memory\n")
        L.append("Peak of `ss -tm` sums (r = receive queue, t = transmit queue, bytes) in the "
                 "client and server pods, sampled every 100 ms.\n")
        L.append("| mode | sender Gbit/s | receiver Gbit/s | client r | client t | server r | "
                 "server t |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for (mode,), rs in sorted(_group(bulk, ("mode",)).items()):
            cells = [_ms({**summarize(r[k] for r in rs), "spread_pct": None})
                     if "gbps" not in k else f"{summarize(r[k] for r in rs)['median']:.2f}"
                     for k in ("sender_gbps", "receiver_gbps", "peak_client_rmem",
                               "peak_client_wmem", "peak_server_rmem", "peak_server_wmem")]
            L.append(f"| {mode} | " + " | ".join(cells) + " |")
        L.append("")

    c = results.get("connect")
    if c:
        L.append("## Per-connect cost of the hooks\n")
        L.append(c.get("method", ""))
        L.append("\n| case | p50 ns | p90 ns | p99 ns | mean ns |\n|---|---:|---:|---:|---:|")
        for case, st in c.get("cases", {}).items():
            L.append(f"| {case} | {_f(st.get('p50'))} | {_f(st.get('p90'))} | "
                     f"{_f(st.get('p99'))} | {_f(st.get('mean'))} |")
        if c.get("prog_stats"):
            L.append("\nbpf_stats (kernel.bpf_stats_enabled=1 during one redirected round; "
                     "\"sk_msg off\": the same with MB_SET_SKMSG_OFF, no psock; \"let "
                     "through\": one round of the loopback case):\n")
            L.append("| program | runs | ns per run | ns per connection | sk_msg off: ns per "
                     "connection | let through: ns per connection |\n"
                     "|---|---:|---:|---:|---:|---:|")
            off = {p["name"]: p for p in c.get("prog_stats_skmsg_off", [])}
            lo = {p["name"]: p for p in c.get("prog_stats_loopback", [])}
            n = c.get("per_round") or max(1, c.get("samples", 0) // max(1, c.get("rounds", 1)))
            for p in c["prog_stats"]:
                per = p["run_time_ns"] / p["run_cnt"] if p.get("run_cnt") else None
                o, q = off.get(p["name"]), lo.get(p["name"])
                L.append(f"| {p['name']} ({p.get('type')}) | {p.get('run_cnt')} | {_f(per)} | "
                         f"{_f(p['run_time_ns'] / n)} | "
                         f"{_f(o['run_time_ns'] / n) if o else '–'} | "
                         f"{_f(q['run_time_ns'] / n) if q else '–'} |")
        if c.get("delta_skmsg_off_ns") is not None:
            L.append(f"\nRedirected connect() with sk_msg off: +{_f(c['delta_skmsg_off_ns'])} ns "
                     f"over bare (with sk_msg: +{_f(c.get('delta_ns'))} ns).")
        L.append("")

    cni = results.get("cni")
    if cni:
        L.append("## CNI ADD/DEL latency (cnitool, wall time per invocation)\n")
        L.append("| chain | op | p50 ms | p99 ms | n | all done ms |\n"
                 "|---|---|---:|---:|---:|---:|")
        for chain, ops in cni.get("chains", {}).items():
            for op, st in ops.items():
                L.append(f"| {chain} | {op} | {_f(st.get('p50'), 1)} | {_f(st.get('p99'), 1)} | "
                         f"{st.get('n')} | {_f(st.get('wall_ms'))} |")
        rst = cni.get("restart") or {}
        if rst.get("enrolled_after_start_s"):
            L.append("\nA pod started while the daemon was killed (`kill -9`; the plugin "
                     "passed its ADD through and remembered it), enrolled after the next "
                     "`merbridge run` started: "
                     + ", ".join(f"{t:.2f} s" for t in rst["enrolled_after_start_s"]) + ".")
        for n in cni.get("notes", []):
            L.append(f"\n{n}")
        L.append("")

    d = results.get("daemon")
    if d:
        L.append("## Daemon\n")
        L.append("| figure | value |\n|---|---|")
        for k, v in d.items():
            if isinstance(v, (int, float, str)):
                v = _f(v, 2) if isinstance(v, float) else str(v).replace("\n", " ").replace("|", "/")
                L.append(f"| {k} | {v} |")
        L.append("")

    errs = results.get("errors") or {}
    if errs:
        L.append("## Suites that did not run\n")
        for k, v in errs.items():
            L.append(f"- **{k}**: {v}")
        L.append("")
    notes = results.get("notes")
    if notes:
        L.append("## Notes\n")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    return "\n".join(L) + "\n"


def plots(results: dict, outdir: str) -> list[str]:
    """bench-rps.png and bench-p99.png: one panel per placement x connection
    style, x = connections, one line per mode. Empty list without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    s = load_summary(results)
    if not s:
        return []
    made = []
    panels = sorted({(k[1], k[2]) for k in s}, key=lambda p: (p[0] != "same", p[1]))
    for metric, fname, ylabel in (("rps", "bench-rps.png", "req/s"),
                                  ("p99_us", "bench-p99.png", "p99 latency (µs)")):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), dpi=80,
                                 squeeze=False)
        for ax, (where, close) in zip(axes[0], panels):
            for mode in LABEL:
                pts = sorted((k[3], v[metric]) for k, v in s.items()
                             if k[0] == mode and k[1] == where and k[2] == close)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1]["median"] for p in pts]
                lo = [p[1]["median"] - p[1]["min"] for p in pts]
                hi = [p[1]["max"] - p[1]["median"] for p in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=mode)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{where}-node, {CONN[close]}", fontsize=8)
            ax.set_xlabel("connections", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0][0].set_ylabel(ylabel, fontsize=7)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(outdir, fname)
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made
