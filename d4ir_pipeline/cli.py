"""The ``d4ir`` command line. It holds no logic: each command lives beside its stage.

Commands are imported lazily so ``d4ir --help`` is instant (no torch import).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from . import __version__
from .errors import D4IRError
from .runtime import setup_logging

# name -> (module, attribute, one-line help). A plain table, no import-time scanning.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "manifest": ("d4ir_pipeline.manifests", "manifest_group", "Build or verify an image manifest (JSON Lines)."),
    "demo-data": ("d4ir_pipeline.demo_data", "demo_data_command", "Build the embedded multi-weather demo data set."),
    "tiny-sd": (
        "d4ir_pipeline.tiny_sd",
        "tiny_sd_command",
        "Write a tiny random Stable Diffusion folder (tests/demo).",
    ),
    "demo-sd": ("d4ir_pipeline.demo_sd", "demo_sd_command", "Train the small demo SD on the demo's web images."),
    "train-dpa": ("d4ir_pipeline.dpa", "train_dpa_command", "Stage one: train the degradation-aware prompt adapter."),
    "prompt-bank": (
        "d4ir_pipeline.prompts",
        "prompt_bank_command",
        "Stage one: encode web-degraded images into a prompt bank.",
    ),
    "synthesize": ("d4ir_pipeline.shards", "synthesize_command", "Stage one: CCD synthesis into webdataset shards."),
    "shards": ("d4ir_pipeline.shards", "shards_group", "Verify or merge a shard set."),
    "models": ("d4ir_pipeline.models", "models_command", "List teachers and students with their size."),
    "train-teacher": ("d4ir_pipeline.teacher", "train_teacher_command", "Train the demo's reference teacher."),
    "distill": ("d4ir_pipeline.distill", "distill_command", "Stage two: distill a student from the teacher on shards."),
    "label": ("d4ir_pipeline.distill", "label_command", "Cache the teacher's outputs next to a shard set."),
    "evaluate": (
        "d4ir_pipeline.evaluate",
        "evaluate_command",
        "Evaluate teacher and student (PSNR/SSIM) on paired sets.",
    ),
    "compare": ("d4ir_pipeline.compare", "compare_command", "The paper's comparison table (baselines and ablations)."),
    "restore": (
        "d4ir_pipeline.deploy.restore",
        "restore_command",
        "Restore an image, a folder or a manifest with a model.",
    ),
    "export": (
        "d4ir_pipeline.deploy.export",
        "export_command",
        "Export a model to ONNX (fp32/fp16/int8) + pt2, verified.",
    ),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module, attr, _ = COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="d4ir")
def main() -> None:
    """D4IR: data-free distillation with degradation-prompt diffusion.

    Stage one (train-dpa, prompt-bank, synthesize) writes webdataset shards; stage two
    (distill, evaluate) trains a student against a frozen teacher on them.
    """
    setup_logging()


def run() -> None:
    """Console-script entry: user errors print one message, interrupts say how to resume."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except D4IRError as e:
        logging.getLogger("d4ir").debug("user error", exc_info=True)
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished work is kept; rerun the same command to resume.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
