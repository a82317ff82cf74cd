"""KubernetesPodSource: the real kubernetes client and informer against fake_apiserver."""
import json
import threading
import time

import pytest

from merbridge.daemon import k8s

NODE = "node-a"


def make_pod(name, node=NODE, ns="shop", annotations=None, ip="10.244.0.5"):
    return {"metadata": {"name": name, "namespace": ns, "annotations": annotations or {}, "labels": {}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}


class Recorder:
    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def __call__(self, event_type, pod):
        with self.cond:
            self.events.append((event_type, pod["metadata"]["name"], pod))
            self.cond.notify_all()

    def wait(self, predicate, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout), self.events
        return self.events

    def names(self):
        return [(t, n) for t, n, _ in self.events]


def write_kubeconfig(path, server):
    """A kubeconfig for ``server`` (a FakeApiServer) at ``path``; returns its path as str."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    return str(path)


@pytest.fixture
def source_factory(server, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
    sources = []

    def make(recorder, node=NODE, on_namespace=None):
        src = k8s.KubernetesPodSource(recorder, node, kubeconfig=kubeconfig,
                                      on_namespace=on_namespace)
        sources.append(src)
        src.start()
        return src

    yield make
    for src in sources:
        src.stop()


def test_initial_list_is_node_scoped(server, source_factory):
    server.upsert(make_pod("a"))
    server.upsert(make_pod("b"))
    server.upsert(make_pod("elsewhere", node="node-b"))
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    assert sorted(rec.names()) == [("ADDED", "a"), ("ADDED", "b")]
    assert sorted(p["metadata"]["name"] for p in src.snapshot()) == ["a", "b"]
    assert src.get("shop", "elsewhere") is None
    pod = src.get("shop", "a")
    # plain camelCase dicts, as annotations.py expects
    assert pod["status"]["podIPs"] == [{"ip": "10.244.0.5"}] and pod["spec"]["nodeName"] == NODE
    list_queries = [q for path, q in server.requests if "watch" not in q]
    assert list_queries and all(q["fieldSelector"] == f"spec.nodeName={NODE}" for q in list_queries)


def test_watch_events_and_annotation_change(server, source_factory):
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    server.upsert(make_pod("a"))
    server.upsert(make_pod("other-node", node="node-b"))
    rec.wait(lambda ev: ("ADDED", "a") in [(t, n) for t, n, _ in ev])
    server.upsert(make_pod("a", annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "6379"}))
    events = rec.wait(lambda ev: any(t == "MODIFIED" for t, _, _ in ev))
    modified = [p for t, n, p in events if t == "MODIFIED"][0]
    assert modified["metadata"]["annotations"] == {"traffic.sidecar.istio.io/excludeOutboundPorts": "6379"}
    server.delete("shop", "a")
    rec.wait(lambda ev: ev[-1][0] == "DELETED")
    assert rec.names() == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert src.snapshot() == []
    # the watch asked for bookmarks and was node-scoped too
    watches = [q for _, q in server.requests if q.get("watch")]
    assert watches and all(q["fieldSelector"] == f"spec.nodeName={NODE}" for q in watches)
    assert all(q.get("allowWatchBookmarks") == "true" for q in watches)


def test_dropped_watch_resumes_from_last_resource_version(server, source_factory):
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    server.upsert(make_pod("a"))
    rec.wait(lambda ev: len(ev) == 1)
    last_rv = server.pods["shop/a"]["metadata"]["resourceVersion"]
    lists_before = sum(1 for _, q in server.requests if "watch" not in q)
    server.drop_watches()
    deadline = time.monotonic() + 10
    while not any(q.get("watch") and q.get("resourceVersion") == last_rv for _, q in server.requests[-3:]):
        assert time.monotonic() < deadline, server.requests
        time.sleep(0.02)
    server.upsert(make_pod("b"))
    rec.wait(lambda ev: len(ev) == 2)
    assert rec.names() == [("ADDED", "a"), ("ADDED", "b")]   # nothing replayed
    assert sum(1 for _, q in server.requests if "watch" not in q) == lists_before  # no re-list


def test_bookmark_advances_resource_version(server, source_factory):
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    server.upsert(make_pod("a"))
    rec.wait(lambda ev: len(ev) == 1)
    server.bookmark()
    bookmark_rv = str(server.rv)
    time.sleep(0.3)
    server.drop_watches()
    deadline = time.monotonic() + 10
    while not any(q.get("resourceVersion") == bookmark_rv for _, q in server.requests if q.get("watch")):
        assert time.monotonic() < deadline, server.requests
        time.sleep(0.02)
    assert rec.names() == [("ADDED", "a")]   # a bookmark is not a pod event


def test_410_gone_relists_and_diffs(server, source_factory):
    server.upsert(make_pod("keep"))
    server.upsert(make_pod("gone"))
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    rec.wait(lambda ev: len(ev) == 2)

    def silent_changes(s):
        # changes the client never sees as events: only a re-list can find them
        s.delete("shop", "gone", record=False)
        s.upsert(make_pod("new"), record=False)
        s.upsert(make_pod("keep", annotations={"x": "y"}), record=False)

    lists_before = sum(1 for _, q in server.requests if "watch" not in q)
    server.expire(silent_changes)
    rec.wait(lambda ev: len(ev) >= 5)
    assert sorted(rec.names()[2:]) == [("ADDED", "new"), ("DELETED", "gone"), ("MODIFIED", "keep")]
    assert sum(1 for _, q in server.requests if "watch" not in q) == lists_before + 1
    assert sorted(p["metadata"]["name"] for p in src.snapshot()) == ["keep", "new"]
    # and the informer is watching again from the new list
    server.upsert(make_pod("after"))
    rec.wait(lambda ev: ev[-1][1] == "after")


def test_unchanged_relist_is_silent(server, source_factory):
    server.upsert(make_pod("a"))
    rec = Recorder()
    src = source_factory(rec)
    assert src.wait_synced(10)
    server.expire()                  # forces a re-list that finds the same pod
    deadline = time.monotonic() + 10
    while sum(1 for _, q in server.requests if "watch" not in q) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.upsert(make_pod("b"))
    rec.wait(lambda ev: len(ev) == 2)
    assert rec.names() == [("ADDED", "a"), ("ADDED", "b")]


def test_configuration_errors_are_clear(tmp_path):
    with pytest.raises(k8s.KubernetesError, match="node name"):
        k8s.KubernetesPodSource(lambda *a: None, "", kubeconfig=str(tmp_path / "x"))
    with pytest.raises(k8s.KubernetesError, match="kubeconfig"):
        k8s.KubernetesPodSource(lambda *a: None, NODE, kubeconfig=str(tmp_path / "missing"))


def make_namespace(name, labels=None):
    return {"metadata": {"name": name, "labels": dict(labels or {})}}


def test_namespaces_are_listed_and_watched_with_on_namespace(server, source_factory):
    server.upsert_namespace(make_namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    server.upsert(make_pod("a"))
    pods, namespaces = Recorder(), Recorder()
    src = source_factory(pods, on_namespace=namespaces)
    assert src.wait_synced(10)
    assert namespaces.names() == [("ADDED", "shop")]
    assert pods.names() == [("ADDED", "a")]          # namespaces never reach the pod callback
    assert [n["metadata"]["labels"] for n in src.namespaces()] == [
        {"istio.io/dataplane-mode": "ambient"}]
    # a label flip is a MODIFIED namespace event, a new namespace an ADDED one
    server.upsert_namespace(make_namespace("shop"))
    server.upsert_namespace(make_namespace("other"))
    namespaces.wait(lambda ev: len(ev) == 3)
    assert namespaces.names()[1:] == [("MODIFIED", "shop"), ("ADDED", "other")]
    assert namespaces.events[1][2]["metadata"].get("labels") in (None, {})
    server.delete_namespace("other")
    namespaces.wait(lambda ev: ev[-1][0] == "DELETED")
    assert sorted(n["metadata"]["name"] for n in src.namespaces()) == ["shop"]
    assert pods.names() == [("ADDED", "a")]
    # the namespace list+watch is cluster-wide (no node selector) and asks for bookmarks
    ns_requests = [q for path, q in server.requests if path == "/api/v1/namespaces"]
    assert any(q.get("watch") for q in ns_requests)
    assert all("fieldSelector" not in q for q in ns_requests)
    assert all(q.get("allowWatchBookmarks") == "true" for q in ns_requests if q.get("watch"))


def test_namespace_watch_survives_410(server, source_factory):
    namespaces = Recorder()
    src = source_factory(Recorder(), on_namespace=namespaces)
    assert src.wait_synced(10)
    server.expire(lambda s: s.upsert_namespace(make_namespace("late"), record=False))
    namespaces.wait(lambda ev: ("ADDED", "late") in [(t, n) for t, n, _ in ev])
    server.upsert_namespace(make_namespace("after"))
    namespaces.wait(lambda ev: ev[-1][1] == "after")


def test_no_namespace_requests_without_on_namespace(server, source_factory):
    server.upsert_namespace(make_namespace("shop"))
    src = source_factory(Recorder())
    assert src.wait_synced(10)
    time.sleep(0.2)
    assert src.namespaces() == []
    assert not [p for p, _ in server.requests if p == "/api/v1/namespaces"]
