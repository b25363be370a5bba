"""Run every benchmark (``make bench``); each prints a ratio against a baseline from the same run.

Usage: python benchmarks/run_all.py [--quick | --smoke] [NAME ...]   (NAME: dpa, synthesize, distill, deploy)

--smoke runs every benchmark at tiny sizes: the tests use it to check that the scripts
still run against the current code; its ratios mean little.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCHES = {
    "dpa": "bench_dpa",
    "synthesize": "bench_synthesize",
    "distill": "bench_distill",
    "deploy": "bench_deploy",
}


def main() -> int:
    from _sizes import add_size_flags  # benchmarks/ is on sys.path (the script's folder)

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHES)} (default: all)")
    add_size_flags(ap, quick_help="smaller sizes (a few minutes)")
    ap.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    args = ap.parse_args()
    unknown = sorted(set(args.names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    names = args.names or list(BENCHES)
    results = {}
    for name in names:
        mod = importlib.import_module(BENCHES[name])
        print(f"\n=== benchmark: {name} ===", flush=True)
        t0 = time.perf_counter()
        results[name] = mod.run(args.size)
        print(f"=== {name} took {time.perf_counter() - t0:.1f} s ===", flush=True)
    print("\nsummary:")
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
