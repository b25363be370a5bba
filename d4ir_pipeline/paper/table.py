"""The comparison table and its figures: rows and groups, mean ± std over seeds, the markdown, the restoration grid."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d4ir_pipeline.common.images import image_grid, save_png
from d4ir_pipeline.models import reference_teacher_path
from d4ir_pipeline.stage1.sd import SDLoadError, model_id
from d4ir_pipeline.stage2.teacher import teacher_name

# ---------------------------------------------------------------------------------------
# rows

ROWS = ("data_kd", "web", "d4ir", "sd_text", "noise", "dfmc", "unpaired", "prior")

ROW_TITLES = {
    "input": "Degraded input (no restoration)",
    "teacher": "Teacher",
    "data_kd": "Data-based KD (teacher's training inputs)",
    "web": "Web data (degraded web photos)",
    "d4ir": "D4IR (CCD, DPA prompts)",
    "sd_text": "SD + text prompt (CCD, no DPA)",
    "noise": "Noise (random inputs)",
    "dfmc": "GAN (DFMC-style)",
    "unpaired": "Unpaired CycleGAN (web clean + degraded)",
    "prior": "Dark channel prior (haze only)",
}
SHORT_TITLES = {  # row labels of the figures
    "teacher": "Teacher",
    "data_kd": "Data-based KD",
    "web": "Web data",
    "d4ir": "D4IR",
    "sd_text": "SD + text prompt",
    "noise": "Noise",
    "dfmc": "GAN (DFMC-style)",
    "unpaired": "unsup.: CycleGAN",
    "prior": "unsup.: DCP prior",
}
# group -> (title in table.md, its rows): the teacher-free rows are the paper's "unsupervised methods"
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reference": ("reference", ("input", "teacher")),
    "distilled": ("distilled from the teacher (the same student, loss and budget)", ROWS[:6]),
    "unsupervised": ("unsupervised (no teacher: unpaired web images or a prior)", ("unpaired", "prior")),
}
ROW_GROUP = {row: g for g, (_, rows) in GROUPS.items() for row in rows}
WEATHERS = ("rain", "haze", "snow")
MARK = "†"  # D4IR's difference to this cell is smaller than the two rows' combined std


@dataclass
class RowResult:
    """One row of the table: the mean over seeds in ``metrics`` / ``average``, their spread in ``std``."""

    row: str
    title: str
    status: str  # "ok" | "skipped"
    reason: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # weather -> {psnr_y, ssim_y, ...}: mean
    average: dict[str, float] = field(default_factory=dict)  # mean over seeds of the mean over weathers
    params: int | None = None
    samples: int | None = None  # training inputs in the row's shard set (unpaired: clean + degraded images)
    shards: str | None = None  # the first seed's
    student_dir: str | None = None  # the first seed's
    seconds: dict[str, float] = field(default_factory=dict)  # source / distill / eval, this run, all seeds (0 = cached)
    cached: dict[str, bool] = field(default_factory=dict)  # every seed's output was reused
    group: str = ""  # reference | distilled | unsupervised
    seeds: list[int] = field(default_factory=list)  # empty: the row does not depend on a seed
    std: dict[str, dict[str, float]] = field(default_factory=dict)  # weather -> column -> sample std over seeds
    average_std: dict[str, float] = field(default_factory=dict)
    per_seed: dict[str, dict] = field(default_factory=dict)  # str(seed) -> metrics, average, student_dir, ...

    def __post_init__(self) -> None:
        self.group = self.group or ROW_GROUP.get(self.row, "")


def aggregate(r: RowResult) -> None:
    """Fill ``metrics`` / ``average`` (means) and ``std`` / ``average_std`` (sample std, ddof 1) from ``per_seed``."""
    runs = list(r.per_seed.values())
    r.seeds = [int(k) for k in r.per_seed]
    r.metrics, r.std = {}, {}
    for w in runs[0]["metrics"]:
        cols = [c for c in runs[0]["metrics"][w] if c != "images"]
        r.metrics[w] = {c: _mean([x["metrics"][w][c] for x in runs]) for c in cols}
        r.metrics[w]["images"] = runs[0]["metrics"][w].get("images")
        r.std[w] = {c: _std([x["metrics"][w][c] for x in runs]) for c in cols}
    if runs[0]["average"]:
        r.average = {c: _mean([x["average"][c] for x in runs]) for c in runs[0]["average"]}
        r.average_std = {c: _std([x["average"][c] for x in runs]) for c in runs[0]["average"]}


def _mean(v: Sequence[float]) -> float:
    return float(np.mean(v))


def _std(v: Sequence[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def average(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over weathers of each metric column."""
    if not metrics:
        return {}
    cols = [c for c in next(iter(metrics.values())) if c != "images"]
    return {c: float(np.mean([v[c] for v in metrics.values()])) for c in cols}


