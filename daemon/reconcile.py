"""CNI mode: make sure every in-mesh pod of the node ends up enrolled.

A pod can start without its ADD reaching us: the daemon was down, killed,
crash-looping or not installed yet when the pod started (with ``failOpen``
the plugin then lets the pod start, Istio's iptables rules intercepting it
meanwhile). Two ways bring such pods in, both through the normal ADD path:

* **replay**: the plugin remembered the ADD (``merbridge.cni.pending``:
  the invocation itself, in ``<state dir>/pending``). It is run again through
  the plugin's own skel and commands (``merbridge.cni.inprocess.replay``),
  then removed; "try again later" (code 11: e.g. the pod source does not
  list the pod yet) keeps it for the next pass, any other error drops it with
  a log line (e.g. the netns is gone: the pod was deleted meanwhile).
* **adopt**: in-mesh pods of the pod source with an IP and no record (the
  plugin was not installed yet: first install, or after a clean stop) are
  looked for among the node's network namespaces -- the named ones and those
  of every process in ``--proc-path`` -- by pod IP (``Registry.adopt``).

One pass runs at start-up, right after the state file is restored, and then
every ``interval`` seconds, on a thread of its own. What is left over is in
``/metrics`` (``merbridge_pods_pending``, ``merbridge_pods_unenrolled``,
``merbridge_pods_recovered``) and in ``reconcile.json`` in the state dir,
which ``merbridge status`` shows.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from merbridge.cni import inprocess, pending

log = logging.getLogger(__name__)

STATUS_FILE = "reconcile.json"
TRY_AGAIN_LATER = 11
#: a remembered ADD still "try again later" after this long is dropped (the pod
#: source never listed the pod); adopt still finds the pod if it shows up
GIVE_UP_AFTER = 600.0


class Reconciler:
    def __init__(self, registry: Any, server: Any, snapshot: Callable[[], list], *,
                 pending_dir: str, netns_dir: str, proc_path: str | None, state_dir: str,
                 interval: float = 1.0, metrics: Any = None) -> None:
        self.registry, self.server, self.snapshot = registry, server, snapshot
        self.pending_dir, self.netns_dir, self.proc_path = pending_dir, netns_dir, proc_path
        self.state_dir, self.interval, self.metrics = state_dir, interval, metrics
        self.totals = {"replayed": 0, "adopted": 0, "dropped": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cni-reconcile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("reconcile pass failed")

    def count_adopted(self, n: int) -> None:
        self.totals["adopted"] += n
        if self.metrics is not None and n:
            self.metrics.pods_recovered.labels(how="adopted").inc(n)

    def run_once(self) -> None:
        left = self.replay()
        self.count_adopted(self.registry.adopt(self.snapshot(), self.netns_dir, self.proc_path))
        unenrolled = list(getattr(self.registry, "unaccounted", []))
        if self.metrics is not None:
            self.metrics.pods_pending.set(len(left))
            self.metrics.pods_unenrolled.set(len(unenrolled))
        self._write_status(left, unenrolled)

    def replay(self) -> list[str]:
        """Replay every remembered ADD; the container ids still waiting."""
        left = []
        for cid, path in pending.entries(self.pending_dir):
            if self._stop.is_set():
                break
            try:
                with open(path, "rb") as f:
                    data = f.read()
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue               # its DEL came meanwhile
            code, why = inprocess.replay(data, self.server.local_post, self.server.local_status)
            if code == TRY_AGAIN_LATER and age < GIVE_UP_AFTER:
                log.debug("replay of the ADD of %s: not yet: %s", cid, why)
                left.append(cid)
                continue
            pending.forget(self.pending_dir, cid)
            if code == 0:
                self.totals["replayed"] += 1
                if self.metrics is not None:
                    self.metrics.pods_recovered.labels(how="replayed").inc()
                log.info("replayed the ADD of container %s, remembered while no daemon served it",
                         cid)
            else:
                self.totals["dropped"] += 1
                log.warning("dropped the remembered ADD of container %s: code %d: %s", cid,
                            code, why)
        return left

    def _write_status(self, left: list[str], unenrolled: list[str]) -> None:
        data = {"time": time.time(), "pending": left, "unenrolled": unenrolled, **self.totals}
        tmp = os.path.join(self.state_dir, f".{STATUS_FILE}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, os.path.join(self.state_dir, STATUS_FILE))
        except OSError as exc:
            log.debug("cannot write %s: %s", STATUS_FILE, exc)
