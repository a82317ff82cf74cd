"""Shared pytest configuration.

Tests marked ``root`` need root and the real kernel. They are skipped only when
not running as root; CI runs as root, so there they always run.
"""
from merbridge.lab.testing import skip_root_tests_unless_root


def pytest_collection_modifyitems(config, items):
    skip_root_tests_unless_root(items)
