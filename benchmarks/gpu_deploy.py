"""GPU check of the deployment paths: ``d4ir restore`` on CUDA in half precision, and ONNX Runtime on CUDA.

What it runs (random weights, no download; inputs cut from photos that ship with scikit-image):

1. a seeded ``nafnet_s`` student and a full-size Restormer (the heavy teacher), each saved
   with ``save_model`` and loaded back through ``d4ir restore``'s own loader;
2. ``restore`` on a folder of three photos (a square one, one with odd sides, one larger than
   the tile of the memory budget, so it is tiled) on the GPU, twice: ``dtype = auto``
   (float16 where the half-precision probe allows it) and ``dtype = float32``;
3. the PSNR of the auto-dtype PNGs against the float32 ones, per image (``null``: identical); the model seconds and
   the peak CUDA memory of each run; the student's float32 GPU PNGs against the same restore
   on the CPU (the largest difference in 8-bit levels);
4. with ``onnxruntime-gpu`` installed (``CUDAExecutionProvider``; the ``[export]`` extra installs
   the CPU build): ``d4ir export`` of the student and ``restore`` of its ``model.onnx`` on CUDA,
   against the PyTorch float32 PNGs. Without it the JSON says which providers there are.

Checks (exit 1 when one fails): every input restored by every run; the large photo tiled;
auto-dtype vs float32 >= 35 dB on every image; GPU vs CPU float32 within 2 levels; ONNX Runtime
CUDA vs PyTorch >= 40 dB when it ran. ``make gpu-check`` runs this as its ``deploy`` step.

    python benchmarks/gpu_deploy.py --json runs/gpu-deploy.json
    python benchmarks/gpu_deploy.py --allow-cpu --small      # the same code on the CPU, tiny sizes (tests)

Without CUDA it stops with a clear message (exit 2) unless ``--allow-cpu``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIN_HALF_DB = 35.0  # auto dtype (float16 where the probe allows it) vs float32, every image
MIN_ONNX_DB = 40.0  # ONNX Runtime CUDA EP vs PyTorch float32
MAX_CPU_LEVELS = 2  # float32 on the GPU vs the CPU, 8-bit levels
SIZES = {"full": {"square": 512, "odd": (301, 451), "large": (1536, 2048), "memory_mb": 512},
         "small": {"square": 64, "odd": (37, 53), "large": (256, 320), "memory_mb": 16}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("runs/gpu-deploy"), help="inputs, models, outputs")
    ap.add_argument("--json", type=Path, default=Path("runs/gpu-deploy.json"), help="the results file")
    ap.add_argument("--models", default="nafnet_s,restormer", help="comma-separated registry names")
    ap.add_argument("--small", action="store_true", help="tiny images and memory budget (a CPU smoke)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (a smoke)")
    ap.add_argument("--onnx", choices=["auto", "always", "never"], default="auto",
                    help="export + ONNX Runtime restore: auto = when onnxruntime has CUDAExecutionProvider")  # fmt: skip
    return ap.parse_args(argv)


def write_inputs(folder: Path, sizes: dict) -> dict[str, tuple[int, int]]:
    """Three PNG photos (astronaut, chelsea, coffee) at the sizes of ``sizes``; {name: (H, W)}."""
    from PIL import Image
    from skimage import data

    from d4ir_pipeline.common.images import save_png

    sq = sizes["square"]
    shapes = {"square.png": (sq, sq), "odd.png": sizes["odd"], "large.png": sizes["large"]}
    photos = {"square.png": data.astronaut(), "odd.png": data.chelsea(), "large.png": data.coffee()}
    for name, (h, w) in shapes.items():
        img = Image.fromarray(photos[name]).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        save_png(folder / name, img)
    return shapes


def _read(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def restore_run(inputs: Path, model: str, out: Path, device: str, dtype: str, memory_mb: int) -> dict:
    """One ``restore`` run; its counts, dtype, notes, model seconds and peak CUDA memory."""
    import torch

    from d4ir_pipeline.deploy import ModelConfig, RestoreConfig
    from d4ir_pipeline.deploy.restore import restore

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = RestoreConfig(input=str(inputs), out=str(out), model=ModelConfig(checkpoint=model), device=device,
                        dtype=dtype, memory_mb=memory_mb, progress=False)  # fmt: skip
    r = restore(cfg)
    summary = json.loads(r.summary_path.read_text())
    return {
        "device": summary["settings"]["device"],
        "dtype": summary["settings"]["dtype"],
        "restored": r.restored,
        "inputs": r.inputs,
        "tiled": sorted(x["input"] for x in summary["restored"] if x["tiled"]),
        "exit_code": r.exit_code,
        "model_s": round(r.model_seconds, 3),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "notes": r.notes,
    }


def compare_pngs(a: Path, b: Path, names: list[str]) -> dict[str, dict]:
    """{name: PSNR (dB) and the largest difference in 8-bit levels} of ``a/name`` against ``b/name``."""
    from d4ir_pipeline.common.images import psnr

    out = {}
    for name in names:
        x, y = _read(a / name), _read(b / name)
        db = psnr(x, y, data_range=255.0)
        out[name] = {"psnr_db": None if math.isinf(db) else round(db, 2), "max_levels": int(abs(x - y).max())}
    return out


def _min_db(rows: dict[str, dict]) -> float:
    return min(math.inf if r["psnr_db"] is None else r["psnr_db"] for r in rows.values())


def onnx_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def onnx_run(model_dir: Path, work: Path, inputs: Path, device: str, memory_mb: int, ref: Path, names: list[str]):
    """``d4ir export`` of ``model_dir`` (fp32 only) and a restore of its model.onnx, against the PyTorch PNGs."""
    from d4ir_pipeline.deploy import ExportConfig, ModelConfig
    from d4ir_pipeline.deploy.export import export

    t0 = time.perf_counter()
    e = export(ExportConfig(out=str(work / "export"), model=ModelConfig(checkpoint=str(model_dir)), fp16=False,
                            int8=False, pt2=False, overwrite=True))  # fmt: skip
    row = {"export_s": round(time.perf_counter() - t0, 1), "export_max_abs_diff": e.max_abs_diff}
    onnx_device = "cuda" if device.startswith("cuda") else "cpu"
    row["restore"] = restore_run(inputs, str(work / "export" / "model.onnx"), work / "onnx-out", onnx_device, "auto",
                                 memory_mb)  # fmt: skip
    row["vs_pytorch_fp32"] = compare_pngs(work / "onnx-out", ref, names)
    return row


def check_model(name: str, row: dict, names: list[str]) -> list[str]:
    """The failed checks of one model's row (empty when all pass)."""
    failed = []
    for run in ("auto", "fp32", "cpu_fp32"):
        r = row.get(run)
        if r is not None and (r["restored"] != len(names) or r["exit_code"] != 0):
            failed.append(f"{name} {run}: {r['restored']}/{len(names)} restored, exit {r['exit_code']}")
    if "large.png" not in row["auto"]["tiled"]:
        failed.append(f"{name}: large.png was not tiled under memory_mb")
    if _min_db(row["auto_vs_fp32"]) < MIN_HALF_DB:
        failed.append(f"{name}: auto dtype ({row['auto']['dtype']}) vs float32 below {MIN_HALF_DB} dB")
    if "gpu_vs_cpu_fp32" in row and max(r["max_levels"] for r in row["gpu_vs_cpu_fp32"].values()) > MAX_CPU_LEVELS:
        failed.append(f"{name}: float32 on {row['fp32']['device']} vs the CPU over {MAX_CPU_LEVELS} levels")
    onnx = row.get("onnx")
    if onnx and _min_db(onnx["vs_pytorch_fp32"]) < MIN_ONNX_DB:
        failed.append(f"{name}: ONNX Runtime ({onnx['restore']['device']}) vs PyTorch below {MIN_ONNX_DB} dB")
    return failed


