"""The size flags every benchmark script takes: full (default), --quick, --smoke."""

from __future__ import annotations

import argparse


def add_size_flags(ap: argparse.ArgumentParser, quick_help: str = "smaller sizes") -> None:
    """``args.size`` becomes 'full', 'quick' or 'smoke' (tiny sizes: checks that the script runs)."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="size", action="store_const", const="quick", help=quick_help)
    g.add_argument("--smoke", dest="size", action="store_const", const="smoke", help="tiny sizes: checks that it runs")
    ap.set_defaults(size="full")
