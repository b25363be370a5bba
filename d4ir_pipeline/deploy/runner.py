"""One callable for every model source: a save_model folder, a weights file + architecture, or an .onnx.

The PyTorch sources are read by the distillation's own teacher loader (the same
``checkpoint`` / ``arch`` / ``kwargs`` / ``key`` options as ``teacher.*``, strict key
matching, ``weights_only`` pickles), so a model that distils is a model that restores.
A teacher that is not called plainly (DehazeFormer's and TransWeather's [-1, 1] inputs,
MPRNet's list of stages, WGWS-Net's weather flag) runs behind its I/O adapter
(``models.AdaptedModel``): every source takes and returns [0, 1] images, and an export
of it does too. A non-blind teacher restores one weather (``model.weather``).
On CUDA the runner uses half precision where the model allows it: a probe forward in
float16 must stay finite and within 40 dB PSNR of float32, else it stays float32.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.common.runtime import pick_device
from d4ir_pipeline.config import opt
from d4ir_pipeline.deploy.budget import DEFAULT_BYTES_PER_PIXEL, activation_bytes_per_pixel
from d4ir_pipeline.deploy.graph import model_multiple
from d4ir_pipeline.deploy.onnx_model import OnnxModel
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models.adapter import AdaptedModel
from d4ir_pipeline.models.checkpoint import CONFIG_NAME, read_model_json
from d4ir_pipeline.stage2.teacher import TeacherConfig, load_teacher, teacher_identity

__all__ = ["ModelConfig", "Runner", "load_torch_model", "load_runner", "HALF_PROBE_MIN_DB", "probe_image"]

logger = logging.getLogger(__name__)

HALF_PROBE_MIN_DB = 40.0  # float16 output vs float32 on the probe: below this the model stays in float32
RUN_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run or export (the same keys as the distill config's ``teacher.*``)."""

    checkpoint: str = opt(
        "",
        help="a model folder (model.json + model.safetensors, e.g. <distill out>/<tag>/student), 'reference' "
        "(the packaged demo teacher), a .safetensors/.pth weights file (then give `arch`), or an exported "
        ".onnx (restore only)",
    )
    arch: str = opt("", help="registry name or 'pkg.module:Class' for a bare weights file; empty = from model.json")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments for `arch`")
    key: str = opt("", help="container key inside a .pth (e.g. 'params_ema'); empty = automatic")
    weather: str = opt(
        "", help="non-blind teachers (WGWS-Net): the weather to restore, one of its flag's; blind models ignore it"
    )

    def teacher_config(self) -> TeacherConfig:
        """The same source as a distill ``teacher.*`` section (float32: precision is the runner's choice)."""
        if not self.checkpoint:
            raise D4IRError(
                "`model.checkpoint` is empty: give a model folder, 'reference', a weights file with `arch`, "
                "or an exported .onnx"
            )
        return TeacherConfig(
            checkpoint=self.checkpoint,
            arch=self.arch,
            kwargs=dict(self.kwargs),
            key=self.key,
            dtype="float32",
            weather=self.weather,
        )

    @property
    def is_onnx(self) -> bool:
        """True for an exported ``.onnx`` file."""
        return self.checkpoint.lower().endswith(".onnx")


def load_torch_model(cfg: ModelConfig) -> tuple[nn.Module, dict, dict]:
    """(float32 CPU model in eval mode, its model.json or {}, identity {id, path, weights_sha256, spec}).

    The model takes and returns [0, 1] images: one whose I/O adapter is not plain comes wrapped in
    :class:`AdaptedModel` (with ``cfg.weather`` for a non-blind one).
    """
    if cfg.is_onnx:
        raise D4IRError(f"`model.checkpoint` = {cfg.checkpoint!r} is already an ONNX file; give the PyTorch model")
    tc = cfg.teacher_config()
    model, _ = load_teacher(tc, torch.device("cpu"))
    io = model.d4ir_io
    if io.weather_flag and not tc.weather:
        raise D4IRError(
            f"`model.weather` (--weather) is empty: {type(model).__name__} is not blind; choose the weather to "
            f"restore, one of {list(io.weather_flag)}"
        )
    if not io.is_plain or model_multiple(model) % io.pad_multiple:
        model = AdaptedModel(model, io, tc.weather or None).eval()
    ident = teacher_identity(tc)
    folder = Path(ident["path"])
    meta = read_model_json(folder) if folder.is_dir() and (folder / CONFIG_NAME).is_file() else {}
    return model, meta, ident


