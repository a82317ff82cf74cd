"""cniserver: a real unix socket in a tmp dir, the real DaemonClient, a fake handler."""
from __future__ import annotations

import os
import socket
import stat
import threading
import time

import pytest

from merbridge.cni import errors, protocol
from merbridge.cni.client import DaemonClient, DaemonUnavailable
from merbridge.cni.errors import CniError
from merbridge.cni.protocol import Attachment, CniRequest
from merbridge.daemon import cniserver
from merbridge.daemon.cniserver import CniServer


class FakeHandler:
    """An in-memory registry: enough state to make CHECK and GC meaningful."""

    def __init__(self):
        self.calls = []
        self.enrolled = {}
        self.ready = (True, "ready")
        self.fail = {}  # method name -> exception to raise

    def _enter(self, name, req):
        self.calls.append((name, req))
        if name in self.fail:
            raise self.fail[name]

    def add(self, req):
        self._enter("add", req)
        self.enrolled[req.container_id] = req
        return {"key": len(self.enrolled)}

    def delete(self, req):
        self._enter("delete", req)
        self.enrolled.pop(req.container_id, None)

    def check(self, req):
        self._enter("check", req)
        if req.container_id not in self.enrolled:
            raise CniError(103, "not enrolled", req.container_id)

    def gc(self, req):
        self._enter("gc", req)
        keep = {a.container_id for a in req.attachments}
        for cid in [c for c in self.enrolled if c not in keep]:
            del self.enrolled[cid]

    def status(self):
        self.calls.append(("status", None))
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready


class CodedError(Exception):
    """Shaped like a CniError without being one: no longer matched by shape."""

    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "mb.sock")


@pytest.fixture
def handler():
    return FakeHandler()


@pytest.fixture
def server(sock_path, handler):
    srv = CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None,
                    request_timeout=1.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


ADD = CniRequest(command="ADD", container_id="c1", netns="/var/run/netns/p", ifname="eth0",
                 pod_namespace="default", pod_name="web-0", ips=("10.244.1.2/24", "fd00::2/64"))


def client(path, timeout=2.0):
    return DaemonClient(path, timeout)


