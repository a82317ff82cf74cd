"""merbridge benchmark driver: ``bench/run [options]`` (see bench/README.md).

Suites: load (wrk saturation + fixed rate + iperf3 bulk, all modes
interleaved), connect (per-connect cost of the hooks), cni (cnitool ADD/DEL
latency), daemon (start to ready, RSS, map update rate, pod event to map
entry). Results go to bench/results/<timestamp>/ as results.json, report.md
and PNG plots; a full run also publishes report, JSON and plots to docs/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import common
from common import BenchError, log

SUITES = ("load", "connect", "cni", "daemon")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: 1 repetition, 1 s points, fewer samples")
    p.add_argument("--reps", type=int, help="repetitions of the load matrix (default 3)")
    p.add_argument("--duration", type=float, help="seconds per wrk point (default 3, max 10)")
    p.add_argument("--conns", help="comma list of wrk connection counts (default 2,16,64)")
    p.add_argument("--modes", help="comma list of modes (default: all)")
    p.add_argument("--where", default="same,cross", help="placements: same,cross")
    p.add_argument("--suites", default=",".join(SUITES), help="comma list of " + ",".join(SUITES))
    p.add_argument("--out", help="results directory (default bench/results/<timestamp>)")
    p.add_argument("--publish", dest="publish", action="store_true", default=None,
                   help="copy report and plots to docs/ (default for full runs)")
    p.add_argument("--no-publish", dest="publish", action="store_false")
    p.add_argument("--report", metavar="DIR", help="only re-render DIR/results.json")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.duration = a.duration or (1.0 if a.quick else 3.0)
    if not 0.5 <= a.duration <= 10:
        p.error("--duration must be between 0.5 and 10 seconds")
    if a.reps < 1:
        p.error("--reps must be at least 1")
    a.conns = [int(x) for x in (a.conns or ("16,64" if a.quick else "2,16,64")).split(",")]
    import topo
    all_modes = list(topo.MODES)
    a.modes = a.modes.split(",") if a.modes else all_modes
    for m in a.modes:
        if m not in all_modes:
            p.error(f"unknown mode {m!r}; modes: {', '.join(all_modes)}")
    a.where = a.where.split(",")
    a.suites = a.suites.split(",")
    for s in a.suites:
        if s not in SUITES:
            p.error(f"unknown suite {s!r}; suites: {', '.join(SUITES)}")
    if a.publish is None:
        a.publish = not a.quick and a.out is None
    return a


def run_suites(a: argparse.Namespace, results: dict, outdir: str) -> None:
    workdir = tempfile.mkdtemp(prefix="mbb-work-")
    os.chmod(workdir, 0o755)  # the unprivileged load generator reads its scripts here
    try:
        for suite in a.suites:
            t0 = time.perf_counter()
            log(f"suite {suite}")
            try:
                if suite == "load":
                    import loadsuite
                    results.update(loadsuite.run(a, workdir))
                elif suite == "connect":
                    import micro
                    results["connect"] = micro.run(a, workdir)
                elif suite == "cni":
                    import cnibench
                    results["cni"] = cnibench.run(a, workdir)
                elif suite == "daemon":
                    import daemonbench
                    results["daemon"] = daemonbench.run(a, workdir)
            except (BenchError, ImportError, OSError) as e:
                log(f"suite {suite} failed: {e}")
                results.setdefault("errors", {})[suite] = str(e)
            except Exception as e:  # a bug in a suite must not lose the others' figures
                log(f"suite {suite} crashed: {e}")
                results.setdefault("errors", {})[suite] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            results.setdefault("suite_seconds", {})[suite] = round(time.perf_counter() - t0, 1)
            _save(results, outdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _save(results: dict, outdir: str, name: str = "results.json") -> None:
    with open(os.path.join(outdir, name), "w") as f:
        json.dump(results, f, indent=1, default=str)


def render(results: dict, outdir: str, publish: bool) -> None:
    import report
    pngs = report.plots(results, outdir)
    with open(os.path.join(outdir, "report.md"), "w") as f:
        f.write(report.markdown(results, img_prefix="" if pngs else None))
    log(f"report: {os.path.join(outdir, 'report.md')}")
    if publish:
        img = os.path.join(common.TOP, "docs", "img")
        os.makedirs(img, exist_ok=True)
        for p in pngs:
            shutil.copy(p, img)
        _save(results, os.path.join(common.TOP, "docs"), "benchmark.json")
        with open(os.path.join(common.TOP, "docs", "benchmark.md"), "w") as f:
            f.write(report.markdown(results, img_prefix="img/" if pngs else None))
            extra = os.path.join(common.TOP, "bench", "analysis.md")
            if os.path.exists(extra):
                f.write("\n" + open(extra).read())
        log("published docs/benchmark.md, docs/benchmark.json and docs/img/bench-*.png")


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("bench/run: must run as root (network namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    try:
        a = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if a.report:
        with open(os.path.join(a.report, "results.json")) as f:
            results = json.load(f)
        render(results, a.report, a.publish)
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = a.out or os.path.join(common.TOP, "bench", "results", stamp)
    os.makedirs(outdir, exist_ok=True)
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": common.machine(),
        "config": {"argv": "bench/run " + " ".join(argv), "reps": a.reps,
                   "duration": a.duration, "conns": a.conns, "modes": a.modes,
                   "where": a.where, "suites": a.suites, "quick": a.quick},
    }
    log(f"results in {outdir}; machine {results['machine']['cpu_model']}, "
        f"{results['machine']['cores']} cores, load {results['machine']['loadavg_at_start']}")
    try:
        run_suites(a, results, outdir)
    except KeyboardInterrupt:
        results.setdefault("errors", {})["run"] = "interrupted"
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(results, outdir)
    render(results, outdir, a.publish)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
