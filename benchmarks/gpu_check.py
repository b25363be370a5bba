"""``make gpu-check``: one prepared script for a CUDA machine, about 8 minutes, results in ``runs/gpu-check.json``.

1. the real-size smoke (``d4ir_pipeline.demo.smoke_sd15``) on the GPU in float16: SD 1.5-shaped
   random weights, CLIP ViT-L/14 DPA, 512 px synthesis, tiled full-size Restormer labels,
   nafnet_s distillation, evaluation; the attention backend each stage used is logged
   (xformers when installed, PyTorch SDPA otherwise);
2. an NCCL probe and a distillation of a few steps under ``torchrun --nproc_per_node=1``
   (the real ``d4ir distill`` entry point on the smoke's shards);
3. ``benchmarks/gpu_deploy.py``: ``d4ir restore`` of a ``nafnet_s`` student and a full-size
   Restormer on the GPU, float16 where the half-precision probe allows it against float32
   (PSNR per image, peak CUDA memory, a tiled large photo), the student's GPU output against
   the CPU's, and ONNX Runtime on CUDA when ``onnxruntime-gpu`` is installed;
4. ``benchmarks/gpu_synthesis.py`` (what ``make bench-gpu`` runs): SD 1.5-sized synthesis
   images/s and UNet TFLOP/s at 512 px, strength 0.5, 30 steps, batch 8 and 16.

Without CUDA it stops at once with a clear message (exit 2) and writes nothing. Each step
has its own time limit; a failed or timed-out step is recorded and the next one still runs.

    python benchmarks/gpu_check.py                      # everything
    python benchmarks/gpu_check.py --skip bench         # smoke + torchrun + deploy only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = ("smoke", "torchrun", "deploy", "bench")
LIMITS_S = {"smoke": 250, "nccl-probe": 30, "torchrun": 50, "deploy": 60, "bench": 90}  # ceilings; sum = 8 minutes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("runs/gpu-check"), help="smoke outputs and logs")
    ap.add_argument("--json", type=Path, default=Path("runs/gpu-check.json"), help="the results file")
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="SD / teacher weights")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    ap.add_argument("--bench-repeats", type=int, default=2, help="timed batches per (backend, batch) in the bench")
    ap.add_argument("--distill-steps", type=int, default=20, help="steps of the torchrun distillation")
    ap.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)  # run under torchrun by step 2
    args = ap.parse_args(argv)
    if args.bench_repeats < 1 or args.distill_steps < 1:
        ap.error("--bench-repeats and --distill-steps must be >= 1")
    return args


def cuda_status() -> tuple[bool, str]:
    """(available, description) without starting anything heavy."""
    import torch

    if not torch.cuda.is_available():
        return False, (
            f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "`make gpu-check` needs a CUDA GPU. On this machine use `make smoke-sd15` (CPU)."
        )
    i = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(i)
    return True, f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}, CUDA {torch.version.cuda})"


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(step, argv) of every step, in order; pure, so it can be checked without a GPU."""
    from d4ir_pipeline.demo.smoke_sd15 import SmokeSettings, stage_overrides

    py = sys.executable
    smoke_dir = args.work_dir / "smoke"
    steps: list[tuple[str, list[str]]] = []
    if "smoke" not in args.skip:
        steps.append(("smoke", [py, "-m", "d4ir_pipeline.demo.smoke_sd15", "--work-dir", str(smoke_dir), "--device", "cuda",
                                "--dtype", args.dtype, "--attention", args.attention]))  # fmt: skip
    if "torchrun" not in args.skip:
        run = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        steps.append(("nccl-probe", [*run, str(Path(__file__).resolve()), "--nccl-probe"]))
        s = SmokeSettings(work=str(smoke_dir), device="cuda", dtype=args.dtype, attention=args.attention,
                          distill_steps=args.distill_steps)  # fmt: skip
        sets = [*stage_overrides(s)["distill"], 'student.tag="nafnet_s-torchrun"', "data.num_workers=2"]
        steps.append(("torchrun", [*run, "-m", "d4ir_pipeline.cli", "distill", "--profile", "sd15", "--work-dir",
                                   str(smoke_dir), *[a for kv in sets for a in ("--set", kv)]]))  # fmt: skip
    if "deploy" not in args.skip:
        steps.append(("deploy", [py, str(REPO / "benchmarks" / "gpu_deploy.py"), "--work-dir", str(args.work_dir / "deploy"),
                                 "--json", str(args.work_dir / "gpu-deploy.json")]))  # fmt: skip
    if "bench" not in args.skip:
        steps.append(("bench", [py, str(REPO / "benchmarks" / "gpu_synthesis.py"), "--repeats", str(args.bench_repeats),
                                "--json", str(args.work_dir / "bench-gpu.json")]))  # fmt: skip
    return steps


