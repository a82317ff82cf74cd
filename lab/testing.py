"""What the test tiers share beyond the lab itself: the one rule for root tests.

Tests marked ``root`` need root and the real kernel. They are skipped only when
not running as root; CI runs as root, so there they always run.
"""
from __future__ import annotations

import os


def skip_root_tests_unless_root(items, under: str | None = None) -> None:
    """pytest_collection_modifyitems body: mark the ``root`` tests (those below
    ``under``, if given) skipped when this process is not root."""
    if os.geteuid() == 0:
        return
    import pytest   # the lab's users have it; the lab itself does not need it
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords and (under is None or str(item.fspath).startswith(under)):
            item.add_marker(skip)
