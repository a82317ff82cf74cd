"""Prometheus metrics and the health endpoints (the only prometheus_client import).

One small HTTP server (``--metrics-addr``, default ``127.0.0.1:15990``: a
port outside Istio's 15000-15090 range and beside nothing merbridge uses;
loopback by default so a hostNetwork DaemonSet exposes nothing unless asked,
probes then use ``host: 127.0.0.1``) serves:

* ``/metrics`` -- the registry below, Prometheus text format;
* ``/healthz`` -- 200 while the process serves HTTP (liveness);
* ``/readyz``  -- 200 when the ``ready`` callback says so, else 503.

Metrics (all prefixed ``merbridge_``): ``pods_enrolled`` (gauge),
``cni_requests_total{command,result}`` (counter),
``cni_request_duration_seconds{command}`` (histogram),
``map_entries{map}`` / ``map_capacity{map}`` (gauges read at scrape time
from a callback), ``heap_bytes{state}`` (malloc's in-use and free-but-kept
bytes, read at scrape time; absent without glibc), ``heap_python_blocks``
(gauge), ``heap_trims_total`` (counter), ``errors_total{kind}`` (counter),
``dns_queries_captured_total`` (counter, the datapath's ``dns_captured``).

Where they come from in the daemon (daemon/runtime.py): ``pods_enrolled`` from
the registry (CNI mode: enrolled containers) or, read at scrape time, the
legacy bookkeeping (in-mesh pods written to ``mb_local_pods``);
``cni_requests`` from the registry (ADD, DEL) and the CNI server's handler
(CHECK, GC, STATUS; a STATUS that answers "not ready" counts as an error);
``map_*`` from the datapath's typed map handles (``Maps.occupancy``);
``errors_total`` counts every ERROR log record of the ``merbridge`` loggers,
``kind`` being the module that logged it (``pods``, ``legacy``, ``install``,
``cniserver``, ...): every error path already logs, so none is missed and none
needs a second call beside its log line.
"""
from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

DEFAULT_ADDR = "127.0.0.1:15990"

#: map name -> (entries in use, max entries)
MapOccupancy = Callable[[], dict[str, tuple[int, int]]]
#: -> an object like daemon/memory.Stats: ``trims``, ``python_blocks`` and ``malloc``
#: (None, or with ``in_use`` and ``free`` bytes)
HeapSource = Callable[[], Any]


class _MapCollector:
    def __init__(self) -> None:
        self.source: MapOccupancy | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = GaugeMetricFamily("merbridge_map_entries", "Entries in each BPF map", labels=["map"])
        cap = GaugeMetricFamily("merbridge_map_capacity", "max_entries of each BPF map", labels=["map"])
        if self.source is not None:
            try:
                occupancy = self.source()
            except Exception as exc:  # a scrape must not fail because a map is gone
                log.warning("map occupancy callback failed: %s", exc)
                occupancy = {}
            for name, (entries, capacity) in sorted(occupancy.items()):
                used.add_metric([name], entries)
                cap.add_metric([name], capacity)
        return [used, cap]


class _HeapCollector:
    def __init__(self) -> None:
        self.source: HeapSource | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        if self.source is None:
            return []
        stats = self.source()
        out: list[GaugeMetricFamily | CounterMetricFamily] = [
            CounterMetricFamily("merbridge_heap_trims", "Times idle heap pages were handed back",
                                value=stats.trims),
            GaugeMetricFamily("merbridge_heap_python_blocks", "Python small-object blocks "
                              "allocated", value=stats.python_blocks)]
        if stats.malloc is not None:
            fam = GaugeMetricFamily("merbridge_heap_bytes", "The daemon's malloc heap: bytes "
                                    "in use and bytes free but kept for reuse", labels=["state"])
            fam.add_metric(["in_use"], stats.malloc.in_use)
            fam.add_metric(["free"], stats.malloc.free)
            out.append(fam)
        return out


