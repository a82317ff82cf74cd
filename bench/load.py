"""Load generators run inside a client pod: wrk (saturation and fixed rate)
and iperf3 (bulk transfer, with socket-memory sampling).

wrk reports through a Lua ``done()`` hook that prints one JSON line, so no
text scraping is needed. The fixed-rate run is wrk with a Lua ``delay()``:
each connection waits a fixed interval before every request, which gives a
uniform, no-catch-up load (Istio's fortio recipe: ``-uniform -nocatchup``)
with wrk's microsecond latency histogram. wrk2 is not in Debian, and ``hey``
reports latencies with 100 us resolution, too coarse for sub-millisecond
differences.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

from common import BenchError, build_c, host_cpu

#: the load generator runs as an ordinary user: never the proxy's UID 1337
CLIENT_UID = 1000

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"lat_mean_us":%.1f,' ..
    '"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""

_DELAY = """
function delay()
  return {interval_ms}
end
"""


def write_scripts(workdir: str) -> dict[str, str]:
    """The Lua scripts, readable by the unprivileged client."""
    paths = {}
    for name, text in (("report.lua", _DONE),):
        paths[name] = _write(workdir, name, text)
    return paths


def _write(workdir: str, name: str, text: str) -> str:
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def wrk(pod, url: str, conns: int, duration: float, close: bool, workdir: str,
        rate_per_conn_ms: int | None = None) -> dict:
    """One wrk run from ``pod``; req/s and latency percentiles (us)."""
    script = _DONE
    name = "report.lua"
    if rate_per_conn_ms is not None:
        script = _DELAY.replace("{interval_ms}", str(int(rate_per_conn_ms))) + _DONE
        name = f"rate{rate_per_conn_ms}.lua"
    lua = _write(workdir, name, script)
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s", "-s", lua]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = host_cpu()
    res = pod.run(argv, uid=CLIENT_UID, timeout=duration + 30)
    after = host_cpu()
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
    if res.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (rc={res.returncode}): {res.stderr.strip()[-300:]} "
                         f"{res.stdout.strip()[-300:]}")
    out = json.loads(line)
    secs = out["duration_us"] / 1e6
    out["rps"] = out["requests"] / secs if secs else 0.0
    out["errors"] = sum(out[k] for k in out if k.startswith("err_"))
    # what each request cost the whole host (wrk's start and exit included:
    # a few ms against seconds of load), and how much of the CPUs was left
    # idle: at few connections a chain of wake-ups, not CPU, sets the rate
    busy = after["busy_s"] - before["busy_s"]
    idle = after["idle_s"] - before["idle_s"]
    if out["requests"]:
        out["cpu_us_per_req"] = busy * 1e6 / out["requests"]
        out["ctxt_per_req"] = (after["ctxt"] - before["ctxt"]) / out["requests"]
    out["idle_share"] = idle / (busy + idle) if busy + idle else 0.0
    return out


def handoff_ns(workdir: str, round_trips: int = 20000) -> float:
    """One wake-up hand-off between two processes on this host (bench/wakeup.c):
    what each context switch of a request costs in latency, on any datapath."""
    exe = build_c(workdir, "wakeup")
    res = subprocess.run([exe, str(round_trips)], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise BenchError(f"wakeup: rc={res.returncode} {res.stderr.strip()[-200:]}")
    return float(json.loads(res.stdout)["ns_per_handoff"])


# -- bulk transfer and socket memory -------------------------------------

_SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def skmem_totals(ns_run) -> dict:
    """Sum of socket memory over every TCP socket of a namespace (``ss -tmn``):
    r=receive queue memory, t=transmit, f=forward alloc (bytes)."""
    res = ns_run(["ss", "-Htmn"])
    tot = {"r": 0, "t": 0, "f": 0, "sockets": 0}
    for m in _SKMEM.finditer(res.stdout):
        fields = dict(re.findall(r"([a-z_]+)(\d+)", m.group(1)))
        tot["r"] += int(fields.get("r", 0))
        tot["t"] += int(fields.get("t", 0))
        tot["f"] += int(fields.get("f", 0))
        tot["sockets"] += 1
    return tot


def sockstat_tcp_mem_pages() -> int:
    """TCP 'mem' from /proc/net/sockstat (pages; a kernel-wide counter)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    return 0


def iperf3(client, server, dst: str, seconds: float, port: int = 5201,
           dst_port: int | None = None) -> dict:
    """iperf3 from ``client`` pod to ``server`` pod (listening on ``port``) at
    dst:dst_port (default: the same port), sampling socket memory in both pods
    every 100 ms; throughput and peak memory."""
    srv = server.spawn(["iperf3", "-s", "-1", "-p", str(port)], uid=CLIENT_UID,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server.wait_listening(port)
        samples: list[dict] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                c = skmem_totals(lambda a: client.run(a, timeout=10))
                s = skmem_totals(lambda a: server.run(a, timeout=10))
                samples.append({"t": time.monotonic(), "client": c, "server": s,
                                "tcp_mem_pages": sockstat_tcp_mem_pages()})
                stop.wait(0.1)

        th = threading.Thread(target=sample, daemon=True)
        base_pages = sockstat_tcp_mem_pages()
        th.start()
        res = client.run(["iperf3", "-c", dst, "-p", str(dst_port or port), "-t",
                          f"{seconds:g}", "-J"],
                         uid=CLIENT_UID, timeout=seconds + 30)
        stop.set()
        th.join(timeout=10)
        try:
            data = json.loads(res.stdout)
        except ValueError:
            raise BenchError(f"iperf3 failed: {res.stderr.strip()[-300:]}") from None
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        end = data["end"]

        def peak(side: str, key: str) -> int:
            return max((s[side][key] for s in samples), default=0)

        return {
            "sender_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
            "receiver_gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits"),
            "peak_client_rmem": peak("client", "r"), "peak_client_wmem": peak("client", "t"),
            "peak_server_rmem": peak("server", "r"), "peak_server_wmem": peak("server", "t"),
            "peak_tcp_mem_pages_delta": max((s["tcp_mem_pages"] for s in samples),
                                            default=base_pages) - base_pages,
            "samples": len(samples),
        }
    finally:
        if srv.poll() is None:
            srv.terminate()
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(timeout=5)
