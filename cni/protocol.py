"""The plugin <-> daemon wire contract (HTTP/1.1 over the daemon's unix socket).

This module is the whole contract, with its error half in ``errors.py`` (the
one ``CniError`` and every code) and the defaults both ends share (the socket
path, the excluded namespaces). Requests and replies are JSON objects, each mirrored by an
immutable record with ``to_json``/``from_json``. ``from_json`` checks every
type and size and raises ``ProtocolError`` (a ValueError); unknown fields are
ignored, so a plugin and a daemon one release apart still understand each other.
The records are ``_Record`` subclasses, not dataclasses: importing
``dataclasses`` (and the ``inspect`` it pulls in) costs ~7 ms on every pod start.

Endpoints:

==========================  ==============  =========================================
``POST /v1/cni/add``        ``CniRequest``  200 ``AddReply``; else ``ErrorReply``
``POST /v1/cni/del``        ``CniRequest``  200 ``AddReply`` (empty); else ``ErrorReply``
``POST /v1/cni/check``      ``CniRequest``  200 ``AddReply`` (empty); else ``ErrorReply``
``POST /v1/cni/gc``         ``CniRequest``  200 ``AddReply`` (empty); else ``ErrorReply``
``GET  /v1/status``         (none)          200 or 503 ``StatusReply``
``POST /v1/cni/exec``       ``ExecRequest`` 200 ``ExecReply``; else ``ErrorReply``
==========================  ==============  =========================================

``/v1/cni/exec`` is what the node's static plugin executable (``cni/static``)
sends: the invocation itself (the ``CNI_*`` variables and stdin, as bytes),
which the daemon runs through this package's skel and plugin in-process
(``cni/inprocess.py``) and answers with what the plugin would have printed
and its exit status. The same record is what a fail-open ADD leaves in the
pending directory when no daemon answers (``plugin.py``), for the daemon to
replay when it is back. Go's copies of these names are generated from this
module (``cni/gocontract.py``; ``tests/unit/test_static_plugin.py`` checks).

An ``ErrorReply`` carries a CNI code (spec codes, or ours from 100) which the
plugin re-emits to the runtime unchanged.
"""
from __future__ import annotations

import ipaddress
import json

API = "/v1"
PATHS = {"ADD": API + "/cni/add", "DEL": API + "/cni/del",
         "CHECK": API + "/cni/check", "GC": API + "/cni/gc"}
COMMAND_OF_PATH = {path: command for command, path in PATHS.items()}
STATUS_PATH = API + "/status"
EXEC_PATH = API + "/cni/exec"
CONTENT_TYPE = "application/json"
#: the variables an ExecRequest carries: the CNI spec's, as the skel reads them
EXEC_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
            "CNI_PATH", "CNI_NETNS_OVERRIDE")

#: caps that bound what either side must buffer or trust
MAX_BODY = 1 << 20
MAX_STR = 1024
MAX_PATH = 4096
MAX_IPS = 64
MAX_INTERFACES = 64
MAX_ATTACHMENTS = 8192
MAX_RESULT_KEYS = 64
#: stdin beyond this is refused by the skel (code 6); the executable forwards at most one more byte
MAX_STDIN = 1 << 20
#: an ExecRequest/ExecReply carries up to MAX_STDIN + 1 bytes of stdin or output, base64-encoded
MAX_EXEC_BODY = 2 << 20

#: defaults of both ends (the plugin's netconf, the daemon's flags), defined here only
DEFAULT_SOCKET_PATH = "/var/run/merbridge-cni.sock"
#: as istio-cni: system pods and Istio's own control plane are never intercepted
DEFAULT_EXCLUDE_NAMESPACES = ("kube-system", "istio-system")


class ProtocolError(ValueError):
    """A message that does not follow this contract."""


