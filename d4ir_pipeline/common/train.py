"""Training plumbing shared by every loop: LR schedule, checkpoints with exact resume, RNG state."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4ir_pipeline.common.io import atomic_write_json, fsync_dir, read_json
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models.checkpoint import save_model

# ---------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:

    st = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": st[0],
            "keys": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached": float(st[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest.json"
    if not pointer.is_file():
        return None
    d = ckpt_root / read_json(pointer)["dir"]
    if not (d / "state.pt").is_file():
        raise D4IRError(f"{pointer} names {d}, which has no state.pt; delete {ckpt_root} to start over")
    return d


def save_checkpoint(ckpt_root: Path, step: int, student: Any, state: dict, keep: int, extra: dict) -> Path:
    """Write ckpt/step-N/ (student safetensors + state.pt) via a tmp folder + rename, then move latest.json."""

    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, tmp / "student", extra=extra)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_json(ckpt_root / "latest.json", {"dir": name, "step": step})
    listed = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))
    for old in listed[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------
# the loop


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
