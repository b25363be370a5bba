"""Evaluate teacher and student on paired test sets: PSNR / SSIM (pyiqa), report, contact sheet, cost.

Convention of the deraining / dehazing / desnowing benchmarks (Rain100L, SOTS,
Snow100K): PSNR and SSIM on the Y channel of BT.601 YCbCr
(``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], on the 0..255
scale), computed here with pyiqa ``psnr`` / ``ssim`` with ``test_y_channel=True,
color_space='ycbcr'`` (pyiqa's own default colour space is YIQ, which is not the
benchmarks' convention). RGB PSNR / SSIM (pyiqa ``psnr``, ``ssimc``) are reported too.
Outputs are clamped and rounded to 8 bits before scoring, as when they are saved as
PNG and scored by the benchmarks' scripts. Every set also gets an ``input`` row (the
degraded input scored against the target), the floor any restorer must beat.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image, ImageDraw

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.images import save_png
from d4ir_pipeline.common.io import atomic_write_json, atomic_write_text
from d4ir_pipeline.common.runtime import package_versions, pick_device
from d4ir_pipeline.config import config_to_dict, opt
from d4ir_pipeline.data.manifests import load_manifest, open_pair
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models.checkpoint import load_model
from d4ir_pipeline.models.cost import count_macs, count_params, format_count, measure_latency
from d4ir_pipeline.stage2.config import RuntimeConfig, StudentConfig, student_dir, student_tag
from d4ir_pipeline.stage2.teacher import TeacherConfig, Teachers, teacher_identity, teacher_name

logger = logging.getLogger(__name__)

# column -> (pyiqa metric name, options): the full-reference metrics every row gets
FR_METRICS: dict[str, tuple[str, dict]] = {
    "psnr_y": ("psnr", {"test_y_channel": True, "color_space": "ycbcr"}),
    "ssim_y": ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}),
    "psnr_rgb": ("psnr", {"test_y_channel": False}),
    "ssim_rgb": ("ssimc", {}),
}
MODELS = ("input", "teacher", "student")
# weather -> the committed demo test set (paired; images from `d4ir demo-data`): the default
# test sets of `d4ir evaluate` and of `d4ir train-teacher`'s bar, declared once
DEMO_TEST_MANIFESTS: dict[str, str] = {
    "rain": "data_manifests/demo/test-rain.jsonl",
    "haze": "data_manifests/demo/test-haze.jsonl",
    "snow": "data_manifests/demo/test-snow.jsonl",
}


@dataclass(frozen=True)
class EvalDataConfig:
    """Paired test sets: one manifest per weather (input + target), paths relative to a root."""

    manifests: dict[str, str] = opt(
        default_factory=lambda: dict(DEMO_TEST_MANIFESTS),
        help="weather -> paired manifest (build one with `d4ir manifest build`; docs/EVALUATION.md)",
    )
    root: str = opt("{data}", help="image root the manifests' paths are relative to")
    roots: dict[str, str] = opt(default_factory=dict, help="per-weather root overriding `root` (sets kept apart)")
    max_images: int = opt(0, help="first N images per set (0 = all)", min=0)
    check_hash: bool = opt(False, help="refuse images whose bytes differ from the manifest's sha256")


@dataclass(frozen=True)
class EvalStudentConfig:
    """Which distilled student to evaluate."""

    name: str = opt("nafnet_s", help="the student's name as given to `d4ir distill` (finds its run folder)")
    tag: str = opt("", help="its run folder name if `student.tag` was set for distill")
    checkpoint: str = opt("", help="a save_model folder; empty = <distill_out>/<tag or name>/student")


@dataclass(frozen=True)
class MetricsConfig:
    """What is scored."""

    crop_border: int = opt(0, help="pixels cropped from each border before scoring (0: the sets' convention)", min=0)
    no_reference: tuple[str, ...] = opt(
        ("niqe",),
        help="pyiqa no-reference metrics; each runs only if its weights are already in pyiqa's cache "
        "(never downloaded here), otherwise it is skipped with a message",
    )


@dataclass(frozen=True)
class CostConfig:
    """Model cost: parameters, MACs and latency."""

    size: int = opt(256, help="square input side for MACs and latency", min=8)
    repeats: int = opt(5, help="timed forwards per device (median reported)", min=1)
    cpu: bool = opt(True, help="measure CPU latency")
    gpu: bool = opt(True, help="measure GPU latency when CUDA is available")


@dataclass(frozen=True)
class ReportConfig:
    """The contact sheet."""

    contact_per_weather: int = opt(
        2, help="images per weather on the contact sheet (input|teacher|student|target)", min=0
    )
    contact_height: int = opt(160, help="row height of the contact sheet in pixels", min=32)


@dataclass(frozen=True)
class EvalOutputConfig:
    """Where the reports go."""

    dir: str = opt("{work}/eval", help="reports go to <output.dir>/<student tag>/")


@dataclass(frozen=True)
class EvalConfig:
    """`d4ir evaluate` (stages/<profile>/evaluate.toml)."""

    output: EvalOutputConfig = field(default_factory=EvalOutputConfig, metadata={"affects_output": False})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata={"affects_output": False})
    distill_out: str = opt("{distill}", help="where `d4ir distill` wrote its runs (its `output.dir`)")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: EvalStudentConfig = field(default_factory=EvalStudentConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class EvalResult:
    """Paths of the report and its numbers (``summary`` is what summary.json holds)."""

    out_dir: Path
    per_image_csv: Path
    summary_json: Path
    summary_md: Path
    contact_sheet: Path | None
    summary: dict


# ---------------------------------------------------------------------------------------
# metrics


def build_fr_metrics(device: Any, crop_border: int = 0) -> dict[str, Any]:
    """The pyiqa full-reference metrics of :data:`FR_METRICS` (no weights needed)."""
    import pyiqa

    return {
        col: pyiqa.create_metric(name, device=device, crop_border=crop_border, **kw)
        for col, (name, kw) in FR_METRICS.items()
    }


def _weight_files(name: str) -> tuple[list[str], str]:
    """Files a pyiqa metric downloads on creation, and pyiqa's cache folder."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR
    from pyiqa.utils.registry import ARCH_REGISTRY

    opts = DEFAULT_CONFIGS[name]["metric_opts"]
    arch = opts["type"]
    lazy = getattr(importlib.import_module("pyiqa.archs"), "_lazy_import_arch", None)
    if lazy is not None:
        lazy(arch)
    module = sys.modules[ARCH_REGISTRY.get(arch).__module__]
    urls: dict[str, str] = getattr(module, "default_model_urls", None) or {}
    for key in (name, opts.get("pretrained"), opts.get("version") and f"{name}_{opts['version']}", "url"):
        if key and key in urls:
            return [urls[key].rsplit("/", 1)[-1]], DEFAULT_CACHE_DIR
    return [u.rsplit("/", 1)[-1] for u in urls.values()], DEFAULT_CACHE_DIR


