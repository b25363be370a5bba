"""``make demo``: every stage, in order, on the embedded demo data (CPU, no download).

demo data -> DPA -> prompt bank -> CCD synthesis -> distillation -> evaluation -> export + restore.
Each step is the same ``d4ir`` command a user would type, run in-process; each one
resumes, so rerunning ``make demo`` after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from d4ir_pipeline.cli import main as cli_main
from d4ir_pipeline.common.runtime import setup_logging
from d4ir_pipeline.deploy.demo import demo_paths, demo_step
from d4ir_pipeline.errors import D4IRError

logger = logging.getLogger(__name__)


def _run(args: list[str]) -> float:
    """Run one ``d4ir`` command in-process; return its wall time in seconds."""
    logger.info("$ d4ir %s", " ".join(args))
    t0 = time.perf_counter()
    cli_main.main(args, prog_name="d4ir", standalone_mode=False)
    return time.perf_counter() - t0


def run_demo(work_dir: str = "runs/demo", *, profile: str = "demo", student: str | None = None) -> dict[str, float]:
    """Run the whole pipeline; return the seconds spent per step."""
    work = Path(work_dir)
    common = ["--profile", profile, "--work-dir", str(work)]
    student_set = ["--set", f"student.name={student}"] if student else []
    steps: list[tuple[str, list[str]]] = [
        ("demo data", ["demo-data", "--out", str(work / "data")]),
        ("DPA", ["train-dpa", *common]),
        ("prompt bank", ["prompt-bank", *common]),
        ("synthesis", ["synthesize", *common]),
        ("teacher labels", ["label", *common]),
        ("distillation", ["distill", *common, *student_set]),
        ("evaluation", ["evaluate", *common, *student_set]),
    ]
    times: dict[str, float] = {}
    for name, args in steps:
        times[name] = _run(args)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work-dir", default="runs/demo", help="where every output goes (default runs/demo)")
    ap.add_argument("--profile", default="demo", help="config profile (stages/<profile>/)")
    ap.add_argument("--student", default=None, help="student registry name (default: the config's)")
    # Half the cores: data-loader workers decode PNGs on the rest. On 2 cores, 2 torch threads
    # plus a worker oversubscribe the CPU and OpenMP threads stall (steps measured 5x slower).
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch intra-op threads")
    args = ap.parse_args()
    setup_logging()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        times = run_demo(args.work_dir, profile=args.profile, student=args.student)
        # ship the student: export it, restore the test inputs with the exported model (d4ir_pipeline.deploy)
        t0 = time.perf_counter()
        shipped = demo_step(*demo_paths(args.work_dir, profile=args.profile, student=args.student))
        times["deploy"] = time.perf_counter() - t0
    except D4IRError as e:
        raise SystemExit(f"error: {e}\nFinished steps are kept; rerun `make demo` to continue.") from None
    work = Path(args.work_dir)
    print("\n== d4ir demo: done ==")
    for name, sec in times.items():
        print(f"  {name:<14} {sec:7.1f} s")
    print(f"  {'total':<14} {sum(times.values()):7.1f} s")
    report = next(iter(sorted(work.glob("eval/**/summary.md"))), None)
    if report is not None:
        print(f"\n{report.read_text()}")
    print("Outputs:")
    print(f"  {'demo SD (64 px toy)':<26} d4ir_pipeline/demo/assets/demo_sd")
    print(f"  {'reference teacher':<26} d4ir_pipeline/demo/assets/reference_teacher")
    for label, sub in [
        ("demo data + manifests", "data"),
        ("DPA adapter + report", "dpa"),
        ("prompt bank", "bank"),
        ("shards + shardset.json", "shards"),
        ("student checkpoints", "distill"),
        ("evaluation report", "eval"),
        ("export + restored tests", "deploy"),
    ]:
        print(f"  {label:<26} {work / sub}")
    print("\n" + "\n".join(shipped["lines"]))


if __name__ == "__main__":
    main()
