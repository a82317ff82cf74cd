"""The one rule for root tests (merbridge.lab.testing): skipped when not root,
and only below the folder asked for."""
from merbridge.lab import testing


class Item:
    def __init__(self, path, root):
        self.fspath, self.keywords, self.markers = path, {"root": 1} if root else {}, []

    def add_marker(self, m):
        self.markers.append(m)


def _items():
    return [Item("/c/conformance/test_a.py", True), Item("/c/tests/root/test_b.py", True),
            Item("/c/tests/unit/test_c.py", False)]


def test_not_root_skips_root_tests_only(monkeypatch):
    monkeypatch.setattr(testing.os, "geteuid", lambda: 1000)
    items = _items()
    testing.skip_root_tests_unless_root(items)
    assert [bool(i.markers) for i in items] == [True, True, False]
    assert items[0].markers[0].kwargs["reason"] == "needs root"
    items = _items()
    testing.skip_root_tests_unless_root(items, under="/c/conformance")
    assert [bool(i.markers) for i in items] == [True, False, False]


def test_root_skips_nothing(monkeypatch):
    monkeypatch.setattr(testing.os, "geteuid", lambda: 0)
    items = _items()
    testing.skip_root_tests_unless_root(items)
    assert not any(i.markers for i in items)
