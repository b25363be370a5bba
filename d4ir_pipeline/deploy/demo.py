"""The last step of ``make demo``: export the distilled student and restore the test inputs with it.

Prints what a deployment needs to know: ONNX Runtime vs PyTorch on the demo's own test
images (max abs difference) and the latency of both on one of them (median of repeats,
measured in the same run). Reruns reuse a finished export of the same student.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from d4ir_pipeline.common.images import decode_rgb
from d4ir_pipeline.common.io import read_json
from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.data.manifests import load_rgb_checked
from d4ir_pipeline.deploy.export import FILES, ExportConfig, export
from d4ir_pipeline.deploy.onnx_model import OnnxModel
from d4ir_pipeline.deploy.restore import RestoreConfig, list_inputs, restore
from d4ir_pipeline.deploy.runner import ModelConfig, load_torch_model
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.stage2.config import DistillConfig, student_dir
from d4ir_pipeline.stage2.evaluate import EvalConfig

__all__ = ["demo_paths", "demo_step"]

logger = logging.getLogger(__name__)


def demo_paths(work: str | Path, *, profile: str = "demo", student: str | None = None) -> tuple:
    """(student folder, test manifests, output folder, image root) of a demo run, from its configs."""
    work = Path(work)
    over = (f"student.name={student!r}",) if student else ()
    dcfg = load_stage_config(DistillConfig, "distill", profile=profile, overrides=over, work_dir=str(work))
    ecfg = load_stage_config(EvalConfig, "evaluate", profile=profile, work_dir=str(work))
    return (
        student_dir(dcfg.output.dir, dcfg.student),
        list(ecfg.data.manifests.values()),
        work / "deploy",
        Path(ecfg.data.root),
    )


def _latency_ms(fn, x, repeats: int = 5) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def demo_step(student_dir: str | Path, inputs: list[str], out: str | Path, root: str | Path | None = None) -> dict:
    """Export ``student_dir`` to ``out/export`` and restore each input into ``out/restored/<name>``."""
    out = Path(out)
    export_dir = out / "export"
    # 1. export (a finished export of this very student is reused)
    model_cfg = ModelConfig(checkpoint=str(student_dir))
    model, _, ident = load_torch_model(model_cfg)
    done = export_dir / "export.json"
    if not (done.is_file() and read_json(done)["source"]["id"] == ident["id"]):
        export(ExportConfig(out=str(export_dir), model=model_cfg, overwrite=True))
    info = read_json(done)
    onnx_path = export_dir / FILES["fp32"]
    # 2. restore the test inputs with the exported model
    restored = {}
    for inp in inputs:
        name = Path(inp).stem
        cfg = RestoreConfig(input=str(inp), root=str(root or ""), out=str(out / "restored" / name),
                            model=ModelConfig(checkpoint=str(onnx_path)), progress=False)  # fmt: skip
        r = restore(cfg)
        restored[name] = {"restored": r.restored, "skipped": len(r.skipped), "out": str(r.out_dir)}
    # 3. ONNX Runtime vs PyTorch on the test images themselves, and their latency
    sess = OnnxModel(onnx_path)
    first = RestoreConfig(input=str(inputs[0]), root=str(root or ""), out=str(out / "restored"))
    xs = []
    for item in list_inputs(first)[0][:8]:
        try:
            img = load_rgb_checked(first.root, item.record)[0] if item.record else decode_rgb(item.path.read_bytes())[0]
        except (BadImageError, OSError):
            continue
        xs.append(torch.from_numpy(np.array(img, np.float32) / 255.0).permute(2, 0, 1)[None])  # (1, 3, H, W)
    if not xs:
        raise D4IRError(f"no readable test image in {inputs[0]!r} to compare ONNX Runtime with PyTorch on")
    with torch.no_grad():
        diffs = [float((sess(x) - model(x)).abs().max()) for x in xs]
        ms_torch = _latency_ms(model, xs[0])
        ms_ort = _latency_ms(sess, xs[0])
    int8 = info["verification"]["int8"]
    lines = [
        f"exported student -> {export_dir} (card: {export_dir / 'README.md'})",
        f"  ONNX Runtime vs PyTorch on {len(xs)} test images: max abs diff {max(diffs):.2e}",
        f"  latency at {xs[0].shape[2]}x{xs[0].shape[3]}: PyTorch {ms_torch:.1f} ms, ONNX Runtime {ms_ort:.1f} ms "
        f"({ms_torch / ms_ort:.2f}x)",
    ]
    if int8.get("written"):
        lines.append(f"  int8: PSNR vs fp32 {int8['psnr_db_mean']:.1f} dB ({int8['method']})")
    for name, r in restored.items():
        lines.append(f"  restored {name}: {r['restored']} image(s) -> {r['out']} ({r['skipped']} skipped)")
    return {
        "export_dir": str(export_dir),
        "max_abs_diff": max(diffs),
        "latency_ms": {"pytorch": ms_torch, "onnxruntime": ms_ort},
        "restored": restored,
        "lines": lines,
    }
