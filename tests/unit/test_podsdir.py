"""PodsDirSource: manifests in a directory, watched with inotify."""
import json
import logging
import os
import threading
import time

import pytest

from merbridge.daemon import podsdir

POD_A = """\
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: shop
  creationTimestamp: 2024-01-02T03:04:05Z
  annotations:
    sidecar.istio.io/status: '{"initContainers":["istio-init"]}'
spec:
  nodeName: node-a
  containers:
  - name: app
  - name: istio-proxy
status:
  podIP: 10.244.0.5
"""

TWO_DOCS = """\
apiVersion: v1
kind: Pod
metadata: {name: b}
---
apiVersion: v1
kind: Service
metadata: {name: not-a-pod}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: other}
"""


class Recorder:
    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def __call__(self, event_type, pod):
        with self.cond:
            meta = pod["metadata"]   # a Namespace has no namespace: "/name"
            self.events.append((event_type, f"{meta.get('namespace', '')}/{meta['name']}", pod))
            self.cond.notify_all()

    def wait_len(self, n, timeout=5):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.events) >= n, timeout), self.events
            return [(t, k) for t, k, _ in self.events]


@pytest.fixture
def source(tmp_path):
    made = []

    def make(rec, on_namespace=None):
        src = podsdir.PodsDirSource(rec, str(tmp_path), on_namespace=on_namespace)
        made.append(src)
        src.start()
        return src

    yield make
    for src in made:
        src.stop()


