"""The design's import rules (docs/design.md), checked on the source text.

- Each third-party library is imported by exactly one module, so a change of
  library (or of its version's API) touches one file.
- merbridge.cni is stdlib-only: it runs under the node's python3, outside our
  virtualenv, on every pod start.
- merbridge.bpf never imports merbridge.daemon (layers: lab above daemon above
  bpf), and the product (cni, daemon, bpf) never imports merbridge.lab: the lab,
  the demo and the test kit are a distribution of their own (lab/setup.cfg) that
  the node image does not ship.
- The daemon imports from merbridge.cni only the modules docs/design.md names
  (the wire contract and its errors, the in-process plugin, the remembered
  ADDs, the zipapp builder), and the pod plumbing (podnet, netns) never
  imports the registry's modules.
- Nothing imports the folders by name (``import daemon`` would pick up
  python-daemon or the folder itself depending on sys.path).
"""
from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"cni": "merbridge.cni", "daemon": "merbridge.daemon", "bpf": "merbridge.bpf",
            "lab": "merbridge.lab"}
PRODUCT = ("cni", "daemon", "bpf")

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
#: the lab's own use of those libraries: one lab module each, none for the rest
LAB_OWNERS = {"pyroute2": "lab/netns.py"}


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
        owner = (LAB_OWNERS if folder == "lab" else OWNERS).get(top, OWNERS.get(top))
        if owner is not None:
            assert rel == owner, f"{rel} imports {top}, which only {owner} may import"
        if folder in PRODUCT:
            assert not name.startswith("merbridge.lab"), \
                f"{rel} imports {name}: the product never imports the lab"
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


def test_every_library_has_its_lab_module() -> None:
    for top, owner in LAB_OWNERS.items():
        assert any(n.split(".", 1)[0] == top for n in _imports(ROOT / owner)), \
            f"{owner} no longer imports {top}: update LAB_OWNERS and docs/design.md"


def _cfg(path: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(path)
    return cfg


def test_the_product_distribution_does_not_ship_the_lab() -> None:
    cfg = _cfg(ROOT / "setup.cfg")
    packages = cfg["options"]["packages"].split()
    assert set(packages) == {PACKAGES[f] for f in PRODUCT}, packages
    mapped = [line.split("=")[1].strip() for line in
              cfg["options"]["package_dir"].strip().splitlines()]
    assert "lab" not in mapped and "." not in mapped, mapped
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "merbridge.lab" not in scripts and "merbridge-lab" not in scripts


def test_the_lab_is_its_own_distribution() -> None:
    cfg = _cfg(ROOT / "lab" / "setup.cfg")
    assert cfg["metadata"]["name"] == "merbridge-lab"
    assert cfg["options"]["packages"].split() == ["merbridge.lab"]
    assert cfg["options"]["package_dir"].split() == ["merbridge.lab", "=", "."]
    assert "merbridge-lab = merbridge.lab.cli:main" in cfg["options.entry_points"]["console_scripts"]
    # ./run demo is the lab's command, not the product's
    run = (ROOT / "run").read_text()
    assert ".venv/bin/merbridge-lab demo" in run and "bin/merbridge demo" not in run


def test_the_node_image_does_not_ship_the_lab() -> None:
    ignored = {ln.strip().strip("/") for ln in
               (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert "lab" in ignored, "the lab must stay out of the image's build context"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    installs = re.findall(r"pip install[^\n&;]*", dockerfile)
    assert installs and not any("lab" in i for i in installs), installs


def test_the_product_imports_without_the_lab() -> None:
    """Importing every product module never loads merbridge.lab (run in a fresh
    interpreter with the lab's import blocked)."""
    modules = sorted(f"{PACKAGES[p.relative_to(ROOT).parts[0]]}.{p.stem}"
                     for p in _sources() if p.relative_to(ROOT).parts[0] in PRODUCT
                     and p.stem not in ("__init__", "__main__")
                     and len(p.relative_to(ROOT).parts) == 2)
    code = ("import importlib, sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'merbridge.lab' or name.startswith('merbridge.lab.'):\n"
            "            raise ImportError('the product imported ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "assert not [m for m in sys.modules if m.startswith('merbridge.lab')]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
