"""Model zoo: teachers users own, students of several sizes, and the build / save contract.

Registries are plain dicts name -> constructor (no decorators, no import-time scanning).
``build_model(spec, **kwargs)`` accepts a registry name or any ``package.module:Class``
and records ``{"name": spec, "kwargs": kwargs}`` on the module (``model_spec``), which
``save_model`` writes to ``model.json`` so ``load_model`` can rebuild it. ``model_io(name)``
says how a teacher is called (value range, output index, size multiple, weather flag) and
``adapted_forward`` (or the module ``AdaptedModel``) applies it. Sizes, checkpoints and key layouts: docs/MODELS.md.
"""

from __future__ import annotations

import json

import click

from .adapter import AdaptedModel, ModelIO, ModelIOError, adapted_forward
from .checkpoint import (
    SAFE_GLOBALS,
    CheckpointError,
    CheckpointMismatchError,
    load_model,
    load_state_dict_file,
    load_weights,
    save_model,
)
from .cost import count_macs, count_params, format_count, measure_latency
from .registry import (
    STUDENTS,
    TEACHER_CHECKPOINTS,
    TEACHER_IO,
    TEACHERS,
    ModelSpecError,
    build_model,
    known_models,
    model_io,
    model_spec,
    reference_teacher_path,
)
from .tiling import pad_to_multiple, tiled_forward

__all__ = [
    "TEACHERS",
    "STUDENTS",
    "TEACHER_IO",
    "TEACHER_CHECKPOINTS",
    "ModelIO",
    "ModelIOError",
    "model_io",
    "adapted_forward",
    "AdaptedModel",
    "SAFE_GLOBALS",
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


def model_table(size: tuple[int, int] = (256, 256), names: list[str] | None = None) -> list[dict]:
    """Rows {name, role, family, params, macs, checkpoint, io} for registered models, built on the meta device."""
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
                "checkpoint": TEACHER_CHECKPOINTS.get(name, ""),
                "io": model_io(name).to_dict() if role != "custom" else None,
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
    """List teachers and students with parameters, MACs at SIZE x SIZE and the checkpoint a teacher expects."""
    rows = model_table((size, size), list(names) or None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<16} {'role':<8} {'family':<13} {'params':>9} {'MACs@' + str(size):>12}  checkpoint")
    for r in sorted(rows, key=lambda r: (r["role"] != "teacher", r["macs"])):
        click.echo(
            f"{r['name']:<16} {r['role']:<8} {r['family']:<13} {format_count(r['params']):>9} "
            f"{format_count(r['macs']):>12}  {r['checkpoint']}".rstrip()
        )
