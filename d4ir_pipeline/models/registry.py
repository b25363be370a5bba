"""The model registry: plain dicts name -> constructor, and the build / spec contract.

``build_model(spec, **kwargs)`` accepts a registry name or any ``package.module:Class`` and
records ``{"name": spec, "kwargs": kwargs}`` on the module (``model_spec``), which
``checkpoint.save_model`` writes to ``model.json`` so ``load_model`` can rebuild it.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import D4IRError
from .adapter import ModelIO
from .dehazeformer import VARIANTS as DEHAZEFORMER_VARIANTS
from .dehazeformer import DehazeFormer
from .drsformer import DRSformer
from .histoformer import Histoformer
from .mprnet import MPRNet
from .nafnet import NAFNet
from .promptir import PromptIR
from .restormer import Restormer
from .students import ResCNN, UNetS
from .transweather import TransWeather
from .wgws import WGWSNet

# Teachers: official-size defaults load the released checkpoints (the configuration of the
# released file, read from the authors' option files, where it differs from the class
# defaults); *_s (dehazeformer_xs: "_s" is the official DehazeFormer-S) are tiny variants
# of the same structure for tests; demo_teacher is the embedded demo's reference teacher.
TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "restormer": Restormer,  # deraining.pth etc. (Real/Gaussian denoising: LayerNorm_type="BiasFree")
    "nafnet": NAFNet,  # NAFNet-SIDD-width32.pth; other configs: pass width / enc_blk_nums / ...
    "promptir": PromptIR,  # the all-in-one model.ckpt (decoder=True)
    # Allweather/Options/Allweather_Histoformer.yml (the class defaults are 48 / [4, 6, 6, 8] / 2.66)
    "histoformer": partial(Histoformer, dim=36, num_blocks=(4, 4, 6, 8), ffn_expansion_factor=2.667),
    "transweather": TransWeather,  # the official Transweather() (Tenc / Tdec presets)
    "mprnet": MPRNet,  # Deraining/MPRNet.py defaults (n_feat 40, scale_unetfeats 20, scale_orsnetfeats 16)
    "drsformer": DRSformer,  # Options/Deraining.yml; Rain200L / SPA-Data checkpoints: mefc=False
    **{f"dehazeformer_{v}": partial(DehazeFormer, **kw) for v, kw in DEHAZEFORMER_VARIANTS.items()},
    "wgws": partial(WGWSNet, base_channel=20),  # Setting 2 (rain, haze, snow): Setting2_K1.pth
    "wgws_setting1": partial(WGWSNet, base_channel=18),  # Setting 1 (AllWeather: rain, raindrop, snow)
    "wgws_setting3": partial(WGWSNet, base_channel=18),  # Setting 3 (real rain, haze, snow); see docs/MODELS.md
    "demo_teacher": partial(NAFNet, width=32, middle_blk_num=2, enc_blk_nums=(1, 1, 2), dec_blk_nums=(1, 1, 1)),
    "restormer_s": partial(Restormer, dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2)),
    "promptir_s": partial(
        PromptIR,
        dim=8,
        num_blocks=(1, 1, 1, 1),
        num_refinement_blocks=1,
        heads=(1, 1, 2, 2),
        prompt_dims=(8, 16, 24),
        prompt_sizes=(16, 8, 4),
    ),
    "histoformer_s": partial(
        Histoformer,
        dim=12,
        num_blocks=(1, 1, 1, 1),
        num_refinement_blocks=1,
        heads=(1, 2, 2, 4),
        ffn_expansion_factor=2.667,
    ),
    "transweather_s": partial(
        TransWeather,
        embed_dims=(16, 32, 40, 64),
        enc_heads=(1, 2, 2, 2),
        enc_depths=(1, 1, 1, 1),
        dec_heads=2,
        dec_mlp_ratio=2,
        dec_depth=1,
        task_queries=8,
    ),
    "mprnet_s": partial(MPRNet, n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    "drsformer_s": partial(DRSformer, dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)),
    "dehazeformer_xs": partial(
        DehazeFormer, embed_dims=(8, 16, 24, 16, 8), depths=(1, 2, 2, 1, 1), num_heads=(2, 2, 2, 1, 1)
    ),
    "wgws_s": partial(WGWSNet, base_channel=4, num_res=1),
}

_DEHAZE_IO = ModelIO(input_range="-1,1", output_range="-1,1", pad_multiple=4)

# Teacher I/O defaults (docs/MODELS.md says where each fact comes from). A registered
# name without an entry is a plain [0, 1] -> [0, 1] network that returns one tensor.
TEACHER_IO: dict[str, ModelIO] = {
    "restormer": ModelIO(pad_multiple=8),
    "nafnet": ModelIO(pad_multiple=16),
    "promptir": ModelIO(pad_multiple=8),
    "demo_teacher": ModelIO(pad_multiple=8),
    "histoformer": ModelIO(pad_multiple=8),
    # Normalize(0.5, 0.5) inputs; the tanh output is trained against [0, 1] targets
    "transweather": ModelIO(input_range="-1,1", output_range="0,1", pad_multiple=16),
    "mprnet": ModelIO(output_index=0, pad_multiple=8),  # [stage3, stage2, stage1]
    "drsformer": ModelIO(pad_multiple=8),
    **{f"dehazeformer_{v}": _DEHAZE_IO for v in DEHAZEFORMER_VARIANTS},
    # flag orders of the official testing_model_Seting{1,2,3}.py
    "wgws": ModelIO(pad_multiple=4, weather_flag=("snow", "rain", "haze")),
    "wgws_setting1": ModelIO(pad_multiple=4, weather_flag=("snow", "rain", "raindrop")),
    "wgws_setting3": ModelIO(pad_multiple=4, weather_flag=("haze", "rain", "snow")),
    "restormer_s": ModelIO(pad_multiple=8),
    "promptir_s": ModelIO(pad_multiple=8),
    "histoformer_s": ModelIO(pad_multiple=8),
    "transweather_s": ModelIO(input_range="-1,1", output_range="0,1", pad_multiple=16),
    "mprnet_s": ModelIO(output_index=0, pad_multiple=8),
    "drsformer_s": ModelIO(pad_multiple=8),
    "dehazeformer_xs": _DEHAZE_IO,
    "wgws_s": ModelIO(pad_multiple=4, weather_flag=("snow", "rain", "haze")),
}

# The checkpoint file each official-size teacher expects (file name; container). Where the
# authors publish them: docs/MODELS.md.
TEACHER_CHECKPOINTS: dict[str, str] = {
    "restormer": "deraining.pth; {'params'}",
    "nafnet": "NAFNet-SIDD-width32.pth; {'params'}",
    "promptir": "model.ckpt; Lightning {'state_dict': {'net.*'}}",
    "histoformer": "net_g_best.pth; {'params'}",
    "transweather": "best; raw DataParallel state_dict ('module.*')",
    "mprnet": "model_deraining.pth; {'state_dict'}",
    "drsformer": "deraining.pth (per data set); {'params'}",
    **{f"dehazeformer_{v}": f"dehazeformer-{v}.pth; {{'state_dict': {{'module.*'}}}}" for v in DEHAZEFORMER_VARIANTS},
    "wgws": "Setting2_K1.pth; raw state_dict",
    "wgws_setting1": "Setting1_K1.pth; raw state_dict",
    "wgws_setting3": "Setting3_K1.pth; raw state_dict",
    "demo_teacher": "assets/reference_teacher/ (make teacher)",
}

# Students: three families of different cost (MACs and parameters in `d4ir models`).
STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "nafnet_s": partial(NAFNet, width=16, middle_blk_num=1, enc_blk_nums=(1, 1, 1), dec_blk_nums=(1, 1, 1)),
    "rescnn": ResCNN,
    "unet_s": UNetS,
}


class ModelSpecError(D4IRError, ValueError):
    """An unknown model name, a bad ``module:Class`` or kwargs the constructor refuses."""


def known_models() -> list[str]:
    """Sorted names of every registered teacher and student."""
    return sorted({**TEACHERS, **STUDENTS})


def _resolve(spec: str) -> Callable[..., nn.Module]:
    if spec in TEACHERS:
        return TEACHERS[spec]
    if spec in STUDENTS:
        return STUDENTS[spec]
    if ":" not in spec:
        raise ModelSpecError(
            f"unknown model {spec!r}; known models: {known_models()}, or give any 'package.module:Class'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def model_io(name: str) -> ModelIO:
    """The registry's I/O defaults for ``name`` (plain [0, 1] in / out for names without an entry)."""
    if name in TEACHER_IO:
        return TEACHER_IO[name]
    if name in TEACHERS or name in STUDENTS or ":" in name:
        return ModelIO()
    raise ModelSpecError(f"unknown model {name!r}; known models: {known_models()}, or give any 'package.module:Class'")


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the stored spec equals its JSON round trip."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a registered model or any ``package.module:Class`` with ``kwargs``; remembers the spec."""
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"model spec {spec!r}: expected a registry name or 'package.module:Class'")
    ctor = _resolve(spec)
    try:
        model = ctor(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"model {spec!r} with kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    model._d4ir_spec = {"name": spec, "kwargs": _plain(kwargs)}
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and not hasattr(model, "_d4ir_spec"):
            return _unwrap(inner)
    return model


def model_spec(model: nn.Module) -> dict:
    """``{"name": spec, "kwargs": {...}}`` recorded by :func:`build_model` (a copy)."""
    spec = getattr(_unwrap(model), "_d4ir_spec", None)
    if spec is None:
        raise ModelSpecError(
            f"{type(model).__name__} was not built with build_model(), so its spec is unknown; "
            "build it with build_model('name' or 'package.module:Class', **kwargs) to save it"
        )
    return copy.deepcopy(spec)


def reference_teacher_path() -> Path:
    """Folder of the committed demo reference teacher (model.safetensors + model.json + README.md)."""
    return Path(__file__).resolve().parent.parent / "demo" / "assets" / "reference_teacher"