def raw(path, data, timeout=3.0):
    """Send raw bytes; return everything the server answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_round_trip_every_command(server, sock_path, handler):
    c = client(sock_path)
    assert c.call(ADD) == {"key": 1}
    assert handler.enrolled["c1"] == ADD
    check = CniRequest(command="CHECK", container_id="c1", netns="/var/run/netns/p", ifname="eth0")
    assert c.call(check) == {}
    c.call(CniRequest(command="GC", attachments=(Attachment("c1", "eth0"),)))
    assert "c1" in handler.enrolled
    c.call(CniRequest(command="GC"))
    assert handler.enrolled == {}
    with pytest.raises(CniError) as e:
        c.call(check)
    assert (e.value.code, e.value.msg, e.value.details) == (103, "not enrolled", "c1")
    c.call(CniRequest(command="DEL", container_id="c1", ifname="eth0"))
    assert c.status() == protocol.StatusReply(True, "ready")
    assert [n for n, _ in handler.calls] == ["add", "check", "gc", "gc", "check", "delete",
                                             "status"]


def test_socket_is_0600_and_removed_on_stop(sock_path, handler):
    srv = CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None)
    srv.start()
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert os.listdir(os.path.dirname(sock_path)) == ["mb.sock"]
    srv.stop()
    assert not os.path.lexists(sock_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to root needs root")
def test_socket_owned_by_root(sock_path, handler):
    with CniServer(sock_path, handler):
        st = os.lstat(sock_path)
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_peer_uid_not_allowed_is_refused(sock_path, handler):
    with CniServer(sock_path, handler, allowed_uids=(os.getuid() + 4242,), owner=None):
        with pytest.raises(CniError) as e:
            client(sock_path).call(ADD)
        assert "permission denied" in e.value.msg
    assert handler.calls == []


@pytest.mark.parametrize("exc,code", [
    (CniError(11, "busy", "netns not ready"), 11),
    (CniError(101, "invalid annotations", "bad port"), 101),
    (CniError(50, "not ready"), 50),
    (ZeroDivisionError("boom"), errors.INTERNAL),
    (CniError(True, "bool is no code"), errors.INTERNAL),
    (CodedError(101, "shaped like one"), errors.INTERNAL),
])
def test_handler_errors_become_replies(server, sock_path, handler, exc, code):
    handler.fail["add"] = exc
    with pytest.raises(CniError) as e:
        client(sock_path).call(ADD)
    assert e.value.code == code
    if code != errors.INTERNAL:
        assert e.value.msg == exc.msg and e.value.details == exc.details
    # the server is still serving
    del handler.fail["add"]
    assert client(sock_path).call(ADD) == {"key": 1}


@pytest.mark.parametrize("state,detail", [((False, "loading maps"), "loading maps"),
                                          (CniError(50, "merbridge daemon is not ready"),
                                           "merbridge daemon is not ready")])
def test_status_not_ready(server, sock_path, handler, state, detail):
    handler.ready = state
    assert client(sock_path).status() == protocol.StatusReply(False, detail)


def test_status_none_means_ready(server, sock_path, handler):
    handler.ready = None
    assert client(sock_path).status().ready is True


def http(method, path, body=b"", headers=None):
    h = {"Host": "x", "Content-Length": str(len(body))}
    h.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def reply_of(data):
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, protocol.ErrorReply.from_json(body)


@pytest.mark.parametrize("request_bytes,status", [
    (http("POST", "/v1/cni/nope", ADD.to_json()), 404),
    (http("GET", "/v1/other"), 404),
    (http("POST", "/v1/cni/del", ADD.to_json()), 400),          # body says ADD
    (http("POST", "/v1/cni/add", b"{not json"), 400),
    (http("POST", "/v1/cni/add", b'{"command": "ADD"}'), 400),   # no container id
    (http("POST", "/v1/cni/add", b"{}", {"Content-Length": None}), 411),
    (http("POST", "/v1/cni/add", b"", {"Content-Length": str(protocol.MAX_BODY + 1)}), 413),
    (http("POST", "/v1/cni/add", b"", {"Transfer-Encoding": "chunked"}), 411),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_malformed_requests_get_error_json(server, sock_path, handler, request_bytes, status):
    got_status, reply = reply_of(raw(sock_path, request_bytes))
    assert got_status == status
    assert reply.code in (errors.DECODING_FAILURE, errors.INTERNAL)
    assert [n for n, _ in handler.calls] == []


def test_idle_client_is_cut_off(server, sock_path):
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        assert s.recv(100) == b""
    assert time.monotonic() - t0 < 3


def test_trickling_client_is_cut_off_by_the_deadline(server, sock_path, handler):
    body = ADD.to_json()
    data = http("POST", "/v1/cni/add", body)
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        try:
            for i in range(len(data)):  # one byte every 50 ms: each read is quick
                s.sendall(data[i:i + 1])
                time.sleep(0.05)
                if time.monotonic() - t0 > 4:
                    break
        except OSError:
            pass  # the server hung up on us: what we want
    assert time.monotonic() - t0 < 3
    assert handler.calls == []


def test_connection_limit(sock_path, handler):
    with CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None,
                   request_timeout=2.0, max_connections=1):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(sock_path)
            time.sleep(0.2)
            with pytest.raises(DaemonUnavailable):
                client(sock_path).call(ADD)
        time.sleep(0.3)
        assert client(sock_path).call(ADD) == {"key": 1}


def test_concurrent_requests(server, sock_path, handler):
    results = []

    def one(i):
        req = CniRequest(command="ADD", container_id=f"c{i}", netns="/n", ifname="eth0")
        results.append(client(sock_path).call(req))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and len(handler.enrolled) == 20


def test_stale_socket_is_replaced(sock_path, handler):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # a socket file nobody listens on
    with CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None):
        assert client(sock_path).call(ADD) == {"key": 1}


def test_live_socket_or_other_file_is_not_taken(server, sock_path, handler, tmp_path):
    with pytest.raises(cniserver.ServerError):
        CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None).start()
    assert client(sock_path).call(ADD) == {"key": 1}  # the first server is untouched
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(cniserver.ServerError):
        CniServer(str(other), handler, owner=None).start()
    assert other.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["file", "mb.sock"]


def test_client_against_no_daemon(tmp_path):
    with pytest.raises(DaemonUnavailable):
        client(str(tmp_path / "none.sock")).call(ADD)
    with pytest.raises(DaemonUnavailable):
        client(str(tmp_path / "none.sock")).status()


def test_client_times_out_on_a_silent_daemon(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            client(path, timeout=0.3).call(ADD)
        assert time.monotonic() - t0 < 2


def _replying(path, reply: bytes, drip: float = 0.0):
    """A one-shot stand-in daemon on ``path`` that reads the request and sends ``reply``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            with conn:
                conn.recv(65536)
                if drip:
                    for i in range(len(reply)):
                        conn.sendall(reply[i:i + 1])
                        time.sleep(drip)
                else:
                    conn.sendall(reply)
        except OSError:      # the client gave up first: that is the point of some cases
            pass
        finally:
            srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


