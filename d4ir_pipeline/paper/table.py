"""The comparison table and its figures: formatting, model descriptions, sample grids."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d4ir_pipeline.models import reference_teacher_path
from d4ir_pipeline.stage1.sd import SDLoadError, model_id

# ---------------------------------------------------------------------------------------
# 6. table and figures


def sd_description(synth_cfg: Any) -> dict:
    """Which SD the D4IR / SD + text rows used, flagged when it is a toy (tiny random or demo SD)."""
    if synth_cfg is None:
        return {"id": None, "kind": "none", "note": "no synthesize config: no SD rows"}

    src = synth_cfg.sd.model
    try:
        ident = model_id(src)
    except (SDLoadError, OSError):
        ident = src
    if (Path(src) / "d4ir_tiny_sd.json").is_file():
        kind = "tiny-random"
        note = (
            "TINY RANDOM SD (`d4ir tiny-sd`): its images are meaningless; these rows exercise the pipeline and are "
            "NOT the paper's numbers"
        )
    elif (Path(src) / "d4ir_demo_sd.json").is_file():
        kind = "demo-toy"
        note = (
            "64 px TOY SD trained on the demo's web images (`d4ir demo-sd`), not a pretrained Stable Diffusion: "
            "these rows are NOT the paper's numbers"
        )
    else:
        kind = "user"
        note = "user-supplied Stable Diffusion weights"
    return {"id": ident, "source": src, "kind": kind, "note": note}


def teacher_description(ident: dict) -> dict:

    path = Path(ident["path"])
    ref = path.resolve() == reference_teacher_path().resolve()
    note = "the embedded demo's reference teacher (trained on the demo's paired data)" if ref else "user teacher"
    return {
        "id": ident["id"],
        "path": str(path),
        "spec": ident["spec"],
        "weights_sha256": ident["weights_sha256"],
        "note": note,
    }


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table(header: dict, rows: list[RowResult], weathers: list[str]) -> str:
    """The markdown table (deterministic: no timings, so a rerun prints the same text)."""
    t, s, b = header["teacher"], header["student"], header["budget"]
    lines = [
        "# D4IR comparison table",
        "",
        f"- Teacher: `{t['spec']['name']}` from `{t['path']}` ({t['note']}; weights sha256 {t['weights_sha256'][:12]}...,"
        f" {_fmt_params(t.get('params'))} params)",
        f"- Student: `{s['spec']['name']}` {json.dumps(s['spec'].get('kwargs', {}), sort_keys=True)}"
        f" ({_fmt_params(s.get('params'))} params, {s['ratio']:.1%} of the teacher)",
        f"- SD model: `{header['sd']['id']}` - {header['sd']['note']}",
        f"- Budget{' (--quick)' if header['quick'] else ''}: {b['steps']} steps, batch {b['batch']}, patch {b['patch']},"
        f" seed {b['seed']}; test images per weather: "
        + ", ".join(f"{w} {header['test_images'][w]}" for w in weathers),
        f"- Metrics: PSNR (dB) / SSIM on the {'Y channel (BT.601)' if header['y_channel'] else 'RGB channels'},"
        " mean over each weather's test images",
        "",
    ]
    p, q = ("psnr_y", "ssim_y") if header["y_channel"] else ("psnr_rgb", "ssim_rgb")
    cols = ["Row"] + [f"{w} PSNR / SSIM" for w in weathers] + ["Average PSNR / SSIM", "Params", "Train inputs"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    skipped = []
    for r in rows:
        if r.status != "ok":
            skipped.append(r)
            lines.append("| " + " | ".join([r.title] + ["skipped"] * len(weathers) + ["skipped", "-", "-"]) + " |")
            continue
        cells = [r.title]
        for w in weathers:
            m = r.metrics.get(w, {})
            cells.append(f"{_fmt(m.get(p), 2)} / {_fmt(m.get(q), 4)}")
        cells.append(f"{_fmt(r.average.get(p), 2)} / {_fmt(r.average.get(q), 4)}")
        cells.append(_fmt_params(r.params))
        cells.append("-" if r.samples is None else str(r.samples))
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped rows:"]
        lines += [f"- {r.title}: {r.reason}" for r in skipped]
    return "\n".join(lines) + "\n"


ROWS = ("data_kd", "web", "d4ir", "sd_text", "noise", "dfmc")

ROW_TITLES = {
    "input": "Degraded input (no restoration)",
    "teacher": "Teacher",
    "data_kd": "Data-based KD (teacher's training inputs)",
    "web": "Web data (degraded web photos)",
    "d4ir": "D4IR (CCD, DPA prompts)",
    "sd_text": "SD + text prompt (CCD, no DPA)",
    "noise": "Noise (random inputs)",
    "dfmc": "GAN (DFMC-style)",
}

WEATHERS = ("rain", "haze", "snow")


@dataclass
class RowResult:
    """One row of the table."""

    row: str
    title: str
    status: str  # "ok" | "skipped"
    reason: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # weather -> {psnr, ssim}
    average: dict[str, float] = field(default_factory=dict)
    params: int | None = None
    samples: int | None = None  # training inputs in the row's shard set
    shards: str | None = None
    student_dir: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # source / distill / eval, this run (0 = cached)
    cached: dict[str, bool] = field(default_factory=dict)
