"""Metrics registry and the /metrics, /healthz, /readyz server, over loopback."""
import http.client

import pytest

from merbridge.daemon import memory, metrics


def get(server, path):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def served():
    m = metrics.Metrics()
    state = {"ready": False}
    server = metrics.MetricsServer("127.0.0.1:0", m, ready=lambda: state["ready"])
    server.start()
    try:
        yield m, server, state
    finally:
        server.stop()


def test_health_and_readiness(served):
    _, server, state = served
    assert get(server, "/healthz") == (200, "ok\n")
    assert get(server, "/readyz")[0] == 503
    state["ready"] = True
    assert get(server, "/readyz") == (200, "ready\n")
    assert get(server, "/nope")[0] == 404


def test_metrics_exposition(served):
    m, server, _ = served
    m.set_pods_enrolled(3)
    m.cni_request("ADD", "ok", 0.004)
    m.cni_request("ADD", "ok", 0.02)
    m.cni_request("DEL", "error", 0.5)
    m.error("enrol")
    m.set_map_occupancy(lambda: {"mb_local_pods": (3, 4096), "mb_pair_orig_dst": (10, 65535)})
    status, text = get(server, "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert "merbridge_pods_enrolled 3.0" in lines
    assert 'merbridge_cni_requests_total{command="ADD",result="ok"} 2.0' in lines
    assert 'merbridge_cni_requests_total{command="DEL",result="error"} 1.0' in lines
    assert 'merbridge_cni_request_duration_seconds_bucket{command="ADD",le="0.005"} 1.0' in lines
    assert 'merbridge_cni_request_duration_seconds_count{command="ADD"} 2.0' in lines
    assert 'merbridge_errors_total{kind="enrol"} 1.0' in lines
    assert 'merbridge_map_entries{map="mb_local_pods"} 3.0' in lines
    assert 'merbridge_map_capacity{map="mb_pair_orig_dst"} 65535.0' in lines


def test_failing_map_callback_does_not_break_the_scrape(served):
    m, server, _ = served

    def broken():
        raise OSError("map gone")

    m.set_map_occupancy(broken)
    status, text = get(server, "/metrics")
    assert status == 200 and "merbridge_pods_enrolled" in text and 'map="' not in text


def test_ipv6_loopback_and_bad_addresses():
    m = metrics.Metrics()
    server = metrics.MetricsServer("[::1]:0", m)
    server.start()
    try:
        assert server.address[0] == "::1"
        assert get(server, "/healthz")[0] == 200
    finally:
        server.stop()
    for bad in ("localhost", "1.2.3.4:port", ":99999"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            metrics.parse_addr(bad)
    assert metrics.parse_addr(metrics.DEFAULT_ADDR) == ("127.0.0.1", 15990)


def test_port_in_use_is_a_clear_error(served):
    _, server, _ = served
    host, port = server.address
    with pytest.raises(OSError, match="cannot listen on"):
        metrics.MetricsServer(f"{host}:{port}", metrics.Metrics())


def test_start_from_config_serves_until_stopped():
    class Cfg:
        metrics_addr = "127.0.0.1:0"

    ready = {"v": True}
    m = metrics.start(Cfg(), ready=lambda: ready["v"])
    try:
        assert get(m.server, "/readyz")[0] == 200
        m.cni_request("CHECK", "ok")            # latency is optional
        assert 'merbridge_cni_requests_total{command="CHECK",result="ok"} 1.0' in get(m.server, "/metrics")[1]
    finally:
        m.stop()
    Cfg.metrics_addr = ""                       # empty: no endpoint at all
    m = metrics.start(Cfg(), ready=lambda: True)
    assert m.server is None
    m.stop()


def test_heap_metrics(served):
    m, server, _ = served
    m.set_heap(lambda: memory.Stats(malloc=memory.Heap(in_use=2048, free=512, arena=4096),
                                    python_blocks=1234, trims=5))
    lines = set(get(server, "/metrics")[1].splitlines())
    assert 'merbridge_heap_bytes{state="in_use"} 2048.0' in lines
    assert 'merbridge_heap_bytes{state="free"} 512.0' in lines
    assert "merbridge_heap_python_blocks 1234.0" in lines
    assert "merbridge_heap_trims_total 5.0" in lines
    # without glibc: no malloc figures, the rest still there
    m.set_heap(lambda: memory.Stats(malloc=None, python_blocks=1, trims=0))
    text = get(server, "/metrics")[1]
    assert "merbridge_heap_bytes" not in text and "merbridge_heap_trims_total 0.0" in text


def test_logged_errors_are_counted_by_module(served):
    import logging
    m, server, _ = served
    stop = m.count_logged_errors(logging.getLogger("merbridge"))
    try:
        logging.getLogger("merbridge.daemon.install").error("CNI install failed")
        logging.getLogger("merbridge.daemon.pods").exception("restore failed")
        logging.getLogger("merbridge.daemon.pods").warning("ADD failed: code 11")   # not an error
        logging.getLogger("elsewhere").error("not ours")
    finally:
        stop()
    logging.getLogger("merbridge.daemon.pods").error("after stop: not counted")
    lines = set(get(server, "/metrics")[1].splitlines())
    assert 'merbridge_errors_total{kind="install"} 1.0' in lines
    assert 'merbridge_errors_total{kind="pods"} 1.0' in lines
    assert not [ln for ln in lines if 'kind="elsewhere"' in ln]


def test_pods_enrolled_read_at_scrape_time(served):
    m, server, _ = served
    pods = {"a": 1}
    m.set_pods_enrolled_source(lambda: len(pods))
    assert "merbridge_pods_enrolled 1.0" in get(server, "/metrics")[1].splitlines()
    pods["b"] = 2
    assert "merbridge_pods_enrolled 2.0" in get(server, "/metrics")[1].splitlines()


def test_map_occupancy_of_the_typed_handles(served):
    from merbridge.bpf import maps as bpfmaps
    from merbridge.bpf import types as t

    class Sized(bpfmaps.DictBackend):        # like the loader's kernel backend
        max_entries = 4096

        def __len__(self):
            return len(self.data)

    backends = {name: Sized() for name in t.ALL_MAPS if name not in t.SOCKET_MAPS}
    backends[t.MAP_SETTINGS] = bpfmaps.DictBackend()    # capacity unknown: left out
    maps = bpfmaps.Maps(backends)
    maps.local_pods.put("10.0.0.5", bpfmaps.PodPolicy())
    maps.mark_pod_ips.put(7, "10.0.0.5")
    occupancy = maps.occupancy()
    assert occupancy[t.MAP_LOCAL_PODS] == (1, 4096)
    assert occupancy[t.MAP_PAIR_ORIG_DST] == (0, 4096)
    assert t.MAP_SETTINGS not in occupancy
    m, server, _ = served
    m.set_map_occupancy(maps.occupancy)
    lines = set(get(server, "/metrics")[1].splitlines())
    assert 'merbridge_map_entries{map="mb_mark_pod_ips"} 1.0' in lines
    assert 'merbridge_map_capacity{map="mb_mark_pod_ips"} 4096.0' in lines


def test_the_cni_server_counts_every_command_into_the_metrics():
    """What runtime wires: the CNI server's requests (here through the in-process
    plugin's way in) counted by command and result, with their latency."""
    from merbridge.cni.errors import CniError
    from merbridge.cni.protocol import CniRequest
    from merbridge.daemon.cniserver import CniServer

    class Handler:
        fail = False

        def _maybe_fail(self):
            if self.fail:
                raise CniError(103, "failed")

        def add(self, req):
            self._maybe_fail()

        def delete(self, req):
            self._maybe_fail()

        def check(self, req):
            self._maybe_fail()

        def gc(self, req):
            self._maybe_fail()

        def status(self):
            if self.fail:
                raise CniError(50, "merbridge is starting")
            return True, "ready"

    m, handler = metrics.Metrics(), Handler()
    server = CniServer("/nonexistent/never-bound.sock", handler, observe=m.cni_request)
    check = CniRequest(command="CHECK", container_id="c1", netns="/n", ifname="eth0")
    for fail in (False, True):
        handler.fail = fail
        assert server.local_post(check)[0] == (500 if fail else 200)
        assert server.local_post(CniRequest(command="GC"))[0] == (500 if fail else 200)
        assert server.local_status()[0] == (503 if fail else 200)
    lines = set(m.render().decode().splitlines())
    for command in ("CHECK", "GC", "STATUS"):
        assert f'merbridge_cni_requests_total{{command="{command}",result="ok"}} 1.0' in lines
        assert f'merbridge_cni_requests_total{{command="{command}",result="error"}} 1.0' in lines
        assert f'merbridge_cni_request_duration_seconds_count{{command="{command}"}} 2.0' in lines


def test_idle_connections_neither_starve_scrapes_nor_pile_up_threads(served):
    """Far more idle connections than metrics.MAX_CONNECTIONS: each new one
    closes the oldest, so a scrape is still answered and the server's
    threads stay bounded (the old server kept a thread per connection)."""
    import socket
    import threading
    _, server, _ = served
    host, port = server.address
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, port), timeout=5))
        assert get(server, "/healthz") == (200, "ok\n")
        assert server.threads <= 2 * metrics.MAX_CONNECTIONS
        assert threading.active_count() < 2 * metrics.MAX_CONNECTIONS + 20
        # the oldest idle connections were closed by the server
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()