def nr_metric_status(name: str) -> tuple[bool, str]:
    """(usable, reason): a no-reference metric is usable only when its weights are already cached."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    if name not in DEFAULT_CONFIGS:
        nr = sorted(k for k, v in DEFAULT_CONFIGS.items() if v.get("metric_mode") == "NR")
        raise D4IRError(f"`metrics.no_reference`: unknown pyiqa metric {name!r}; no-reference metrics: {nr}")
    if DEFAULT_CONFIGS[name].get("metric_mode") != "NR":
        raise D4IRError(f"`metrics.no_reference`: {name!r} is a full-reference metric, not a no-reference one")
    try:
        files, cache = _weight_files(name)
    except (ImportError, KeyError, AttributeError) as e:  # an optional dependency of that metric is missing
        return False, f"{name}: cannot be loaded here ({type(e).__name__}: {e})"
    missing = [f for f in files if not os.path.isfile(os.path.join(cache, f))]
    if missing:
        return False, (
            f"{name}: skipped, its weights {missing} are not in pyiqa's cache {cache} (nothing is downloaded "
            f"here). On a machine with internet run once: python -c \"import pyiqa; pyiqa.create_metric('{name}')\" "
            "and copy the files into that folder."
        )
    return True, f"{name}: weights cached in {cache}"


def _nr_metrics(names: tuple[str, ...], device: Any) -> tuple[dict[str, Any], dict[str, str]]:
    import pyiqa

    metrics, skipped = {}, {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in names:
        ok, why = nr_metric_status(name)
        if not ok:
            logger.warning("%s", why)
            skipped[name] = why
            continue
        try:
            metrics[name] = pyiqa.create_metric(name, device=device)
        except Exception as e:  # noqa: BLE001 - a broken optional metric is reported and skipped, not fatal
            skipped[name] = f"{name}: failed to load ({type(e).__name__}: {e})"
            logger.warning("%s", skipped[name])
    return metrics, skipped


def _score(metric: Any, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        v = metric(x) if y is None else metric(x, y)
    return float(v.reshape(-1)[0])


# ---------------------------------------------------------------------------------------
# models


def _student_dir(cfg: EvalConfig) -> Path:
    if cfg.student.checkpoint:
        return Path(cfg.student.checkpoint)
    return student_dir(cfg.distill_out, StudentConfig(name=cfg.student.name, tag=cfg.student.tag))


def load_student(cfg: EvalConfig, device: Any) -> tuple[torch.nn.Module, Path]:
    """The distilled student (eval mode) from its save_model folder."""

    d = _student_dir(cfg)
    if not (d / "model.json").is_file():
        raise D4IRError(
            f"no distilled student at {d} (expected model.json + model.safetensors): run `d4ir distill` with "
            f"`student.name` = {cfg.student.name!r} first, or set `student.checkpoint`"
        )
    return load_model(d, device=device), d


def _to_tensor(img: Image.Image, device: Any) -> torch.Tensor:
    arr = np.array(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].to(device).float().div_(255.0)  # (1, 3, H, W)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits, as a saved PNG would be."""
    return x.float().clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def _to_image(x: torch.Tensor) -> Image.Image:
    arr = x[0].mul(255.0).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


