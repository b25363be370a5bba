"""The frozen teacher of stage two: config, loading, identity (what determines its outputs), forward."""

from __future__ import annotations

import dataclasses
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
from d4ir_pipeline.models import ModelIO, adapted_forward, build_model, model_io, reference_teacher_path
from d4ir_pipeline.models.adapter import RANGES
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
    # the I/O adapter: empty / 0 / -1 = the registry's value for the architecture (models.model_io)
    input_range: str = opt("", choices=("", *RANGES), help="value range the teacher takes ('-1,1' for DehazeFormer)")
    output_range: str = opt("", choices=("", *RANGES), help="value range the teacher returns")
    output_index: int = opt(-1, min=-1, help="which output of a list / tuple is the restoration (MPRNet: 0)")
    pad_multiple: int = opt(0, min=0, help="pad the input to this multiple outside the model, crop back")
    weather_flag: tuple[str, ...] = opt((), help="non-blind teachers: weather order of the one-hot flag argument")
    weather: str = opt("", help="non-blind teachers: a fixed weather for the flag; empty = each sample's weather")
    by_weather: dict[str, TeacherConfig] = opt(
        default_factory=dict,
        help="one teacher per weather: rain = {checkpoint = ..., arch = ...} (each a full teacher spec); samples "
        "of other weathers, or without one, go to the teacher above",
    )


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


def teacher_io(cfg: TeacherConfig, arch: str) -> ModelIO:
    """The teacher's calling convention: the registry's defaults for ``arch``, overridden by the config."""
    base = model_io(arch)
    return ModelIO(
        input_range=cfg.input_range or base.input_range,
        output_range=cfg.output_range or base.output_range,
        output_index=cfg.output_index if cfg.output_index >= 0 else base.output_index,
        pad_multiple=cfg.pad_multiple or base.pad_multiple,
        weather_flag=tuple(cfg.weather_flag) or base.weather_flag,
    )


def teacher_identity(cfg: TeacherConfig) -> dict:
    """Hash of what determines the teachers' outputs: weights, architecture, tiling, I/O adapter (of each
    weather's teacher too, with ``by_weather``)."""
    if cfg.by_weather:
        if nested := sorted(w for w, spec in cfg.by_weather.items() if spec.by_weather):
            raise D4IRError(f"`teacher.by_weather.{nested[0]}` cannot hold its own `by_weather`")
        parts = {w: _single_identity(spec) for w, spec in sorted(cfg.by_weather.items())}
        default = _single_identity(dataclasses.replace(cfg, by_weather={}))
        tid = hashlib.sha256(
            json.dumps({"default": default["id"], **{w: p["id"] for w, p in parts.items()}}, sort_keys=True).encode()
        ).hexdigest()[:16]
        return {"id": tid, "path": default["path"], "default": default, "by_weather": parts}
    return _single_identity(cfg)


def teacher_name(ident: dict) -> str:
    """Architecture name(s) of a ``teacher_identity``: ``restormer`` or ``nafnet; rain: drsformer, ...``."""
    if "by_weather" not in ident:
        return ident["spec"]["name"]
    parts = [f"{w}: {p['spec']['name']}" for w, p in ident["by_weather"].items()]
    return "; ".join([ident["default"]["spec"]["name"], *parts])


def with_tiling(cfg: TeacherConfig, tile: int, overlap: int) -> TeacherConfig:
    """``cfg`` (and each of its weathers' teachers) tiled above ``tile`` px with ``overlap`` px."""
    by_weather = {w: dataclasses.replace(s, tile=tile, tile_overlap=overlap) for w, s in cfg.by_weather.items()}
    return dataclasses.replace(cfg, tile=tile, tile_overlap=overlap, by_weather=by_weather)


def _single_identity(cfg: TeacherConfig) -> dict:
    path, weights, spec = _teacher_source(cfg)
    wsha = sha256_file(weights)
    io = teacher_io(cfg, spec["name"])
    ident = {
        "weights_sha256": wsha,
        "spec": spec,
        "tile": cfg.tile,
        "tile_overlap": cfg.tile_overlap,
        "io": io.to_dict(),
        "weather": cfg.weather or None,
    }
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
    model.d4ir_io = teacher_io(cfg, spec["name"])  # how teacher_forward calls it
    if model.d4ir_io.weather_flag and cfg.weather and cfg.weather not in model.d4ir_io.weather_flag:
        raise D4IRError(
            f"`teacher.weather` = {cfg.weather!r}: teacher {spec['name']!r} knows {list(model.d4ir_io.weather_flag)}"
        )
    logger.info("teacher %s from %s (%s on %s; %s)", spec["name"], path, dtype, device, model.d4ir_io)
    return model, dtype


def check_same_size(out: Any, x: Any, who: str) -> None:
    if tuple(out.shape) != tuple(x.shape):
        raise D4IRError(
            f"{who} returned {tuple(out.shape)} for an input of {tuple(x.shape)}: pixel distillation needs an "
            "image-to-image model whose output has the input's size and channels (check the model name / kwargs, "
            "e.g. an upscale factor or out_channels)"
        )


