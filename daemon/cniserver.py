"""The daemon's end of the CNI plugin: HTTP/1.1 on a root-only unix socket.

The wire format is ``merbridge.cni.protocol``, its errors ``merbridge.cni.errors``.
Each connection carries one request: the peer's uid is checked with
SO_PEERCRED, the request must arrive within ``request_timeout`` seconds and
within ``protocol.MAX_BODY`` bytes, then it is decoded (a validated
``CniRequest``) and handed to the handler: the pod registry, which implements
``CniHandler`` itself (``pods.Registry``).

This module is the single place where exceptions become error replies:

* ``CniError`` -> ``ErrorReply`` with its CNI code (the spec's or ours);
* ``protocol.ProtocolError`` -> 400 with code 6 (decoding failure);
* anything else -> 500 with code 999 (logged with its traceback here).

It is also the one place where CNI requests are counted: ``observe(command,
"ok" | "error", seconds)`` for each ADD, DEL, CHECK, GC and STATUS, from the
socket or from the in-process plugin alike.

Every branch returns right after writing its reply (Go merbridge's handlers
did not, and went on after a 500).

``POST /v1/cni/exec`` carries a whole invocation of the node's static plugin
executable (``protocol.ExecRequest``); it is run in-process through
``merbridge.cni.inprocess`` (the plugin's own skel and commands), whose calls
reach the handler through ``local_post``/``local_status`` with the same
answers the socket would give, and whose "plugin's own netns" is the peer's
(``/proc/<SO_PEERCRED pid>/ns/net``).

Besides the plugin's endpoints (``protocol.PATHS``, ``STATUS_PATH``) the socket
serves ``POST /v1/drain`` for ``merbridge drain`` (the DaemonSet's preStop),
when the server is given a ``drain`` (else 404); ``drain.request_drain`` is its client.
The reply is a ``StatusReply`` (ready: false, drain's detail), or an ``ErrorReply``.
"""
from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
import struct
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterable, Mapping, Protocol

from merbridge.cni import errors, protocol
from merbridge.cni.errors import CniError

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DRAIN_PATH = protocol.API + "/drain"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

class ServerError(Exception):
    """The socket cannot be served (path taken by a live server or by a non-socket)."""


class CniHandler(Protocol):
    """What the server calls (``pods.Registry``); raise ``CniError`` to fail a request."""

    def add(self, req: protocol.CniRequest) -> Mapping[str, Any] | None:
        """Enrol the pod; the returned extras go back to the plugin (for its log)."""

    def delete(self, req: protocol.CniRequest) -> None:
        """Withdraw the container; must succeed when there is nothing to undo."""

    def check(self, req: protocol.CniRequest) -> None:
        """Fail when our state for the container is missing or broken."""

    def gc(self, req: protocol.CniRequest) -> None:
        """Drop every container not in ``req.attachments``."""

    def status(self) -> tuple[bool, str] | None:
        """(ready, detail); None means ready; raising a CniError means not ready."""


def _coded(exc: BaseException) -> tuple[int, str, str] | None:
    """(code, msg, details) of a CniError whose code can go on the wire, else None."""
    if not isinstance(exc, CniError):
        return None
    code, msg, details = exc.code, exc.msg, exc.details
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code <= 0xFFFF \
            and isinstance(msg, str):
        return code, msg, details if isinstance(details, str) else str(details)
    return None


