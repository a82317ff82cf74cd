"""Our part of the network config, and the pod identity from CNI_ARGS.

``parse_netconf`` turns the decoded stdin object into a ``NetConf`` with every
key checked and defaulted up front (as the Go meta plugins do), so the command
handlers start from a validated config. Our keys:

``socketPath``         the daemon's unix socket (default /var/run/merbridge-cni.sock)
``timeoutSeconds``     per request to the daemon (default 10)
``excludeNamespaces``  pods here pass straight through (default kube-system, istio-system)
``logLevel``           debug | info | warning | error (default info)
``failOpen``           true (default): an ADD the daemon cannot serve (unreachable, or
                       "try again later") succeeds, passing prevResult through, and is
                       remembered in ``pendingDir`` for the daemon to replay; false: it
                       fails with code 11 (try again later), as before
``pendingDir``         where remembered ADDs go (default /var/run/merbridge/pending)

``prevResult`` is kept exactly as received: the plugin prints it back unchanged.
"""
from __future__ import annotations

from merbridge.cni import errors
from merbridge.cni.errors import CniError
from merbridge.cni.protocol import DEFAULT_EXCLUDE_NAMESPACES, DEFAULT_SOCKET_PATH

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 300.0
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_FAIL_OPEN = True
#: the daemon's default --state-dir + "/pending" (daemon/config.py)
DEFAULT_PENDING_DIR = "/var/run/merbridge/pending"
#: sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107
#: the spec's reserved GC key, and the spelling libcni also sends (cni#1101)
GC_ATTACHMENT_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


class NetConf:
    """The validated config of one invocation."""

    __slots__ = ("name", "cni_version", "socket_path", "timeout", "exclude_namespaces",
                 "log_level", "prev_result", "fail_open", "pending_dir")

    def __init__(self, name: str, cni_version: str, socket_path: str = DEFAULT_SOCKET_PATH,
                 timeout: float = DEFAULT_TIMEOUT,
                 exclude_namespaces: tuple = DEFAULT_EXCLUDE_NAMESPACES,
                 log_level: str = "info", prev_result: dict | None = None,
                 fail_open: bool = DEFAULT_FAIL_OPEN,
                 pending_dir: str = DEFAULT_PENDING_DIR) -> None:
        self.name = name
        self.cni_version = cni_version
        self.socket_path = socket_path
        self.timeout = timeout
        self.exclude_namespaces = exclude_namespaces
        self.log_level = log_level
        self.prev_result = prev_result
        self.fail_open = fail_open
        self.pending_dir = pending_dir


def _bad(key: str, why: str) -> CniError:
    return CniError(errors.INVALID_NETWORK_CONFIG, f"invalid {key!r} in network config", why)


def parse_netconf(config: dict) -> NetConf:
    """Validate our keys of a decoded config; CniError(7) names the bad key."""
    socket_path = config.get("socketPath", DEFAULT_SOCKET_PATH)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise _bad("socketPath", "must be an absolute path")
    if len(socket_path.encode("utf-8", "surrogatepass")) > MAX_SOCKET_PATH or "\0" in socket_path:
        raise _bad("socketPath", f"must be at most {MAX_SOCKET_PATH} bytes, without NUL")

    timeout = config.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise _bad("timeoutSeconds", f"must be a number in (0, {MAX_TIMEOUT:g}]")

    exclude = config.get("excludeNamespaces", list(DEFAULT_EXCLUDE_NAMESPACES))
    if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
        raise _bad("excludeNamespaces", "must be a list of namespace names")

    log_level = config.get("logLevel", "info")
    if log_level not in LOG_LEVELS:
        raise _bad("logLevel", f"must be one of {', '.join(LOG_LEVELS)}")

    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad("prevResult", "must be a JSON object")

    fail_open = config.get("failOpen", DEFAULT_FAIL_OPEN)
    if not isinstance(fail_open, bool):
        raise _bad("failOpen", "must be true or false")

    pending_dir = config.get("pendingDir", DEFAULT_PENDING_DIR)
    if not isinstance(pending_dir, str) or not pending_dir.startswith("/") \
            or len(pending_dir) > 4096 or "\0" in pending_dir:
        raise _bad("pendingDir", "must be an absolute path")

    return NetConf(config["name"], config.get("cniVersion") or "", socket_path, float(timeout),
                   tuple(exclude), log_level, prev, fail_open, pending_dir)


def parse_cni_args(text: str) -> dict:
    """``K=V;K=V`` -> dict, with libcni's rules: every pair has one ``=`` and a key.

    Unknown keys are fine only with ``IgnoreUnknown`` set (kubelet always sets
    it); we only read the K8S_POD_* keys ourselves.
    """
    out: dict = {}
    if not text:
        return out
    try:
        # os.environ carries undecodable bytes as surrogates; no Kubernetes name or
        # uid can contain them, so waiting for such a pod would only stall the runtime
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES, "invalid CNI_ARGS",
                       "ARGS: not valid UTF-8") from None
    for pair in text.split(";"):
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES, "invalid CNI_ARGS",
                           f"ARGS: invalid pair {pair[:100]!r}")
        out[key] = value
    known = {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID",
             "K8S_POD_INFRA_CONTAINER_ID"}
    ignore = out.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(k for k in out if k not in known)
    if unknown and not ignore:
        raise CniError(errors.INVALID_ENVIRONMENT_VARIABLES, "invalid CNI_ARGS",
                       f"ARGS: unknown args {unknown[:10]} (set IgnoreUnknown=1)")
    return out


class Pod:
    """Which Kubernetes pod an invocation is for (from CNI_ARGS)."""

    __slots__ = ("namespace", "name", "uid")

    def __init__(self, namespace: str, name: str, uid: str = "") -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_from_args(cni_args: str) -> Pod | None:
    """The pod named in CNI_ARGS, or None when this is not a Kubernetes pod."""
    args = parse_cni_args(cni_args)
    namespace, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if not namespace or not name:
        return None
    return Pod(namespace, name, args.get("K8S_POD_UID", ""))


def gc_attachments(config: dict) -> list:
    """The still-valid attachments a GC call carries: ``[(container_id, ifname), ...]``."""
    for key in GC_ATTACHMENT_KEYS:
        if key in config:
            raw = config[key]
            break
    else:
        return []
    if not isinstance(raw, list):
        raise _bad(GC_ATTACHMENT_KEYS[0], "must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise _bad(GC_ATTACHMENT_KEYS[0],
                       'each attachment must be {"containerID": str, "ifname": str}')
        out.append((item["containerID"], item["ifname"]))
    return out


def prev_result_ips(prev: dict) -> list:
    """Addresses (``"addr/prefix"``) from ``prevResult.ips``; CniError(7) if malformed."""
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise _bad("prevResult", '"ips" must be a list')
    out = []
    for ip in ips:
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise _bad("prevResult", 'each of "ips" needs an "address" string')
        out.append(ip["address"])
    return out


def prev_result_interfaces(prev: dict) -> list:
    """``(name, sandbox)`` of the interfaces in ``prevResult`` that live in a sandbox."""
    ifaces = prev.get("interfaces", [])
    if not isinstance(ifaces, list):
        raise _bad("prevResult", '"interfaces" must be a list')
    out = []
    for iface in ifaces:
        if not isinstance(iface, dict) or not isinstance(iface.get("name", ""), str) \
                or not isinstance(iface.get("sandbox", ""), str):
            raise _bad("prevResult", 'each of "interfaces" needs string "name"/"sandbox"')
        if iface.get("sandbox"):
            out.append((iface.get("name", ""), iface["sandbox"]))
    return out
