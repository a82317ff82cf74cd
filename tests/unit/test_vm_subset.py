"""The vm tier's list of root tests (tests/vm/subset.txt) names tests that exist:
a renamed or re-parametrized test would otherwise only show up as a failed
35-minute VM run."""
import os
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBSET = os.path.join(TOP, "tests", "vm", "subset.txt")


def test_every_line_of_the_vm_subset_is_a_collected_test():
    with open(SUBSET, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ids
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "pytest"),
                          "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "root", *ids],
                         cwd=TOP, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    collected = [line for line in res.stdout.splitlines() if "::" in line]
    for node in ids:
        assert any(c == node or c.startswith(node + "::") or c.startswith(node + "[")
                   or (node.endswith(".py") and c.startswith(node + "::")) for c in collected), node
