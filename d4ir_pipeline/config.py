"""Typed, frozen stage configs read from TOML, with validation that names file and key.

Each stage module declares its config as a frozen dataclass whose fields are sections
(themselves frozen dataclasses) declared with :func:`opt`, which carries the help text
and the allowed range. :func:`load_config` reads ``stages/<profile>/<stage>.toml``,
applies ``--set section.key=value`` overrides, and rejects unknown keys (with a
"did you mean"), wrong types and out-of-range values before any work starts.

Strings may contain ``{work}`` (the run's work directory, default ``runs/<profile>``),
``{profile}`` and ``{assets}`` (the package's bundled weights); they are substituted at
load time.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from d4ir_pipeline.errors import D4IRError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


ASSETS = Path(__file__).resolve().parent / "demo" / "assets"  # packaged weights: `{assets}` in config strings


class ConfigError(D4IRError, ValueError):
    """A config file or override is wrong; the message names the file, key and value."""


def opt(
    default: Any = _MISSING,
    *,
    help: str,  # noqa: A002 - mirrors argparse/click naming, read as metadata only
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    choices: Sequence[Any] | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """Declare a config field with its help text and allowed values."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def redefault(section: type, name: str, default: Any, *, help: str | None = None) -> Any:  # noqa: A002
    """``section``'s key ``name`` again, with another default (and optionally a note on it).

    For a section that subclasses another one because it means the same keys at another
    size (compare's ``[quick]`` is ``[budget]`` scaled to the demo): the help, range and
    choices are declared once, on the base, and cannot drift apart.
    """
    meta = {f.name: f for f in dataclasses.fields(section)}[name].metadata
    return opt(default, help=help or meta["help"], min=meta["min"], max=meta["max"], choices=meta["choices"])


# ---------------------------------------------------------------------------------------
# type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against ``tp`` and return it in canonical form (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected {_type_name(tp)}")
    if tp is type(None):
        if value is None or value == "none":
            return None
        raise ConfigError(f"{where} = {value!r}: expected None")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected a list of {_type_name(args[0])}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} = {value!r}: expected {len(args)} items ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected a table {_type_name(tp)}")
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")
    raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected {_type_name(tp)}")


def _check_range(value: Any, meta: dict, where: str) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        if choices is not None and v not in choices:
            hint = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            dym = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{where} = {v!r}: allowed values are {list(choices)}{dym}")
        if lo is not None and isinstance(v, int | float) and v < lo:
            raise ConfigError(f"{where} = {v!r}: must be >= {lo}")
        if hi is not None and isinstance(v, int | float) and v > hi:
            raise ConfigError(f"{where} = {v!r}: must be <= {hi}")


def _unknown(key: str, allowed: Sequence[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    dym = f" Did you mean `{hint[0]}`?" if hint else ""
    return ConfigError(f"{where}: unknown key `{key}`.{dym} Allowed here: {sorted(allowed)}")


def _build(cls: type[T], data: dict, file: str, prefix: str, subst: dict[str, str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown(prefix + key, [prefix + k for k in fields], file)
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key_where = f"{file}: `{prefix}{name}`"
        if dataclasses.is_dataclass(tp):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{key_where} = {sub!r}: expected a table [{prefix}{name}]")
            kwargs[name] = _build(tp, sub, file, f"{prefix}{name}.", subst)
            continue
        if name in data:
            value = _coerce(data[name], tp, key_where)
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{key_where}: required key is missing")
        value = _substitute(value, subst)
        _check_range(value, dict(f.metadata), key_where)
        kwargs[name] = value
    return cls(**kwargs)


def _substitute(value: Any, subst: dict[str, str]) -> Any:
    if isinstance(value, str) and "{" in value:
        for k, v in subst.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, tuple):
        return tuple(_substitute(v, subst) for v in value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, path: list[str], value: Any, cls: type, origin: str) -> None:
    node, node_cls = data, cls
    for i, part in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            prefix = "".join(p + "." for p in path[:i])
            raise _unknown(prefix + part, [prefix + k for k in fields], origin)
        if i == len(path) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{origin}: `{'.'.join(path[: i + 1])}` is a value, not a section")
        node = node.setdefault(part, {})
        node_cls = tp


def load_config(
    cls: type[T],
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    work_dir: str | os.PathLike | None = None,
    profile: str | None = None,
) -> T:
    """Read ``path`` (TOML; None means all defaults) into ``cls`` and apply overrides."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {where} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML ({e})") from e
        if profile is None:
            profile = path.parent.name
    profile = profile or "default"
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, cls, f"--set {text}")
    work = str(work_dir) if work_dir is not None else f"runs/{profile}"
    return _build(cls, data, where, "", {"work": work, "profile": profile, "assets": str(ASSETS)})


def stages_root() -> Path:
    """The ``stages/`` folder: ``$D4IR_STAGES``, else ``./stages``, else beside the package."""
    env = os.environ.get("D4IR_STAGES")
    if env:
        return Path(env)
    cwd = Path.cwd() / "stages"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parent.parent / "stages"


def find_stage_file(stage: str, profile: str) -> Path:
    """``stages/<profile>/<stage>.toml``, with an error listing the profiles that exist."""
    root = stages_root()
    path = root / profile / f"{stage}.toml"
    if not path.is_file():
        profiles = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        have = [p for p in profiles if (root / p / f"{stage}.toml").is_file()]
        raise ConfigError(f"no config {path} for stage {stage!r}, profile {profile!r}; profiles with one: {have}")
    return path


def load_stage_config(
    cls: type[T],
    stage: str,
    *,
    profile: str = "demo",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    work_dir: str | os.PathLike | None = None,
) -> T:
    """Load a stage's config from ``config`` or ``stages/<profile>/<stage>.toml``."""
    path = Path(config) if config is not None else find_stage_file(stage, profile)
    return load_config(cls, path, overrides, work_dir=work_dir, profile=profile)


def config_to_dict(cfg: Any) -> dict:
    """Plain-JSON dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any, *, exclude: Sequence[str] = ()) -> str:
    """sha256 of the canonical JSON of ``cfg``; ``exclude`` drops ``section.key`` paths."""
    d = config_to_dict(cfg)
    for dotted in exclude:
        node = d
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