def test_a_connection_is_cut_at_its_deadline(served):
    """A client that sends half a request and waits is cut after the
    deadline, not served forever."""
    import socket
    import time
    _, server, _ = served
    server.httpd.deadline = 0.5
    s = socket.create_connection(server.address, timeout=10)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")      # never finished
        t0 = time.monotonic()
        assert s.recv(1) == b""
        assert 0.4 < time.monotonic() - t0 < 5
    finally:
        s.close()


def test_map_counts_are_not_walked_per_scrape(served):
    """Counting walks every key: it happens when the source is set and then
    at most every MAP_COUNT_MAX_AGE seconds in the background, never in a
    scrape."""
    import time
    m, server, _ = served
    calls = []

    def count():
        calls.append(time.monotonic())
        return {"mb_pair_orig_dst": (len(calls), 65535)}

    m.set_map_occupancy(count)
    for _ in range(5):
        assert 'merbridge_map_entries{map="mb_pair_orig_dst"} 1.0' in get(server, "/metrics")[1]
    assert len(calls) == 1
    m._maps.max_age = 0.0                       # stale: the next scrape starts a recount
    get(server, "/metrics")
    deadline = time.monotonic() + 5
    while len(calls) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    m._maps.max_age = 60.0
    deadline = time.monotonic() + 5
    while 'mb_pair_orig_dst"} 2.0' not in get(server, "/metrics")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(calls) == 2
