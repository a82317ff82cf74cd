"""Both pod sources call back after releasing their lock.

The daemon's Registry.restore() holds a container lock and calls the source's
get(); a DELETED event goes callback -> Registry.delete(), which needs that
container lock.  If the source held its own lock around the callback, the two
would wait for each other forever.  Here the callback asks get()/snapshot()
from another thread (as restore() would) and gives it a few seconds: with the
lock held across the callback those calls cannot finish, and the test fails
instead of hanging.
"""
import json
import threading

from merbridge.daemon import k8s, podsdir
from test_k8s_source import NODE, make_pod, write_kubeconfig

WAIT = 3.0


class CallsBack:
    """A pod callback that reads the source from another thread while it runs."""

    def __init__(self):
        self.source = None
        self.seen = []          # (event, get() result name, snapshot() size) or "deadlock"
        self.done = threading.Event()

    def __call__(self, event, pod):
        meta = pod["metadata"]
        got = {}
        reader = threading.Thread(target=lambda: got.update(
            pod=self.source.get(meta["namespace"], meta["name"]),
            snapshot=self.source.snapshot()), daemon=True)
        reader.start()
        reader.join(WAIT)
        if reader.is_alive():
            self.seen.append((event, "deadlock"))
        else:
            # the source's state already includes this event when it is delivered
            self.seen.append((event, (got["pod"] or {}).get("metadata", {}).get("name"),
                              len(got["snapshot"])))
        self.done.set()


def test_pods_dir_callback_can_read_the_source(tmp_path):
    cb = CallsBack()
    src = cb.source = podsdir.PodsDirSource(cb, str(tmp_path))
    (tmp_path / "a.json").write_text(json.dumps({"kind": "Pod", "metadata": {"name": "a"}}))
    src.start()
    try:
        (tmp_path / "a.json").unlink()
        src.rescan()
        assert cb.seen == [("ADDED", "a", 1), ("DELETED", None, 0)]
    finally:
        src.stop()


def test_kubernetes_callback_can_read_the_source(server, tmp_path):
    server.upsert(make_pod("a"))
    cb = CallsBack()
    src = cb.source = k8s.KubernetesPodSource(
        cb, NODE, kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", server))
    src.start()
    try:
        assert src.wait_synced(10) and cb.done.wait(10)
        cb.done.clear()
        server.delete("shop", "a")
        assert cb.done.wait(10)
        assert cb.seen == [("ADDED", "a", 1), ("DELETED", None, 0)]
    finally:
        src.stop()
