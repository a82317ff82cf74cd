"""Fixtures of the cnitool-driven CNI conformance suite (building blocks in ``cnikit``).

* ``netns_factory``  named network namespaces ``mbt-<hex>-<tag>``, deleted afterwards;
* ``node``           a "node" netns: cnitool and every plugin run inside it, so the
                     bridge plugin's bridge, veths and ip_forward stay off the host;
* ``network_factory`` chained conflists (``cnikit.CniNetwork``) in tmp dirs; removes
                     the libcni result-cache entries their runs created;
* ``cnitool``        ``cnikit.Cnitool`` bound to the node netns and the plugin dir;
* ``plugin_exe``     the node executable (zipapp) built from this checkout;
* ``run_plugin``     invokes the plugin directly, the way libcni would (STATUS, GC);
* ``fake_daemon``    the daemon's ``CniServer`` with ``cnikit.RecordingHandler``.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest

from cnikit import (CNITOOL, NODE_PATH, CniNetwork, Cnitool, RecordingHandler, netns_path,
                    run)
from merbridge.cni.main import build_zipapp
from merbridge.daemon.cniserver import CniServer

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py skips root tests for tests/ only; do the same here
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords and str(item.fspath).startswith(HERE):
            item.add_marker(skip)


# -- namespaces ---------------------------------------------------------------
@pytest.fixture
def tag() -> str:
    return secrets.token_hex(4)


@pytest.fixture
def netns_factory(tag):
    created: list[str] = []

    def make(suffix: str) -> str:
        name = f"mbt-{tag}-{suffix}"
        run("ip", "netns", "add", name)
        created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            run("ip", "netns", "del", name, check=False)


@pytest.fixture
def node(netns_factory) -> str:
    return netns_factory("node")


# -- the plugin and the network ---------------------------------------------
@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("cni-bin")
    build_zipapp(str(d / "merbridge-cni"))
    return str(d)


@pytest.fixture(scope="session")
def plugin_exe(plugin_dir) -> str:
    return os.path.join(plugin_dir, "merbridge-cni")


@pytest.fixture
def network_factory(tmp_path, tag):
    made: list[CniNetwork] = []
    index = [0]

    def make(cni_version: str, socket_path: str | None = None) -> CniNetwork:
        index[0] += 1
        octet = 200 + secrets.randbelow(50)
        name = f"mbt-{tag}-{index[0]}"
        net = CniNetwork(
            name=name, conf_dir=str(tmp_path / f"net.d-{index[0]}"),
            ipam_dir=str(tmp_path / f"ipam-{index[0]}"),
            socket_path=socket_path or str(tmp_path / "merbridge-cni.sock"),
            cni_version=cni_version,
            subnet4=f"10.{octet}.{secrets.randbelow(256)}.0/24",
            subnet6=f"fd00:{tag[:4]}:{index[0]:x}::/64", bridge=f"mb{tag}{index[0]}"[:15])
        net.write()
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.cleanup_cache()


@pytest.fixture
def cnitool(node, plugin_dir) -> Cnitool:
    if not os.access(CNITOOL, os.X_OK):
        pytest.fail(f"{CNITOOL} missing: run scripts/prepare-host (conformance/build-cnitool)")
    return Cnitool(node, plugin_dir)


@pytest.fixture
def run_plugin(plugin_exe, node):
    """Invoke the plugin executable directly in the node netns.

    Returns (exit code, stdout JSON or None, stderr)."""

    def invoke(env: dict, stdin: bytes):
        p = subprocess.run(["nsenter", f"--net={netns_path(node)}", plugin_exe], input=stdin,
                           capture_output=True, timeout=60,
                           env={"PATH": NODE_PATH, **env})
        assert b"Traceback" not in p.stderr
        return p.returncode, (json.loads(p.stdout) if p.stdout else None), p.stderr.decode()

    return invoke


@pytest.fixture
def fake_daemon(tmp_path):
    """(server, handler) on ``<tmp>/merbridge-cni.sock``; root-only, as in production."""
    handler = RecordingHandler()
    server = CniServer(str(tmp_path / "merbridge-cni.sock"), handler, allowed_uids=(0,))
    server.start()
    try:
        yield server, handler
    finally:
        server.stop()
