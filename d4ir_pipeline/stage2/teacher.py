"""The frozen teacher of stage two: config, loading, identity (what determines its outputs), forward."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.common.runtime import DTYPES, pick_dtype
from d4ir_pipeline.config import opt
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model, reference_teacher_path
from d4ir_pipeline.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_model_json
from d4ir_pipeline.models.tiling import tiled_forward

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher: a model folder (save_model), or a weights file plus its architecture."""

    checkpoint: str = opt(
        "reference",
        help="'reference' (the packaged demo teacher), a folder from save_model (model.json + "
        "model.safetensors), or a .safetensors/.pth file (then give `arch` and `kwargs`)",
    )
    arch: str = opt("", help="registry name or 'pkg.module:Class' for a bare weights file; empty = from model.json")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments for `arch`")
    key: str = opt("", help="container key inside a .pth (e.g. 'params_ema'); empty = automatic")
    dtype: str = opt(
        "float16",
        help="teacher precision on CUDA (half halves its cost; the CPU always runs float32)",
        choices=DTYPES,
    )
    tile: int = opt(0, help="tiled teacher inference above this side in pixels (0 = whole images)", min=0)
    tile_overlap: int = opt(32, help="overlap of neighbouring tiles in pixels", min=0)


# ---------------------------------------------------------------------------------------
# teacher


def _teacher_source(cfg: TeacherConfig) -> tuple[Path, Path, dict]:
    """(checkpoint path, weights file, build spec) without building anything."""

    path = reference_teacher_path() if cfg.checkpoint == "reference" else Path(cfg.checkpoint)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if cfg.arch:
            spec = {"name": cfg.arch, "kwargs": dict(cfg.kwargs)}
        elif (path / CONFIG_NAME).is_file():
            spec = read_model_json(path)["spec"]
        else:
            raise D4IRError(
                f"`teacher.checkpoint` = {str(path)!r}: the folder has no {CONFIG_NAME}; give `teacher.arch` "
                "(and `teacher.kwargs`) or a folder written by save_model"
            )
        if not weights.is_file():
            raise D4IRError(f"`teacher.checkpoint` = {str(path)!r}: no {WEIGHTS_NAME} in the folder")
        return path, weights, spec
    if path.is_file():
        if not cfg.arch:
            raise D4IRError(
                f"`teacher.checkpoint` = {str(path)!r} is a bare weights file: set `teacher.arch` (a registry "
                "name such as 'restormer' or 'pkg.module:Class') and `teacher.kwargs`"
            )
        return path, path, {"name": cfg.arch, "kwargs": dict(cfg.kwargs)}
    hint = " (build it with `make teacher`)" if cfg.checkpoint == "reference" else ""
    raise D4IRError(f"`teacher.checkpoint` = {cfg.checkpoint!r}: {str(path)!r} does not exist{hint}")


def teacher_identity(cfg: TeacherConfig) -> dict:
    """Hash of what determines the teacher's outputs: weights, architecture, tiling."""
    path, weights, spec = _teacher_source(cfg)
    wsha = sha256_file(weights)
    ident = {"weights_sha256": wsha, "spec": spec, "tile": cfg.tile, "tile_overlap": cfg.tile_overlap}
    tid = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": tid, "path": str(path), **ident}


def load_teacher(cfg: TeacherConfig, device: Any) -> tuple[Any, Any]:
    """Build + load the teacher strictly, frozen (eval, no grad), cast to the run's dtype: (model, dtype)."""

    path, weights, spec = _teacher_source(cfg)
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    # a key mismatch raises CheckpointMismatchError listing missing / unexpected keys
    load_weights(model, weights, strict=True, key=cfg.key or None)
    dtype = pick_dtype(cfg.dtype, device)
    model = model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    logger.info("teacher %s from %s (%s on %s)", spec["name"], path, dtype, device)
    return model, dtype


def check_same_size(out: Any, x: Any, who: str) -> None:
    if tuple(out.shape) != tuple(x.shape):
        raise D4IRError(
            f"{who} returned {tuple(out.shape)} for an input of {tuple(x.shape)}: pixel distillation needs an "
            "image-to-image model whose output has the input's size and channels (check the model name / kwargs, "
            "e.g. an upscale factor or out_channels)"
        )


def teacher_forward(model: Any, x: Any, dtype: Any, cfg: TeacherConfig) -> Any:
    """Frozen teacher on ``x`` (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) clamped to [0, 1]."""

    with torch.no_grad():
        xin = x.to(dtype)
        if cfg.tile and max(x.shape[-2:]) > cfg.tile:
            y = tiled_forward(model, xin, tile=cfg.tile, overlap=min(cfg.tile_overlap, cfg.tile - 1))
        else:
            y = model(xin)
    check_same_size(y, x, f"teacher ({cfg.checkpoint})")
    return y.float().clamp_(0.0, 1.0)