def teacher_forward(model: Any, x: Any, dtype: Any, cfg: TeacherConfig, weather: Any = None) -> Any:
    """Frozen teacher on ``x`` (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) clamped to [0, 1].

    The model is called through its I/O adapter (``model.d4ir_io``, set by :func:`load_teacher`):
    value range, output index, padding, and for non-blind teachers the weather flag:
    ``teacher.weather`` when set, else ``weather`` (one name, or one per sample).
    """
    io = getattr(model, "d4ir_io", ModelIO())
    weather = cfg.weather or weather

    def run(t: Any) -> Any:
        return adapted_forward(model, t, io, weather)

    with torch.no_grad():
        xin = x.to(dtype)
        if cfg.tile and max(x.shape[-2:]) > cfg.tile:
            if io.weather_flag is not None and not isinstance(weather, str | None):
                raise D4IRError("a tiled non-blind teacher needs one weather per batch (set `teacher.weather`)")
            y = tiled_forward(run, xin, tile=cfg.tile, overlap=min(cfg.tile_overlap, cfg.tile - 1))
        else:
            y = run(xin)
    check_same_size(y, x, f"teacher ({cfg.checkpoint})")
    return y.float().clamp_(0.0, 1.0)


class Teachers:
    """The default teacher and the per-weather ones (``teacher.by_weather``), each loaded on first use.

    Calling it with a batch and its samples' weathers sends every sample to its weather's
    teacher (the default one for other weathers and for samples without a weather) and puts
    the outputs back in batch order. Every teacher used stays on the device: memory is the sum
    of the teachers that data reaches (a 26M-parameter Restormer is ~52 MB of fp16 weights, plus
    its activations at the crop size, one teacher at a time).
    """

    def __init__(self, cfg: TeacherConfig, device: Any):
        self.cfg, self.device = cfg, device
        # the default teacher exactly as a single teacher is loaded (same RNG use: runs stay bit-identical)
        self._loaded: dict[str | None, tuple[Any, Any, TeacherConfig]] = {None: (*load_teacher(cfg, device), cfg)}
        self._waiting: dict[str, Any] = {}
        for w, spec in sorted(cfg.by_weather.items()):
            with torch.random.fork_rng(devices=[]):  # building a model draws random init weights
                self._waiting[w], _ = load_teacher(spec, torch.device("cpu"))

    def spec_for(self, weather: str | None) -> tuple[str | None, TeacherConfig]:
        """(which teacher, its config) for a sample of ``weather``."""
        if weather is not None and weather in self.cfg.by_weather:
            return weather, self.cfg.by_weather[weather]
        return None, self.cfg

    def _get(self, which: str | None) -> tuple[Any, Any, TeacherConfig]:
        if which not in self._loaded:  # a weather's teacher reaches the device when its first sample does
            spec = self.cfg.by_weather[which]
            dtype = pick_dtype(spec.dtype, self.device)
            self._loaded[which] = (self._waiting.pop(which).to(device=self.device, dtype=dtype), dtype, spec)
        return self._loaded[which]

    def model(self, weather: str | None = None) -> tuple[Any, Any]:
        """(model, dtype) of the teacher that samples of ``weather`` reach (moved to the device)."""
        model, dtype, _ = self._get(self.spec_for(weather)[0])
        return model, dtype

    def all_models(self) -> list[Any]:
        """Every teacher of this config: the default one first, then each weather's (loaded or not)."""
        return [self._loaded[None][0]] + [
            self._loaded[w][0] if w in self._loaded else self._waiting[w] for w in sorted(self.cfg.by_weather)
        ]

    def for_weather(self, weather: str) -> Any:
        """A one-argument model function (B, 3, H, W) -> (B, 3, H, W) for images of ``weather``."""
        return lambda x: self(x, [weather] * x.shape[0])

    def __call__(self, x: Any, weathers: Any = None) -> Any:
        """Teacher outputs float32 (B, 3, H, W) in [0, 1] for ``x`` (B, 3, H, W); ``weathers``: one per sample or None."""
        names = list(weathers) if weathers is not None else [None] * x.shape[0]
        groups: dict[str | None, list[int]] = {}
        for i, w in enumerate(names):
            groups.setdefault(self.spec_for(w)[0], []).append(i)
        if len(groups) == 1:
            ((which, _),) = groups.items()
            model, dtype, spec = self._get(which)
            one = names[0] if len(set(names)) == 1 else names  # one weather per batch: tiling allows it
            return teacher_forward(model, x, dtype, spec, weather=one)
        out = None
        for which, idx in groups.items():
            model, dtype, spec = self._get(which)
            y = teacher_forward(model, x[idx], dtype, spec, weather=[names[i] for i in idx])
            if out is None:
                out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
            out[idx] = y
        return out
