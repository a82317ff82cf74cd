"""HTTP/1.1 over the daemon's unix socket, with a timeout (stdlib only).

``DaemonClient.call`` posts a ``CniRequest`` and returns the daemon's extras,
or raises ``CniError`` with the code the daemon sent. ``DaemonUnavailable``
means no answer at all (no socket, refused, timed out, connection dropped):
the plugin decides what that means per command (ADD: try again later, DEL:
success, STATUS: not available).
"""
from __future__ import annotations

import http.client
import socket

from . import errors, protocol
from .errors import CniError


class DaemonUnavailable(Exception):
    """The daemon could not be reached or did not answer in time."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("merbridge", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            try:
                conn.connect()
            except OSError as e:  # ENOENT, ECONNREFUSED, EACCES, timeout
                raise DaemonUnavailable(f"cannot connect to {self.socket_path}: {e}") from None
            try:
                headers = {"Content-Type": protocol.CONTENT_TYPE} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read(protocol.MAX_BODY + 1)
            except (OSError, http.client.HTTPException) as e:
                raise DaemonUnavailable(f"no reply from {self.socket_path}: "
                                        f"{type(e).__name__}: {e}") from None
            return resp.status, data
        finally:
            conn.close()

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