def nccl_probe() -> int:
    """Under torchrun: join an NCCL group, all-reduce on the GPU, print what was seen."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    t = torch.ones(4, device=f"cuda:{local}")
    dist.all_reduce(t)
    dist.barrier()
    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": t.tolist(),
           "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}  # fmt: skip
    dist.destroy_process_group()
    print("NCCL_PROBE " + json.dumps(out))
    return 0 if out["all_reduce"] == [float(out["world_size"])] * 4 else 1


def run_step(name: str, argv: list[str], log_dir: Path) -> dict:
    """One step as a child with its time limit; its output goes to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    print(f"[gpu-check] {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=LIMITS_S[name], cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row = {"step": name, "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}
    print(f"[gpu-check] {name}: exit {rc} after {row['wall_s']} s (log {log})", flush=True)
    return row


def collect(name: str, row: dict, args: argparse.Namespace) -> None:
    """Attach each step's own results (report files, probe line) to its row."""
    text = Path(row["log"]).read_text(errors="replace")
    if name == "smoke":
        rep = args.work_dir / "smoke" / "report.json"
        if rep.is_file():
            doc = json.loads(rep.read_text())
            row["stages"] = {s["name"]: {k: s[k] for k in ("wall_s", "peak_rss_mib", "attention", "returncode")}
                             for s in doc.get("stages", [])}  # fmt: skip
            row["sizes"] = doc.get("sizes")
            row["total_s"] = doc.get("total_s")
            row["attention_backends"] = sorted({a for s in doc.get("stages", []) for a in s.get("attention", [])})
    elif name == "nccl-probe":
        line = next((ln for ln in text.splitlines() if ln.startswith("NCCL_PROBE ")), None)
        row["probe"] = json.loads(line.removeprefix("NCCL_PROBE ")) if line else None
    elif name == "torchrun":
        metrics = args.work_dir / "smoke" / "distill" / "nafnet_s-torchrun" / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            row["last_metrics"] = rows[-1] if rows else None
    elif name == "deploy":
        deploy = args.work_dir / "gpu-deploy.json"
        if deploy.is_file():
            row["deploy"] = json.loads(deploy.read_text())
    elif name == "bench":
        bench = args.work_dir / "bench-gpu.json"
        if bench.is_file():
            row["bench"] = json.loads(bench.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nccl_probe:
        return nccl_probe()
    ok, device = cuda_status()
    if not ok:
        print(f"error: {device}", file=sys.stderr)
        return 2
    import torch

    result = {
        "kind": "d4ir-gpu-check",
        "device": device,
        "torch": torch.__version__,
        "xformers": _version("xformers"),
        "dtype": args.dtype,
        "attention": args.attention,
        "steps": [],
    }
    t0 = time.perf_counter()
    for name, step_argv in plan(args):
        row = run_step(name, step_argv, args.work_dir / "logs")
        collect(name, row, args)
        result["steps"].append(row)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    failed = [r["step"] for r in result["steps"] if r["returncode"] != 0]
    print(f"[gpu-check] {device}: {len(result['steps']) - len(failed)}/{len(result['steps'])} steps passed in "
          f"{result['total_s']} s; results in {args.json}" + (f"; FAILED: {failed}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
