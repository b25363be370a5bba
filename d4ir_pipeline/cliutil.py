"""Shared click options for stage commands: --profile, --config, --set, --work-dir."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import click

from .config import load_stage_config

T = TypeVar("T")

__all__ = ["stage_options", "config_from_options"]


def stage_options(fn: Callable) -> Callable:
    """Add the options every stage command takes."""

    @click.option(
        "--profile",
        default="demo",
        show_default=True,
        envvar="D4IR_PROFILE",
        help="Config profile: reads stages/<profile>/<stage>.toml.",
    )
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Config file to use instead of stages/<profile>/<stage>.toml.",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable); VALUE is read as TOML.",
    )
    @click.option(
        "--work-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Replaces {work} in config paths (default runs/<profile>).",
    )
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def config_from_options(
    cls: type[T], stage: str, *, profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None
) -> T:
    """Load a stage config from the values of :func:`stage_options`."""
    return load_stage_config(cls, stage, profile=profile, config=config_path, overrides=overrides, work_dir=work_dir)
