"""Unit-tier fixtures."""
import pytest

from merbridge.cni import netconf


@pytest.fixture(autouse=True)
def private_pending_dir(tmp_path, monkeypatch):
    """A fail-open ADD without ``pendingDir`` in its config remembers itself in the
    default /var/run/merbridge/pending: keep the in-process ones in a tmp dir."""
    monkeypatch.setattr(netconf, "DEFAULT_PENDING_DIR", str(tmp_path / "pending"))
