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
``get(namespace, name)``; the callback runs on the source's own thread.
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
from typing import Any, Callable

import kubernetes
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


class KubernetesPodSource:
    def __init__(self, callback: Callback, node_name: str, *, kubeconfig: str | None = None,
                 api_client: k8s_client.ApiClient | None = None, resync_period: int = 0):
        if not node_name:
            raise KubernetesError("a node name is needed to select this node's pods "
                                  "(--node-name or the NODE_NAME environment variable)")
        self.node_name = node_name
        self._callback = callback
        self._api = api_client or build_api_client(kubeconfig)
        self._core = k8s_client.CoreV1Api(self._api)
        self._pods: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = False
        self._watch_resp: Any = None
        core_list = self._core.list_pod_for_all_namespaces

        # The informer calls this for the list and for each watch.  A watch
        # call means the preceding list has been fully delivered to our
        # handlers: that is when the source counts as synced.  Bookmarks are
        # asked for so a quiet node still advances its resourceVersion and
        # resumes without a re-list.  functools.wraps keeps the signature that
        # kubernetes.watch.Watch inspects to find the item type (V1Pod).
        @functools.wraps(core_list)
        def list_pods(**kwargs: Any) -> Any:
            if self._stopping:
                raise _Stopped()
            if not kwargs.get("watch"):
                return core_list(**kwargs)
            kwargs.setdefault("allow_watch_bookmarks", True)
            self._synced.set()
            resp = core_list(**kwargs)
            with self._lock:
                self._watch_resp = resp
                if self._stopping:
                    _shutdown(resp)
            return resp

        self._informer = SharedInformer(list_pods, resync_period=resync_period,
                                        field_selector=f"spec.nodeName={node_name}")
        for event_type in (ADDED, MODIFIED, DELETED):
            self._informer.add_event_handler(event_type, functools.partial(self._on_event, event_type))
        self._informer.add_event_handler(ERROR, self._on_error)

    def _on_event(self, event_type: str, obj: Any) -> None:
        pod = self._api.sanitize_for_serialization(obj)
        if not isinstance(pod, dict):
            return
        key = pod_key(pod)
        with self._lock:
            old = self._pods.get(key)
            if event_type == DELETED:
                if old is None:
                    return
                del self._pods[key]
                emit = DELETED
            else:
                if old == pod:
                    return  # a re-list or resync that changed nothing
                self._pods[key] = pod
                emit = ADDED if old is None else MODIFIED
            try:
                self._callback(emit, pod)
            except Exception:  # a consumer bug must not kill the informer thread
                log.exception("pod event handler failed event=%s pod=%s", emit, key)

    def _on_error(self, exc: Any) -> None:
        if self._stopping:
            return
        status = getattr(exc, "status", None)
        if status == 410:
            log.info("watch expired (410 Gone); re-listing pods node=%s", self.node_name)
        else:
            log.warning("pod watch error node=%s error=%s", self.node_name, exc)

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

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the initial list has been delivered to the callback."""
        return self._synced.wait(timeout)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._pods.values())

    def get(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._pods.get(f"{namespace}/{name}")


def client_version() -> str:
    return getattr(kubernetes, "__version__", "unknown")
