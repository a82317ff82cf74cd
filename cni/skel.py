"""The CNI skeleton: env + stdin in, result or error JSON out.

Shaped like Go's ``pkg/skel``: a ``Dispatcher`` holds injected ``getenv``,
``stdin``, ``stdout`` and ``stderr`` (binary streams), so tests drive it with a
dict and ``BytesIO`` objects and no process. It validates the environment from
one table (all missing variables reported in one code-4 error), decodes and
checks the config (6: not JSON, 7: bad ``name``, 1: version), then calls the
plugin's method for the command. A ``CniError`` is printed as the spec's error
JSON on stdout; anything else becomes code 999. Logs go to stderr only, one
line each, never a traceback.
"""
from __future__ import annotations

import json
import os

from merbridge.cni import errors, version
from merbridge.cni.errors import CniError

#: larger configs are refused: a real one (config + prevResult) is a few KiB
MAX_STDIN = 1 << 20
MAX_IFNAME = 15

ADD, DEL, CHECK, VERSION, STATUS, GC = "ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"
COMMANDS = (ADD, DEL, CHECK, VERSION, STATUS, GC)
#: the plugin method each command calls
METHODS = {ADD: "add", DEL: "delete", CHECK: "check", STATUS: "status", GC: "gc"}
#: commands that act on one container (its id, netns and ifname are checked)
CONTAINER_COMMANDS = (ADD, DEL, CHECK)

#: (variable, commands that require it). The spec makes CNI_NETNS optional on
#: DEL and CNI_PATH optional on STATUS.
ENV_TABLE = (
    ("CNI_COMMAND", COMMANDS),
    ("CNI_CONTAINERID", (ADD, CHECK, DEL)),
    ("CNI_NETNS", (ADD, CHECK)),
    ("CNI_IFNAME", (ADD, CHECK, DEL)),
    ("CNI_ARGS", ()),
    ("CNI_PATH", (ADD, CHECK, DEL, GC)),
    ("CNI_NETNS_OVERRIDE", ()),
)

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class Log:
    """One-line logs on stderr (the runtime owns stdout)."""

    def __init__(self, stream, level: str = "info", prefix: str = "merbridge-cni") -> None:
        self.stream = stream
        self.level = LEVELS.get(level, 20)
        self.prefix = prefix

    def _write(self, level: int, name: str, msg: str) -> None:
        if level < self.level:
            return
        line = f"{self.prefix} {name}: {msg}\n"
        try:
            self.stream.write(line.encode("utf-8", "backslashreplace"))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not turn a success into a failure

    def debug(self, msg: str) -> None:
        self._write(10, "DEBUG", msg)

    def info(self, msg: str) -> None:
        self._write(20, "INFO", msg)

    def warning(self, msg: str) -> None:
        self._write(30, "WARNING", msg)

    def error(self, msg: str) -> None:
        self._write(40, "ERROR", msg)


class CmdArgs:
    """One invocation, validated: the CNI_* values and the decoded config."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path",
                 "netns_override", "stdin_data", "config", "cni_version")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 args: str = "", path: str = "", netns_override: str = "",
                 stdin_data: bytes = b"", config: dict | None = None,
                 cni_version: str = version.CURRENT) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args
        self.path = path
        self.netns_override = netns_override
        self.stdin_data = stdin_data
        self.config = config if config is not None else {}
        self.cni_version = cni_version


def valid_id(text: str) -> bool:
    """The spec's rule for container ids and network names: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``."""
    return bool(text) and text[0] not in "_.-" and all(c in _ID_CHARS for c in text)


def check_ifname(name: str) -> None:
    if len(name) > MAX_IFNAME:
        raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES, "interface name is too long",
                       f"interface name should be less than {MAX_IFNAME + 1} characters")
    if name in (".", ".."):
        raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in name):
        raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES,
                       "interface name contains / or : or whitespace characters")


def same_netns_as_self(path: str) -> bool:
    """True when ``path`` is the netns this process runs in (a misconfigured runtime)."""
    try:
        ours, theirs = os.stat("/proc/self/ns/net"), os.stat(path)
    except OSError:
        return False  # gone or unreadable: not ours; the daemon judges the rest
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # 1e999 would come back out as "Infinity", which is not JSON
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def decode_config(data: bytes) -> dict:
    """stdin bytes -> config object; CniError 6 (decoding) or 7 (name)."""
    if len(data) > MAX_STDIN:
        raise CniError(errors.DECODING_FAILURE, "network config too large",
                       f"more than {MAX_STDIN} bytes on stdin")
    try:
        text = data.decode("utf-8")
        conf = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise CniError(errors.DECODING_FAILURE, "error decoding network config",
                       f"not UTF-8 at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise CniError(errors.DECODING_FAILURE, "error decoding network config",
                       str(e)[:200]) from None
    if not isinstance(conf, dict):
        raise CniError(errors.DECODING_FAILURE, "error decoding network config",
                       f"expected a JSON object, got {type(conf).__name__}")
    name = conf.get("name")
    if name is not None and not isinstance(name, str):
        raise CniError(errors.DECODING_FAILURE, "error decoding network config",
                       '"name" must be a string')
    if not name:
        raise CniError(errors.INVALID_NETWORK_CONFIG, "missing network name")
    if not valid_id(name):
        raise CniError(errors.INVALID_NETWORK_CONFIG,
                       "invalid characters found in network name", name[:100])
    cni_version = conf.get("cniVersion", "")
    if not isinstance(cni_version, str):
        raise CniError(errors.DECODING_FAILURE, "error decoding network config",
                       '"cniVersion" must be a string')
    return conf


