"""The model card (README.md of an export folder), rendered from the export's own ``export.json``.

Every figure on the card is one the export measured or read from the model's files
(model.json's ``run``, the evaluation summary, file hashes); nothing is typed in.
"""

from __future__ import annotations

import json
import re

from d4ir_pipeline.deploy.graph import SWAP_NOTES

__all__ = ["render_card", "USAGE"]

# five lines: any image size, any batch; the padding to the network's multiple is in the graph
USAGE = """\
import numpy as np, onnxruntime as ort
from PIL import Image
sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
x = np.asarray(Image.open("in.jpg").convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
Image.fromarray((sess.run(None, {"input": x})[0][0].clip(0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save("out.png")
"""


def _count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _demote(markdown: str) -> str:
    """Headings one level down, so an embedded report sits under the card's own section."""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown.strip(), flags=re.M)


def render_card(info: dict) -> str:
    """Markdown model card from an export's ``export.json`` content."""
    lines = _architecture(info) + _distilled_from(info.get("distillation")) + _evaluation(info.get("evaluation"))
    lines += _verification(info, info["verification"]) + _usage(info) + _files(info)
    return "\n".join(lines)


def _architecture(info: dict) -> list[str]:
    m, src = info["model"], info["source"]
    spec = m["spec"]
    lines = [
        f"# `{spec['name']}` ({m['role']}), exported for deployment",
        "",
        f"Exported by `d4ir export` from `{src['path']}` (source id `{src['id']}`). Every figure below was "
        "measured by that export; `export.json` holds them all.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{spec['name']}` (`{m['class']}`), kwargs `{json.dumps(spec.get('kwargs', {}), sort_keys=True)}` |",
        f"| parameters | {_count(m['params'])} ({m['params']}) |",
        "| MACs | " + "; ".join(f"{k}: {_count(v)}" for k, v in m["macs"].items()) + " |",
        f"| input | `input` (batch, 3, height, width) float32 RGB in [0, 1]; any size: {info['onnx']['padding']} |",
        "| output | `output`, same shape; clip to [0, 1] |",
        f"| activations | {m['activation_bytes_per_pixel']:.0f} bytes per pixel in eager PyTorch "
        f"({m['activation_bytes_per_pixel'] * 512 * 512 / 2**20:.0f} MiB at 512x512; `d4ir restore` tiles above "
        "its memory budget) |",
    ]
    if adapter := m.get("adapter"):
        flag = adapter["weather_flag"]
        weather = f"; weather flag fixed to `{adapter['weather']}` (of {', '.join(flag)})" if flag else ""
        lines.append(
            f"| I/O adapter (in the graph) | network input range [{adapter['input_range']}], output range "
            f"[{adapter['output_range']}], output index {adapter['output_index']}{weather} |"
        )
    if info.get("replaced_modules"):
        swaps = "; ".join(
            f"{k} x {v} -> {SWAP_NOTES.get(k, 'an exact equivalent')}" for k, v in info["replaced_modules"].items()
        )
        lines.append(
            f"| export-friendly swaps | {swaps}; max abs diff vs the original {info['replacement_max_abs_diff']:.1e} |"
        )
    return lines


def _distilled_from(d: dict | None) -> list[str]:
    lines = ["", "## Distilled from", ""]
    if not d:
        return lines + ["No distillation record in model.json (a teacher, or a model trained elsewhere)."]
    t = d.get("teacher") or {}
    tspec = t.get("spec") or {}
    return lines + [
        "| | |",
        "|---|---|",
        f"| teacher | `{tspec.get('name')}` id `{t.get('id')}`, weights sha256 `{t.get('weights_sha256')}` "
        f"(`{t.get('path')}`) |",
        f"| shard set | shardset.json sha256 `{d.get('shardset_sha256')}`"
        + (f" (`{d['shardset_path']}`)" if d.get("shardset_path") else "")
        + " |",
        f"| targets | {d.get('targets')} |",
        f"| distillation config hash | `{d.get('config_hash')}` |",
        f"| steps | {d.get('steps')} |",
        f"| held-out PSNR vs teacher | {_num(d.get('val_psnr_vs_teacher'), '.2f')} dB |",
    ]