class _Record:
    """An immutable value: ``_fields`` (name, default) pairs, set once in __init__.

    Each subclass also annotates its fields at class level, for type checkers:
    an annotation without a value creates no class attribute, so it neither
    clashes with ``__slots__`` nor costs anything at import.
    """

    __slots__ = ()
    _fields: tuple[tuple[str, object], ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} arguments")
        for i, (name, default) in enumerate(self._fields):
            if i < len(args):
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__} got {name!r} twice")
                value = args[i]
            else:
                value = kwargs.pop(name, default)
                if value is _REQUIRED:
                    raise TypeError(f"{type(self).__name__} needs {name!r}")
                if isinstance(value, dict):   # a mutable default: each record its own
                    value = dict(value)
            object.__setattr__(self, name, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kwargs))!r}")
        self._check()

    def _check(self) -> None:
        """Validation hook, run by __init__."""

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name, _ in self._fields)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + self._values())   # TypeError if it holds a dict

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._fields)
        return f"{type(self).__name__}({inner})"


_REQUIRED = object()


def _str(obj: dict, key: str, limit: int = MAX_STR, required: bool = False) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{key!r} longer than {limit} characters")
    if "\0" in value:
        raise ProtocolError(f"{key!r} contains NUL")
    if required and not value:
        raise ProtocolError(f"{key!r} is required")
    return value


def _list(obj: dict, key: str, limit: int) -> list:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"{key!r} must be a list")
    if len(value) > limit:
        raise ProtocolError(f"{key!r} has more than {limit} items")
    return value


def _object(data: bytes, limit: int = MAX_BODY) -> dict:
    if not isinstance(data, (bytes, bytearray)) or len(data) > limit:
        raise ProtocolError(f"body must be at most {limit} bytes")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"body is not UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a JSON object")
    return obj


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def normalize_ip(text: str) -> str:
    """``"10.0.0.2/24"`` -> itself; ``"fd00:0::2/64"`` -> ``"fd00::2/64"``; ProtocolError if bad."""
    if not isinstance(text, str) or "/" not in text or len(text) > 64:
        raise ProtocolError(f"ip {str(text)[:64]!r} must be 'address/prefix'")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ProtocolError(f"ip {text[:64]!r} is not a valid 'address/prefix'") from None
    if iface.ip.is_unspecified:
        raise ProtocolError(f"ip {text[:64]!r} is the unspecified address, no pod's address")
    return str(iface)


class Interface(_Record):
    """An interface of the pod (``prevResult.interfaces`` entries with a sandbox)."""

    __slots__ = ("name", "sandbox")
    name: str
    sandbox: str
    _fields = (("name", _REQUIRED), ("sandbox", ""))


class Attachment(_Record):
    """A (container id, ifname) pair the runtime still considers valid (GC)."""

    __slots__ = ("container_id", "ifname")
    container_id: str
    ifname: str
    _fields = (("container_id", _REQUIRED), ("ifname", _REQUIRED))


