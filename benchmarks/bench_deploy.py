"""Deployment benchmark (CPU): latency and peak memory of teacher and student, eager PyTorch vs ONNX Runtime.

At 256, 512 and 1024 px (--quick: 256 and 512), each arm in a fresh subprocess:

- ``teacher``: the demo's reference teacher (NAFNet width 32, trained weights), eager PyTorch;
- ``restormer``: a full-size Restormer (random weights, ``build_model('restormer')``), the heavy
  teacher users own; tiled where its activations exceed the restore default budget (2048 MiB);
- ``student``: nafnet_s, eager PyTorch; ``student_ort_fp32`` / ``student_ort_int8``: the same
  student exported by ``d4ir export`` (int8: static QDQ calibrated on a shard set).

Latency: median of repeats after a warm-up; teacher and student arms run interleaved in one
process (one forward of each per round, order alternating), so on a shared machine they
all see the same load and their ratios hold; the slow Restormer runs in its own process
(no warm-up from 512 px on). Peak memory: each arm alone in a fresh process, its peak RSS
(VmHWM, reset through /proc/self/clear_refs once the model is loaded and warmed up) minus
its RSS after the imports, i.e. weights + activations + runtime buffers of that arm; the
median of 3 such processes for every arm but the Restormer (``total_mib_runs`` lists them).
Goals (at 512 px): student ONNX Runtime fp32 >= 2x faster than eager; the student >= 50x
faster and >= 10x less peak memory than the full Restormer (reported for the eager student and for
the exported one in ONNX Runtime fp32); int8 vs fp32 output PSNR >= 35 dB.

Usage: python benchmarks/bench_deploy.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGET_MB = 2048  # d4ir restore's default activation budget: what decides the Restormer's tiles
# per size: image sides, interleaved latency rounds (teacher and students), Restormer repeats per side (~40 s per 512 px image
# on 2 cores, 4 tiles at 1024), calibration sample px, whether the teacher is exported for its int8 figure
SIZES = {
    "full": {"px": (256, 512, 1024), "reps": 7, "restormer_reps": {256: 3, 512: 2, 1024: 1}, "shard_px": 128,
             "teacher_int8": True, "mem_runs": 3},
    "quick": {"px": (256, 512), "reps": 5, "restormer_reps": {256: 1, 512: 1}, "shard_px": 96,
              "teacher_int8": True, "mem_runs": 3},
    "smoke": {"px": (32,), "reps": 2, "restormer_reps": {32: 1}, "shard_px": 32, "teacher_int8": False,
              "mem_runs": 1},
}  # fmt: skip
SMOKE_VERIFY = ("16x16", "19x23", "32x24")
GOAL_PX = 512
ARMS = ("teacher", "restormer", "student", "student_ort_fp32", "student_ort_int8")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# one arm, in its own process


def _warm_machinery() -> None:
    """Pay the one-time costs every arm shares before the baseline RSS: lazy imports, thread pools, kernels."""
    import safetensors.torch  # noqa: F401
    import torch
    from torch import nn

    from d4ir_pipeline.deploy.budget import activation_bytes_per_pixel

    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)).eval()
    activation_bytes_per_pixel(tiny, size=16)  # torch.func + the dispatch mode
    with torch.no_grad():
        tiny(torch.rand(1, 3, 16, 16))


def _load(arm: str, model_path: str, px: int, threads: int):
    """(runner, plan) of one arm; the Restormer is built here with random weights."""
    import torch

    from d4ir_pipeline.deploy import ModelConfig, load_runner
    from d4ir_pipeline.deploy.budget import activation_bytes_per_pixel, plan
    from d4ir_pipeline.deploy.runner import Runner
    from d4ir_pipeline.models import build_model

    if arm == "restormer":
        torch.manual_seed(0)
        model = build_model("restormer").eval().requires_grad_(False)
        runner = Runner("torch", model, {"id": "restormer-random"}, 8, activation_bytes_per_pixel(model),
                        torch.device("cpu"), torch.float32, model)  # fmt: skip
    else:
        runner = load_runner(ModelConfig(checkpoint=model_path), device="cpu", threads=threads)
    p = plan(px, px, bytes_per_pixel=runner.bytes_per_pixel, budget_bytes=BUDGET_MB * 2**20, max_batch=1,
             multiple=runner.multiple)  # fmt: skip
    return runner, p


def _image(px: int):
    import torch

    return torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(0))


def arm_child(arm: str, px: int, repeats: int, model_path: str, threads: int, warmup: int) -> dict:
    """Peak memory of one arm alone in this process (and the time of its runs): ``warmup + repeats`` forwards."""
    import numpy as np
    import onnxruntime  # noqa: F401  imported before the baseline RSS, like torch
    import torch

    from d4ir_pipeline.deploy.restore import run_model

    torch.set_num_threads(threads)
    _warm_machinery()
    rss0 = _status_kib("VmRSS")
    runner, p = _load(arm, model_path, px, threads)
    x = _image(px)
    for _ in range(warmup):
        run_model(runner, x, p, 32)
    reset = _reset_peak()
    rss1 = _status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = run_model(runner, x, p, 32)
        times.append((time.perf_counter() - t0) * 1000.0)
    hwm = _status_kib("VmHWM")
    assert tuple(y.shape) == (1, 3, px, px) and bool(torch.isfinite(y).all())
    return {
        "arm": arm,
        "px": px,
        "tile": p.tile or None,
        "repeats": repeats,
        "warmup": warmup,
        "median_ms": statistics.median(times),
        "times_ms": [round(t, 1) for t in times],
        "total_mib": (hwm - rss0) / 1024,  # weights + activations + runtime buffers
        "model_mib": (rss1 - rss0) / 1024,  # what stays resident between forwards
        "forward_mib": (hwm - rss1) / 1024,  # extra during the forwards
        "peak_reset": reset,
        "est_activation_mib": runner.bytes_per_pixel * min(px, p.tile or px) ** 2 / 2**20,
        "out_mean": float(np.mean(y.numpy())),
    }


def latency_child(px: int, repeats: int, paths: dict[str, str], threads: int) -> dict:
    """Interleaved latency of several arms in one process: one forward of each per round, order alternating.

    On a shared machine the load changes from minute to minute; interleaving makes every
    arm see the same load, so their ratios hold even when the absolute times drift.
    """
    import torch

    from d4ir_pipeline.deploy.restore import run_model

    torch.set_num_threads(threads)
    loaded = {arm: _load(arm, path, px, threads) for arm, path in paths.items()}
    x = _image(px)
    for runner, p in loaded.values():
        run_model(runner, x, p, 32)  # warm-up
    times: dict[str, list[float]] = {arm: [] for arm in loaded}
    arms = list(loaded)
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            runner, p = loaded[arm]
            t0 = time.perf_counter()
            run_model(runner, x, p, 32)
            times[arm].append((time.perf_counter() - t0) * 1000.0)
    return {arm: {"median_ms": statistics.median(t), "times_ms": [round(v, 1) for v in t]} for arm, t in times.items()}


def _child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_arm(arm: str, px: int, repeats: int, model_path: str, threads: int, warmup: int) -> dict:
    return _child(["--arm", arm, str(px), str(repeats), model_path, str(threads), str(warmup)], threads)


def _run_latency(px: int, repeats: int, paths: dict[str, str], threads: int) -> dict:
    return _child(["--latency", str(px), str(repeats), json.dumps(paths), str(threads)], threads)


# ---------------------------------------------------------------------------------------
# the benchmark


def _export(model_dir: Path, out: Path, shards: Path, size: str) -> dict:
    from d4ir_pipeline.deploy.export import CalibConfig, ExportConfig, export
    from d4ir_pipeline.deploy.runner import ModelConfig

    calib = CalibConfig(shards=str(shards), samples=16 if size != "smoke" else 4, eval_samples=8 if size != "smoke"
                        else 2, size=SIZES[size]["shard_px"])  # fmt: skip
    kw = {"verify_sizes": SMOKE_VERIFY} if size == "smoke" else {}
    r = export(ExportConfig(out=str(out), model=ModelConfig(checkpoint=str(model_dir)), calib=calib, pt2=False, **kw))
    return {
        "seconds": round(r.seconds, 1),
        "max_abs_diff": r.max_abs_diff,
        "fp16_psnr_db": r.fp16_psnr_db,
        "int8_psnr_db": r.int8_psnr_db,
        "int8_method": r.int8_method,
        "export_seconds_by_step": r.info["seconds"],
    }


def _photo_psnr(fp32: Path, int8: Path, px: int, threads: int) -> float:
    """int8 vs fp32 ONNX Runtime outputs on a real photo (scikit-image's astronaut, centre crop)."""
    import numpy as np
    from skimage import data

    from d4ir_pipeline.deploy import OnnxModel
    from d4ir_pipeline.deploy.export import psnr_np

    img = data.astronaut().astype(np.float32) / 255.0
    h, w = img.shape[:2]
    side = min(px, h, w)
    crop = img[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2].transpose(2, 0, 1)[None]
    a = OnnxModel(fp32, threads=threads).run(crop)
    b = OnnxModel(int8, threads=threads).run(crop)
    return psnr_np(a, b)


def run(size: str = "full") -> dict:
    """The deployment benchmark at ``size`` (full / quick / smoke); returns its figures (also printed)."""
    import torch

    from d4ir_pipeline.common.runtime import usable_cpus
    from d4ir_pipeline.models import load_model, reference_teacher_path, save_model
    from d4ir_pipeline.testing import make_shardset, randomised

    # one core fewer than the machine has (D4IR_BENCH_THREADS overrides), as in bench_distill: on a shared
    # 2-core box two OpenMP threads stall each other whenever another process runs (a 256 px teacher
    # forward measured 5.4 s with 2 threads and 1.1 s with 1, back to back, under load)
    threads = int(os.environ.get("D4IR_BENCH_THREADS") or max(1, usable_cpus() - 1))
    torch.set_num_threads(threads)
    s = SIZES[size]
    res: dict = {"threads": threads, "cpus": os.cpu_count(), "budget_mb": BUDGET_MB, "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as d:
        tmp = Path(d)
        # 1. models and their exports (int8 calibrated on a shard set in stage one's format)
        shards = make_shardset(tmp / "shards", n_shards=4, per=8, size=s["shard_px"], smooth=8, noise=4.0)
        student_dir = save_model(randomised("nafnet_s"), tmp / "student")
        res["export"] = {"student": _export(student_dir, tmp / "student-export", shards, size)}
        if s["teacher_int8"]:  # trained weights: the int8 figure of a real network of the same family
            res["export"]["teacher"] = _export(reference_teacher_path(), tmp / "teacher-export", shards, size)
        print("export", json.dumps(res["export"]), flush=True)
        teacher_params = sum(p.numel() for p in load_model(reference_teacher_path()).parameters())
        paths = {
            "teacher": str(reference_teacher_path()),
            "restormer": "-",
            "student": str(student_dir),
            "student_ort_fp32": str(tmp / "student-export" / "model.onnx"),
            "student_ort_int8": str(tmp / "student-export" / "model.int8.onnx"),
        }
        # 2. every arm at every size, each in a fresh process
        rows = []
        for px in s["px"]:
            # memory: each arm alone in a fresh process (one timed forward after a warm-up; the Restormer's
            # runs there are its latency too); latency of the others: interleaved in one process
            for arm in ARMS:
                if arm == "restormer":  # one process: its runs take minutes (and are its latency too)
                    rows.append(_run_arm(arm, px, s["restormer_reps"][px], paths[arm], threads, 0 if px >= 512 else 1))
                    continue
                # the median of a few fresh processes: what the allocator keeps after the warm-up forward
                # moves from process to process (the eager student's: 70 to 122 MiB over five runs)
                runs = sorted((_run_arm(arm, px, 1, paths[arm], threads, 1) for _ in range(s["mem_runs"])),
                              key=lambda r: r["total_mib"])  # fmt: skip
                row = runs[len(runs) // 2]
                row["total_mib_runs"] = [round(r["total_mib"], 1) for r in runs]
                rows.append(row)
            lat = _run_latency(px, s["reps"], {a: paths[a] for a in ARMS if a != "restormer"}, threads)
            for row in rows[-len(ARMS) :]:
                row["memory_run_ms"] = row["median_ms"]
                if row["arm"] in lat:
                    row.update(lat[row["arm"]], latency="interleaved", repeats=len(lat[row["arm"]]["times_ms"]))
                print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        res["int8_psnr_db_photo"] = _photo_psnr(Path(paths["student_ort_fp32"]), Path(paths["student_ort_int8"]),
                                                max(s["px"]), threads)  # fmt: skip
    res["rows"] = rows
    res["teacher_params"] = teacher_params
    res["load_avg_end"] = os.getloadavg()
    res.update(ratios(rows, res["export"]["student"]["int8_psnr_db"]))
    return res


def ratios(rows: list[dict], int8_psnr: float | None) -> dict:
    """Ratios and goals at 512 px (or the largest size measured, at --smoke), from the rows of this run."""
    px = GOAL_PX if any(r["px"] == GOAL_PX for r in rows) else max(r["px"] for r in rows)
    at = {r["arm"]: r for r in rows if r["px"] == px}
    ms = {a: at[a]["median_ms"] for a in at}
    mib = {a: at[a]["total_mib"] for a in at}
    out = {
        "px": px,
        "ort_fp32_speedup_vs_eager": ms["student"] / ms["student_ort_fp32"],
        "ort_int8_speedup_vs_eager": ms["student"] / ms["student_ort_int8"],
        "speedup_vs_restormer_eager": ms["restormer"] / ms["student"],
        "speedup_vs_restormer_ort": ms["restormer"] / ms["student_ort_fp32"],
        "speedup_vs_teacher_eager": ms["teacher"] / ms["student"],
        "memory_ratio_vs_restormer_eager": mib["restormer"] / mib["student"],
        "memory_ratio_vs_restormer_ort": mib["restormer"] / mib["student_ort_fp32"],
        "memory_ratio_vs_teacher_eager": mib["teacher"] / mib["student"],
    }
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    goals = {
        "ort_fp32_2x_faster_than_eager": out["ort_fp32_speedup_vs_eager"] >= 2.0,
        "student_50x_faster_than_restormer": out["speedup_vs_restormer_eager"] >= 50.0,
        "student_10x_less_memory_than_restormer": out["memory_ratio_vs_restormer_eager"] >= 10.0,
        # the same goal for the student as it is deployed (the exported model in ONNX Runtime fp32)
        "student_onnx_10x_less_memory_than_restormer": out["memory_ratio_vs_restormer_ort"] >= 10.0,
        "int8_psnr_at_least_35db": int8_psnr is not None and math.isfinite(int8_psnr) and int8_psnr >= 35.0,
    }
    return {"ratios": out, "goals": goals}


def table(res: dict) -> str:
    """Markdown table of the rows (for docs/DEPLOY.md and the README)."""
    lines = ["| px | arm | median ms | peak MiB (total) | resident MiB | tile |", "|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['px']} | {r['arm']} | {r['median_ms']:.0f} | {r['total_mib']:.0f} | {r['model_mib']:.0f} | "
            f"{r['tile'] or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from _sizes import add_size_flags  # benchmarks/ is on sys.path (the script's folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(ap, quick_help="256 and 512 px only (a few minutes)")
    ap.add_argument("--arm", nargs=6, metavar=("ARM", "PX", "REPEATS", "MODEL", "THREADS", "WARMUP"),
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--latency", nargs=4, metavar=("PX", "REPEATS", "PATHS", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.arm:
        a = args.arm
        print(json.dumps(arm_child(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]))))
    elif args.latency:
        a = args.latency
        print(json.dumps(latency_child(int(a[0]), int(a[1]), json.loads(a[2]), int(a[3]))))
    else:
        result = run(args.size)
        print(table(result))
        print(json.dumps(result, indent=2, default=str))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
