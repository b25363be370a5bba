"""The ``d4ir`` command line. It holds no logic: each command lives beside its stage.

Commands are imported lazily so ``d4ir --help`` is instant (no torch import).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import click

from d4ir_pipeline import __version__
from d4ir_pipeline.common.runtime import setup_logging
from d4ir_pipeline.config import load_stage_config
from d4ir_pipeline.errors import D4IRError

# name -> (module, attribute, one-line help). A plain table, no import-time scanning.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "manifest": ("d4ir_pipeline.data.manifests", "manifest_group", "Build or verify an image manifest (JSON Lines)."),
    "demo-data": ("d4ir_pipeline.demo.data", "demo_data_command", "Build the embedded multi-weather demo data set."),
    "tiny-sd": (
        "d4ir_pipeline.demo.tiny_sd",
        "tiny_sd_command",
        "Write a tiny random Stable Diffusion folder (tests/demo).",
    ),
    "sd15-shaped": (
        "d4ir_pipeline.demo.sd15_shaped",
        "sd15_shaped_command",
        "Write an SD 1.5-shaped random folder with the real CLIP tokenizer.",
    ),
    "demo-sd": ("d4ir_pipeline.demo.demo_sd", "demo_sd_command", "Train the small demo SD on the demo's web images."),
    "train-dpa": (
        "d4ir_pipeline.stage1.dpa.train",
        "train_dpa_command",
        "Stage one: train the degradation-aware prompt adapter.",
    ),
    "prompt-bank": (
        "d4ir_pipeline.stage1.prompt_bank",
        "prompt_bank_command",
        "Stage one: encode web-degraded images into a prompt bank.",
    ),
    "synthesize": (
        "d4ir_pipeline.stage1.synthesize",
        "synthesize_command",
        "Stage one: CCD synthesis into webdataset shards.",
    ),
    "shards": ("d4ir_pipeline.shardset.cli", "shards_group", "Verify or merge a shard set."),
    "models": ("d4ir_pipeline.models", "models_command", "List teachers and students with their size."),
    "train-teacher": (
        "d4ir_pipeline.demo.reference_teacher",
        "train_teacher_command",
        "Train the demo's reference teacher.",
    ),
    "distill": (
        "d4ir_pipeline.stage2.distill",
        "distill_command",
        "Stage two: distill a student from the teacher on shards.",
    ),
    "label": ("d4ir_pipeline.stage2.labels", "label_command", "Cache the teacher's outputs next to a shard set."),
    "evaluate": (
        "d4ir_pipeline.stage2.evaluate",
        "evaluate_command",
        "Evaluate teacher and student (PSNR/SSIM) on paired sets.",
    ),
    "compare": (
        "d4ir_pipeline.paper.compare",
        "compare_command",
        "The paper's comparison table (baselines and ablations).",
    ),
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


T = TypeVar("T")


def stage_options(fn: Callable) -> Callable:
    """Add the options every stage command takes: --profile, --config, --set, --work-dir."""
    fn = click.option(
        "--work-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Replaces {work} in config paths (default runs/<profile>).",
    )(fn)
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable); VALUE is read as TOML.",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Config file to use instead of stages/<profile>/<stage>.toml.",
    )(fn)
    return click.option(
        "--profile",
        default="demo",
        show_default=True,
        envvar="D4IR_PROFILE",
        help="Config profile: reads stages/<profile>/<stage>.toml (and its base profiles').",
    )(fn)


def config_from_options(
    cls: type[T], stage: str, *, profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None
) -> T:
    """Load a stage config from the values of :func:`stage_options`."""
    return load_stage_config(cls, stage, profile=profile, config=config_path, overrides=overrides, work_dir=work_dir)


def stage_command(name: str, config_cls: type, stage: str | None = None) -> Callable[[Callable], click.Command]:
    """A click command for a stage: the stage options, its config loaded, then ``fn(cfg, **extra_options)``.

    ``stage`` names the TOML file (default: the command name). Extra ``@click.option``s go
    below this decorator; the function's docstring is the command's help.
    """

    def wrap(fn: Callable) -> click.Command:
        @functools.wraps(fn)
        def run_stage(profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None, **kw):
            cfg = config_from_options(
                config_cls,
                stage or name,
                profile=profile,
                config_path=config_path,
                overrides=overrides,
                work_dir=work_dir,
            )
            return fn(cfg, **kw)

        return click.command(name)(stage_options(run_stage))

    return wrap


if __name__ == "__main__":
    run()