ModelFn = Callable[[torch.Tensor], torch.Tensor]  # (1, 3, H, W) in [0, 1] -> (1, 3, H, W)


@dataclass
class ScoredPair:
    """One test pair after :func:`score_pairs`: every model's 8-bit output and its scores."""

    id: Any
    input: torch.Tensor  # (1, 3, H, W) in [0, 1]
    target: torch.Tensor  # (1, 3, H, W)
    outputs: dict[str, torch.Tensor]  # model -> (1, 3, H, W), clamped and rounded to 8 bits
    scores: dict[str, dict[str, float]]  # model -> metric column -> value


def _as_tensor(img: Any, device: Any) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img.to(device).float()
    if isinstance(img, Image.Image):
        return _to_tensor(img, device)
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].to(device).float().div_(255.0)


def score_pairs(
    models: Mapping[str, ModelFn | None],
    pairs: Iterable[tuple[Any, Any, Any]],
    metrics: Mapping[str, Any],
    *,
    no_reference: Mapping[str, Any] | None = None,
    device: Any = "cpu",
) -> Iterator[ScoredPair]:
    """Run every model on each ``(id, input, target)`` pair and score its 8-bit output against the target.

    The one scoring loop of ``evaluate`` and ``compare``. A model ``None`` scores the input
    itself (the floor). Inputs are PIL images, (H, W, 3) uint8 arrays or (1, 3, H, W)
    tensors; pairs stream (one is held at a time), so a large test set never sits in memory.
    """
    for pid, inp, tgt in pairs:
        x, y = _as_tensor(inp, device), _as_tensor(tgt, device)  # (1, 3, H, W)
        outputs: dict[str, torch.Tensor] = {}
        scores: dict[str, dict[str, float]] = {}
        for name, fn in models.items():
            out = x if fn is None else _model_output(fn, x, name, pid)
            outputs[name] = out
            scores[name] = {col: _score(m, out, y) for col, m in metrics.items()}
            scores[name].update({col: _score(m, out) for col, m in (no_reference or {}).items()})
        yield ScoredPair(pid, x, y, outputs, scores)


def _model_output(fn: ModelFn, x: torch.Tensor, name: str, pid: Any) -> torch.Tensor:
    with torch.no_grad():
        raw = fn(x)
    if raw.shape != x.shape:
        raise D4IRError(f"model `{name}` returned {tuple(raw.shape)} for test image {pid} of {tuple(x.shape)}")
    return _quantize(raw)


