"""The client of ``POST /v1/drain`` on the CNI socket, for ``merbridge drain``
(the DaemonSet's preStop): the daemon's side is ``cniserver`` and
``runtime.Daemon.drain``.
"""
from __future__ import annotations

import errno
import http.client
import socket
import time

from merbridge.cni import errors, protocol
from merbridge.daemon.cniserver import DRAIN_PATH


class NotServing(Exception):
    """No daemon answers on the socket (none running, or legacy mode): nothing to drain."""


class DrainError(Exception):
    """The daemon answered but did not drain; the message says why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("merbridge", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


_ABSENT = (errno.ENOENT, errno.ECONNREFUSED)


def request_drain(socket_path: str, timeout: float, retry_every: float = 0.5) -> str:
    """POST /v1/drain until the daemon has drained (its detail), retrying while it
    answers "try again later" (starting) for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        conn = _UnixConnection(socket_path, max(deadline - time.monotonic(), 0.1))
        try:
            conn.request("POST", DRAIN_PATH, body=b"")
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except OSError as exc:
            if exc.errno in _ABSENT:
                raise NotServing(f"no merbridge daemon serves {socket_path}: "
                                 f"{exc.strerror}") from None
            raise DrainError(f"{socket_path}: {exc}") from None
        except http.client.HTTPException as exc:
            raise DrainError(f"{socket_path}: bad reply: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        try:
            if status == 200:
                return protocol.StatusReply.from_json(data).detail
            reply = protocol.ErrorReply.from_json(data)
        except protocol.ProtocolError as exc:
            raise DrainError(f"{socket_path}: bad reply (HTTP {status}): {exc}") from None
        if reply.code != errors.TRY_AGAIN_LATER:
            raise DrainError(f"{reply.msg}: {reply.details}" if reply.details else reply.msg)
        if time.monotonic() + retry_every > deadline:
            raise DrainError(f"not drained within {timeout:g}s: {reply.msg}: {reply.details}")
        time.sleep(retry_every)