def _evaluation(ev: dict | None) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if not ev:
        return lines + ["No evaluation report of this model was found (run `d4ir evaluate`, or pass `eval_summary`)."]
    return lines + [f"From `{ev['path']}`:", "", _demote(ev["markdown"])]


def _usage(info: dict) -> list[str]:
    lines = [
        "",
        "## Usage",
        "",
        "ONNX Runtime (any size, any batch):",
        "",
        "```python",
        USAGE.rstrip(),
        "```",
        "",
        "Images of changing sizes: `so = ort.SessionOptions(); so.enable_mem_pattern = False` and pass `so` "
        "to the session: ONNX Runtime otherwise keeps a memory block per input shape on top of its arena, "
        "which raises the peak.",
        "",
    ]
    if info["onnx"].get("traced"):
        lines += [f"`model.onnx` was written by the {info['onnx']['exporter']}; so there is no `model.pt2`.", ""]
    if info.get("pt2"):
        lines += [
            "PyTorch: `torch.export.load('model.pt2').module()(x)` "
            f"(sides {info['pt2']['min_side']} to {info['pt2']['max_side']} px; torch.export's range constraint). "
            "A folder of images: `d4ir restore IN --model model.onnx --out OUT`.",
            "",
        ]
    return lines


def _files(info: dict) -> list[str]:
    lines = ["## Files", "", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| `{name}` | {f['bytes']} | `{f['sha256']}` |" for name, f in info["files"].items()]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return lines + ["", f"Exported with {versions}.", ""]


def _verification(info: dict, ver: dict) -> list[str]:
    rows = ver["fp32_onnxruntime"]
    cols = [f"{r['batch']}x3x{r['size']}" for r in rows]
    lines = [
        "",
        "## Verification",
        "",
        f"Sizes verified: {', '.join(ver['sizes'])} (batch 1) and a batch of 3 at {ver['sizes'][0]}; inputs "
        f"uniform noise; fp32 tolerance {ver['tolerance']:g} (max abs difference vs eager PyTorch).",
        "",
        "| file | figure | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
        "| `model.onnx` | max abs diff vs PyTorch | " + " | ".join(f"{r['max_abs_diff']:.1e}" for r in rows) + " |",
    ]
    if ver.get("pt2"):
        by = {f"{r['batch']}x3x{r['size']}": r for r in ver["pt2"]}
        cells = [f"{by[c]['max_abs_diff']:.1e}" if c in by else "(below min side)" for c in cols]
        lines.append("| `model.pt2` | max abs diff vs PyTorch | " + " | ".join(cells) + " |")
    fp16 = ver.get("fp16") or {}
    if fp16.get("rows"):
        cells = [_num(r["psnr_db"], ".1f") for r in fp16["rows"]]
        name = "`model.fp16.onnx`" if fp16["written"] else "fp16 (not written)"
        lines.append(f"| {name} | PSNR vs fp32 (dB) | " + " | ".join(cells) + " |")
    int8 = ver.get("int8") or {}
    lines.append("")
    if int8.get("written"):
        lines.append(
            f"`model.int8.onnx`: {int8['method']}; PSNR vs fp32 {_num(int8['psnr_db_mean'], '.2f')} dB mean, "
            f"{_num(int8['psnr_db_min'], '.2f')} dB worst, on {int8['psnr_images']}."
        )
        if int8.get("calibration"):
            lines.append(f"Calibrated on {int8['calibration']}.")
        if int8.get("static_not_used_because"):
            lines.append(f"Static quantisation was not used: {int8['static_not_used_because']}.")
    else:
        lines.append("No int8 export was requested.")
    if fp16 and not fp16.get("written") and fp16.get("note"):
        lines.append(f"fp16: {fp16['note']}.")
    elif not fp16.get("rows"):
        lines.append("No fp16 export was requested.")
    else:
        lines.append("`model.fp16.onnx` keeps float32 input and output; it is meant for GPUs (CUDA / TensorRT EPs).")
    return lines