OK_BODY = b'{"result": {"key": 7}}'


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY),
    b"HTTP/1.0 200 OK\r\ncontent-length:%d\r\nServer: x\r\n\r\n%s" % (len(OK_BODY), OK_BODY),
    b"HTTP/1.1 200\r\nContent-Length: %d\r\n\r\n%sTRAILING" % (len(OK_BODY), OK_BODY),
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + OK_BODY,    # body ends at EOF
])
def test_client_reads_well_formed_replies(tmp_path, reply):
    path = str(tmp_path / "d.sock")
    t = _replying(path, reply)
    assert client(path).call(ADD) == {"key": 7}
    t.join(5)


def test_client_reads_a_reply_sent_byte_by_byte(tmp_path):
    path = str(tmp_path / "d.sock")
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)
    t = _replying(path, reply, drip=0.001)
    assert client(path).call(ADD) == {"key": 7}
    t.join(5)


@pytest.mark.parametrize("reply", [
    b"",                                                           # closed at once
    b"garbage\r\n\r\n{}",
    b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{}",            # body cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}",      # over MAX_BODY
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000,                   # headers never end
])
def test_client_rejects_what_is_not_a_whole_reply(tmp_path, reply):
    path = str(tmp_path / "d.sock")
    t = _replying(path, reply)
    with pytest.raises(DaemonUnavailable):
        client(path, timeout=2).call(ADD)
    t.join(5)


def test_client_deadline_covers_a_dripping_daemon(tmp_path):
    path = str(tmp_path / "d.sock")
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)
    _replying(path, reply, drip=0.05)                  # ~3 s in all, each byte in time
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        client(path, timeout=0.5).call(ADD)
    assert time.monotonic() - t0 < 1.5


def test_client_maps_error_replies_to_their_code(tmp_path):
    path = str(tmp_path / "d.sock")
    body = b'{"code": 11, "msg": "later", "details": "d"}'
    _replying(path, b"HTTP/1.1 503 Unavailable\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body)).join(0)
    with pytest.raises(CniError) as e:
        client(path).call(ADD)
    assert (e.value.code, e.value.msg) == (11, "later")


def test_every_command_is_counted_once_here(sock_path, handler):
    """The server is the one place that counts CNI requests: each ADD, DEL,
    CHECK, GC and STATUS, "ok" or "error", with its duration."""
    seen = []
    with CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None,
                   observe=lambda *a: seen.append(a)):
        c = client(sock_path)
        c.call(ADD)
        check = CniRequest(command="CHECK", container_id="c1", netns="/n", ifname="eth0")
        c.call(check)
        c.call(CniRequest(command="GC"))
        with pytest.raises(CniError):
            c.call(check)                           # not enrolled any more
        c.call(CniRequest(command="DEL", container_id="c1", ifname="eth0"))
        c.status()
        handler.ready = CniError(50, "merbridge is starting")
        c.status()
        # refused before the handler (no netns): not counted
        assert reply_of(raw(sock_path, http("POST", "/v1/cni/check", b'{"command":"CHECK"}'
                                            )))[0] == 400
    assert [(cmd, result) for cmd, result, _ in seen] == [
        ("ADD", "ok"), ("CHECK", "ok"), ("GC", "ok"), ("CHECK", "error"), ("DEL", "ok"),
        ("STATUS", "ok"), ("STATUS", "error")]
    assert all(isinstance(t, float) and t >= 0 for _, _, t in seen)


def test_drain_is_served_only_when_given(sock_path, handler):
    with CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None):
        status, reply = reply_of(raw(sock_path, http("POST", cniserver.DRAIN_PATH)))
        assert status == 404 and reply.msg == "no such endpoint: POST /v1/drain"
    with CniServer(sock_path, handler, allowed_uids=(os.getuid(),), owner=None,
                   drain=lambda: "done"):
        data = raw(sock_path, http("POST", cniserver.DRAIN_PATH))
        assert protocol.StatusReply.from_json(data.partition(b"\r\n\r\n")[2]) == \
            protocol.StatusReply(False, "done")