# ---------------------------------------------------------------------------------------
# report


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _markdown(summary: dict) -> str:
    cols = list(FR_METRICS) + list(summary["no_reference"])
    head = {"psnr_y": "PSNR-Y", "ssim_y": "SSIM-Y", "psnr_rgb": "PSNR-RGB", "ssim_rgb": "SSIM-RGB"}
    lines = [
        f"# Evaluation: teacher `{summary['teacher']['name']}` vs student `{summary['student']['name']}`",
        "",
        "PSNR (dB) / SSIM on the Y channel of BT.601 YCbCr (the benchmarks' convention) and on RGB, "
        "outputs rounded to 8 bits. `input` scores the degraded input itself.",
        "",
    ]
    for weather, rows in summary["per_weather"].items():
        n = rows["input"]["n"]
        lines += [f"## {weather} ({n} images)", ""]
        lines.append("| model | " + " | ".join(head.get(c, c.upper()) for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for model in MODELS:
            r = rows[model]
            cells = [_fmt(r.get(c), 4 if c.startswith("ssim") else 2) for c in cols]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if "student_psnr_y_vs_teacher" in rows["student"]:
            lines += [
                "",
                f"Student vs teacher output: PSNR-Y {_fmt(rows['student']['student_psnr_y_vs_teacher'], 2)} dB",
            ]
        lines.append("")
    cost = summary["cost"]
    size = cost["size"]
    lines += [
        f"## Cost ({size}x{size} input)",
        "",
        "| model | params | MACs | CPU ms | GPU ms |",
        "|---|---|---|---|---|",
    ]
    for who in ("teacher", "student"):
        c = cost[who]
        lines.append(
            f"| {who} ({summary[who]['name']}) | {c['params_str']} | {c['macs_str']} | "
            f"{_fmt(c.get('cpu_ms'), 1)} | {_fmt(c.get('gpu_ms'), 2)} |"
        )
    if summary["skipped_metrics"]:
        lines += ["", "Skipped metrics:"] + [f"- {v}" for v in summary["skipped_metrics"].values()]
    if summary["skipped_images"]:
        lines += ["", f"Skipped images: {len(summary['skipped_images'])} (see summary.json)"]
    return "\n".join(lines) + "\n"


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], height: int) -> Image.Image:
    """One row per image: label | input | teacher | student | target, each scaled to ``height``."""
    titles = ["input", "teacher", "student", "target"]
    band, gap, label_w = 16, 4, 150
    scaled = []
    for name, ims in rows:
        scaled.append((name, [im.resize((max(1, round(im.width * height / im.height)), height)) for im in ims]))
    col_w = [max(r[1][i].width for r in scaled) for i in range(4)]
    width = label_w + sum(col_w) + gap * 5
    sheet = Image.new("RGB", (width, band + len(scaled) * (height + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    x = label_w + gap
    for t, w in zip(titles, col_w, strict=True):
        draw.text((x + 2, 2), t, fill="black")
        x += w + gap
    y = band
    for name, ims in scaled:
        draw.text((4, y + height // 2 - 6), name[-24:], fill="black")
        x = label_w + gap
        for im, w in zip(ims, col_w, strict=True):
            sheet.paste(im, (x, y))
            x += w + gap
        y += height + gap
    return sheet


def _cost(model: torch.nn.Module, name: str, cfg: CostConfig, device: Any, dtype: torch.dtype) -> dict:

    size = (cfg.size, cfg.size)
    out: dict[str, Any] = {"name": name, "params": count_params(model), "macs": count_macs(model, size)}
    out["params_str"], out["macs_str"] = format_count(out["params"]), format_count(out["macs"])
    if cfg.cpu:
        cpu_model = model if device.type == "cpu" else _cpu_copy(model)
        out["cpu_ms"] = measure_latency(cpu_model, size, "cpu", cfg.repeats, warmup=1)["median_ms"]
    if cfg.gpu and torch.cuda.is_available():
        gpu_model = model if device.type == "cuda" else model.to("cuda")
        gdtype = dtype if device.type == "cuda" else torch.float32
        out["gpu_ms"] = measure_latency(gpu_model, size, "cuda", cfg.repeats, dtype=gdtype)["median_ms"]
        out["gpu_dtype"] = str(gdtype).replace("torch.", "")
        if device.type != "cuda":
            model.to(device)
    return out


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).float().to("cpu")


# ---------------------------------------------------------------------------------------
# the stage


def _pairs(
    cfg: EvalConfig, sets: dict[str, list], skipped: list[dict]
) -> Iterator[tuple[Any, Image.Image, Image.Image]]:
    """((weather, record), input, target) of every readable test pair; unreadable ones go to ``skipped``."""
    from tqdm import tqdm

    for weather, records in sets.items():
        root = cfg.data.roots.get(weather, cfg.data.root)
        for rec in tqdm(records, desc=f"evaluate {weather}", unit="img"):
            try:
                inp_img, tgt_img = open_pair(root, rec, check_hash=cfg.data.check_hash)
            except BadImageError as e:
                logger.warning("%s: skipped %s (%s: %s)", weather, rec.id, e.reason, e)
                skipped.append({"weather": weather, "id": rec.id, "reason": e.reason, "message": str(e)})
                continue
            yield (weather, rec), inp_img, tgt_img


def _score_sets(
    cfg: EvalConfig,
    sets: dict[str, list],
    teachers: Teachers,
    student: ModelFn,
    fr: Mapping[str, Any],
    nr: Mapping[str, Any],
    skipped: list[dict],
    device: Any,
) -> Iterator[ScoredPair]:
    """``score_pairs`` over each weather's test set, with that weather's teacher."""
    for weather, records in sets.items():
        models = {"input": None, "teacher": teachers.for_weather(weather), "student": student}
        yield from score_pairs(models, _pairs(cfg, {weather: records}, skipped), fr, no_reference=nr, device=device)


def _test_sets(data: EvalDataConfig) -> dict[str, list]:
    """weather -> its paired test records (the first ``max_images``); unpaired or empty manifests are refused."""
    if not data.manifests:
        raise D4IRError("`data.manifests` is empty: give weather -> paired manifest (docs/EVALUATION.md)")
    sets = {}
    for weather, path in data.manifests.items():
        records = load_manifest(path)
        unpaired = [r.id for r in records if r.target is None]
        if unpaired:
            raise D4IRError(
                f"`data.manifests.{weather}` = {path!r}: {len(unpaired)} record(s) without a target (e.g. "
                f"{unpaired[0]!r}); evaluation needs a paired manifest (input + target folders, docs/EVALUATION.md)"
            )
        if not records:
            raise D4IRError(f"`data.manifests.{weather}` = {path!r} has no records")
        sets[weather] = records[: data.max_images] if data.max_images else records
    return sets


@dataclass
class _Scores:
    """What :func:`_collect` keeps of the scored pairs: the CSV rows, the contact sheet, student vs teacher."""

    rows: list[dict] = field(default_factory=list)  # one per (image, model)
    sheet_rows: list[tuple[str, list[Image.Image]]] = field(default_factory=list)
    vs_teacher: dict[str, list[float]] = field(default_factory=dict)  # weather -> PSNR-Y of student vs teacher


def _collect(scored: Iterable[ScoredPair], psnr_y: Any, contact_per_weather: int) -> _Scores:
    """The per-image rows of every scored pair, the first ``contact_per_weather`` of each weather for the sheet."""
    res = _Scores()
    shown: dict[str, int] = {}
    for sp in scored:
        weather, rec = sp.id
        size = {"width": sp.input.shape[-1], "height": sp.input.shape[-2]}
        res.rows += [{"weather": weather, "id": rec.id, "model": m, **size, **sp.scores[m]} for m in MODELS]
        res.vs_teacher.setdefault(weather, []).append(_score(psnr_y, sp.outputs["student"], sp.outputs["teacher"]))
        if shown.get(weather, 0) < contact_per_weather:
            shown[weather] = shown.get(weather, 0) + 1
            name = rec.id if weather in rec.id else f"{weather}/{rec.id}"
            res.sheet_rows.append((name, [_to_image(sp.outputs[m]) for m in MODELS] + [_to_image(sp.target)]))
    return res


def _per_weather(weathers: Iterable[str], scores: _Scores, cols: list[str]) -> dict[str, dict]:
    """weather -> model -> {n, mean of every metric column}; the student also gets its PSNR-Y vs the teacher."""
    per_weather: dict[str, dict] = {}
    for weather in weathers:
        per_weather[weather] = {}
        for model in MODELS:
            sel = [r for r in scores.rows if r["weather"] == weather and r["model"] == model]
            entry: dict[str, Any] = {"n": len(sel)}
            for c in cols:
                entry[c] = float(np.mean([r[c] for r in sel])) if sel else None
            per_weather[weather][model] = entry
        if scores.vs_teacher.get(weather):
            per_weather[weather]["student"]["student_psnr_y_vs_teacher"] = float(np.mean(scores.vs_teacher[weather]))
    return per_weather


def _write_report(cfg: EvalConfig, summary: dict, scores: _Scores, cols: list[str]) -> EvalResult:
    """per_image.csv, summary.json, summary.md and the contact sheet (if any) under the student's folder."""
    out = Path(cfg.output.dir) / student_tag(StudentConfig(name=cfg.student.name, tag=cfg.student.tag))
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "per_image.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["weather", "id", "model", "width", "height", *cols])
    writer.writeheader()
    writer.writerows(scores.rows)
    atomic_write_text(csv_path, buf.getvalue())
    json_path = atomic_write_json(out / "summary.json", summary)
    md_path = atomic_write_text(out / "summary.md", _markdown(summary))
    sheet_path = None
    if scores.sheet_rows:
        sheet_path = save_png(out / "contact_sheet.png", contact_sheet(scores.sheet_rows, cfg.report.contact_height))
    logger.info("evaluation -> %s", out)
    return EvalResult(out, csv_path, json_path, md_path, sheet_path, summary)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Score input, teacher and student on every paired set; write CSV, JSON, markdown, contact sheet."""
    # 1. inputs
    sets = _test_sets(cfg.data)
    device = pick_device(cfg.runtime.device)

    # 2. models and metrics
    teachers = Teachers(cfg.teacher, device)  # one per weather with `teacher.by_weather`
    tident = teacher_identity(cfg.teacher)
    student, sdir = load_student(cfg, device)
    fr = build_fr_metrics(device, cfg.metrics.crop_border)
    nr, skipped_metrics = _nr_metrics(cfg.metrics.no_reference, device)

    # 3. score every image
    skipped_images: list[dict] = []
    scored = _score_sets(cfg, sets, teachers, student, fr, nr, skipped_images, device)
    scores = _collect(scored, fr["psnr_y"], cfg.report.contact_per_weather)

    # 4. cost
    teacher, tdtype = teachers.model()  # the default teacher (with `by_weather`: the one of other weathers)
    cost = {
        "size": cfg.cost.size,
        "teacher": _cost(teacher, teacher_name(tident), cfg.cost, device, tdtype),
        "student": _cost(student, cfg.student.name, cfg.cost, device, torch.float32),
    }

    # 5. summary and files
    cols = list(FR_METRICS) + list(nr)
    summary = {
        "teacher": {"name": teacher_name(tident), "checkpoint": tident["path"], "id": tident["id"]},
        "student": {"name": cfg.student.name, "checkpoint": str(sdir)},
        "metrics": {c: {"pyiqa": n, **kw} for c, (n, kw) in FR_METRICS.items()},
        "no_reference": list(nr),
        "per_weather": _per_weather(sets, scores, cols),
        "cost": cost,
        "skipped_metrics": skipped_metrics,
        "skipped_images": skipped_images,
        "config": config_to_dict(cfg),
        "versions": package_versions(),
        "device": str(device),
    }
    return _write_report(cfg, summary, scores, cols)


@stage_command("evaluate", EvalConfig)
def evaluate_command(cfg: EvalConfig) -> None:
    """Evaluate teacher and student (PSNR/SSIM, Y and RGB) on paired test sets, with cost."""
    r = evaluate(cfg)
    click.echo(r.summary_md.read_text(encoding="utf-8"))
    click.echo(f"report: {r.out_dir}")
