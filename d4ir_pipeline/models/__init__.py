"""Model zoo: teachers users own, students of several sizes, and the build / save contract.

Registries are plain dicts name -> constructor (no decorators, no import-time scanning).
``build_model(spec, **kwargs)`` accepts a registry name or any ``package.module:Class``
and records ``{"name": spec, "kwargs": kwargs}`` on the module (``model_spec``), which
``save_model`` writes to ``model.json`` so ``load_model`` can rebuild it. Sizes,
checkpoints and key layouts: docs/MODELS.md.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
from torch import nn

from ..errors import D4IRError
from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_model,
    load_state_dict_file,
    load_weights,
    save_model,
)
from .cost import count_macs, count_params, format_count, measure_latency
from .nafnet import NAFNet
from .promptir import PromptIR
from .restormer import Restormer
from .students import ResCNN, UNetS
from .tiling import pad_to_multiple, tiled_forward

__all__ = [
    "TEACHERS",
    "STUDENTS",
    "ModelSpecError",
    "build_model",
    "model_spec",
    "known_models",
    "reference_teacher_path",
    "models_command",
    "load_weights",
    "load_state_dict_file",
    "load_model",
    "save_model",
    "CheckpointError",
    "CheckpointMismatchError",
    "count_params",
    "count_macs",
    "measure_latency",
    "tiled_forward",
    "pad_to_multiple",
]

# Teachers: official-size defaults load the released checkpoints; *_s are tiny variants
# of the same structure for tests; demo_teacher is the embedded demo's reference teacher.
TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "restormer": Restormer,  # deraining.pth etc. (Real/Gaussian denoising: LayerNorm_type="BiasFree")
    "nafnet": NAFNet,  # NAFNet-SIDD-width32.pth; other configs: pass width / enc_blk_nums / ...
    "promptir": PromptIR,  # the all-in-one model.ckpt (decoder=True)
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


def model_table(size: tuple[int, int] = (256, 256), names: list[str] | None = None) -> list[dict]:
    """Rows {name, role, family, params, macs} for registered models, built on the meta device."""
    import torch

    rows = []
    for name in names or known_models():
        role = "teacher" if name in TEACHERS else "student" if name in STUDENTS else "custom"
        with torch.device("meta"):
            model = build_model(name)
        rows.append(
            {
                "name": name,
                "role": role,
                "family": type(model).__name__,
                "params": count_params(model),
                "macs": count_macs(model, size),
            }
        )
    return rows


@click.command("models")
@click.option(
    "--size", default=256, show_default=True, type=click.IntRange(8, 8192), help="Square input size for MACs."
)
@click.option("--name", "names", multiple=True, help="Only these models (repeatable; default: all registered).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_command(size: int, names: tuple[str, ...], as_json: bool) -> None:
    """List teachers and students with parameters and MACs at SIZE x SIZE."""
    rows = model_table((size, size), list(names) or None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<14} {'role':<8} {'family':<10} {'params':>9} {'MACs@' + str(size):>12}")
    for r in sorted(rows, key=lambda r: (r["role"] != "teacher", r["macs"])):
        click.echo(
            f"{r['name']:<14} {r['role']:<8} {r['family']:<10} {format_count(r['params']):>9} "
            f"{format_count(r['macs']):>12}"
        )