def probe_image(h: int = 64, w: int = 64) -> torch.Tensor:
    """A deterministic smooth colour image (1, 3, h, w) in [0, 1]: gradients and a few sine waves."""
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    chans = [
        0.5 + 0.4 * torch.sin(6.0 * xx + 3.0 * yy),
        0.5 + 0.4 * torch.cos(9.0 * yy - 2.0 * xx),
        (0.3 + 0.6 * xx * yy).expand(h, w),
    ]
    return torch.stack(chans)[None].clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def _half_allowed(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[bool, float]:
    """(float16 / bfloat16 output finite and >= HALF_PROBE_MIN_DB vs float32, its PSNR) on the probe image."""
    x = probe_image().to(device)
    with torch.no_grad():
        ref = model(x).float().clamp(0, 1)
        half = copy.deepcopy(model).to(dtype)
        y = half(x.to(dtype)).float()
        del half
    if not bool(torch.isfinite(y).all()):
        return False, float("nan")
    db = _psnr(y.clamp(0, 1), ref)
    return db >= HALF_PROBE_MIN_DB, db


@dataclass
class Runner:
    """A loaded model: call it on (B, 3, H, W) float32 in [0, 1]; returns float32 (B, 3, H, W)."""

    kind: str  # "torch" or "onnx"
    fn: Any
    identity: dict
    multiple: int
    bytes_per_pixel: float
    device: torch.device
    dtype: torch.dtype
    module: nn.Module | None = None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onnx":
            return self.fn(x)
        with torch.no_grad():
            return self.fn(x.to(self.device, self.dtype)).float()


def load_runner(cfg: ModelConfig, *, device: str = "auto", dtype: str = "auto", threads: int = 0) -> Runner:
    """Load ``cfg`` for inference on ``device``: an ONNX Runtime session or a frozen PyTorch model."""
    if dtype not in RUN_DTYPES:
        raise D4IRError(f"`dtype` = {dtype!r}: expected one of {list(RUN_DTYPES)}")
    if cfg.is_onnx:
        onnx_model = OnnxModel(cfg.checkpoint, device=device, threads=threads)
        sha = sha256_file(cfg.checkpoint)
        bpp = onnx_model.bytes_per_pixel or DEFAULT_BYTES_PER_PIXEL
        notes = [] if onnx_model.bytes_per_pixel else [f"no d4ir metadata: assuming {bpp:.0f} B/px of activations"]
        ident = {
            "id": sha[:16],
            "path": str(Path(cfg.checkpoint)),
            "onnx_sha256": sha,
            "spec": onnx_model.meta.get("spec"),
        }
        dev = torch.device("cuda" if "CUDAExecutionProvider" in onnx_model.providers else "cpu")
        return Runner("onnx", onnx_model, ident, onnx_model.multiple, bpp, dev, torch.float32, notes=notes)
    dev = pick_device(device)
    model, meta, ident = load_torch_model(cfg)
    model = model.to(dev)
    run_dtype, notes = torch.float32, []
    if dev.type == "cuda" and dtype != "float32":
        want = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        ok, db = _half_allowed(model, dev, want)
        if ok or dtype != "auto":
            run_dtype = want
            model = model.to(want)
        notes.append(f"{str(want).replace('torch.', '')} probe: {db:.1f} dB vs float32 -> running {run_dtype}")
    elif dtype not in ("auto", "float32"):
        notes.append(f"`dtype` = {dtype!r} on the CPU: running float32")
    bpp = activation_bytes_per_pixel(model, dtype=run_dtype)
    return Runner("torch", model, ident, model_multiple(model), bpp, dev, run_dtype, model, meta, notes)