def unresolved(rows: list[RowResult], cols: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """row -> weather (or "average") -> the columns where |D4IR - row| < sqrt(std_D4IR^2 + std_row^2).

    Only when D4IR ran with at least two seeds; rows without seeds (teacher, input, the
    prior) have a std of 0. These cells cannot say whether D4IR is better or worse.
    """
    d4 = next((r for r in rows if r.row == "d4ir" and r.status == "ok"), None)
    if d4 is None or len(d4.seeds) < 2:
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r is d4 or r.status != "ok":
            continue
        cells = {w: (d4.metrics.get(w, {}), d4.std.get(w, {}), m, r.std.get(w, {})) for w, m in r.metrics.items()}
        if r.average:
            cells["average"] = (d4.average, d4.average_std, r.average, r.average_std)
        for where, (ma, sa, mb, sb) in cells.items():
            close = [c for c in cols if c in ma and c in mb and _close(ma[c], sa.get(c, 0.0), mb[c], sb.get(c, 0.0))]
            if close:
                out.setdefault(r.row, {})[where] = close
    return out


def _close(a: float, sa: float, b: float, sb: float) -> bool:
    return abs(a - b) < math.sqrt(sa * sa + sb * sb)


# ---------------------------------------------------------------------------------------
# table and figures


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
    if "by_weather" in ident:  # one teacher per weather: the default one's weights, each weather's spec
        return {
            "id": ident["id"],
            "path": str(path),
            "spec": {**ident["default"]["spec"], "name": teacher_name(ident)},
            "weights_sha256": ident["default"]["weights_sha256"],
            "by_weather": {w: {"path": p["path"], "spec": p["spec"]} for w, p in ident["by_weather"].items()},
            "note": f"{note}, with one teacher per weather ({', '.join(ident['by_weather'])})",
        }
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


def _cell(m: dict, sd: dict, cols: tuple[str, str], spread: bool, marked: list[str]) -> str:
    """``PSNR / SSIM`` of one weather (``mean ± std`` with seeds; ``MARK`` where D4IR is within the spread)."""
    if not m:
        return "-"
    parts = []
    for col, digits in zip(cols, (2, 4), strict=True):
        text = _fmt(m.get(col), digits)
        if spread and m.get(col) is not None:
            text += f" ± {_fmt(sd.get(col), digits)}"
        parts.append(text + (MARK if col in marked else ""))
    return " / ".join(parts)


def _header_lines(header: dict, weathers: list[str]) -> list[str]:
    t, s, b = header["teacher"], header["student"], header["budget"]
    seeds = b.get("seeds", [b.get("seed")])
    return [
        "# D4IR comparison table",
        "",
        f"- Teacher: `{t['spec']['name']}` from `{t['path']}` ({t['note']}; weights sha256 {t['weights_sha256'][:12]}...,"
        f" {_fmt_params(t.get('params'))} params)",
        f"- Student: `{s['spec']['name']}` {json.dumps(s['spec'].get('kwargs', {}), sort_keys=True)}"
        f" ({_fmt_params(s.get('params'))} params, {s['ratio']:.1%} of the teacher)",
        f"- SD model: `{header['sd']['id']}` - {header['sd']['note']}",
        f"- Budget{' (--quick)' if header['quick'] else ''}: {b['steps']} steps, batch {b['batch']}, patch {b['patch']},"
        f" seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; test images per weather: "
        + ", ".join(f"{w} {header['test_images'][w]}" for w in weathers),
        f"- Metrics: PSNR (dB) / SSIM on the {'Y channel (BT.601)' if header['y_channel'] else 'RGB channels'},"
        " mean over each weather's test images"
        + (
            f"; learned rows: mean ± sample std over the {len(seeds)} seeds (one training run per seed)"
            if len(seeds) > 1
            else ""
        ),
        "",
    ]


def format_table(header: dict, rows: list[RowResult], weathers: list[str]) -> str:
    """The markdown table (deterministic: no timings, so a rerun prints the same text)."""
    lines = _header_lines(header, weathers)
    p, q = ("psnr_y", "ssim_y") if header["y_channel"] else ("psnr_rgb", "ssim_rgb")
    marks = unresolved(rows, (p, q))
    cols = ["Row"] + [f"{w} PSNR / SSIM" for w in weathers] + ["Average PSNR / SSIM", "Params", "Train inputs"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    group = None
    for r in rows:
        if len({x.group for x in rows}) > 1 and r.group != group:
            group = r.group
            lines.append("| " + " | ".join([f"*{GROUPS.get(group, (group,))[0]}*"] + [""] * (len(cols) - 1)) + " |")
        if r.status != "ok":
            lines.append("| " + " | ".join([r.title] + ["skipped"] * len(weathers) + ["skipped", "-", "-"]) + " |")
            continue
        spread, mk = len(r.seeds) > 1, marks.get(r.row, {})
        cells = [r.title] + [
            _cell(r.metrics.get(w, {}), r.std.get(w, {}), (p, q), spread, mk.get(w, [])) for w in weathers
        ]
        cells.append(_cell(r.average, r.average_std, (p, q), spread, mk.get("average", [])))
        cells += [_fmt_params(r.params), "-" if r.samples is None else str(r.samples)]
        lines.append("| " + " | ".join(cells) + " |")
    if marks:
        lines += ["", f"{MARK} D4IR's difference to this value is smaller than the two rows' combined std "
                  "(sqrt(std_D4IR^2 + std_row^2)): these seeds do not tell which of the two is better."]  # fmt: skip
    skipped = [r for r in rows if r.status != "ok"]
    if skipped:
        lines += ["", "Skipped rows:"]
        lines += [f"- {r.title}: {r.reason}" for r in skipped]
    return "\n".join(lines) + "\n"


# label, run (image, its weather) -> image, weathers it restores (None: all)
FigureModel = tuple[str, Callable[[np.ndarray, str], np.ndarray], tuple[str, ...] | None]


def restorations_figure(picks: list[tuple[str, np.ndarray, np.ndarray]], models: list[FigureModel], path: Path) -> Path:
    """A grid: columns are test images (weather, input, target), rows are input, target and each model's output.

    A model given ``weathers`` leaves the other columns as the input (the prior on rain / snow: a no-op).
    """
    rows = [[inp for _, inp, _ in picks], [tgt for _, _, tgt in picks]]
    labels = ["input", "target"]
    for label, run, weathers in models:
        rows.append([run(inp, w) if weathers is None or w in weathers else inp for w, inp, _ in picks])
        labels.append(label)
    save_png(path, image_grid(rows, cell=128, labels=labels, col_labels=[w for w, _, _ in picks]))
    return path