class CniRequest(_Record):
    """One CNI command forwarded by the plugin.

    ``command`` is ADD, DEL, CHECK or GC. ADD and CHECK need ``container_id``,
    ``netns`` and ``ifname``; DEL needs ``container_id`` and ``ifname`` (the
    netns may already be gone); GC needs only ``attachments`` (possibly empty:
    then nothing is still valid).
    """

    # ips: pod addresses from prevResult, "addr/prefix", both families;
    # network: the network (conflist) name
    _fields = (("command", _REQUIRED), ("container_id", ""), ("netns", ""), ("ifname", ""),
               ("pod_namespace", ""), ("pod_name", ""), ("pod_uid", ""), ("ips", ()),
               ("interfaces", ()), ("cni_version", ""), ("network", ""), ("attachments", ()))
    __slots__ = tuple(name for name, _ in _fields)
    command: str
    container_id: str
    netns: str
    ifname: str
    pod_namespace: str
    pod_name: str
    pod_uid: str
    ips: tuple[str, ...]
    interfaces: tuple[Interface, ...]
    cni_version: str
    network: str
    attachments: tuple[Attachment, ...]

    def _check(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.command not in PATHS:
            raise ProtocolError(f"unknown command {str(self.command)[:20]!r}")
        d = self.to_dict()
        for key in ("container_id", "ifname", "pod_namespace", "pod_name", "pod_uid",
                    "cni_version", "network"):
            _str(d, key)
        _str(d, "netns", MAX_PATH)
        if self.command in ("ADD", "CHECK", "DEL"):
            _str(d, "container_id", required=True)
            _str(d, "ifname", required=True)
        if self.command in ("ADD", "CHECK"):
            _str(d, "netns", MAX_PATH, required=True)
        if len(self.ips) > MAX_IPS or len(self.interfaces) > MAX_INTERFACES \
                or len(self.attachments) > MAX_ATTACHMENTS:
            raise ProtocolError("too many ips, interfaces or attachments")
        for ip in self.ips:
            if normalize_ip(ip) != ip:
                raise ProtocolError(f"ip {ip!r} is not normalized")
        for iface in self.interfaces:
            if not isinstance(iface, Interface):
                raise ProtocolError("interfaces must be Interface objects")
            _str({"name": iface.name}, "name")
            _str({"sandbox": iface.sandbox}, "sandbox", MAX_PATH)
        for att in self.attachments:
            if not isinstance(att, Attachment):
                raise ProtocolError("attachments must be Attachment objects")
            _str({"container_id": att.container_id}, "container_id", required=True)
            _str({"ifname": att.ifname}, "ifname")

    def to_dict(self) -> dict:
        return {"command": self.command, "container_id": self.container_id,
                "netns": self.netns, "ifname": self.ifname,
                "pod_namespace": self.pod_namespace, "pod_name": self.pod_name,
                "pod_uid": self.pod_uid, "ips": list(self.ips),
                "interfaces": [{"name": i.name, "sandbox": i.sandbox}
                               for i in self.interfaces if isinstance(i, Interface)],
                "cni_version": self.cni_version, "network": self.network,
                "attachments": [{"container_id": a.container_id, "ifname": a.ifname}
                                for a in self.attachments if isinstance(a, Attachment)]}

    def to_json(self) -> bytes:
        return _dump(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes, command: str | None = None) -> CniRequest:
        """Decode and validate; ``command`` (from the URL) must match the body's."""
        obj = _object(data)
        cmd = _str(obj, "command", 16, required=True)
        if command is not None and cmd != command:
            raise ProtocolError(f"command {cmd!r} posted to the {command} endpoint")
        ips = tuple(normalize_ip(ip) for ip in _list(obj, "ips", MAX_IPS))
        ifaces = []
        for i in _list(obj, "interfaces", MAX_INTERFACES):
            if not isinstance(i, dict):
                raise ProtocolError("each interface must be an object")
            ifaces.append(Interface(_str(i, "name"), _str(i, "sandbox", MAX_PATH)))
        atts = []
        for a in _list(obj, "attachments", MAX_ATTACHMENTS):
            if not isinstance(a, dict):
                raise ProtocolError("each attachment must be an object")
            atts.append(Attachment(_str(a, "container_id", required=True), _str(a, "ifname")))
        return cls(command=cmd, container_id=_str(obj, "container_id"),
                   netns=_str(obj, "netns", MAX_PATH), ifname=_str(obj, "ifname"),
                   pod_namespace=_str(obj, "pod_namespace"), pod_name=_str(obj, "pod_name"),
                   pod_uid=_str(obj, "pod_uid"), ips=ips, interfaces=tuple(ifaces),
                   cni_version=_str(obj, "cni_version"), network=_str(obj, "network"),
                   attachments=tuple(atts))


class AddReply(_Record):
    """Success. ``result`` holds extras from the daemon (e.g. the mark key), for logs only:
    the plugin always prints ``prevResult`` unchanged."""

    __slots__ = ("result",)
    result: dict
    _fields: tuple[tuple[str, object], ...] = (("result", {}),)

    def to_json(self) -> bytes:
        return _dump({"result": self.result})

    @classmethod
    def from_json(cls, data: bytes) -> AddReply:
        obj = _object(data)
        result = obj.get("result", {})
        if not isinstance(result, dict) or len(result) > MAX_RESULT_KEYS:
            raise ProtocolError(f"'result' must be an object of at most {MAX_RESULT_KEYS} keys")
        return cls(result)


class ErrorReply(_Record):
    """Failure, with the CNI code the plugin passes on."""

    __slots__ = ("code", "msg", "details")
    code: int
    msg: str
    details: str
    _fields = (("code", _REQUIRED), ("msg", _REQUIRED), ("details", ""))

    def to_json(self) -> bytes:
        return _dump({"code": self.code, "msg": self.msg, "details": self.details})

    @classmethod
    def from_json(cls, data: bytes) -> ErrorReply:
        obj = _object(data)
        code = obj.get("code")
        if isinstance(code, bool) or not isinstance(code, int) or not 0 < code <= 0xFFFF:
            raise ProtocolError("'code' must be a positive integer")
        return cls(code, _str(obj, "msg", required=True), _str(obj, "details", MAX_PATH))


class StatusReply(_Record):
    """``GET /v1/status``: whether the daemon can service ADD now."""

    __slots__ = ("ready", "detail")
    ready: bool
    detail: str
    _fields = (("ready", _REQUIRED), ("detail", ""))

    def to_json(self) -> bytes:
        return _dump({"ready": self.ready, "detail": self.detail})

    @classmethod
    def from_json(cls, data: bytes) -> StatusReply:
        obj = _object(data)
        if not isinstance(obj.get("ready"), bool):
            raise ProtocolError("'ready' must be a boolean")
        return cls(obj["ready"], _str(obj, "detail", MAX_PATH))


def _b64(obj: dict, key: str, limit: int) -> bytes:
    import base64
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > (limit + 2) // 3 * 4:
        raise ProtocolError(f"{key!r} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ProtocolError(f"{key!r} is not base64") from None


def _b64text(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode("ascii")


class ExecRequest(_Record):
    """One invocation of the plugin executable: its ``CNI_*`` variables (only the
    names of ``EXEC_ENV``, values as bytes) and its stdin."""

    __slots__ = ("env", "stdin")
    env: dict[str, bytes]
    stdin: bytes
    _fields: tuple[tuple[str, object], ...] = (("env", {}), ("stdin", b""))

    def _check(self) -> None:
        if not isinstance(self.env, dict) or not all(
                k in EXEC_ENV and isinstance(v, bytes) and len(v) <= MAX_PATH
                for k, v in self.env.items()):
            raise ProtocolError(f"env must map names of {EXEC_ENV} to at most {MAX_PATH} bytes")
        if not isinstance(self.stdin, bytes) or len(self.stdin) > MAX_STDIN + 1:
            raise ProtocolError(f"stdin must be at most {MAX_STDIN + 1} bytes")

    def getenv(self, name: str) -> str | None:
        """The variable as ``os.environ`` would show it (undecodable bytes as surrogates)."""
        value = self.env.get(name)
        return None if value is None else value.decode("utf-8", "surrogateescape")

    def to_json(self) -> bytes:
        return _dump({"env": {k: _b64text(v) for k, v in sorted(self.env.items())},
                      "stdin": _b64text(self.stdin)})

    @classmethod
    def from_json(cls, data: bytes) -> ExecRequest:
        obj = _object(data, MAX_EXEC_BODY)
        env = obj.get("env", {})
        if not isinstance(env, dict) or len(env) > len(EXEC_ENV):
            raise ProtocolError("'env' must be an object")
        return cls({k: _b64(env, k, MAX_PATH) for k in env}, _b64(obj, "stdin", MAX_STDIN + 1))


class ExecReply(_Record):
    """What the plugin printed (stdout, stderr) and its exit status."""

    __slots__ = ("exit", "stdout", "stderr")
    exit: int
    stdout: bytes
    stderr: bytes
    _fields = (("exit", 0), ("stdout", b""), ("stderr", b""))

    def to_json(self) -> bytes:
        return _dump({"exit": self.exit, "stdout": _b64text(self.stdout),
                      "stderr": _b64text(self.stderr[-MAX_STDIN:])})

    @classmethod
    def from_json(cls, data: bytes) -> ExecReply:
        obj = _object(data, MAX_EXEC_BODY)
        code = obj.get("exit")
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise ProtocolError("'exit' must be an integer in 0..255")
        return cls(code, _b64(obj, "stdout", MAX_STDIN + 1), _b64(obj, "stderr", MAX_STDIN))
