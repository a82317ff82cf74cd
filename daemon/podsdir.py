"""Pods from a directory of manifests (``--pods-dir``): a source without Kubernetes.

Ordinary Pod manifests -- YAML (several documents per file allowed), JSON, or
a ``kind: List``/``PodList`` -- in one directory.  The directory is re-read
whenever inotify reports a change, and the result is diffed with the previous
one by namespace/name, so the callback sees the same ("ADDED" | "MODIFIED" |
"DELETED", pod) events as from ``k8s.KubernetesPodSource``.  A file that
cannot be parsed, or a document that is not a Pod, is logged with the reason
and skipped; it never stops the source.  The only module importing ``yaml``.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import yaml

from merbridge.daemon import inotify

log = logging.getLogger(__name__)

Callback = Callable[[str, dict], None]
SUFFIXES = (".yaml", ".yml", ".json")


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings, as the API server's JSON has them."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class PodsDirError(Exception):
    """The pods directory itself is unusable."""


def load_file(path: str) -> list[dict]:
    """The Pods in one manifest file; raises ValueError with a readable reason."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = list(yaml.load_all(f, Loader=_Loader))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    except RecursionError:  # deeply nested flow collections
        raise ValueError("not valid YAML/JSON: nested too deeply") from None
    pods = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"document {index + 1}"
        if not isinstance(doc, dict):
            log.warning("skipping %s in %s: not a mapping", where, path)
            continue
        kind = doc.get("kind")
        in_list = kind in ("List", "PodList")
        items = doc.get("items") or []
        if in_list and not isinstance(items, list):
            log.warning("skipping %s in %s: items is not a list", where, path)
            continue
        for item in items if in_list else [doc]:
            # items of a PodList often omit their kind
            item_kind = item.get("kind", "Pod" if in_list else None) if isinstance(item, dict) else None
            if item_kind != "Pod":
                log.warning("skipping %s in %s: kind %r is not Pod", where, path, item_kind)
                continue
            meta = item.get("metadata")
            if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
                log.warning("skipping %s in %s: metadata.name is missing", where, path)
                continue
            meta.setdefault("namespace", "default")
            pods.append(item)
    return pods


def load_dir(directory: str) -> dict[str, dict]:
    """namespace/name -> pod for every valid Pod in the directory (sorted file order)."""
    pods: dict[str, dict] = {}
    origin: dict[str, str] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(SUFFIXES) or not os.path.isfile(path):
            continue
        try:
            found = load_file(path)
        except ValueError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        for pod in found:
            key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
            if key in pods:
                log.warning("skipping pod %s in %s: already defined in %s", key, path, origin[key])
                continue
            pods[key], origin[key] = pod, path
    return pods


class PodsDirSource:
    def __init__(self, callback: Callback, pods_dir: str):
        self.pods_dir = pods_dir
        self._callback = callback
        self._pods: dict[str, dict] = {}
        self._lock = threading.Lock()
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
            if self._relevant(self._ino.read()):
                try:
                    self.rescan()
                except OSError as exc:
                    log.error("cannot read --pods-dir %s: %s", self.pods_dir, exc)

    def _relevant(self, events: list[inotify.Event]) -> bool:
        # A new regular file is read when its writer closes it (IN_CLOSE_WRITE),
        # not when it is created empty.  Dot names are NOT ignored: a ConfigMap
        # volume swaps its files by renaming the ..data symlink.
        return any(not ev.mask & inotify.IN_CREATE
                   or os.path.islink(os.path.join(self.pods_dir, ev.name)) for ev in events)

    def rescan(self) -> None:
        """Re-read the directory and emit the differences."""
        new = load_dir(self.pods_dir)
        with self._lock:
            old, self._pods = self._pods, new
            events = [("DELETED", pod) for key, pod in old.items() if key not in new]
            for key, pod in new.items():
                if key not in old:
                    events.append(("ADDED", pod))
                elif old[key] != pod:
                    events.append(("MODIFIED", pod))
            for event_type, pod in events:
                try:
                    self._callback(event_type, pod)
                except Exception:
                    log.exception("pod event handler failed event=%s pod=%s/%s", event_type,
                                  pod["metadata"]["namespace"], pod["metadata"]["name"])

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

    def get(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._pods.get(f"{namespace}/{name}")
