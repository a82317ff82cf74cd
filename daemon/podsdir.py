"""Pods from a directory of manifests (``--pods-dir``): a source without Kubernetes.

Ordinary Pod manifests -- YAML (several documents per file allowed), JSON, or
a ``kind: List``/``PodList`` -- in one directory.  The directory is re-read
whenever inotify reports a change, and the result is diffed with the previous
one by namespace/name, so the callback sees the same ("ADDED" | "MODIFIED" |
"DELETED", pod) events as from ``k8s.KubernetesPodSource``.  Namespace
manifests (``kind: Namespace``/``NamespaceList``, in the same files or their
own) are diffed the same way, by name, and go to ``on_namespace``: ambient
mode reads their ``istio.io/dataplane-mode`` label.  Callbacks run after the
source's lock is released (namespaces first, then pods), one rescan at a time,
so a callback may call ``get()``/``snapshot()``.  A file that cannot be
parsed, or a document that is neither a Pod nor a Namespace, is logged with
the reason and skipped; it never stops the source.  The only module importing
``yaml``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import yaml

from merbridge.daemon import inotify

log = logging.getLogger(__name__)

Callback = Callable[[str, dict], None]
SUFFIXES = (".yaml", ".yml", ".json")


try:   # libyaml's parser, where PyYAML was built with it
    from yaml import CSafeLoader as _SafeLoader
except ImportError:
    from yaml import SafeLoader as _SafeLoader


class _Loader(_SafeLoader):
    """SafeLoader (libyaml's parser where PyYAML has it, ~10x faster) that keeps
    timestamps as strings, as the API server's JSON has them."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class PodsDirError(Exception):
    """The pods directory itself is unusable."""


#: list kinds, and the kind their items have when they omit it
_LISTS = {"List": "Pod", "PodList": "Pod", "NamespaceList": "Namespace"}
KINDS = ("Pod", "Namespace")


def load_file(path: str) -> list[dict]:
    """The Pods and Namespaces in one manifest file; raises ValueError with a
    readable reason.  A Pod without a namespace gets ``default``."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = list(yaml.load_all(f, Loader=_Loader))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    except RecursionError:  # deeply nested flow collections
        raise ValueError("not valid YAML/JSON: nested too deeply") from None
    objects = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"document {index + 1}"
        if not isinstance(doc, dict):
            log.warning("skipping %s in %s: not a mapping", where, path)
            continue
        kind = doc.get("kind")
        # the kind of a list's items; None: no list (a kind may be any YAML value)
        item_default = _LISTS.get(kind) if isinstance(kind, str) else None
        in_list = item_default is not None
        items = doc.get("items") or []
        if in_list and not isinstance(items, list):
            log.warning("skipping %s in %s: items is not a list", where, path)
            continue
        for item in items if in_list else [doc]:
            # items of a PodList often omit their kind
            item_kind = item.get("kind", item_default) if isinstance(item, dict) else None
            if item_kind not in KINDS:
                log.warning("skipping %s in %s: kind %r is not Pod or Namespace", where, path,
                            item_kind)
                continue
            meta = item.get("metadata")
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
                log.warning("skipping %s in %s: metadata.name is missing", where, path)
                continue
            if item_kind == "Pod":
                meta.setdefault("namespace", "default")
            else:
                item["kind"] = "Namespace"   # load_dir tells the two apart by kind
            objects.append(item)
    return objects


#: a file changed less than this long ago is parsed again even if its stat
#: looks the same (mtime has coarse ticks: a same-size rewrite in one tick)
RACY_S = 2.0


def load_dir(directory: str, cache: dict | None = None) -> dict[str, dict]:
    """namespace/name -> pod for every valid Pod in the directory (sorted file order)."""
    return load_all(directory, cache)[0]


def load_all(directory: str, cache: dict | None = None, changed: set[str] | None = None
             ) -> tuple[dict[str, dict], dict[str, dict]]:
    """(namespace/name -> pod, name -> namespace) for every valid Pod and
    Namespace in the directory (sorted file order; the first definition wins).

    ``cache`` (path -> (stat key, objects)), kept by the caller between calls,
    skips parsing files whose inode, size, mtime and ctime are unchanged, so
    one new manifest among a thousand costs one parse, not a thousand.

    ``changed`` (with ``cache``): the names inotify reported since the cache
    was filled, and the only ones that can have changed. The directory is not
    listed and the other files are neither stat()ed nor parsed again: one
    event among a thousand manifests costs one file, not a thousand stat()s
    and the re-parse of every file still inside the racy window.
    """
    pods: dict[str, dict] = {}
    namespaces: dict[str, dict] = {}
    origin: dict[str, str] = {}
    seen: set[str] = set()
    now = time.time_ns()
    if changed is None or cache is None:
        names = sorted(os.listdir(directory))
        changed = None
    else:
        names = sorted({os.path.basename(path) for path in cache} | changed)
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(SUFFIXES):
            continue
        hit = cache.get(path) if cache is not None else None
        if changed is not None and hit is not None and name not in changed:
            seen.add(path)
            found = hit[1]
        elif not os.path.isfile(path):
            continue
        else:
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if hit is not None and hit[0] == stamp and now - st.st_ctime_ns > RACY_S * 1e9:
                found = hit[1]
            else:
                try:
                    found = load_file(path)
                except ValueError as exc:
                    found = []
                    log.warning("skipping %s: %s", path, exc)
                if cache is not None:
                    cache[path] = (stamp, found)
        for obj in found:
            meta = obj["metadata"]
            if obj.get("kind") == "Namespace":
                what, key, into = "namespace", meta["name"], namespaces
            else:
                what, key, into = "pod", f"{meta['namespace']}/{meta['name']}", pods
            if key in into:
                log.warning("skipping %s %s in %s: already defined in %s", what, key, path,
                            origin[what + key])
                continue
            into[key], origin[what + key] = obj, path
    if cache is not None:
        for path in set(cache) - seen:
            del cache[path]
    return pods, namespaces


def _diff(old: dict[str, dict], new: dict[str, dict]) -> list[tuple[str, dict]]:
    events = [("DELETED", obj) for key, obj in old.items() if key not in new]
    for key, obj in new.items():
        if key not in old:
            events.append(("ADDED", obj))
        elif old[key] != obj:
            events.append(("MODIFIED", obj))
    return events


class PodsDirSource:
    def __init__(self, callback: Callback, pods_dir: str, *, on_namespace: Callback | None = None):
        self.pods_dir = pods_dir
        self._callback = callback
        self._on_namespace = on_namespace
        self._pods: dict[str, dict] = {}
        self._namespaces: dict[str, dict] = {}
        self._files: dict = {}   # load_all's parse cache
        self._lock = threading.Lock()       # the state get()/snapshot() read
        self._rescan = threading.Lock()     # one rescan (and its callbacks) at a time
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._ino: inotify.Inotify | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not os.path.isdir(self.pods_dir):
            raise PodsDirError(f"--pods-dir {self.pods_dir}: not a directory")
        self._ino = inotify.Inotify()
        # watch before the first read, so no change can slip in between
        self._ino.add_watch(self.pods_dir)
        self.rescan()
        self._synced.set()
        self._thread = threading.Thread(target=self._run, name="pods-dir", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._ino is not None
        while not self._stop.is_set():
            events = self._ino.read()
            if self._relevant(events):
                try:
                    self.rescan(self._changed(events))
                except OSError as exc:
                    log.error("cannot read --pods-dir %s: %s", self.pods_dir, exc)

    def _changed(self, events: list[inotify.Event]) -> set[str] | None:
        """The names these events can have changed, or None for "read it all":
        a lost event (queue overflow), the directory itself, a directory or a
        symlink among the names (a ConfigMap volume swaps its ..data symlink,
        and every visible file changes through it without an event of its own)."""
        names = set()
        for ev in events:
            if (ev.mask & (inotify.IN_Q_OVERFLOW | inotify.IN_ISDIR | inotify.IN_DELETE_SELF
                           | inotify.IN_MOVE_SELF | inotify.IN_IGNORED) or not ev.name
                    or os.path.islink(os.path.join(self.pods_dir, ev.name))):
                return None
            names.add(ev.name)
        return names

    def _relevant(self, events: list[inotify.Event]) -> bool:
        # A new regular file is read when its writer closes it (IN_CLOSE_WRITE),
        # not when it is created empty.  Dot names are NOT ignored: a ConfigMap
        # volume swaps its files by renaming the ..data symlink.
        return any(not ev.mask & inotify.IN_CREATE
                   or os.path.islink(os.path.join(self.pods_dir, ev.name)) for ev in events)

    def rescan(self, changed: set[str] | None = None) -> None:
        """Re-read the directory (only the files named in ``changed``, when
        given: see ``load_all``) and emit the differences.

        The callbacks run after ``_lock`` is released (a callback may call
        ``get()``/``snapshot()``, or wait for a lock whose holder calls them),
        under ``_rescan``, so two rescans never interleave their events."""
        with self._rescan:
            pods, namespaces = load_all(self.pods_dir, self._files, changed)
            with self._lock:
                ns_events = _diff(self._namespaces, namespaces) if self._on_namespace else []
                pod_events = _diff(self._pods, pods)
                self._pods, self._namespaces = pods, namespaces
            for callback, events in ((self._on_namespace, ns_events), (self._callback, pod_events)):
                if callback is None:   # no namespace callback: no namespace events either
                    continue
                for event_type, obj in events:
                    try:
                        callback(event_type, obj)
                    except Exception:
                        meta = obj["metadata"]
                        log.exception("%s event handler failed event=%s name=%s/%s",
                                      obj.get("kind") or "Pod", event_type,
                                      meta.get("namespace", ""), meta["name"])

    def stop(self) -> None:
        self._stop.set()
        if self._ino is not None:
            self._ino.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._ino is not None:
            self._ino.close()
            self._ino = None

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._pods.values())

    def namespaces(self) -> list[dict]:
        with self._lock:
            return list(self._namespaces.values())

    def get(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._pods.get(f"{namespace}/{name}")
