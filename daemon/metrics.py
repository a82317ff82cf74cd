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
``cni_requests`` from the CNI server, the one place that counts them (ADD,
DEL, CHECK, GC, STATUS; a STATUS that answers "not ready" counts as an error);
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
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

DEFAULT_ADDR = "127.0.0.1:15990"
#: how old a map count a scrape may get (_MapCollector)
MAP_COUNT_MAX_AGE = 5.0
#: connections served at once; a new one beyond it closes the oldest (a
#: scrape or probe takes milliseconds, so only idle connections are old)
MAX_CONNECTIONS = 16
#: a connection's whole life, first byte to last (probes time out at 5 s)
CONNECTION_DEADLINE = 5.0

#: map name -> (entries in use, max entries)
MapOccupancy = Callable[[], dict[str, tuple[int, int]]]
#: -> an object like daemon/memory.Stats: ``trims``, ``python_blocks`` and ``malloc``
#: (None, or with ``in_use`` and ``free`` bytes)
HeapSource = Callable[[], Any]


class _MapCollector:
    """map_entries / map_capacity. Counting a map's entries walks every key
    (~1 us each: a full 65,535-entry LRU is tens of ms), so a scrape never
    does it: it reads the last count, and a stale count (older than
    ``max_age``) is redone in a thread of its own, one at a time. The first
    count is taken when the source is set (the daemon's start, maps nearly
    empty). A scrape's cost is thus independent of the maps' size."""

    def __init__(self, max_age: float = MAP_COUNT_MAX_AGE) -> None:
        self.source: MapOccupancy | None = None
        self.max_age = max_age
        self._lock = threading.Lock()
        self._counted: dict[str, tuple[int, int]] = {}
        self._at = 0.0
        self._busy = False

    def set_source(self, source: MapOccupancy | None) -> None:
        self.source = source
        with self._lock:
            self._counted, self._busy = {}, source is not None
        if source is not None:
            self._count()

    def _count(self) -> None:
        source, occupancy = self.source, {}
        try:
            occupancy = source() if source is not None else {}
        except Exception as exc:  # a scrape must not fail because a map is gone
            log.warning("map occupancy callback failed: %s", exc)
        with self._lock:
            if source is self.source:
                self._counted = occupancy
            self._at, self._busy = time.monotonic(), False

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            stale = (self.source is not None and not self._busy
                     and time.monotonic() - self._at > self.max_age)
            if stale:
                self._busy = True
            counted = dict(self._counted)
        if stale:
            threading.Thread(target=self._count, name="map-count", daemon=True).start()
        used = GaugeMetricFamily("merbridge_map_entries", "Entries in each BPF map (counted at "
                                 f"most every {self.max_age:g} s)", labels=["map"])
        cap = GaugeMetricFamily("merbridge_map_capacity", "max_entries of each BPF map", labels=["map"])
        for name, (entries, capacity) in sorted(counted.items()):
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
        """Count now, then at most every MAP_COUNT_MAX_AGE s (never in a scrape)."""
        self._maps.set_source(source)

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
    def __init__(self, addr: str, metrics: Metrics, ready: Callable[[], bool] = lambda: True,
                 why_not_ready: Callable[[], str | None] = lambda: None):
        """``why_not_ready``: a reason /readyz gives with its 503 (None: none)."""
        host, port = parse_addr(addr)
        self.metrics, self.ready, self.why_not_ready = metrics, ready, why_not_ready
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = CONNECTION_DEADLINE   # per read; _Server enforces the total

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
                    if ok:
                        self._reply(200, b"ready\n")
                        return
                    why = None
                    try:
                        why = server.why_not_ready()
                    except Exception as exc:
                        log.warning("readiness reason callback failed: %s", exc)
                    self._reply(503, f"not ready: {why}\n".encode() if why else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server_cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = server_cls((host, port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr} for metrics: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        assert isinstance(host, str)   # an AF_INET or AF_INET6 server's
        return host, port

    @property
    def threads(self) -> int:
        """Connection threads alive now (at most about MAX_CONNECTIONS)."""
        return self.httpd.threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with bounded connections and a deadline per
    connection. At most ``max_connections`` are served at once: one more
    shuts the oldest down (a scrape or probe lasts milliseconds, so the
    oldest is an idle or slow one), and a connection older than ``deadline``
    is shut down by the accept loop (service_actions, every poll). Shutting a
    socket down wakes its thread, which then ends: threads stay bounded by
    about max_connections, however many connections come."""
    request_queue_size = 64
    max_connections = MAX_CONNECTIONS
    deadline = CONNECTION_DEADLINE

    def server_bind(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}   # request -> start
        self.threads = 0
        super().server_bind()

    @staticmethod
    def _cut(request: socket.socket) -> None:
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def process_request(self, request, client_address) -> None:
        with self._lock:
            if self.threads >= 2 * self.max_connections:   # the cut ones have not ended yet
                self.shutdown_request(request)
                return
            if len(self._open) >= self.max_connections:
                oldest = min(self._open, key=self._open.__getitem__)
                self._cut(oldest)
                del self._open[oldest]
            self._open[request] = time.monotonic()
            self.threads += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._open.pop(request, None)
                self.threads -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            pass   # a client that went away; nothing to report
        finally:
            with self._lock:        # out of _open before the fd can be reused
                self._open.pop(request, None)
                self.threads -= 1
            self.shutdown_request(request)

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._lock:
            for request in [r for r, t0 in self._open.items() if now - t0 > self.deadline]:
                self._cut(request)
                del self._open[request]


class _V6Server(_Server):
    address_family = socket.AF_INET6