def write_atomic(path, text):
    tmp = path.parent / ("." + path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def test_initial_scan_multi_document_and_json(tmp_path, source):
    (tmp_path / "a.yaml").write_text(POD_A)
    (tmp_path / "bc.yml").write_text(TWO_DOCS)
    (tmp_path / "d.json").write_text(json.dumps({"kind": "PodList", "items": [{"metadata": {"name": "d"}}]}))
    (tmp_path / "README.txt").write_text("not a manifest")
    rec = Recorder()
    src = source(rec)
    assert src.wait_synced(0)
    assert sorted(k for _, k, _ in rec.events) == ["default/b", "default/d", "other/c", "shop/a"]
    assert {t for t, _, _ in rec.events} == {"ADDED"}
    a = src.get("shop", "a")
    assert a["status"]["podIP"] == "10.244.0.5"
    assert a["metadata"]["creationTimestamp"] == "2024-01-02T03:04:05Z"   # kept as text, like the API
    json.dumps(src.snapshot())


def test_changes_are_diffed(tmp_path, source):
    (tmp_path / "a.yaml").write_text(POD_A)
    rec = Recorder()
    source(rec)
    assert rec.wait_len(1) == [("ADDED", "shop/a")]
    # an annotation edit -> MODIFIED
    write_atomic(tmp_path / "a.yaml", POD_A.replace(
        "  annotations:\n", "  annotations:\n    traffic.sidecar.istio.io/excludeOutboundPorts: '6379'\n"))
    assert rec.wait_len(2)[1] == ("MODIFIED", "shop/a")
    assert rec.events[1][2]["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] == "6379"
    # a new file -> ADDED; an in-place rewrite (open/truncate/write) also works
    (tmp_path / "b.yaml").write_text(TWO_DOCS)
    assert sorted(rec.wait_len(4)[2:]) == [("ADDED", "default/b"), ("ADDED", "other/c")]
    # removing a file -> DELETED
    (tmp_path / "a.yaml").unlink()
    assert rec.wait_len(5)[4] == ("DELETED", "shop/a")


def test_bad_files_are_logged_and_skipped(tmp_path, source, caplog):
    caplog.set_level(logging.WARNING, logger="merbridge.daemon.podsdir")
    (tmp_path / "a.yaml").write_text(POD_A)
    (tmp_path / "broken.yaml").write_text("kind: Pod\nmetadata: {name: [unclosed\n")
    (tmp_path / "noname.yaml").write_text("kind: Pod\nmetadata: {}\n")
    (tmp_path / "scalar.yaml").write_text("just a string\n")
    (tmp_path / "dup.yaml").write_text(POD_A)
    rec = Recorder()
    src = source(rec)
    assert [k for _, k, _ in rec.events] == ["shop/a"]
    text = caplog.text
    assert "broken.yaml: not valid YAML/JSON" in text
    assert "noname.yaml: metadata.name is missing" in text
    assert "scalar.yaml: not a mapping" in text
    assert "already defined in" in text and "a.yaml" in text
    # a file turning bad later does not crash the watcher; the pod goes away
    write_atomic(tmp_path / "a.yaml", "{{{")
    (tmp_path / "dup.yaml").unlink()
    assert rec.wait_len(2)[1] == ("DELETED", "shop/a")
    (tmp_path / "ok.yaml").write_text("kind: Pod\nmetadata: {name: ok}\n")
    assert rec.wait_len(3)[2] == ("ADDED", "default/ok")
    assert src._thread.is_alive()


def test_a_kind_that_is_no_string_is_skipped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="merbridge.daemon.podsdir")
    (tmp_path / "a.yaml").write_text("kind: [Pod]\nmetadata: {name: a}\n")
    (tmp_path / "b.yaml").write_text("kind: {List: 1}\nitems: []\n")
    assert podsdir.load_file(str(tmp_path / "a.yaml")) == []
    assert podsdir.load_dir(str(tmp_path)) == {}
    assert "kind ['Pod'] is not Pod or Namespace" in caplog.text


def test_missing_directory_is_a_clear_error(tmp_path):
    src = podsdir.PodsDirSource(lambda *a: None, str(tmp_path / "nope"))
    with pytest.raises(podsdir.PodsDirError, match="not a directory"):
        src.start()


def test_configmap_style_symlink_swap(tmp_path, source):
    """A ConfigMap volume: a.yaml -> ..data/a.yaml, updated by renaming ..data."""
    def publish(version, text):
        d = tmp_path / f"..v{version}"
        d.mkdir()
        (d / "a.yaml").write_text(text)
        os.symlink(d.name, tmp_path / "..data_tmp")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")

    publish(1, POD_A)
    os.symlink("..data/a.yaml", tmp_path / "a.yaml")
    rec = Recorder()
    source(rec)
    assert rec.wait_len(1) == [("ADDED", "shop/a")]
    publish(2, POD_A.replace("10.244.0.5", "10.244.0.6"))
    assert rec.wait_len(2)[1] == ("MODIFIED", "shop/a")
    assert rec.events[1][2]["status"]["podIP"] == "10.244.0.6"


def test_in_place_rewrite_does_not_flap(tmp_path, source):
    (tmp_path / "a.yaml").write_text(POD_A)
    rec = Recorder()
    source(rec)
    with open(tmp_path / "a.yaml", "w") as f:   # truncate, then write, then close
        f.write(POD_A.replace("10.244.0.5", "10.244.0.9"))
        f.flush()
        time.sleep(0.2)                          # a rescan now would see the truncated file
    assert rec.wait_len(2) == [("ADDED", "shop/a"), ("MODIFIED", "shop/a")]


def test_load_dir_parses_only_changed_files(tmp_path, monkeypatch):
    def pod(name, ip):
        return json.dumps({"apiVersion": "v1", "kind": "Pod", "status": {"podIP": ip},
                           "metadata": {"name": name, "namespace": "ns"}})

    for i in range(5):
        (tmp_path / f"p{i}.json").write_text(pod(f"p{i}", f"10.0.0.{i}"))
    old = time.time() - 60          # out of the racy window
    for f in tmp_path.iterdir():
        os.utime(f, (old, old))
    monkeypatch.setattr(podsdir, "RACY_S", 0.0)
    cache = {}
    parsed = []
    real = podsdir.load_file
    monkeypatch.setattr(podsdir, "load_file", lambda p: parsed.append(os.path.basename(p)) or real(p))

    first = podsdir.load_dir(str(tmp_path), cache)
    assert len(first) == 5 and len(parsed) == 5
    parsed.clear()
    (tmp_path / "new.json").write_text(pod("new", "10.0.0.9"))
    tmp = tmp_path / ".p1.json"                      # replaced by rename, same size
    tmp.write_text(pod("p1", "10.0.0.8"))
    os.replace(tmp, tmp_path / "p1.json")
    (tmp_path / "p2.json").unlink()
    second = podsdir.load_dir(str(tmp_path), cache)
    assert sorted(parsed) == ["new.json", "p1.json"]
    assert second["ns/p1"]["status"]["podIP"] == "10.0.0.8" and "ns/p2" not in second
    assert second["ns/p0"] is first["ns/p0"]          # unchanged: not parsed again
    assert set(cache) == {str(tmp_path / n) for n in ("p0.json", "p1.json", "p3.json",
                                                      "p4.json", "new.json")}


def test_a_file_inside_the_racy_window_is_parsed_again(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text(POD_A)
    cache = {}
    parsed = []
    real = podsdir.load_file
    monkeypatch.setattr(podsdir, "load_file", lambda p: parsed.append(p) or real(p))
    podsdir.load_dir(str(tmp_path), cache)
    podsdir.load_dir(str(tmp_path), cache)        # just written: stat cannot be trusted yet
    assert len(parsed) == 2


NAMESPACE_SHOP = """\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
"""


def test_namespace_manifests_go_to_on_namespace(tmp_path, source):
    (tmp_path / "a.yaml").write_text(POD_A + "---\n" + NAMESPACE_SHOP)   # same file as a pod
    (tmp_path / "more.json").write_text(json.dumps(
        {"kind": "NamespaceList", "items": [{"metadata": {"name": "other"}}]}))
    pods, namespaces = Recorder(), Recorder()
    src = source(pods, on_namespace=namespaces)
    assert [k for _, k, _ in pods.events] == ["shop/a"]          # namespaces are not pods
    assert sorted(namespaces.wait_len(2)) == [("ADDED", "/other"), ("ADDED", "/shop")]
    assert sorted(n["metadata"]["name"] for n in src.namespaces()) == ["other", "shop"]
    assert src.get("shop", "a") is not None and len(src.snapshot()) == 1
    # a label flip -> MODIFIED, a removed manifest -> DELETED; the pod is untouched
    write_atomic(tmp_path / "a.yaml", POD_A + "---\n" + NAMESPACE_SHOP.replace("ambient", "none"))
    assert namespaces.wait_len(3)[2] == ("MODIFIED", "/shop")
    assert namespaces.events[2][2]["metadata"]["labels"] == {"istio.io/dataplane-mode": "none"}
    (tmp_path / "more.json").unlink()
    assert namespaces.wait_len(4)[3] == ("DELETED", "/other")
    assert len(pods.events) == 1


def test_duplicate_namespace_is_skipped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="merbridge.daemon.podsdir")
    (tmp_path / "a.yaml").write_text(NAMESPACE_SHOP)
    (tmp_path / "b.yaml").write_text(NAMESPACE_SHOP.replace("ambient", "none"))
    pods, namespaces = podsdir.load_all(str(tmp_path))
    assert pods == {}
    assert namespaces["shop"]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert "skipping namespace shop in" in caplog.text and "already defined in" in caplog.text


def test_load_all_with_changed_names_reads_only_those(tmp_path, monkeypatch):
    """With the names inotify reported, the other files are neither stat()ed
    nor parsed again, even inside the racy window; the result is the full scan's."""
    def pod(name, ip):
        return json.dumps({"apiVersion": "v1", "kind": "Pod", "status": {"podIP": ip},
                           "metadata": {"name": name, "namespace": "ns"}})

    for i in range(5):
        (tmp_path / f"p{i}.json").write_text(pod(f"p{i}", f"10.0.0.{i}"))
    cache: dict = {}
    podsdir.load_all(str(tmp_path), cache)            # all just written: racy
    parsed, stats = [], []
    real_load, real_stat = podsdir.load_file, os.stat
    monkeypatch.setattr(podsdir, "load_file", lambda p: parsed.append(os.path.basename(p))
                        or real_load(p))
    (tmp_path / "new.json").write_text(pod("new", "10.0.0.9"))
    (tmp_path / "p1.json").write_text(pod("p1", "10.0.0.8"))
    (tmp_path / "p2.json").unlink()
    monkeypatch.setattr(podsdir.os, "stat", lambda p, *a, **k: stats.append(p)
                        or real_stat(p, *a, **k))
    pods, _ = podsdir.load_all(str(tmp_path), cache, {"new.json", "p1.json", "p2.json",
                                                     ".new.json.tmp"})
    monkeypatch.undo()
    assert sorted(parsed) == ["new.json", "p1.json"]
    assert {os.path.basename(p) for p in stats} == {"new.json", "p1.json", "p2.json"}
    assert pods == podsdir.load_all(str(tmp_path))[0]
    assert sorted(pods) == ["ns/new", "ns/p0", "ns/p1", "ns/p3", "ns/p4"]
    assert pods["ns/p1"]["status"]["podIP"] == "10.0.0.8"
    assert set(cache) == {str(tmp_path / n) for n in ("p0.json", "p1.json", "p3.json",
                                                      "p4.json", "new.json")}


def test_an_event_reads_only_its_file(tmp_path, source, monkeypatch):
    """Atomic writes (a dot temp file renamed into place) of one manifest
    among many: the watcher parses that one file."""
    for i in range(20):
        (tmp_path / f"p{i}.yaml").write_text(POD_A.replace("name: a", f"name: p{i}"))
    rec = Recorder()
    source(rec)
    assert len(rec.wait_len(20)) == 20
    parsed = []
    real = podsdir.load_file
    monkeypatch.setattr(podsdir, "load_file", lambda p: parsed.append(os.path.basename(p))
                        or real(p))
    write_atomic(tmp_path / "p3.yaml", POD_A.replace("name: a", "name: p3")
                 .replace("10.244.0.5", "10.244.0.33"))
    assert rec.wait_len(21)[20] == ("MODIFIED", "shop/p3")
    assert set(parsed) == {"p3.yaml"}