class Dispatcher:
    """Runs one CNI invocation against a plugin object with injected I/O."""

    def __init__(self, getenv=os.environ.get, stdin=None, stdout=None, stderr=None,
                 same_netns=same_netns_as_self, about: str = "") -> None:
        self.getenv = getenv
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.same_netns = same_netns
        self.about = about
        self.log = Log(stderr)

    def env_args(self) -> CmdArgs:
        """Read CNI_* from the table; one code-4 error lists every missing variable."""
        values = {name: (self.getenv(name) or "") for name, _ in ENV_TABLE}
        command = values["CNI_COMMAND"]
        missing = [name for name, needed in ENV_TABLE
                   if not values[name] and (name == "CNI_COMMAND" or command in needed)]
        if missing:
            if not command and self.about:
                self.log.error(f"{self.about}; CNI protocol versions supported: "
                               + ", ".join(version.SUPPORTED))
            raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES,
                           f"required env variables [{','.join(missing)}] missing")
        if command not in COMMANDS:
            raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES,
                           f"unknown CNI_COMMAND: {command[:40]}")
        return CmdArgs(command, values["CNI_CONTAINERID"], values["CNI_NETNS"],
                       values["CNI_IFNAME"], values["CNI_ARGS"], values["CNI_PATH"],
                       values["CNI_NETNS_OVERRIDE"])

    def read_stdin(self) -> bytes:
        try:
            data = self.stdin.read(MAX_STDIN + 1)
        except (OSError, ValueError) as e:
            raise CniError(errors.IO_FAILURE, "error reading from stdin", str(e)) from None
        return data if isinstance(data, bytes) else b""

    def prepare(self, cmd: CmdArgs) -> None:
        """Decode stdin into ``cmd.config`` and apply the skel's checks, in Go's order."""
        cmd.stdin_data = self.read_stdin()
        cmd.config = decode_config(cmd.stdin_data)
        cmd.cni_version = cmd.config.get("cniVersion") or version.IMPLICIT
        if cmd.command in CONTAINER_COMMANDS:
            if not valid_id(cmd.container_id):
                raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES,
                               "invalid characters in containerID", cmd.container_id[:100])
            check_ifname(cmd.ifname)
        version.check(cmd.cni_version, cmd.command)
        override = cmd.netns_override.lower() in ("1", "true")
        if cmd.netns and cmd.command in CONTAINER_COMMANDS and not override \
                and self.same_netns(cmd.netns):
            raise CniError(errors.INVALID_NETNS,
                           "plugin's netns and netns from CNI_NETNS should not be the same")

    def emit(self, obj: dict) -> None:
        self.stdout.write(json.dumps(obj).encode("ascii") + b"\n")
        self.stdout.flush()

    def run(self, plugin) -> int:
        """Dispatch to ``plugin.<add|delete|check|status|gc>(cmd)``; return the exit code."""
        cmd = None
        try:
            cmd = self.env_args()
            if cmd.command == VERSION:
                self.emit(version.info())  # stdin is not read, as in Go's skel
                return 0
            self.prepare(cmd)
            set_level = getattr(plugin, "configure_log", None)
            if set_level is not None:
                set_level(cmd, self.log)
            result = getattr(plugin, METHODS[cmd.command])(cmd)
            if result is not None:
                self.emit(result)
            return 0
        except CniError as e:
            err = e
        except (Exception, KeyboardInterrupt) as e:  # the one catch-all, as in Go's skel
            err = CniError(errors.INTERNAL, "internal error", f"{type(e).__name__}: {e}"[:500])
        self.log.error(f"{cmd.command if cmd else '?'} "
                       f"{cmd.container_id if cmd else ''}: code {err.code}: {err}")
        cni_version = version.CURRENT
        if cmd is not None and cmd.cni_version in version.SUPPORTED:
            cni_version = cmd.cni_version
        try:
            self.emit(err.to_dict(cni_version))
        except (OSError, ValueError):
            pass
        return 1
