"""Shared pytest configuration.

Tests marked ``root`` need root and the real kernel. They are skipped only when
not running as root; CI runs as root, so there they always run.
"""
import os

import pytest



def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
