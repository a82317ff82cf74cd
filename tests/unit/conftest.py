"""Unit-tier fixtures."""
import pytest

from fake_apiserver import FakeApiServer  # tests/unit is on sys.path (rootdir-less test dirs)
from merbridge.cni import netconf


@pytest.fixture(autouse=True)
def private_pending_dir(tmp_path, monkeypatch):
    """A fail-open ADD without ``pendingDir`` in its config remembers itself in the
    default /var/run/merbridge/pending: keep the in-process ones in a tmp dir."""
    monkeypatch.setattr(netconf, "DEFAULT_PENDING_DIR", str(tmp_path / "pending"))


@pytest.fixture
def server():
    """A fake Kubernetes API server (fake_apiserver.py)."""
    with FakeApiServer() as s:
        yield s


@pytest.fixture
def world(tmp_path):
    """A pod registry with in-memory maps and a fake podnet (test_pods.make_world)."""
    from test_pods import make_world
    return make_world(tmp_path)
