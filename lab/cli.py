"""``merbridge-lab``: the lab's command line (standard library only; click stays
in the product's cli).

    merbridge-lab demo [--json]   the demo of the README (``./run demo``)
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merbridge-lab",
                                     description="merbridge's labs and demo (not the product)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="a small node in network namespaces, real traffic, what happened to it",
        description="A small node in network namespaces (pods via the chained CNI, sidecars, "
                    "the daemon), real traffic, and what happened to each connection; then "
                    "tears it all down. Needs root; changes nothing outside its own "
                    "namespaces, cgroup and dirs.")
    demo.add_argument("--json", dest="as_json", action="store_true",
                      help="Print the facts as JSON instead of a table.")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from merbridge.lab import demo as demo_mod
        return demo_mod.run(as_json=args.as_json)
    return 2  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
