"""HTTP/1.1 over the daemon's unix socket, with a timeout (stdlib only).

``DaemonClient.call`` posts a ``CniRequest`` and returns the daemon's extras,
or raises ``CniError`` with the code the daemon sent. ``DaemonUnavailable``
means no answer at all (no socket, refused, timed out, connection dropped,
not an HTTP reply): the plugin decides what that means per command (ADD: try
again later, DEL: success, STATUS: not available).

The exchange is written out here rather than done with ``http.client``: that
module imports ``email`` and ``ssl`` and cost ~21 ms of the plugin's start on
every pod creation. The daemon's side is the standard ``http.server``; one
request per connection, ``Connection: close``, bodies with ``Content-Length``.
"""
from __future__ import annotations

import socket
import time

from merbridge.cni import errors, protocol
from merbridge.cni.errors import CniError

#: a reply's status line and headers may take this much beyond the body
MAX_HEAD = 16 * 1024


class DaemonUnavailable(Exception):
    """The daemon could not be reached or did not answer in time."""


def parse_response(raw: bytes, eof: bool = False) -> tuple[int, bytes] | None:
    """(status, body) of the HTTP/1.x reply in ``raw``; None while it is incomplete
    (``eof``: the daemon closed the connection, nothing more will come).

    Raises ValueError for bytes that are not an HTTP reply, or not all of one at eof."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        if len(raw) > MAX_HEAD:
            raise ValueError("reply headers too long")
        if eof:
            raise ValueError(f"connection closed after {len(raw)} bytes of an incomplete reply")
        return None
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit() or rest[3:4] not in (b"", b" "):
        raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"malformed header line: {line[:80]!r}")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            if not value.isdigit():
                raise ValueError(f"bad Content-Length: {value[:40]!r}")
            length = int(value)
    if length is None:        # the body runs to the end of the connection
        if not eof and len(body) <= protocol.MAX_BODY:
            return None
        length = len(body)
    if length > protocol.MAX_BODY:
        raise ValueError(f"reply body of more than {protocol.MAX_BODY} bytes")
    if len(body) < length:
        if eof:
            raise ValueError(f"connection closed after {len(body)} of {length} body bytes")
        return None
    return int(code), body[:length]


class DaemonClient:
    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout
        head = f"{method} {path} HTTP/1.1\r\nHost: merbridge\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: {protocol.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
        message = head.encode("ascii") + b"\r\n" + (body or b"")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            except OSError as e:  # ENOENT, ECONNREFUSED, EACCES, timeout
                raise DaemonUnavailable(f"cannot connect to {self.socket_path}: {e}") from None
            try:
                sock.sendall(message)
                raw = b""
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no complete reply within {self.timeout} s")
                    sock.settimeout(left)
                    chunk = sock.recv(65536)
                    raw += chunk
                    reply = parse_response(raw, eof=not chunk)
                    if reply is not None:
                        return reply
            except (OSError, ValueError) as e:
                raise DaemonUnavailable(f"no reply from {self.socket_path}: "
                                        f"{type(e).__name__}: {e}") from None
        finally:
            sock.close()

    def call(self, req: protocol.CniRequest) -> dict:
        """POST ``req`` to its endpoint; the daemon's extras, or CniError with its code."""
        status, data = self._request("POST", protocol.PATHS[req.command], req.to_json())
        try:
            if status == 200:
                return protocol.AddReply.from_json(data).result
            reply = protocol.ErrorReply.from_json(data)
        except protocol.ProtocolError as e:
            raise CniError(errors.INTERNAL, f"bad reply from merbridge daemon (HTTP {status})",
                           str(e)) from None
        code = reply.code if errors.valid_code(reply.code) else errors.INTERNAL
        raise CniError(code, reply.msg, reply.details)

    def status(self) -> protocol.StatusReply:
        status, data = self._request("GET", protocol.STATUS_PATH, None)
        try:
            return protocol.StatusReply.from_json(data)
        except protocol.ProtocolError as e:
            raise CniError(errors.INTERNAL, f"bad status reply from merbridge daemon "
                           f"(HTTP {status})", str(e)) from None
