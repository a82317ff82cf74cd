"""Chain merbridge-cni into the node's primary CNI configuration, and undo it.

(Over 450 lines on purpose: the installer's crash-safety argument -- write
order, recheck before rename, byte-exact restore -- reads top to bottom in one
file, next to the pure transforms it relies on.)

Pure part: ``insert_plugin`` / ``remove_plugin`` transform a parsed config
(``.conflist`` or single-plugin ``.conf``) and are golden-file tested.

IO part: ``Installer`` picks the file kubelet would use (the lexically first
valid ``.conf``/``.conflist``/``.json`` in the conf dir), copies the plugin
executable into the bin dir, and writes the chained config.  Every write is
atomic (temporary file in the same directory, then rename) and keeps the
file's mode, so the container runtime never reads half a file.

Uninstall order matters (istio/istio#20238): a config that names a plugin
whose binary is gone fails every pod ADD and DEL on the node.  So the config
entry is removed FIRST and the binary SECOND.  The file we changed is
restored byte for byte when nobody else touched it since, including renaming
a ``.conf`` we had to turn into a ``.conflist`` back to its old name.

``watch()`` re-applies when the primary CNI rewrites its file (inotify; no
polling and no busy loop, unlike upstream's sleepCheckInstall) and waits,
without spinning, when no config exists yet.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Iterable

from merbridge.daemon import inotify

log = logging.getLogger(__name__)

PLUGIN_TYPE = "merbridge-cni"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
#: name and version istio-cni gives a wrapped .conf when the original has none
DEFAULT_NETWORK_NAME = "k8s-pod-network"
DEFAULT_CNI_VERSION = "0.3.1"
#: atomic_write's temporary files: hidden, no CNI extension (libcni skips them)
TEMP_PREFIX, TEMP_SUFFIX = ".merbridge-", ".tmp"


class InstallError(Exception):
    """The CNI configuration could not be read or written."""


# ------------------------------------------------------------------ pure


def plugin_entry(socket_path: str, mode: str = "istio", log_level: str = "info",
                 exclude_namespaces: Iterable[str] | None = None,
                 fail_open: bool | None = None, pending_dir: str | None = None) -> dict:
    """The conflist entry the daemon chains in (read by merbridge-cni's netconf parser).

    ``exclude_namespaces`` (the daemon's ``--exclude-namespaces``) becomes the
    plugin's ``excludeNamespaces``, so the plugin passes exactly those pods
    straight through; without it the plugin's own default applies. Likewise
    ``fail_open`` (``--cni-fail-open``) and ``pending_dir`` (in ``--state-dir``)
    become ``failOpen`` and ``pendingDir``."""
    entry: dict[str, object] = {"type": PLUGIN_TYPE, "socketPath": socket_path, "mode": mode,
                                "logLevel": log_level}
    if exclude_namespaces is not None:
        entry["excludeNamespaces"] = list(exclude_namespaces)
    if fail_open is not None:
        entry["failOpen"] = fail_open
    if pending_dir is not None:
        entry["pendingDir"] = pending_dir
    return entry


def is_conflist(config: dict) -> bool:
    return isinstance(config.get("plugins"), list)


def insert_plugin(config: dict, entry: dict) -> dict:
    """Return ``config`` with ``entry`` chained last (idempotent).

    Any existing merbridge-cni entry is removed first so a restart never leaves
    two (istio/istio#28258).  A single-plugin ``.conf`` becomes a conflist
    carrying the original's name and cniVersion.
    """
    if entry.get("type") != PLUGIN_TYPE:
        raise ValueError(f"entry must have type {PLUGIN_TYPE!r}")
    if is_conflist(config):
        new = remove_plugin(config)
    elif "type" in config:
        new = {"name": config.get("name") or DEFAULT_NETWORK_NAME,
               "cniVersion": config.get("cniVersion") or DEFAULT_CNI_VERSION,
               "plugins": [copy.deepcopy(config)]}
    else:
        raise InstallError("not a CNI config: neither 'plugins' nor 'type'")
    new["plugins"].append(copy.deepcopy(entry))
    return new


def remove_plugin(config: dict) -> dict:
    """Return ``config`` without any merbridge-cni entry (a no-op for a .conf)."""
    new = copy.deepcopy(config)
    if is_conflist(new):
        new["plugins"] = [p for p in new["plugins"]
                          if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return new


def has_plugin(config: dict) -> bool:
    return is_conflist(config) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                       for p in config["plugins"])


def dumps(config: dict) -> bytes:
    """Our canonical serialisation (stable, so re-applying writes nothing)."""
    return (json.dumps(config, indent=2) + "\n").encode()


# ------------------------------------------------------------------ IO


class Raced(InstallError):
    """The file changed while we were about to replace it; the change that
    raced us sends its own inotify event, which re-runs the install."""


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def atomic_write(path: str, data: bytes, mode: int | None = None,
                 expect: tuple[str, bytes | None] | None = None) -> None:
    """Write via a hidden temp file (no CNI extension) and rename over ``path``.

    ``expect=(p, b)``: re-read ``p`` right before the rename and raise Raced,
    writing nothing, unless it still holds ``b`` (None: absent), so a
    concurrent rewrite by the primary CNI is not overwritten with a config
    built from its previous bytes."""
    directory = os.path.dirname(path) or "."
    if mode is None:
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if expect is not None and _read(expect[0]) != expect[1]:
            raise Raced(f"{expect[0]} changed while it was being rewritten")
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_config(data: bytes) -> dict:
    """A CNI config's JSON; InstallError saying what is wrong with it."""
    try:
        config = json.loads(data)
    except RecursionError:
        raise InstallError("JSON nested too deeply") from None
    except ValueError as exc:
        raise InstallError(f"not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InstallError(f"not a JSON object but a {type(config).__name__}")
    if not (is_conflist(config) or "type" in config):
        raise InstallError("not a CNI config: neither 'plugins' (a list) nor 'type'")
    return config


def _load(path: str) -> dict | None:
    """A config file's JSON if it looks like a CNI config, else None."""
    try:
        return config_problem(path)[0]
    except OSError:
        return None


def config_problem(path: str) -> tuple[dict | None, str | None]:
    """(config, None) or (None, why it is not a CNI config). OSError passes."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_config(data), None
    except InstallError as exc:
        return None, str(exc)


def find_primary_config(conf_dir: str, skipped: list[str] | None = None) -> str | None:
    """The file kubelet/libcni would pick: lexically first valid config.
    ``skipped`` collects "name: why" for the config files passed over."""
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return None
    for name in names:
        if name.startswith(".") or not name.endswith(CONF_EXTENSIONS):
            continue
        path = os.path.join(conf_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            config, why = config_problem(path)
        except OSError as exc:
            config, why = None, exc.strerror or str(exc)
        if config is not None:
            return path
        if skipped is not None:
            skipped.append(f"{name}: {why}")
    return None


@dataclass
class _Changed:
    """What we did to one file, so uninstall can undo exactly that."""
    path: str               # the file as it is now (maybe renamed to .conflist)
    original_path: str      # the file as we found it
    original: bytes | None  # its bytes (None: we found our own entry already there)
    written: bytes          # what we wrote


@dataclass
class Installer:
    cni_bin_dir: str
    cni_conf_dir: str
    plugin_source_path: str
    entry: dict
    binary_name: str = PLUGIN_TYPE
    #: where to keep the original bytes across daemon restarts (kill -9 included);
    #: without it only this process can restore byte for byte
    state_file: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._changed: _Changed | None = self._load_state()
        #: why the last install failed (None: it did not)
        self.problem: str | None = None
        self._swept = False
        self._lock = threading.Lock()
        self._ino: inotify.Inotify | None = None
        self._stop = threading.Event()

    @property
    def binary_path(self) -> str:
        return os.path.join(self.cni_bin_dir, self.binary_name)

    # -- install ---------------------------------------------------------

    def install(self) -> str | None:
        """Copy the binary and chain the entry; the config path, or None if none exists yet.
        InstallError when the only config files are not valid CNI configs."""
        with self._lock:
            if not self._swept:       # a killed daemon's leftovers, once at start
                self._remove_stale_temporaries()
                self._swept = True
            self._install_binary()
            skipped: list[str] = []
            path = find_primary_config(self.cni_conf_dir, skipped)
            if path is None:
                if skipped:
                    raise InstallError(f"no valid CNI config in {self.cni_conf_dir}: "
                                       + "; ".join(skipped))
                log.info("no CNI config in %s yet; waiting for the primary CNI", self.cni_conf_dir)
                return None
            self._install_config(path)
            self.ready.set()
            return self._changed.path if self._changed else path

    def _remove_stale_temporaries(self) -> None:
        """atomic_write's temporaries a killed daemon left (its own prefix only)."""
        for directory in {self.cni_conf_dir, self.cni_bin_dir,
                          os.path.dirname(self.state_file) if self.state_file else self.cni_conf_dir}:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(directory, name))
                    except FileNotFoundError:
                        pass

    def _install_binary(self) -> None:
        with open(self.plugin_source_path, "rb") as f:
            data = f.read()
        try:
            with open(self.binary_path, "rb") as f:
                if f.read() == data:
                    return
        except FileNotFoundError:
            pass
        os.makedirs(self.cni_bin_dir, exist_ok=True)
        atomic_write(self.binary_path, data, 0o755)
        log.info("installed CNI plugin binary path=%s", self.binary_path)

    def _install_config(self, path: str) -> None:
        """Crash-safe at every step (a kill -9 anywhere leaves the original
        bytes restorable): the state file naming the original bytes is
        written before the config, and the config only replaces the bytes
        it was built from (atomic_write's recheck)."""
        with open(path, "rb") as f:
            current = f.read()
        try:
            config = parse_config(current)
        except InstallError as exc:
            raise InstallError(f"{path}: {exc}") from None
        new = dumps(insert_plugin(config, self.entry))
        target = path if is_conflist(config) else os.path.splitext(path)[0] + ".conflist"
        if target == path and new == current:
            return  # already ours, nothing to do (also ends our own inotify echo)
        if has_plugin(config) and self._changed and self._changed.path == path:
            original, original_path = self._changed.original, self._changed.original_path
        elif has_plugin(config):
            original, original_path = None, path  # left by an earlier run
        else:
            original, original_path = current, path  # the primary CNI's own bytes
        mode = os.stat(path).st_mode & 0o7777
        # first what we are about to do (a crash before the config is written
        # leaves the original in place, and the state names its bytes) ...
        self._changed = _Changed(target, original_path, original, new)
        self._save_state()
        # ... then the config, only over the bytes it was built from
        atomic_write(target, new, mode, expect=(path, current))
        if target != path:
            os.unlink(path)  # a .conf would sort first and hide our .conflist
        log.info("chained %s into CNI config path=%s", PLUGIN_TYPE, target)

    # -- what we changed, kept on disk -------------------------------------

    def _save_state(self) -> None:
        if not self.state_file:
            return
        c = self._changed
        data = None if c is None else {
            "path": c.path, "original_path": c.original_path, "written": c.written.decode("latin-1"),
            "original": None if c.original is None else c.original.decode("latin-1")}
        if data is None:
            try:
                os.unlink(self.state_file)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(self.state_file) or ".", exist_ok=True)
        atomic_write(self.state_file, json.dumps(data).encode(), 0o600)

    def _load_state(self) -> _Changed | None:
        if not self.state_file:
            return None
        try:
            with open(self.state_file, "rb") as f:
                d = json.loads(f.read())
            return _Changed(d["path"], d["original_path"],
                            None if d["original"] is None else d["original"].encode("latin-1"),
                            d["written"].encode("latin-1"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable CNI install state %s: %s", self.state_file, exc)
            return None

    # -- uninstall -------------------------------------------------------

    def uninstall(self) -> None:
        """Remove our entry (restoring the original bytes if untouched), then the binary."""
        with self._lock:
            self._remove_stale_temporaries()
            self._uninstall_config()
            try:
                os.unlink(self.binary_path)
                log.info("removed CNI plugin binary path=%s", self.binary_path)
            except FileNotFoundError:
                pass
            self.ready.clear()

    def _uninstall_config(self) -> None:
        changed = self._changed
        paths = [changed.path] if changed else []
        # also clean any other file that carries our entry (e.g. after a restart)
        try:
            names = sorted(os.listdir(self.cni_conf_dir))
        except FileNotFoundError:
            names = []
        paths += [os.path.join(self.cni_conf_dir, n) for n in names
                  if n.endswith(CONF_EXTENSIONS) and not n.startswith(".")]
        seen = set()
        for path in paths:
            if path in seen:
                continue
            seen.add(path)
            try:
                with open(path, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                continue
            if changed and path == changed.path and current == changed.written and changed.original is not None:
                # untouched since we wrote it: put the exact original back
                atomic_write(changed.original_path, changed.original, os.stat(path).st_mode & 0o7777,
                             expect=(path, current))
                if changed.original_path != path:
                    os.unlink(path)
                log.info("restored original CNI config path=%s", changed.original_path)
                continue
            config = _load(path)
            if config is not None and has_plugin(config):
                atomic_write(path, dumps(remove_plugin(config)), expect=(path, current))
                log.info("removed %s from CNI config path=%s", PLUGIN_TYPE, path)
        self._changed = None
        self._save_state()

    # -- watch -----------------------------------------------------------

    def watch(self) -> None:
        """Install, then re-install whenever the conf or bin dir changes; until stop()."""
        os.makedirs(self.cni_conf_dir, exist_ok=True)
        os.makedirs(self.cni_bin_dir, exist_ok=True)
        with inotify.Inotify() as ino:
            self._ino = ino
            ino.add_watch(self.cni_conf_dir)
            ino.add_watch(self.cni_bin_dir, inotify.IN_DELETE | inotify.IN_MOVED_FROM)
            try:
                while not self._stop.is_set():
                    self._install_reporting()
                    # block until something changes in either directory
                    while not self._stop.is_set() and not self._relevant(ino.read()):
                        pass
            finally:
                self._ino = None

    def _install_reporting(self) -> None:
        """install(), with any failure kept as ``problem`` (for /readyz and
        ``merbridge status``, through problem_file) and logged, never raised:
        the watch goes on and retries on the next change."""
        try:
            self.install()
        except Raced as exc:
            log.info("CNI config changed under us; redoing: %s", exc)
            self._set_problem(None)
            return
        except Exception as exc:   # noqa: BLE001 -- whatever it is, the thread must live
            why = str(exc) if isinstance(exc, (OSError, InstallError)) else f"{type(exc).__name__}: {exc}"
            log.error("CNI install failed (will retry on the next change): %s", why)
            self._set_problem(why)
            return
        self._set_problem(None)

    @property
    def problem_file(self) -> str | None:
        """Where ``problem`` is kept for ``merbridge status`` (beside the state file)."""
        return os.path.splitext(self.state_file)[0] + ".error" if self.state_file else None

    def _set_problem(self, why: str | None) -> None:
        path = self.problem_file
        try:
            if path is None:
                pass
            elif why is None:
                os.unlink(path)
            else:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                atomic_write(path, (why + "\n").encode(), 0o644)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot record the CNI install problem in %s: %s", path, exc)
        self.problem = why     # after the file: who sees it cleared finds no file

    def _relevant(self, events: list[inotify.Event]) -> bool:
        for ev in events:
            if ev.mask & inotify.IN_Q_OVERFLOW or not ev.name:
                return True
            if ev.name == self.binary_name or (ev.name.endswith(CONF_EXTENSIONS) and not ev.name.startswith(".")):
                return True
        return False

    def stop(self) -> None:
        """Make watch() return (from another thread)."""
        self._stop.set()
        if self._ino is not None:
            self._ino.wake()