class _Reject(Exception):
    """A request refused before it reaches the handler: HTTP status + CNI error."""

    def __init__(self, status: int, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.status, self.reply = status, protocol.ErrorReply(code, msg, details)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "merbridge"
    default_request_version = "HTTP/1.1"  # never answer in HTTP/0.9 (no status line)
    server: _UnixServer

    def setup(self) -> None:
        # per blocking read/write (what StreamRequestHandler.setup does with a timeout)
        self.request.settimeout(self.server.request_timeout)
        super().setup()
        # and a bound on the whole read phase, against a client trickling bytes
        self._drained = False  # set once the whole request has been read
        self._deadline = threading.Timer(self.server.request_timeout, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        try:
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        if not self._drained:
            self._linger()
        self._deadline.cancel()

    def _linger(self) -> None:
        """Discard what the client still sends after an early reply (refused peer, 404,
        413, ...): closing with unread data would reset the connection and the client
        could lose the reply. Bounded by the deadline timer and a byte cap."""
        try:
            self.request.shutdown(socket.SHUT_WR)
            total = 0
            while total < 2 * protocol.MAX_BODY:
                chunk = self.request.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
        except OSError:
            pass

    def address_string(self) -> str:  # AF_UNIX peers have no address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("cni socket: " + format, *args)

    def handle(self) -> None:
        try:
            pid, uid, _ = _PEERCRED.unpack(self.request.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return
        self._peer_pid = pid
        if uid not in self.server.allowed_uids:
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
            log.warning("cni socket: refused pid %d uid %d", pid, uid)
            self._send(403, protocol.ErrorReply(errors.INTERNAL, "permission denied",
                                                f"uid {uid} may not use this socket"))
            return
        self.close_connection = True
        self.handle_one_request()

    # BaseHTTPRequestHandler calls this for malformed request lines and headers
    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        self.close_connection = True
        self._send(code, protocol.ErrorReply(errors.DECODING_FAILURE, message or "bad request",
                                             explain or ""))

    def _send(self, status: int, reply: Any) -> None:
        body = reply.to_json()
        try:
            self.send_response(status)
            self.send_header("Content-Type", protocol.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError as e:
            log.debug("cni socket: reply not delivered: %s", e)

    def _body(self, limit: int = protocol.MAX_BODY) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _Reject(411, errors.DECODING_FAILURE, "chunked bodies are not accepted")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _Reject(411, errors.DECODING_FAILURE, "Content-Length required")
        if int(length) > limit:
            raise _Reject(413, errors.DECODING_FAILURE, "request too large",
                          f"limit {limit} bytes")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            raise _Reject(408, errors.DECODING_FAILURE, "request body incomplete or too slow")
        self._drained = True
        self._deadline.cancel()  # the read phase is over; the handler may take its time
        return data

    def do_POST(self) -> None:
        self._serve(self._post)

    def do_GET(self) -> None:
        self._serve(self._get)

    def _post(self) -> tuple[int, Any]:
        if self.path == DRAIN_PATH and self.server.drain is not None:
            self._body()
            log.info("cni socket: drain requested")
            return 200, protocol.StatusReply(False, str(self.server.drain()))
        if self.path == protocol.EXEC_PATH:
            from merbridge.cni import inprocess
            req = protocol.ExecRequest.from_json(self._body(protocol.MAX_EXEC_BODY))
            return 200, inprocess.execute(req, self.server.local_post, self.server.local_status,
                                          same_netns=self._in_peer_netns)
        command = protocol.COMMAND_OF_PATH.get(self.path)
        if command is None:
            raise _Reject(404, errors.INTERNAL, f"no such endpoint: POST {self.path[:100]}")
        return self.server.forward(protocol.CniRequest.from_json(self._body(), command))

    def _in_peer_netns(self, path: str) -> bool:
        """Whether ``path`` is the network namespace of the plugin process we serve."""
        try:
            ours = os.stat(f"/proc/{int(self._peer_pid)}/ns/net")
            theirs = os.stat(path)
        except (OSError, ValueError):
            return False
        return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)

    def _get(self) -> tuple[int, Any]:
        if self.path != protocol.STATUS_PATH:
            raise _Reject(404, errors.INTERNAL, f"no such endpoint: GET {self.path[:100]}")
        self._drained = True
        self._deadline.cancel()
        return self.server.status()

    def _serve(self, route) -> None:
        self._send(*_answer(route, self.path))


def _forward(handler: Any, req: protocol.CniRequest) -> tuple[int, Any]:
    """One plugin command to the handler: (200, AddReply)."""
    log.debug("cni socket: %s %s %s/%s", req.command, req.container_id, req.pod_namespace,
              req.pod_name)
    if req.command == "ADD":
        extras = handler.add(req) or {}
        return 200, protocol.AddReply(dict(extras))
    {"DEL": handler.delete, "CHECK": handler.check, "GC": handler.gc}[req.command](req)
    return 200, protocol.AddReply()


def _status(handler: Any) -> tuple[int, Any]:
    try:
        state = handler.status()
    except Exception as e:
        coded = _coded(e)
        if coded is None:
            raise
        state = (False, f"{coded[1]}: {coded[2]}" if coded[2] else coded[1])
    ready, detail = (True, "ready") if state is None else state
    return (200 if ready else 503), protocol.StatusReply(bool(ready), str(detail))


def _answer(route, what: str) -> tuple[int, Any]:
    """The one place where exceptions become replies: (HTTP status, reply record)."""
    try:
        return route()
    except _Reject as e:
        return e.status, e.reply
    except protocol.ProtocolError as e:
        return 400, protocol.ErrorReply(errors.DECODING_FAILURE, "invalid request", str(e))
    except Exception as e:
        coded = _coded(e)
        if coded is not None:
            code, msg, details = coded
            log.info("cni socket: %s failed: code %d: %s %s", what, code, msg, details)
            http = 503 if code in (errors.TRY_AGAIN_LATER, errors.PLUGIN_NOT_AVAILABLE) else 500
            return http, protocol.ErrorReply(code, msg, details[:protocol.MAX_PATH])
        log.exception("cni socket: %s failed unexpectedly", what)
        return 500, protocol.ErrorReply(errors.INTERNAL, "internal error in merbridge daemon",
                                        f"{type(e).__name__}: {e}"[:500])


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # a node may start many pods at once
    allow_reuse_address = False

    def __init__(self, handler: CniHandler, allowed_uids: frozenset, request_timeout: float,
                 max_connections: int, drain: Callable[[], str] | None,
                 observe: Callable[[str, str, float], None] | None) -> None:
        # the address is bound later, privately, by CniServer._bind
        super().__init__("", _RequestHandler, bind_and_activate=False)
        self.handler, self.drain, self._observe = handler, drain, observe
        self.allowed_uids = allowed_uids
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)

    def _counted(self, command: str, fn: Callable[[], tuple[int, Any]]) -> tuple[int, Any]:
        t0, result = time.monotonic(), "error"
        try:
            status, reply = fn()
            if status == 200:
                result = "ok"
            return status, reply
        finally:
            if self._observe is not None:
                self._observe(command, result, time.monotonic() - t0)

    def forward(self, req: protocol.CniRequest) -> tuple[int, Any]:
        """One plugin command to the handler, counted."""
        return self._counted(req.command, lambda: _forward(self.handler, req))

    def status(self) -> tuple[int, Any]:
        return self._counted("STATUS", lambda: _status(self.handler))

    # the in-process plugin's way to the handler (merbridge.cni.inprocess)
    def local_post(self, req: protocol.CniRequest) -> tuple[int, Any]:
        return _answer(lambda: self.forward(req), protocol.PATHS[req.command])

    def local_status(self) -> tuple[int, Any]:
        return _answer(self.status, protocol.STATUS_PATH)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("cni socket: too many connections; dropping one")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class CniServer:
    """Serves ``handler`` on ``socket_path`` (mode 0600, owned by ``owner``) in a thread.

    ``drain`` answers ``POST /v1/drain`` (a detail for the log of ``merbridge
    drain``); ``observe(command, result, seconds)`` counts each request."""

    def __init__(self, socket_path: str, handler: CniHandler, *,
                 allowed_uids: Iterable[int] = (0,), owner: tuple[int, int] | None = (0, 0),
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 drain: Callable[[], str] | None = None,
                 observe: Callable[[str, str, float], None] | None = None) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.owner = owner
        self._server = _UnixServer(handler, frozenset(allowed_uids), request_timeout,
                                   max_connections, drain, observe)
        self._thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None

    def __enter__(self) -> CniServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._bind()
        self._server.server_activate()
        # a short poll keeps stop() quick; it costs ~20 idle wake-ups a second
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="cni-server", daemon=True)
        self._thread.start()
        log.info("CNI server listening on %s", self.socket_path)

    def _bind(self) -> None:
        """Bind privately, set mode and owner, then rename into place: the path is
        never connectable with looser permissions."""
        parent = os.path.dirname(self.socket_path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self._clear_stale()
        private = tempfile.mkdtemp(prefix=".mb-cni-", dir=parent)
        tmp = os.path.join(private, "s")
        try:
            if len(os.fsencode(tmp)) > 107:  # too long for sun_path: bind in place
                tmp = self.socket_path
            self._server.socket.bind(tmp)
            os.chmod(tmp, 0o600)
            if self.owner is not None:
                os.chown(tmp, *self.owner)
            if tmp != self.socket_path:
                os.rename(tmp, self.socket_path)
        except BaseException:
            self._server.server_close()
            raise
        finally:
            if os.path.lexists(os.path.join(private, "s")):
                os.unlink(os.path.join(private, "s"))
            os.rmdir(private)
        st = os.lstat(self.socket_path)
        self._inode = (st.st_dev, st.st_ino)

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.socket_path)  # left by a daemon that died
            log.info("removed stale socket %s", self.socket_path)
            return
        except OSError as e:
            raise ServerError(f"cannot probe {self.socket_path}: {e}") from e
        finally:
            probe.close()
        raise ServerError(f"another process is serving {self.socket_path}")

    def local_post(self, req: protocol.CniRequest) -> tuple[int, Any]:
        """A plugin command answered as over the socket (for ``merbridge.cni.inprocess``)."""
        return self._server.local_post(req)

    def local_status(self) -> tuple[int, Any]:
        return self._server.local_status()

    def stop(self) -> None:
        """Stop accepting, close the socket and remove the path if it is still ours."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._inode = None
