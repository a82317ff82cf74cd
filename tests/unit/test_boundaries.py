"""The design's import rules (docs/design.md), checked on the source text.

- Each third-party library is imported by exactly one module, so a change of
  library (or of its version's API) touches one file.
- merbridge.cni is stdlib-only: it runs under the node's python3, outside our
  virtualenv, on every pod start.
- merbridge.bpf never imports merbridge.daemon (layers: daemon above bpf).
- The daemon imports from merbridge.cni only the modules docs/design.md names
  (the wire contract and its errors, the in-process plugin, the remembered
  ADDs, the zipapp builder), and the pod plumbing (podnet, netns) never
  imports the registry's modules.
- Nothing imports the folders by name (``import daemon`` would pick up
  python-daemon or the folder itself depending on sys.path).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"cni": "merbridge.cni", "daemon": "merbridge.daemon", "bpf": "merbridge.bpf"}

#: third-party top-level module -> the one project module allowed to import it
OWNERS = {
    "bcc": "bpf/loader.py",
    "pyroute2": "daemon/netns.py",
    "kubernetes": "daemon/k8s.py",
    "click": "daemon/cli.py",
    "netaddr": "daemon/annotations.py",
    "yaml": "daemon/podsdir.py",
    "prometheus_client": "daemon/metrics.py",
}


#: the cni modules the daemon may import (docs/design.md, "Import rules")
DAEMON_FROM_CNI = {"merbridge.cni.protocol", "merbridge.cni.errors", "merbridge.cni.inprocess",
                   "merbridge.cni.pending", "merbridge.cni.zipapp"}
#: the pod plumbing, below the registry: it must not import these
PLUMBING = ("daemon/podnet.py", "daemon/netns.py")
REGISTRY = ("merbridge.daemon.pods", "merbridge.daemon.enroll", "merbridge.daemon.adopt",
            "merbridge.daemon.podfacts", "merbridge.daemon.cniserver")


def _imports(path: Path) -> list[str]:
    """Every module name imported anywhere in the file (also inside functions);
    ``from a import b`` gives ``a`` and ``a.b`` (b may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return names


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_import_rules(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    folder = rel.split("/", 1)[0]
    for name in _imports(path):
        top = name.split(".", 1)[0]
        assert top not in PACKAGES, f"{rel} imports {name!r}: use merbridge.{top}"
        owner = OWNERS.get(top)
        if owner is not None:
            assert rel == owner, f"{rel} imports {top}, which only {owner} may import"
        if folder == "cni":
            stdlib = top in sys.stdlib_module_names or top == "__future__"
            assert stdlib or name.startswith("merbridge.cni"), \
                f"{rel} imports {name!r}: the CNI plugin must stay stdlib-only"
        if folder == "bpf":
            assert not name.startswith("merbridge.daemon"), f"{rel} imports {name}: bpf is below daemon"
        if folder == "daemon" and name.startswith("merbridge.cni."):
            module = ".".join(name.split(".")[:3])
            assert module in DAEMON_FROM_CNI, \
                f"{rel} imports {name}: the daemon may import from cni only " \
                f"{sorted(DAEMON_FROM_CNI)}"
        if rel in PLUMBING:
            assert not name.startswith(REGISTRY), \
                f"{rel} imports {name}: the pod plumbing is below the registry"


def test_every_library_has_its_module() -> None:
    for top, owner in OWNERS.items():
        assert any(n.split(".", 1)[0] == top for n in _imports(ROOT / owner)), \
            f"{owner} no longer imports {top}: update OWNERS and docs/design.md"
