"""Pods of this node from the Kubernetes API (the only module importing ``kubernetes``).

``KubernetesPodSource`` runs the client's own ``SharedInformer`` over
``list_pod_for_all_namespaces`` with ``fieldSelector=spec.nodeName=<node>``:
list, then watch from the list's resourceVersion, resume from the last seen
version after a dropped stream, re-list after 410 Gone.  The informer hands
us model objects; we keep plain camelCase dicts (what annotations.py reads)
and call back with ("ADDED" | "MODIFIED" | "DELETED", pod) only when a pod
really changed, so an annotation or label edit reaches the daemon (upstream
merbridge ignored everything but a pod IP change) and a re-list that finds
nothing new is silent.

Every pod source (this one and ``podsdir.PodsDirSource``) has the same shape:
``start()``, ``stop()``, ``wait_synced(timeout) -> bool``, ``snapshot()``,
``namespaces()``, ``get(namespace, name)``; the callbacks run on the source's
own threads, never while the source holds its lock, and in order per object.
Namespaces (for ambient mode's namespace label) are watched only when an
``on_namespace`` callback is given.
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from typing import Any, Callable

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.informer import ADDED, DELETED, ERROR, MODIFIED, SharedInformer

log = logging.getLogger(__name__)

Callback = Callable[[str, dict], None]


class KubernetesError(Exception):
    """No usable API server configuration, or the API server refused us."""


def build_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """An ApiClient from ``kubeconfig``, else from the in-cluster service account."""
    configuration = k8s_client.Configuration()
    try:
        if kubeconfig:
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)
    except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise KubernetesError(f"cannot configure the Kubernetes client from {where}: {exc} "
                              "(pass --kubeconfig, or --pods-dir to run without Kubernetes)") from exc
    return k8s_client.ApiClient(configuration)


_informer_log = logging.getLogger("kubernetes.informer.informer")


class _Stopped(Exception):
    """Raised into the informer thread once stop() has begun."""


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _shutdown(resp: Any) -> None:
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pod_key(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def namespace_key(namespace: dict) -> str:
    return (namespace.get("metadata") or {}).get("name") or ""


class _Watched:
    """One informer: a list+watch of one resource kept as plain dicts by key.

    The informer calls back on its one thread, so events reach ``callback`` in
    the order the API server sent them.  The store is updated under the lock,
    the callback runs after it is released: a consumer may call ``get()`` or
    ``snapshot()`` from its callback, or hold its own lock while calling them
    when another of its threads is in a callback waiting for that lock
    (Registry.restore vs. a DELETED event), without a deadlock."""

    def __init__(self, what: str, list_func: Callable[..., Any], api: k8s_client.ApiClient,
                 callback: Callback, key: Callable[[dict], str], resync_period: int,
                 field_selector: str | None = None):
        self.what = what
        self._api = api
        self._callback = callback
        self._key = key
        self._objects: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stopping = False
        self._watch_resp: Any = None

        # The informer calls this for the list and for each watch.  A watch
        # call means the preceding list has been fully delivered to our
        # handlers: that is when the source counts as synced.  Bookmarks are
        # asked for so a quiet node still advances its resourceVersion and
        # resumes without a re-list.  functools.wraps keeps the signature that
        # kubernetes.watch.Watch inspects to find the item type (V1Pod, ...).
        @functools.wraps(list_func)
        def listing(**kwargs: Any) -> Any:
            if self._stopping:
                raise _Stopped()
            if not kwargs.get("watch"):
                return list_func(**kwargs)
            kwargs.setdefault("allow_watch_bookmarks", True)
            self.synced.set()
            resp = list_func(**kwargs)
            with self._lock:
                self._watch_resp = resp
                if self._stopping:
                    _shutdown(resp)
            return resp

        self._informer = SharedInformer(listing, resync_period=resync_period,
                                        field_selector=field_selector)
        for event_type in (ADDED, MODIFIED, DELETED):
            self._informer.add_event_handler(event_type, functools.partial(self._on_event, event_type))
        self._informer.add_event_handler(ERROR, self._on_error)

    def _on_event(self, event_type: str, obj: Any) -> None:
        item = self._api.sanitize_for_serialization(obj)
        if not isinstance(item, dict):
            return
        key = self._key(item)
        with self._lock:
            old = self._objects.get(key)
            if event_type == DELETED:
                if old is None:
                    return
                del self._objects[key]
                emit = DELETED
            else:
                if old == item:
                    return  # a re-list or resync that changed nothing
                self._objects[key] = item
                emit = ADDED if old is None else MODIFIED
        try:
            self._callback(emit, item)
        except Exception:  # a consumer bug must not kill the informer thread
            log.exception("%s event handler failed event=%s %s=%s", self.what, emit, self.what, key)

    def _on_error(self, exc: Any) -> None:
        if self._stopping:
            return
        if getattr(exc, "status", None) == 410:
            log.info("watch expired (410 Gone); re-listing %ss", self.what)
        else:
            log.warning("%s watch error: %s", self.what, exc)

    def start(self) -> None:
        self._informer.start()

    def stop(self) -> None:
        # SharedInformer.stop() cannot interrupt a watch whose response has
        # not arrived yet (it would block in the read forever), so we cut the
        # current stream ourselves and refuse new requests first.
        with self._lock:
            self._stopping = True
            if self._watch_resp is not None:
                _shutdown(self._watch_resp)
        quiet = _DropAll()
        _informer_log.addFilter(quiet)  # the cut stream is not an error
        try:
            self._informer.stop()
        finally:
            _informer_log.removeFilter(quiet)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._objects.values())

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._objects.get(key)


class KubernetesPodSource:
    """This node's pods; with ``on_namespace``, also every namespace (their
    labels put pods into ambient mode), from a second informer over
    ``list_namespace`` -- asked for only then, so the RBAC rule
    ``namespaces: get, list, watch`` is needed only with ``--ambient``."""

    def __init__(self, callback: Callback, node_name: str, *, kubeconfig: str | None = None,
                 api_client: k8s_client.ApiClient | None = None, resync_period: int = 0,
                 on_namespace: Callback | None = None):
        if not node_name:
            raise KubernetesError("a node name is needed to select this node's pods "
                                  "(--node-name or the NODE_NAME environment variable)")
        self.node_name = node_name
        self._api = api_client or build_api_client(kubeconfig)
        self._core = k8s_client.CoreV1Api(self._api)
        self._pods = _Watched("pod", self._core.list_pod_for_all_namespaces, self._api, callback,
                              pod_key, resync_period, field_selector=f"spec.nodeName={node_name}")
        self._namespaces = None if on_namespace is None else _Watched(
            "namespace", self._core.list_namespace, self._api, on_namespace, namespace_key,
            resync_period)
        self._watched = [w for w in (self._namespaces, self._pods) if w is not None]

    def start(self) -> None:
        for w in self._watched:
            w.start()

    def stop(self) -> None:
        for w in self._watched:
            w.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the initial lists have been delivered to the callbacks."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(w.synced.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for w in self._watched)

    def snapshot(self) -> list[dict]:
        return self._pods.snapshot()

    def namespaces(self) -> list[dict]:
        """Every namespace (empty without ``on_namespace``)."""
        return self._namespaces.snapshot() if self._namespaces is not None else []

    def get(self, namespace: str, name: str) -> dict | None:
        return self._pods.get(f"{namespace}/{name}")
