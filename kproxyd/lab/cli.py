"""`kproxyd lab …`: the embedded lab's commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kproxyd.logs import configure_logging


def lab_main(argv: Sequence[str]) -> int:
    """Parse `kproxyd lab` arguments and run the command."""
    parser = argparse.ArgumentParser(prog="kproxyd lab", description="The embedded lab (needs root).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="replay the Service tutorials on a 2-node lab with real traffic")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kproxyd lab needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    configure_logging(verbosity=-1)
    if args.command == "demo":
        from kproxyd.lab.demo import run_demo

        return run_demo()
    return 2
