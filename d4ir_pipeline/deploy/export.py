"""``d4ir export``: a student or teacher -> ONNX (fp32, fp16, int8) + torch.export, verified, with a model card.

The folder it writes (docs/DEPLOY.md):

    model.onnx        dynamic batch, height and width (opset >= 17), pads to the multiple inside the graph
    model.fp16.onnx   float16 weights and activations, float32 input/output (where the model allows)
    model.int8.onnx   ONNX Runtime static QDQ quantisation calibrated on the student's own shard set
                      (dynamic quantisation, with the reason, where static is not possible)
    model.pt2         torch.export ExportedProgram (torch.export.load(...).module()(x))
    export.json       every figure below, machine-readable
    README.md         the model card

Nothing is reported as exported before it is verified: ONNX Runtime and the ExportedProgram
against the PyTorch model at (by default) three sizes, one odd, max abs difference <= 1e-4;
fp16 and int8 by their PSNR against the fp32 outputs. The folder is built under a tmp name
and renamed at the end, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from d4ir_pipeline.common.images import decode_rgb
from d4ir_pipeline.common.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, sha256_file
from d4ir_pipeline.common.runtime import package_versions, torch_threads
from d4ir_pipeline.config import opt
from d4ir_pipeline.deploy.budget import activation_bytes_per_pixel
from d4ir_pipeline.deploy.card import render_card
from d4ir_pipeline.deploy.graph import AnySize, export_ready, model_multiple
from d4ir_pipeline.deploy.onnx_model import META_PREFIX, OnnxModel, require
from d4ir_pipeline.deploy.options import RawToml, config_from_cli
from d4ir_pipeline.deploy.runner import ModelConfig, load_torch_model, probe_image
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import STUDENTS, TEACHERS, AdaptedModel, count_macs, count_params
from d4ir_pipeline.shardset.reader import open_shardset, read_shard

__all__ = [
    "CalibConfig",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "EXPORT_LIMITS",
    "export",
    "export_command",
    "known_limit",
    "FILES",
]

logger = logging.getLogger(__name__)

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx", "pt2": "model.pt2"}
FP16_MIN_DB = 40.0  # fp16 outputs vs fp32 below this: the model does not allow fp16, no file is written
INT8_GOAL_DB = 35.0  # int8 vs fp32 below this is logged as a warning (the file is still written and reported)
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

# Teachers whose any-size export is known to fail or to lose a file here (torch 2.14, onnxruntime 1.32), by
# class, with why; the export error (or export.json's exporter) names it. All restore in PyTorch. docs/DEPLOY.md.
EXPORT_LIMITS = {
    "TransWeather": "its decoder crops a row / column where an upsampled map overshoots its skip, a relation of "
    "the side modulo 32 that torch.export cannot prove for every size (the TorchScript tracer records it: "
    "model.onnx works at any size, but there is no model.pt2)",
    "DehazeFormer": "its shifted-window attention folds the windows into the batch and splits them back, a "
    "division torch.export cannot prove for every size (the TorchScript tracer records it: model.onnx works at any "
    "size, but there is no model.pt2)",
    "Histoformer": "it sorts pixels by value, so the float round-off between two runtimes reorders near-equal "
    "values and moves them between attention groups (about 28 dB PSNR between ONNX Runtime and PyTorch on random "
    "weights; model.pt2 runs PyTorch's kernels and matches); raise `tolerance` to accept an ONNX file anyway",
}


class ExportError(D4IRError):
    """An export that cannot be made or fails its verification; nothing is left at the output path."""


@dataclass(frozen=True)
class CalibConfig:
    """Samples for int8 calibration and for the int8-vs-fp32 PSNR."""

    shards: str = opt(
        "",
        help="shard set (folder with shardset.json) to calibrate on; empty = the set the student was distilled on "
        "(the `shardset` of its run.json, checked against model.json's run.shardset_sha256)",
    )
    samples: int = opt(32, help="calibration samples (spread over the shards)", min=1)
    eval_samples: int = opt(8, help="further samples (not used to calibrate) for the int8 PSNR", min=1)
    size: int = opt(128, help="centre crop side of each sample (quantisation ranges do not depend on size)", min=16)
    method: str = opt("minmax", help="activation range calibration", choices=("minmax", "percentile", "entropy"))


@dataclass(frozen=True)
class ExportConfig:
    """`d4ir export`: what to export, where, and how it is verified."""

    out: str = opt("", help="export folder (built in a hidden folder beside it, renamed when verified)")
    model: ModelConfig = field(default_factory=ModelConfig)
    opset: int = opt(18, help="ONNX opset (>= 17)", min=17)
    multiple: int = opt(0, help="side multiple the model pads to; 0 = the model's `multiple` attribute", min=0)
    verify_sizes: tuple[str, ...] = opt(
        ("64x64", "97x131", "256x192"), help="HxW sizes of the PyTorch-vs-export check (three, one with an odd side)"
    )
    tolerance: float = opt(1e-4, help="max abs difference allowed between fp32 exports and PyTorch", min=0.0)
    fp16: bool = opt(True, help="also write model.fp16.onnx (kept only if its PSNR vs fp32 is >= 40 dB)")
    int8: bool = opt(True, help="also write model.int8.onnx (ONNX Runtime quantisation)")
    pt2: bool = opt(True, help="also write model.pt2 (torch.export ExportedProgram)")
    max_side: int = opt(32768, help="largest side model.pt2 accepts (ONNX has no limit)", min=64)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval_summary: str = opt(
        "", help="evaluation summary.md for the card; empty = <work>/eval/<tag>/summary.md when it is this model's"
    )
    threads: int = opt(0, help="ONNX Runtime / torch threads while verifying (0 = library default)", min=0)
    overwrite: bool = opt(False, help="replace an existing export folder")


@dataclass
class ExportResult:
    """What an export wrote and the figures it was verified with."""

    out_dir: Path
    files: dict[str, dict]
    max_abs_diff: float  # worst fp32 ONNX Runtime vs PyTorch over the verified sizes
    pt2_max_abs_diff: float | None
    fp16_psnr_db: float | None
    int8_psnr_db: float | None
    int8_method: str | None
    info: dict
    seconds: float


# ---------------------------------------------------------------------------------------
# helpers


def parse_size(text: str) -> tuple[int, int]:
    """'97x131' -> (97, 131) (height x width)."""
    m = _SIZE_RE.match(text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ExportError(f"`verify_sizes` entry {text!r}: expected HxW, e.g. '97x131'")
    return int(m.group(1)), int(m.group(2))


def psnr_np(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two arrays in [0, 1] (after clipping)."""
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1).astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _network(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside the I/O adapter and the in-graph padding (the module the card and errors name)."""
    while isinstance(getattr(model, "model", None), torch.nn.Module):
        model = model.model
    return model


def known_limit(model: torch.nn.Module) -> str:
    """ " (a known limit of <class>: why)" for a network in :data:`EXPORT_LIMITS` (looked up through wrappers), else ""."""
    name = type(_network(model)).__name__
    return f" (a known limit of {name}: {EXPORT_LIMITS[name]})" if name in EXPORT_LIMITS else ""


def _inputs(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Verification inputs: uniform noise at every size (batch 1) and a batch of 3 at the first size."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(1, 3, h, w, generator=g) for h, w in sizes]
    xs.append(torch.rand(3, 3, *sizes[0], generator=g))
    return xs


def _session(path: Path, threads: int) -> OnnxModel:
    return OnnxModel(path, device="cpu", threads=threads)


def _example(multiple: int) -> torch.Tensor:
    """The tracing example: batch 2, odd sides above twice the multiple. Seeded: it is stored in model.pt2
    (sample_inputs), so an unseeded one gave every export of the same weights another file and sha256."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, max(67, 2 * multiple + 3), max(53, 2 * multiple + 1), generator=g)


def _export_program(graph: torch.nn.Module, multiple: int, max_side: int) -> Any:
    """torch.export with dynamic batch / height / width (min side: multiple + 1, so no side is special-cased 1)."""
    lo = max(2, multiple + 1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=lo, max=max_side)
    width = torch.export.Dim("width", min=lo, max=max_side)
    example = _example(multiple)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(graph, (example,), dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    except Exception as e:  # noqa: BLE001  torch.export raises many types; the message is what helps
        hint = known_limit(graph) or (
            ". If it names a constraint on height/width, the model pads to a multiple it does not declare: set "
            "`multiple`"
        )
        raise ExportError(
            f"torch.export of the model failed ({type(e).__name__}: {str(e).strip()[:1500]}){hint}"
        ) from e
    return ep, example, lo


def _program_or_reason(graph: torch.nn.Module, multiple: int, max_side: int) -> tuple[Any, Any, int, str | None]:
    """(ExportedProgram, example, min side, None), or (None, None, 0, why) where torch.export cannot make one."""
    try:
        ep, example, min_side = _export_program(graph, multiple, max_side)
    except ExportError as e:
        why = "torch.export of the model failed" + known_limit(graph)  # the cause is in the log line below
        logger.warning("%s; exporting ONNX with the TorchScript tracer instead (no model.pt2)", e)
        return None, None, 0, why
    return ep, example, min_side, None


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _add_metadata(path: Path, meta: dict) -> None:
    onnx = require("onnx")
    import json

    model = onnx.load(str(path))
    del model.metadata_props[:]
    _strip_stack_traces(model.graph)
    for k, v in sorted(meta.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, json.dumps(v, sort_keys=True)
    onnx.save(model, str(path))


def _strip_stack_traces(graph: Any) -> None:
    """Drop the exporter's per-node Python stack traces: they hold this machine's source paths (an export
    would name where it was made, and differ from one install to the next) and a fifth of the file."""
    for entry in (*graph.node, *graph.input, *graph.output, *graph.value_info):
        props = entry.metadata_props
        for i in reversed([i for i, p in enumerate(props) if p.key == STACK_TRACE_KEY]):
            del props[i]


def _opset(path: Path) -> int:
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _compare(ref: list[np.ndarray], out: list[np.ndarray], xs: list[torch.Tensor]) -> list[dict]:
    rows = []
    for r, o, x in zip(ref, out, xs, strict=True):
        diff = float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64)))) if o.shape == r.shape else math.inf
        rows.append(
            {
                "batch": int(x.shape[0]),
                "size": f"{x.shape[2]}x{x.shape[3]}",
                "max_abs_diff": diff,
                "psnr_db": _finite(psnr_np(r, o)) if o.shape == r.shape else None,
                "finite": bool(np.isfinite(o).all()),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# int8 calibration data


def _shard_images(root: Path, n: int, size: int) -> list[np.ndarray]:
    """``n`` degraded images spread over the shard set's shards, centre-cropped to ``size``: (1, 3, h, w)."""
    ss = open_shardset(root, verify="size")
    order = list(ss.shards)
    pick = sorted({int(i) for i in np.linspace(0, len(order) - 1, num=min(len(order), n))})
    per = math.ceil(n / len(pick))
    out: list[np.ndarray] = []
    for i in pick:
        samples = read_shard(order[i].path)
        taken = 0
        for key in sorted(samples):
            ext = next((e for e in sorted(samples[key]) if e.startswith("degraded.")), None)
            if ext is None or taken >= per or len(out) >= n:
                continue
            try:
                img = decode_rgb(samples[key][ext], name=f"{order[i].name}:{key}.{ext}")[0]
            except D4IRError as e:
                logger.warning("calibration: skipping %s (%s)", key, e)
                continue
            out.append(_crop(np.asarray(img, dtype=np.float32) / 255.0, size))
            taken += 1
    return out


def _crop(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> centre crop of at most size x size as (1, 3, h, w) float32."""
    h, w = arr.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    c = arr[top : top + size, left : left + size]
    return np.ascontiguousarray(c.transpose(2, 0, 1)[None], dtype=np.float32)


def _photos(n: int, size: int) -> list[np.ndarray]:
    """Crops of the photos that ship inside scikit-image (used when no shard set is at hand)."""
    from skimage import data

    out: list[np.ndarray] = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            img = getattr(data, name)()
        except Exception as e:  # noqa: BLE001  a data file missing from this install: use the others
            logger.debug("skimage.data.%s unavailable (%s)", name, e)
            continue
        arr = img.astype(np.float32) / 255.0
        h, w = arr.shape[:2]
        for top in range(0, max(1, h - size + 1), size):
            for left in range(0, max(1, w - size + 1), size):
                out.append(_crop(arr[top : top + size, left : left + size], size))
    step = max(1, len(out) // n)
    return out[::step][:n]


def find_shardset(cfg: CalibConfig, meta: dict, model_dir: Path | None) -> tuple[Path | None, str]:
    """(shard-set folder or None, how it was found / why not) for int8 calibration."""
    want = (meta.get("run") or {}).get("shardset_sha256")
    if cfg.shards:
        ss = open_shardset(cfg.shards, verify="size")
        if want and ss.manifest_sha256 != want:
            return Path(cfg.shards), (
                f"`calib.shards` = {cfg.shards!r} (NOT the set this model was distilled on: shardset.json sha256 "
                f"{ss.manifest_sha256[:12]}... vs model.json run.shardset_sha256 {want[:12]}...)"
            )
        return Path(cfg.shards), f"`calib.shards` = {cfg.shards!r}" + (" (the distillation's set)" if want else "")
    if not want:
        return None, "the model records no distillation shard set (model.json has no run.shardset_sha256)"
    run_json = model_dir.parent / "run.json" if model_dir is not None else None
    if run_json is None or not run_json.is_file():
        return None, f"no run.json beside the model folder to locate shard set {want[:12]}...; pass `calib.shards`"
    path = Path(str(read_json(run_json).get("shardset", "")))
    if not (path / "shardset.json").is_file():
        return None, f"the distillation's shard set {str(path)!r} (from {run_json}) is not there; pass `calib.shards`"
    got = sha256_file(path / "shardset.json")
    if got != want:
        return None, f"{path}/shardset.json changed since distillation (sha256 {got[:12]}... vs {want[:12]}...)"
    return path, f"the distillation's shard set {str(path)!r} (sha256 {want[:12]}... matches model.json)"


class _QuietRoot(logging.Filter):
    """Holds back what onnxruntime.quantization writes to the root logger (a line per tensor); counts warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            self.warnings.append(record.getMessage())
        return record.levelno >= logging.ERROR


class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of (1, 3, h, w) arrays."""

    def __init__(self, name: str, arrays: list[np.ndarray]):
        self.name, self.arrays, self.i = name, arrays, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {self.name: self.arrays[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def _quantize_static(q: Any, src: Path, dst: Path, calib: list[np.ndarray], method: str) -> None:
    """Static QDQ: per-channel int8 weights, uint8 activations calibrated on ``calib`` by ``method``."""
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "percentile": q.CalibrationMethod.Percentile,
        "entropy": q.CalibrationMethod.Entropy,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_static(
            str(src),
            str(dst),
            _Reader("input", calib),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=methods[method],
        )


def quantize_int8(
    fp32: Path, dst: Path, calib: list[np.ndarray], method: str, *, static: bool
) -> tuple[str, str | None]:
    """Write ``dst`` from ``fp32``: static QDQ (per-channel int8 weights, uint8 activations) or dynamic.

    Returns (method used, reason static was not used or None).
    """
    q = require("onnxruntime.quantization", what="int8 quantisation")
    pre = dst.with_name(dst.stem + ".pre.onnx")
    reason = None if static else "no calibration samples"
    quiet = _QuietRoot()
    logging.getLogger().addFilter(quiet)
    try:
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as e:  # noqa: BLE001  pre-processing is an optimisation; quantise the plain graph
            logger.info("quantisation pre-processing failed (%s); quantising the exported graph", e)
            src = fp32
        if static:
            try:
                _quantize_static(q, src, dst, calib, method)
                return f"static QDQ ({method}, {len(calib)} samples)", None
            except Exception as e:  # noqa: BLE001  any failure of static: fall back and say why
                reason = f"static quantisation failed ({type(e).__name__}: {str(e)[:300]})"
                logger.warning("%s; falling back to dynamic quantisation", reason)
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8, per_channel=True)
        return "dynamic (int8 weights, activations quantised at run time)", reason
    finally:
        logging.getLogger().removeFilter(quiet)
        if quiet.warnings:  # e.g. "Axis 1 is out-of-range for weight ...norm1.weight" (1-D LayerNorm weights)
            logger.info("onnxruntime.quantization: %d warning(s), first: %s", len(quiet.warnings), quiet.warnings[0])
        pre.unlink(missing_ok=True)
        for extra in dst.parent.glob(dst.stem + ".pre*"):
            extra.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# the stage


def _role(name: str) -> str:
    return "student" if name in STUDENTS else "teacher" if name in TEACHERS else "custom"


def _find_eval(cfg: ExportConfig, model_dir: Path | None) -> dict | None:
    """The evaluation report of this very model folder, if one exists and is newer than its weights."""
    if cfg.eval_summary:
        p = Path(cfg.eval_summary)
        if not p.is_file():
            raise ExportError(f"`eval_summary` = {cfg.eval_summary!r} does not exist")
        return {"path": str(p), "markdown": p.read_text(encoding="utf-8")}
    if model_dir is None or model_dir.name != "student":
        return None
    tag, work = model_dir.parent.name, model_dir.parent.parent.parent
    md, js = work / "eval" / tag / "summary.md", work / "eval" / tag / "summary.json"
    if not (md.is_file() and js.is_file()):
        return None
    recorded = Path(str(read_json(js).get("student", {}).get("checkpoint", "")))
    weights = model_dir / "model.safetensors"
    same = recorded.resolve() == model_dir.resolve() if str(recorded) else False
    if not same or (weights.is_file() and js.stat().st_mtime < weights.stat().st_mtime):
        logger.info("%s is not an evaluation of %s (or older than its weights): not in the card", js, model_dir)
        return None
    return {"path": str(md), "markdown": md.read_text(encoding="utf-8")}


def export(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.model`` to ``cfg.out`` (ONNX fp32 / fp16 / int8, pt2, card), verified before the rename."""
    with torch_threads(cfg.threads):
        return _export(cfg)


def _export(cfg: ExportConfig) -> ExportResult:
    t_start = time.perf_counter()
    # 1. check inputs and the optional packages
    sizes, out = _check_request(cfg)
    # 2. the model, in float32 on the CPU (exports are device-independent)
    model, meta, ident = load_torch_model(cfg.model)
    model_dir = Path(ident["path"]) if Path(ident["path"]).is_dir() else None
    multiple = model_multiple(model, cfg.multiple)
    spec = ident["spec"]
    logger.info("exporting %s (%s, multiple %d) -> %s", spec["name"], type(model).__name__, multiple, out)
    # 3. export-friendly copy: swapped modules must be equivalent
    graph, replaced, swap_diff = _export_ready_graph(model, multiple, cfg.tolerance)
    # 4. torch.export (dynamic batch / height / width), then ONNX from the same program
    with atomic_dir(out) as tmp:  # a staging folder, renamed to `out` only once all is written
        lap = _Laps()
        onnx_path = tmp / FILES["fp32"]
        ep, example, min_side, no_program = _program_or_reason(graph, multiple, cfg.max_side)
        lap("torch_export")
        opset = _onnx_export(graph, ep, example, multiple, onnx_path, cfg.opset)  # ep None: the tracer, no pt2
        lap("onnx_export")
        bpp = activation_bytes_per_pixel(model)
        onnx_meta = {"multiple": multiple, "bytes_per_pixel": round(bpp, 1), "spec": spec, "source_id": ident["id"]}
        _add_metadata(onnx_path, onnx_meta)
        # 5. verify fp32 ONNX Runtime and the ExportedProgram against eager PyTorch
        xs = _inputs(sizes)
        ref, fp32_out, fp32_rows = _verify_onnx(model, onnx_path, xs, cfg)
        lap("verify_fp32")
        pt2_rows: list[dict] | None = None
        if cfg.pt2 and ep is not None:
            pt2_rows = _verify_pt2(ep, tmp / FILES["pt2"], xs, ref, min_side, cfg.tolerance)
            lap("pt2")
        # 6. fp16, kept where the model allows it; 7. int8
        fp16: dict[str, Any] = {"written": False}
        if cfg.fp16:
            fp16 = _fp16(onnx_path, tmp / FILES["fp16"], xs, fp32_out, cfg.threads)
            lap("fp16")
        int8: dict[str, Any] = {"written": False}
        if cfg.int8:
            int8 = _int8(cfg, meta, model_dir, onnx_path, tmp / FILES["int8"], cfg.threads)
            lap("int8")
        for name in ("fp16", "int8"):
            if (tmp / FILES[name]).is_file():
                _add_metadata(tmp / FILES[name], onnx_meta)
        # 8. figures, card, rename
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}  # fmt: skip
        info = {
            "kind": "d4ir-export",
            "version": 1,
            "model": _model_info(model, spec, multiple, bpp),
            "source": ident,
            "distillation": _distillation_info(meta, model_dir),
            "replaced_modules": replaced,
            "replacement_max_abs_diff": swap_diff,
            "onnx": _onnx_info(opset, multiple, no_program),
            "pt2": {"min_side": min_side, "max_side": cfg.max_side} if cfg.pt2 and ep is not None else None,
            "verification": {"tolerance": cfg.tolerance, "sizes": [f"{h}x{w}" for h, w in sizes],
                             "fp32_onnxruntime": fp32_rows, "pt2": pt2_rows, "fp16": fp16, "int8": int8},
            "evaluation": _find_eval(cfg, model_dir),
            "files": files,
            "seconds": lap.seconds,
            "versions": package_versions(("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "pillow")),
        }  # fmt: skip
        atomic_write_json(tmp / "export.json", info)
        atomic_write_text(tmp / "README.md", render_card(info))
        if out.exists() and not cfg.overwrite:
            raise ExportError(f"`out` = {str(out)!r} appeared while exporting; not replacing it")
    seconds = time.perf_counter() - t_start
    logger.info("export -> %s (%.1f s)", out, seconds)
    return ExportResult(
        out_dir=out,
        files=files,
        max_abs_diff=max(r["max_abs_diff"] for r in fp32_rows),
        pt2_max_abs_diff=max(r["max_abs_diff"] for r in pt2_rows) if pt2_rows else None,
        fp16_psnr_db=fp16.get("psnr_db_min"),
        int8_psnr_db=int8.get("psnr_db_mean"),
        int8_method=int8.get("method"),
        info=info,
        seconds=seconds,
    )


class _Laps:
    """Seconds per export step: each call records the time since the previous one (or since creation)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.t, 2)
        self.t = time.perf_counter()


def _check_request(cfg: ExportConfig) -> tuple[list[tuple[int, int]], Path]:
    """The verification sizes and the output folder; refused before any work when they cannot be used."""
    for pkg in ("onnx", "onnxruntime", "onnxscript"):
        require(pkg)
    if not cfg.out:
        raise ExportError("`out` is empty: give the export folder (e.g. --out runs/demo/export/nafnet_s)")
    sizes = [parse_size(s) for s in cfg.verify_sizes]
    if len(sizes) < 3 or not any(h % 2 or w % 2 for h, w in sizes):
        raise ExportError(
            f"`verify_sizes` = {list(cfg.verify_sizes)}: give at least three sizes, one with an odd side "
            "(an export is checked where padding to the network's multiple is needed)"
        )
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ExportError(f"`out` = {str(out)!r} exists; choose another folder or pass --overwrite")
    return sizes, out


def _export_ready_graph(model: torch.nn.Module, multiple: int, tolerance: float) -> tuple[torch.nn.Module, dict, float]:
    """(the graph to trace: export-friendly modules, padding inside; the swaps; their max abs diff on a probe)."""
    ready, replaced = export_ready(model)
    probe = torch.cat([probe_image(67, 53), torch.rand(1, 3, 67, 53, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        swap_diff = float((ready(probe) - model(probe)).abs().max()) if replaced else 0.0
    if swap_diff > tolerance:
        raise ExportError(f"replaced modules {replaced} change the output by {swap_diff:.3g} > {tolerance}")
    return AnySize(ready, multiple).eval(), replaced, swap_diff


def _onnx_export(graph: torch.nn.Module, ep: Any, example: Any, multiple: int, path: Path, opset: int) -> int:
    """``model.onnx`` from the ExportedProgram ``ep``; returns its opset (at least 17).

    Without one (torch.export cannot prove the model's shapes for every size: TransWeather,
    DehazeFormer), from the TorchScript tracer (``dynamo=False``, dynamic batch / height /
    width), which records the size arithmetic as graph ops instead of proving it. What a
    tracer freezes instead (a Python branch on a size) shows in the three-size verification.
    """
    axes = {0: "batch", 2: "height", 3: "width"}
    common = {"opset_version": opset, "input_names": ["input"], "output_names": ["output"]}
    what = "torch.onnx.export" if ep is not None else "the TorchScript ONNX exporter"
    try:
        with warnings.catch_warnings(), torch.no_grad() if ep is None else contextlib.nullcontext():
            warnings.simplefilter("ignore")
            if ep is not None:
                torch.onnx.export(ep, (example,), str(path), dynamo=True, external_data=False, verbose=False, **common)
            else:
                torch.onnx.export(graph, (_example(multiple),), str(path), dynamo=False,
                                  dynamic_axes={"input": axes, "output": axes}, **common)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{what} failed ({type(e).__name__}: {str(e).strip()[:1500]})") from e
    got = _opset(path)
    if got < 17:
        raise ExportError(f"{path}: opset {got} < 17")
    return got


def _verify_onnx(
    model: torch.nn.Module, path: Path, xs: list[torch.Tensor], cfg: ExportConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """(eager outputs, ONNX Runtime outputs, per-size rows); more than ``cfg.tolerance`` apart is an error."""
    with torch.no_grad():
        ref = [model(x).numpy() for x in xs]
    sess = _session(path, cfg.threads)
    try:
        out = [sess.run(x.numpy()) for x in xs]
    except Exception as e:  # noqa: BLE001  onnxruntime's own exception types
        raise ExportError(
            f"ONNX Runtime cannot run the exported graph ({type(e).__name__}: {str(e)[:600]}){known_limit(model)}"
        ) from e
    rows = _compare(ref, out, xs)
    worst = max(r["max_abs_diff"] for r in rows)
    if not worst <= cfg.tolerance:
        raise ExportError(
            f"ONNX Runtime differs from PyTorch by {worst:.3g} > `tolerance` {cfg.tolerance} "
            f"({[(r['size'], r['max_abs_diff']) for r in rows]}){known_limit(model)}"
        )
    logger.info("fp32 ONNX verified: max abs diff %.2e over %s", worst, [r["size"] for r in rows])
    return ref, out, rows


def _verify_pt2(
    ep: Any, path: Path, xs: list[torch.Tensor], ref: list[np.ndarray], min_side: int, tolerance: float
) -> list[dict]:
    """Save ``model.pt2``, load it back and compare it with eager PyTorch at the sizes its range allows.

    Saved without the nodes' Python stack traces: like the ONNX files' (``_strip_stack_traces``), they
    name this install's source files (1486 of them in the demo student's model.pt2), so the same model
    exported from two installs gave two files.
    """
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    keep = [i for i, x in enumerate(xs) if min(x.shape[-2:]) >= min_side]  # its range constraint
    if not keep:
        raise ExportError(f"`verify_sizes` are all below model.pt2's minimum side {min_side}")
    with torch.no_grad():
        rows = _compare([ref[i] for i in keep], [loaded(xs[i]).numpy() for i in keep], [xs[i] for i in keep])
    worst = max(r["max_abs_diff"] for r in rows)
    if not worst <= tolerance:
        raise ExportError(f"model.pt2 differs from PyTorch by {worst:.3g} > {tolerance}")
    return rows


def _model_info(model: torch.nn.Module, spec: dict, multiple: int, bpp: float) -> dict:
    return {
        "spec": spec,
        "class": type(_network(model)).__name__,
        # a teacher that is not called plainly: its I/O adapter is inside the graph ([0, 1] in and out)
        "adapter": {**model.io.to_dict(), "weather": model.weather} if isinstance(model, AdaptedModel) else None,
        "role": _role(spec["name"]),
        "params": count_params(model),
        "macs": {f"{s}x{s}": count_macs(model, (s, s)) for s in (256, 512)},
        "multiple": multiple,
        "activation_bytes_per_pixel": round(bpp, 1),
    }


def _distillation_info(meta: dict, model_dir: Path | None) -> dict | None:
    """The distillation run a student folder records (None for other models)."""
    run = meta.get("run") or {}
    if not run:
        return None
    return {
        **run,
        "steps": meta.get("steps"),
        "val_psnr_vs_teacher": meta.get("val_psnr_vs_teacher"),
        "shardset_path": _shardset_path(model_dir),
    }


def _onnx_info(opset: int, multiple: int, no_program: str | None) -> dict:
    return {
        "exporter": f"TorchScript tracer: {no_program}" if no_program else "torch.export (dynamo)",
        "traced": no_program is not None,  # from the TorchScript tracer: no model.pt2
        "opset": opset,
        "input": "input",
        "output": "output",
        "dynamic_axes": ["batch", "height", "width"],
        "padding": f"in the graph, reflect to a multiple of {multiple}" if multiple > 1 else "none needed",
    }


def _shardset_path(model_dir: Path | None) -> str | None:
    run_json = model_dir.parent / "run.json" if model_dir is not None else None
    return str(read_json(run_json).get("shardset")) if run_json is not None and run_json.is_file() else None


def _fp16(src: Path, dst: Path, xs: list[torch.Tensor], fp32_out: list[np.ndarray], threads: int) -> dict:
    """model.fp16.onnx (float32 input / output), kept only if finite and >= FP16_MIN_DB vs fp32 everywhere."""
    onnx = require("onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    sess = _session(dst, threads)
    rows = _compare(fp32_out, [sess.run(x.numpy()) for x in xs], xs)
    worst = min((r["psnr_db"] if r["psnr_db"] is not None else math.inf) for r in rows)
    ok = all(r["finite"] for r in rows) and worst >= FP16_MIN_DB
    if not ok:
        dst.unlink()
        logger.warning("fp16 export dropped: PSNR vs fp32 %.1f dB (< %.0f) or non-finite outputs", worst, FP16_MIN_DB)
    return {
        "written": ok,
        "psnr_db_min": _finite(worst),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "rows": rows,
        "note": None if ok else f"not written: PSNR vs fp32 below {FP16_MIN_DB} dB or non-finite outputs",
    }


def _int8(cfg: ExportConfig, meta: dict, model_dir: Path | None, src: Path, dst: Path, threads: int) -> dict:
    """model.int8.onnx, calibrated on the distillation's shard set where possible, with its PSNR vs fp32."""
    c = cfg.calib
    shards, how = find_shardset(c, meta, model_dir)
    calib: list[np.ndarray] = []
    evals: list[np.ndarray] = []
    if shards is not None:
        imgs = _shard_images(shards, c.samples + c.eval_samples, c.size)
        calib, evals = imgs[: c.samples], imgs[c.samples :]
        if not calib:
            how = f"{how}: no decodable samples"
    eval_source = f"{len(evals)} shard-set samples not used for calibration"
    if not evals:
        evals = _photos(c.eval_samples, c.size)
        eval_source = f"{len(evals)} crops of scikit-image's bundled photos"
    method, reason = quantize_int8(src, dst, calib, c.method, static=bool(calib))
    if not calib:
        reason = how
    ref_sess, q_sess = _session(src, threads), _session(dst, threads)
    psnrs = [psnr_np(ref_sess.run(x), q_sess.run(x)) for x in evals]
    finite = [p for p in psnrs if math.isfinite(p)]
    mean = float(np.mean(finite)) if finite else float("inf")
    if mean < INT8_GOAL_DB:
        logger.warning("int8 PSNR vs fp32 is %.1f dB (< %.0f dB)", mean, INT8_GOAL_DB)
    return {
        "written": True,
        "method": method,
        "static_not_used_because": reason,
        "calibration": how if calib else None,
        "calibration_samples": len(calib),
        "psnr_db_mean": _finite(mean),
        "psnr_db_min": _finite(min(psnrs)) if psnrs else None,
        "psnr_images": eval_source,
    }


# ---------------------------------------------------------------------------------------
# command


@click.command("export")
@click.argument("checkpoint", required=False)
@click.option("--out", "out", default=None, help="Export folder (must not exist unless --overwrite).")
@click.option("--arch", default=None, help="Architecture of a bare weights file (registry name or pkg.module:Class).")
@click.option("--kwargs", "kwargs_", default=None, metavar="TOML", help="Constructor arguments, e.g. '{width = 32}'.")
@click.option("--key", default=None, help="Container key inside a .pth (e.g. params_ema).")
@click.option("--weather", default=None, help="Non-blind teachers (WGWS-Net): the weather to restore.")
@click.option("--calib-shards", default=None, help="Shard set to calibrate int8 on (default: the student's own).")
@click.option("--no-int8", is_flag=True, help="Skip model.int8.onnx.")
@click.option("--no-fp16", is_flag=True, help="Skip model.fp16.onnx.")
@click.option("--no-pt2", is_flag=True, help="Skip model.pt2.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
def export_command(checkpoint, out, arch, kwargs_, key, weather, calib_shards, no_int8, no_fp16, no_pt2, overwrite,
                   config_path, sets) -> None:  # fmt: skip
    """Export CHECKPOINT (a model folder, 'reference', or a weights file with --arch) to ONNX / int8 / pt2."""
    options = {
        "out": out,
        "model.checkpoint": checkpoint,
        "model.arch": arch,
        "model.kwargs": RawToml(kwargs_) if kwargs_ else None,
        "model.key": key,
        "model.weather": weather,
        "calib.shards": calib_shards,
        "int8": False if no_int8 else None,
        "fp16": False if no_fp16 else None,
        "pt2": False if no_pt2 else None,
        "overwrite": True if overwrite else None,
    }
    r = export(config_from_cli(ExportConfig, config_path, sets, options))
    click.echo(f"exported -> {r.out_dir}  ({r.seconds:.1f} s)")
    click.echo(
        f"  fp32 ONNX Runtime vs PyTorch: max abs diff {r.max_abs_diff:.2e} at {r.info['verification']['sizes']}"
    )
    if r.pt2_max_abs_diff is not None:
        click.echo(f"  model.pt2 vs PyTorch:         max abs diff {r.pt2_max_abs_diff:.2e}")
    elif r.info["onnx"]["traced"]:
        click.echo(f"  model.onnx from the {r.info['onnx']['exporter']}; no model.pt2")
    fp16 = r.info["verification"]["fp16"]
    if fp16.get("written"):
        click.echo(f"  fp16 vs fp32:                 PSNR >= {r.fp16_psnr_db:.1f} dB")
    elif fp16.get("note"):
        click.echo(f"  fp16: {fp16['note']}")
    if r.int8_method:
        int8 = r.info["verification"]["int8"]
        click.echo(f"  int8 vs fp32:                 PSNR {r.int8_psnr_db:.1f} dB; {r.int8_method}")
        if int8.get("static_not_used_because"):
            click.echo(f"    static quantisation not used: {int8['static_not_used_because']}")
    for name, f in r.files.items():
        click.echo(f"  {name:<18} {f['bytes'] / 2**20:8.2f} MiB  sha256 {f['sha256'][:16]}...")
