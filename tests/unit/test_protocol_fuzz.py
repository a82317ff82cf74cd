"""Fuzzing the daemon's socket protocol (``cniserver`` + ``cni.protocol``).

Generated: raw HTTP requests on the real unix socket -- methods, paths,
headers (Content-Length missing, wrong, negative, huge; chunked; junk lines),
bodies (valid requests, fuzzed JSON of every shape, binary, over the size
cap), cut short at a random byte -- and JSON documents for the decoders.

Invariants: every connection gets exactly one HTTP/1.1 reply whose body is
the contract's JSON (``AddReply``/``ErrorReply``/``StatusReply``), with a
status that matches it; the handler only ever sees requests that validate;
nothing is left behind (server threads and fds return to the baseline); a
stalled or slow client does not keep a good one from being served. The
decoders return a valid object or raise ``ProtocolError``, nothing else.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from merbridge.cni import protocol
from merbridge.cni.client import DaemonClient
from merbridge.daemon.cniserver import CniServer
from test_cniserver import ADD, FakeHandler

CASES = int(os.environ.get("MB_FUZZ_CASES", "1000"))
TIMEOUT = 1.0

text = st.text(max_size=30)
junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text,
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(text, kids, max_size=4), max_leaves=12)


def mostly(good, *bad, weight=4):
    choices = [good] * weight + list(bad)
    return st.integers(0, len(choices) - 1).flatmap(lambda i: choices[i])


commands = st.sampled_from(["ADD", "DEL", "CHECK", "GC"])
ips = st.one_of(st.ip_addresses(v=4).map(lambda a: f"{a}/24"),
                st.ip_addresses(v=6).map(lambda a: f"{a}/64"), text)
request_objects = st.fixed_dictionaries(
    {"command": mostly(commands, junk)},
    optional={"container_id": mostly(st.sampled_from(["c1", "c2"]), junk,
                                     st.text(min_size=1000, max_size=1100)),
              "netns": mostly(st.just("/var/run/netns/p"), junk,
                              st.sampled_from(["../../proc/1/ns/net", "p", "/x\0y"])),
              "ifname": mostly(st.just("eth0"), junk),
              "pod_namespace": mostly(st.just("default"), junk),
              "pod_name": mostly(st.just("web-0"), junk),
              "ips": mostly(st.lists(ips, max_size=4), junk,
                            st.integers(65, 70).map(lambda n: [f"10.0.0.{i}/24"
                                                               for i in range(n)])),
              "interfaces": mostly(st.lists(st.fixed_dictionaries(
                  {"name": text}, optional={"sandbox": text}), max_size=3), junk),
              "attachments": mostly(st.lists(st.fixed_dictionaries(
                  {"container_id": text, "ifname": text}), max_size=3), junk),
              "x-unknown": junk})
GOOD = json.loads(ADD.to_json())
one_off = st.tuples(commands, st.sampled_from(sorted(GOOD) + [None] * 8), junk).map(
    lambda t: {**GOOD, "command": t[0], **({t[1]: t[2]} if t[1] else {})})
bodies = st.one_of(
    one_off.map(lambda o: json.dumps(o).encode()),
    one_off.map(lambda o: json.dumps(o).encode()),
    request_objects.map(lambda o: json.dumps(o).encode()),
    request_objects.map(lambda o: json.dumps(o).encode()),
    junk.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(ADD.to_json()),
    st.just(b"[" * 100000),                                    # nesting bomb
    st.just(b'{"command": "ADD", "pad": "' + b"x" * protocol.MAX_BODY + b'"}'))  # too large
paths = mostly(st.sampled_from(list(protocol.PATHS.values()) + [protocol.STATUS_PATH]),
                  st.sampled_from(["/", "/v1/cni/", "/v1/cni/add/../del", "/v1/cni/add?x=1",
                                   "//v1/status", "*", "/" + "a" * 70000]),
                  st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
                  weight=6)
methods = mostly(st.sampled_from(["POST", "GET"]), st.sampled_from(["PUT", "HEAD", "OPTIONS"]),
                 st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=10),
                 weight=10)
length_modes = st.sampled_from(["exact"] * 6 + ["none", "short", "long", "negative", "huge",
                                                "junk", "twice", "chunked"])
extra_headers = st.lists(st.sampled_from([b"Expect: 100-continue", b"Connection: keep-alive",
                                          b"X: " + b"y" * 70000, b"no colon here",
                                          b"Content-Type: text/plain", b"\x00\xff: x"]),
                         max_size=2)


def build(method, path, body, mode, extra):
    head = [f"{method} {path} HTTP/1.1".encode(errors="surrogateescape"), b"Host: merbridge"]
    n = len(body)
    head += {"exact": [b"Content-Length: %d" % n], "none": [],
             "short": [b"Content-Length: %d" % max(0, n - 1)],
             "long": [b"Content-Length: %d" % (n + 10)],
             "negative": [b"Content-Length: -5"],
             "huge": [b"Content-Length: %d" % (protocol.MAX_BODY * 4)],
             "junk": [b"Content-Length: 12abc"],
             "twice": [b"Content-Length: %d" % n, b"Content-Length: 3"],
             "chunked": [b"Transfer-Encoding: chunked"]}[mode]
    return b"\r\n".join(head + extra) + b"\r\n\r\n" + body


def exchange(path, data, cut):
    """Send (maybe only a prefix, then half-close) and read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT * 5)
        s.connect(path)
        try:
            s.sendall(data[:cut] if cut is not None else data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the server may hang up early (after its reply) on a large body
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def check_reply(out):
    # "Expect: 100-continue" earns an interim 100 first (valid HTTP/1.1)
    if out.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        out = out[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    head, sep, body = out.partition(b"\r\n\r\n")
    assert sep, out[:200]
    lines = head.split(b"\r\n")
    version, status, _ = lines[0].split(b" ", 2)
    assert version == b"HTTP/1.1"
    status = int(status)
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert int(headers[b"Content-Length"]) == len(body)
    assert headers[b"Content-Type"] == b"application/json"
    if status == 200:
        obj = json.loads(body)
        if "ready" in obj:
            protocol.StatusReply.from_json(body)
        else:
            protocol.AddReply.from_json(body)
    elif status == 503 and b'"ready"' in body:
        assert protocol.StatusReply.from_json(body).ready is False
    else:
        assert 400 <= status < 600
        reply = protocol.ErrorReply.from_json(body)
        assert reply.code > 0 and reply.msg
    return status


class StrictHandler(FakeHandler):
    """Fails the test if anything invalid ever gets through to the handler."""

    def _enter(self, name, req):
        assert isinstance(req, protocol.CniRequest)
        req.validate()
        assert protocol.CniRequest.from_json(req.to_json(), req.command) == req
        super()._enter(name, req)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("proto") / "mb.sock")
    handler = StrictHandler()
    srv = CniServer(path, handler, allowed_uids=(os.getuid(),), owner=None,
                    request_timeout=TIMEOUT)
    srv.start()
    try:
        yield path, handler
    finally:
        srv.stop()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=CASES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(method=methods, path=paths, body=bodies, mode=length_modes, extra=extra_headers,
       cut=st.none() | st.none() | st.integers(0, 400), own_path=st.booleans())
def test_fuzz_raw_requests(served, method, path, body, mode, extra, cut, own_path):
    sock, handler = served
    if own_path and method == "POST":
        try:
            path = protocol.PATHS.get(json.loads(body).get("command"), path)
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
    data = build(method, path, body, mode, extra)
    t0 = time.monotonic()
    out = exchange(sock, data, cut)
    assert time.monotonic() - t0 < TIMEOUT * 4
    if not out:
        # only a request cut before its request line ends may go unanswered
        assert cut is not None and b"\r\n" not in data[:cut], data[:cut][:200]
        event("no reply (request line incomplete)")
        return
    event(f"HTTP {check_reply(out)}")


def test_fuzzing_left_nothing_behind_and_the_server_still_serves(served):
    sock, handler = served
    deadline = time.monotonic() + 5
    while threading.active_count() > 3 and time.monotonic() < deadline:
        time.sleep(0.05)   # connection threads finishing their lingering close
    # the main thread, the server thread (and maybe a timer being cancelled)
    assert threading.active_count() <= 3, threading.enumerate()
    assert DaemonClient(sock, 2).status().ready
    assert DaemonClient(sock, 2).call(ADD) == {"key": len(handler.enrolled)}


def test_no_fd_or_thread_leak_over_many_bad_connections(tmp_path):
    path = str(tmp_path / "mb.sock")
    fds, threads = open_fds(), threading.active_count()
    with CniServer(path, FakeHandler(), allowed_uids=(os.getuid(),), owner=None,
                   request_timeout=0.5):
        for i in range(300):
            exchange(path, [b"GARBAGE\r\n\r\n", b"POST /v1/cni/add HTTP/1.1\r\n"
                            b"Content-Length: 99\r\n\r\n{", b""][i % 3], None)
        assert DaemonClient(path, 2).status().ready
    deadline = time.monotonic() + 5
    while (open_fds() > fds or threading.active_count() > threads) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= fds and threading.active_count() <= threads


def test_slow_clients_do_not_starve_a_good_one(tmp_path):
    """20 clients that send half a request and stall, then a kubelet ADD."""
    path = str(tmp_path / "mb.sock")
    handler = FakeHandler()
    with CniServer(path, handler, allowed_uids=(os.getuid(),), owner=None,
                   request_timeout=2.0):
        stalled = []
        try:
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                s.sendall(b"POST /v1/cni/add HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
                stalled.append(s)
            t0 = time.monotonic()
            assert DaemonClient(path, 5).call(ADD) == {"key": 1}
            assert time.monotonic() - t0 < 1.0
        finally:
            for s in stalled:
                s.close()


@settings(max_examples=CASES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(obj=st.one_of(one_off, request_objects, junk), command=st.none() | commands,
       reply=st.sampled_from(["add", "error", "status"]))
def test_fuzz_decoders(obj, command, reply):
    data = json.dumps(obj).encode()
    try:
        req = protocol.CniRequest.from_json(data, command)
    except protocol.ProtocolError:
        event("request refused")
    else:
        event("request accepted")
        assert protocol.CniRequest.from_json(req.to_json(), req.command) == req
        assert len(req.to_json()) <= protocol.MAX_BODY
    decoder = {"add": protocol.AddReply, "error": protocol.ErrorReply,
               "status": protocol.StatusReply}[reply]
    try:
        decoder.from_json(data)
    except protocol.ProtocolError:
        pass
