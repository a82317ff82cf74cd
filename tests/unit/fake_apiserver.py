"""A tiny stand-in for kube-apiserver, which cannot be installed on these machines.

It speaks just enough of the real list/watch wire protocol for the official
``kubernetes`` client (and its SharedInformer) to run unmodified against it:

* ``GET /api/v1/pods[?fieldSelector=spec.nodeName=N]`` -> a PodList whose
  ``metadata.resourceVersion`` is the store's current version;
* ``GET /api/v1/namespaces`` -> a NamespaceList, the same way (no selector);
* ``...&watch=true&resourceVersion=RV`` -> a chunked stream of JSON lines
  ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`` with every
  change after RV; a RV older than the compaction point gets an ERROR event
  carrying a 410 "Expired" Status, exactly as the real server answers;
* ``allowWatchBookmarks``/``timeoutSeconds`` are honoured.

Tests drive it with ``upsert``/``delete`` (recorded changes; pods, or
namespaces with ``upsert_namespace``/``delete_namespace``), ``bookmark()``,
``drop_watches()`` (end every open stream, forcing a resume) and
``expire()`` (change state silently and compact history, forcing 410 and a
re-list).  ``requests`` records each request's path and query.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeApiServer:
    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.namespaces: dict[str, dict] = {}
        self.rv = 100
        self.compacted = 0          # watches from an older RV get 410
        self.history: list[tuple[int, str, dict]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._drop_gen = 0
        self._closing = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------ control

    def __enter__(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _record(self, kind: str, pod: dict) -> None:
        self.history.append((self.rv, kind, copy.deepcopy(pod)))
        self._cond.notify_all()

    def _stamp(self, obj: dict, kind: str = "Pod") -> dict:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        if kind == "Pod":
            meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"uid-{meta.get('namespace', '')}-{meta['name']}")
        meta["resourceVersion"] = str(self.rv)
        return obj

    def upsert(self, pod: dict, *, record: bool = True) -> dict:
        with self._cond:
            pod = self._stamp(pod)
            key = _key(pod)
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self.pods[key] = pod
            if record:
                self._record(kind, pod)
            return pod

    def delete(self, namespace: str, name: str, *, record: bool = True) -> None:
        with self._cond:
            pod = self._stamp(self.pods.pop(f"{namespace}/{name}"))
            if record:
                self._record("DELETED", pod)

    def upsert_namespace(self, namespace: dict, *, record: bool = True) -> dict:
        with self._cond:
            namespace = self._stamp(namespace, "Namespace")
            name = namespace["metadata"]["name"]
            kind = "MODIFIED" if name in self.namespaces else "ADDED"
            self.namespaces[name] = namespace
            if record:
                self._record(kind, namespace)
            return namespace

    def delete_namespace(self, name: str, *, record: bool = True) -> None:
        with self._cond:
            namespace = self._stamp(self.namespaces.pop(name), "Namespace")
            if record:
                self._record("DELETED", namespace)

    def bookmark(self) -> None:
        with self._cond:
            self.rv += 1
            self.history.append((self.rv, "BOOKMARK", {
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)}}))
            self._cond.notify_all()

    def drop_watches(self) -> None:
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    def expire(self, change=None) -> None:
        """Compact history (optionally after a silent change), ending all watches."""
        with self._cond:
            if change:
                change(self)
            self.compacted = self.rv + 1
            self.rv += 1
            self._drop_gen += 1
            self._cond.notify_all()

    def watch_count(self) -> int:
        return sum(1 for path, q in self.requests if q.get("watch") in ("true", "True", "1"))

    # ------------------------------------------------------------ protocol

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.requests.append((url.path, query))
        kind = {"/api/v1/pods": "Pod", "/api/v1/namespaces": "Namespace"}.get(url.path)
        if kind is None:
            return self._send_json(h, 404, _status(404, "NotFound", f"{url.path} not found"))
        store = self.pods if kind == "Pod" else self.namespaces
        node = None
        selector = query.get("fieldSelector", "")
        if selector:
            field, _, value = selector.partition("=")
            if field != "spec.nodeName":
                return self._send_json(h, 400, _status(400, "BadRequest", f"field {field} unsupported"))
            node = value

        def visible(obj: dict) -> bool:
            return obj.get("kind") == kind and (
                node is None or (obj.get("spec") or {}).get("nodeName") == node)

        if query.get("watch") not in ("true", "True", "1"):
            with self._cond:
                items = [copy.deepcopy(p) for p in store.values() if visible(p)]
                body = {"kind": f"{kind}List", "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            return self._send_json(h, 200, body)
        self._watch(h, query, visible, store)

    def _watch(self, h, query, visible, store) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        bookmarks = query.get("allowWatchBookmarks") in ("true", "True", "1")
        deadline = time.monotonic() + float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        rv = query.get("resourceVersion", "")
        try:
            with self._cond:
                gen = self._drop_gen
                if rv in ("", "0"):
                    start = self.rv
                    events = [("ADDED", p) for p in store.values() if visible(p)]
                elif int(rv) < self.compacted:
                    err = _status(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
                    self._chunk(h, {"type": "ERROR", "object": err})
                    return self._end(h)
                else:
                    start, events = int(rv), []
            for kind, obj in events:
                self._chunk(h, {"type": kind, "object": obj})
            while True:
                with self._cond:
                    pending = [(r, k, o) for r, k, o in self.history if r > start]
                    while not pending and gen == self._drop_gen and not self._closing:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            break
                        self._cond.wait(left)
                        pending = [(r, k, o) for r, k, o in self.history if r > start]
                    stop = gen != self._drop_gen or self._closing or (
                        not pending and deadline is not None and time.monotonic() >= deadline)
                for r, kind, obj in pending:
                    start = r
                    if kind == "BOOKMARK":
                        if bookmarks:
                            self._chunk(h, {"type": kind, "object": obj})
                    elif visible(obj):
                        self._chunk(h, {"type": kind, "object": obj})
                if stop:
                    break
            self._end(h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (Watch.stop shuts its socket down)

    @staticmethod
    def _chunk(h, event: dict) -> None:
        data = (json.dumps(event) + "\n").encode()
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()

    @staticmethod
    def _end(h) -> None:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
        h.close_connection = True

    @staticmethod
    def _send_json(h, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _key(pod: dict) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
