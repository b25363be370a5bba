"""Click options -> the same validated config a TOML file gives (types, ranges, choices, unknown keys).

``d4ir restore`` / ``d4ir export`` take direct options for everyday use plus ``--config
FILE`` and ``--set key=value``; every given option becomes a ``--set`` override, so one
validation path (:func:`d4ir_pipeline.config.load_config`) checks them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from d4ir_pipeline.config import load_config

__all__ = ["toml_value", "config_from_cli"]

T = TypeVar("T")


class RawToml(str):
    """A value the user typed as TOML (an inline table such as ``{width = 16}``): passed through as is."""


def toml_value(value: Any) -> str:
    """A Python value as TOML text (strings JSON-escaped, which TOML basic strings accept)."""
    if isinstance(value, RawToml):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def config_from_cli(cls: type[T], config_path: str | None, sets: tuple[str, ...], options: Mapping[str, Any]) -> T:
    """Build ``cls`` from an optional TOML file, then the given options (None = not given), then ``--set``."""
    overrides = [f"{key}={toml_value(v)}" for key, v in options.items() if v is not None]
    return load_config(cls, config_path, [*overrides, *sets])
