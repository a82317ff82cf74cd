"""The plugin, run inside the daemon for the node's static executable.

The executable the runtime runs (``cni/static``, a static Go binary that needs
nothing from the node) forwards its invocation -- ``CNI_*`` variables and
stdin -- to the daemon (``POST /v1/cni/exec``); the daemon runs it here
through the very same ``skel.Dispatcher`` and ``plugin.Plugin`` the Python
executable runs, with a client that reaches the daemon's handler directly
instead of through the socket, and sends back what the plugin printed and its
exit status. So the CNI semantics stay defined once, in this package.

``execute`` serves one forwarded invocation; ``replay`` runs a remembered
fail-open ADD (``pending.py``) once the daemon is back.

``post(req) -> (http status, AddReply | ErrorReply)`` and ``status() ->
(http status, StatusReply)`` are the daemon's answers as the socket would
have sent them, so ``LocalClient`` reads them exactly as ``DaemonClient``
reads the socket's.
"""
from __future__ import annotations

import io
from typing import Callable

from merbridge.cni import errors, protocol, skel
from merbridge.cni.errors import CniError
from merbridge.cni.main import ABOUT
from merbridge.cni.plugin import Plugin

Post = Callable[[protocol.CniRequest], tuple]
Status = Callable[[], tuple]


class LocalClient:
    """``DaemonClient``'s contract without the socket."""

    def __init__(self, post: Post, status: Status) -> None:
        self._post, self._status = post, status

    def call(self, req: protocol.CniRequest) -> dict:
        status, reply = self._post(req)
        if status == 200:
            return reply.result
        code = reply.code if errors.valid_code(reply.code) else errors.INTERNAL
        raise CniError(code, reply.msg, reply.details)

    def status(self) -> protocol.StatusReply:
        return self._status()[1]


def execute(req: protocol.ExecRequest, post: Post, status: Status,
            same_netns: Callable[[str], bool] = lambda path: False,
            replay: bool = False) -> protocol.ExecReply:
    """Run one invocation as the plugin executable would; its output and exit status."""
    out, err = io.BytesIO(), io.BytesIO()
    plugin = Plugin(client_factory=lambda conf: LocalClient(post, status), replay=replay)
    code = skel.Dispatcher(req.getenv, io.BytesIO(req.stdin), out, err, same_netns=same_netns,
                           about=ABOUT).run(plugin)
    return protocol.ExecReply(code, out.getvalue(), err.getvalue())


def error_code(reply: protocol.ExecReply) -> int:
    """0 for success, else the CNI code of the error the plugin printed (999 if unreadable)."""
    if reply.exit == 0:
        return 0
    try:
        import json
        code = json.loads(reply.stdout).get("code")
    except (ValueError, AttributeError):
        return errors.INTERNAL
    return code if errors.valid_code(code) else errors.INTERNAL


def replay(data: bytes, post: Post, status: Status) -> tuple[int, str]:
    """Replay a remembered ADD: ``(0, "")`` done, ``(11, why)`` try again later,
    ``(code, why)`` given up (bad record, pod gone, ...)."""
    try:
        req = protocol.ExecRequest.from_json(data)
    except protocol.ProtocolError as e:
        return errors.DECODING_FAILURE, f"unreadable record: {e}"
    if req.getenv("CNI_COMMAND") != skel.ADD:
        return errors.INVALID_ENVIRONMENT_VARIABLES, "not an ADD"
    reply = execute(req, post, status, replay=True)
    code = error_code(reply)
    return code, reply.stdout.decode("utf-8", "replace").strip() if code else ""