class _DnsCollector:
    """``dns_queries_captured_total``: the datapath's ``dns_captured`` counter
    (bpf/progs/dns.c, read at scrape time from ``Maps.counters``)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterable[CounterMetricFamily]:
        if self.source is None:
            return []
        try:
            value = self.source().get("dns_captured", 0)
        except Exception as exc:  # a scrape must not fail because a map is gone
            log.warning("datapath counters callback failed: %s", exc)
            return []
        return [CounterMetricFamily("merbridge_dns_queries_captured", "DNS queries (UDP "
                                    "datagrams, TCP and connected UDP sockets) sent to the "
                                    "sidecar's DNS proxy", value=value)]


class _ErrorLog(logging.Handler):
    """ERROR and worse log records -> ``errors_total{kind=<module>}``."""

    def __init__(self, metrics: "Metrics") -> None:
        super().__init__(logging.ERROR)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self.metrics.error(record.name.rpartition(".")[2])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pods_enrolled = Gauge("merbridge_pods_enrolled", "Pods whose traffic merbridge intercepts",
                                   registry=r)
        self.cni_requests = Counter("merbridge_cni_requests", "CNI requests handled",
                                    ["command", "result"], registry=r)
        self.cni_latency = Histogram("merbridge_cni_request_duration_seconds",
                                     "Time to handle a CNI request", ["command"], registry=r,
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.errors = Counter("merbridge_errors", "Errors by kind", ["kind"], registry=r)
        # CNI mode: pods the ADD path missed (daemon down, not yet installed), see reconcile.py
        self.pods_recovered = Counter("merbridge_pods_recovered", "Pods enrolled after their "
                                      "CNI ADD: replayed (a remembered fail-open ADD) or adopted "
                                      "(found by IP in the node's netns)", ["how"], registry=r)
        self.pods_pending = Gauge("merbridge_pods_pending", "Remembered fail-open ADDs not "
                                  "replayed yet", registry=r)
        self.pods_unenrolled = Gauge("merbridge_pods_unenrolled", "In-mesh pods of this node "
                                     "with an IP but not enrolled (netns not found yet)",
                                     registry=r)
        self._maps = _MapCollector()
        r.register(self._maps)
        self._heap = _HeapCollector()
        r.register(self._heap)
        self._dns = _DnsCollector()
        r.register(self._dns)
        self.server: MetricsServer | None = None

    def cni_request(self, command: str, result: str, seconds: float | None = None) -> None:
        """Record one CNI request; ``result`` is e.g. "ok" or "error"."""
        self.cni_requests.labels(command=command, result=result).inc()
        if seconds is not None:
            self.cni_latency.labels(command=command).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def set_pods_enrolled(self, count: int) -> None:
        self.pods_enrolled.set(count)

    def set_pods_enrolled_source(self, source: Callable[[], float]) -> None:
        """Read ``pods_enrolled`` from ``source`` at scrape time instead."""
        self.pods_enrolled.set_function(source)

    def count_logged_errors(self, logger: logging.Logger) -> Callable[[], None]:
        """Count ``logger``'s (and its children's) ERROR records in ``errors_total``;
        returns the function that stops it."""
        handler = _ErrorLog(self)
        logger.addHandler(handler)
        return lambda: logger.removeHandler(handler)

    def set_map_occupancy(self, source: MapOccupancy | None) -> None:
        self._maps.source = source

    def set_heap(self, source: HeapSource | None) -> None:
        self._heap.source = source

    def set_datapath_counters(self, source: Callable[[], dict[str, int]] | None) -> None:
        """The datapath's counters (``Maps.counters``), read at scrape time."""
        self._dns.source = source

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, addr: str, ready: Callable[[], bool] = lambda: True) -> "MetricsServer":
        """Start the HTTP endpoint for this registry (stopped by stop())."""
        self.server = MetricsServer(addr, self, ready)
        self.server.start()
        host, port = self.server.address
        log.info("metrics and health endpoint listening addr=%s", f"[{host}]:{port}" if ":" in host
                 else f"{host}:{port}")
        return self.server

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


def start(config: object, ready: Callable[[], bool]) -> Metrics:
    """The daemon's metrics: a registry plus, unless ``metrics_addr`` is empty, its server."""
    m = Metrics()
    addr = getattr(config, "metrics_addr", DEFAULT_ADDR)
    if addr:
        m.serve(addr, ready)
    return m


def parse_addr(addr: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError with the reason."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {addr!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class MetricsServer:
    def __init__(self, addr: str, metrics: Metrics, ready: Callable[[], bool] = lambda: True):
        host, port = parse_addr(addr)
        self.metrics, self.ready = metrics, ready
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass  # scrapes every few seconds would flood the daemon log

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    try:
                        ok = bool(server.ready())
                    except Exception as exc:
                        log.warning("readiness callback failed: %s", exc)
                        ok = False
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server_cls = _V6Server if ":" in host else ThreadingHTTPServer
        try:
            self.httpd = server_cls((host, port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr} for metrics: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return host, port

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
