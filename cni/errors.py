"""CNI error codes and the one exception type of the CNI path, plugin and daemon.

The numbers are the CNI specification's well-known codes (0-99 are reserved by
the spec) and ours (101-104, below). Everything the plugin reports to the
runtime is a ``CniError``; the skel turns any other exception into
``INTERNAL`` (999), so the runtime always receives the spec's error JSON and
never a traceback. The daemon raises the same type (its pod registry, its
plumbing, its CNI server's refusals); the server turns it into an
``ErrorReply`` with that code, which the plugin re-emits unchanged
(``protocol.py`` is the wire contract, this module its error half).
"""
from __future__ import annotations

INCOMPATIBLE_CNI_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT_VARIABLES = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
INVALID_NETNS = 8
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999

# ours (100+): what the daemon's pod registry answers
#: the pod's annotations or manifest cannot be used (nothing was written)
INVALID_ANNOTATIONS = 101
#: no IP in prevResult, in the pod's status or on its interface
NO_POD_IP = 102
#: CHECK: the pod is in the mesh but its enrolment is missing or incomplete
NOT_ENROLLED = 103
#: the datapath's maps hold no more pods
NODE_FULL = 104

#: codes a daemon reply may carry (anything else is reported as INTERNAL)
KNOWN_CODES = frozenset({
    INCOMPATIBLE_CNI_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER,
    INVALID_ENVIRONMENT_VARIABLES, IO_FAILURE, DECODING_FAILURE,
    INVALID_NETWORK_CONFIG, INVALID_NETNS, TRY_AGAIN_LATER,
    PLUGIN_NOT_AVAILABLE, LIMITED_CONNECTIVITY, INTERNAL,
})


def valid_code(code: object) -> bool:
    """True for a code the plugin may pass on: a spec code or a plugin code (>= 100)."""
    return (isinstance(code, int) and not isinstance(code, bool)
            and (code in KNOWN_CODES or 100 <= code <= 0xFFFF))


class CniError(Exception):
    """An error for the runtime: ``{cniVersion, code, msg, details}`` on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"{self.msg}; {self.details}" if self.details else self.msg

    def __repr__(self) -> str:
        return f"CniError({self.code!r}, {self.msg!r}, {self.details!r})"