def run(args: argparse.Namespace, device: str) -> dict:
    from d4ir_pipeline.models import save_model
    from d4ir_pipeline.testing import randomised

    sizes = SIZES["small" if args.small else "full"]
    work = args.work_dir
    inputs = work / "inputs"
    names = sorted(write_inputs(inputs, sizes))
    providers = onnx_providers()
    want_onnx = args.onnx == "always" or (args.onnx == "auto" and "CUDAExecutionProvider" in providers)
    result = {"kind": "d4ir-gpu-deploy", "device": device, "sizes": sizes, "onnxruntime_providers": providers,
              "models": {}, "failed": []}  # fmt: skip
    for i, name in enumerate(m.strip() for m in args.models.split(",") if m.strip()):
        model_dir = save_model(randomised(name, seed=i), work / "models" / name)
        out = work / "out" / name
        row = {"auto": restore_run(inputs, str(model_dir), out / "auto", device, "auto", sizes["memory_mb"]),
               "fp32": restore_run(inputs, str(model_dir), out / "fp32", device, "float32", sizes["memory_mb"])}  # fmt: skip
        row["auto_vs_fp32"] = compare_pngs(out / "auto", out / "fp32", names)
        if name == "nafnet_s" and device != "cpu":  # the heavy teacher on the CPU would take minutes
            row["cpu_fp32"] = restore_run(inputs, str(model_dir), out / "cpu", "cpu", "float32", sizes["memory_mb"])
            row["gpu_vs_cpu_fp32"] = compare_pngs(out / "fp32", out / "cpu", names)
        if name == "nafnet_s" and want_onnx:
            row["onnx"] = onnx_run(model_dir, out, inputs, device, sizes["memory_mb"], out / "fp32", names)
        elif name == "nafnet_s":
            row["onnx"] = None
            result["onnx_skipped"] = (
                "--onnx never"
                if args.onnx == "never"
                else (f"onnxruntime has no CUDAExecutionProvider (providers {providers}); pip install onnxruntime-gpu")
            )
        result["models"][name] = row
        result["failed"] += check_model(name, row, names)
        print(f"[gpu-deploy] {name}: auto {row['auto']['dtype']} {row['auto']['model_s']} s, float32 "
              f"{row['fp32']['model_s']} s, auto vs float32 min {_min_db(row['auto_vs_fp32']):.1f} dB", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu:
        device = "cpu"
    else:
        print("error: no CUDA device (torch.cuda.is_available() is False); pass --allow-cpu for a CPU smoke",
              file=sys.stderr)  # fmt: skip
        return 2
    result = run(args, device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("GPU_DEPLOY " + json.dumps({"failed": result["failed"], "json": str(args.json)}))
    for f in result["failed"]:
        print(f"[gpu-deploy] FAILED: {f}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
