"""Typed, frozen stage configs read from TOML, with validation that names file and key.

Each stage module declares its config as a frozen dataclass whose fields are sections
(themselves frozen dataclasses) declared with :func:`opt`, which carries the help text
and the allowed range. :func:`load_config` reads ``stages/<profile>/<stage>.toml``,
applies ``--set section.key=value`` overrides, and rejects unknown keys (with a
"did you mean"), wrong types and out-of-range values before any work starts.

Profiles: ``stages/<profile>/`` holds one TOML per stage and optionally ``profile.toml``
with ``base = "<other profile>"`` (its stage files are read first, this profile's on top:
a profile holds only what differs) and a ``[paths]`` table. Strings may contain ``{work}``
(the run's work directory, default ``runs/<profile>``), ``{profile}``, ``{assets}`` (the
package's bundled weights) and the shared paths ``{data}``, ``{dpa}``, ``{bank}``,
``{shards}``, ``{distill}`` (defaults ``{work}/<name>``): one stage's output folder and the
next stage's input are the same placeholder, so they cannot drift apart.

A field declared ``opt(..., affects_output=False)`` changes speed, memory or logging but not
what a stage produces: :func:`config_hash` leaves it out, so a resume may change it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from d4ir_pipeline.errors import D4IRError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


ASSETS = Path(__file__).resolve().parent / "demo" / "assets"  # packaged weights: `{assets}` in config strings
PROFILE_FILE = "profile.toml"
# shared folders of a profile (`{name}` in config strings); profile.toml's [paths] changes them
PATHS: dict[str, str] = {
    "data": "{work}/data",
    "dpa": "{work}/dpa",
    "bank": "{work}/bank",
    "shards": "{work}/shards",
    "distill": "{work}/distill",
}
# keys that were renamed: old dotted key -> new one (an old key in a file gets an error naming the new one)
RENAMED: dict[str, str] = {
    "train.checkpoint_every": "train.ckpt_every",  # dpa, teacher
    "train.keep_checkpoints": "train.ckpt_keep",  # dpa
    "train.log_every": "log.every",  # dpa, teacher
    "budget.seed": "budget.seeds",  # compare: a list now, e.g. seeds = [0, 1, 2]
    "quick.seed": "quick.seeds",  # compare
    # one name per idea: every stage writes to `output.dir` and computes on `runtime.device`
    "out": "output.dir",  # distill, evaluate
    "bank.out": "output.dir",  # prompt-bank
    "out.dir": "output.dir",  # train-teacher
    "out.publish_dir": "output.publish_dir",  # train-teacher
    "out.command": "output.command",  # train-teacher
    "device": "runtime.device",  # evaluate
    "train.device": "runtime.device",  # distill, train-dpa
    "bank.device": "runtime.device",  # prompt-bank
}


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
    affects_output: bool = True,
) -> Any:
    """Declare a config field with its help text and allowed values.

    ``affects_output=False``: the field changes speed, memory or logging, not the result;
    it is left out of :func:`config_hash`, so a resumed run may change it.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": tuple(choices) if choices else None,
        "affects_output": affects_output,
    }
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
    return opt(
        default,
        help=help or meta["help"],
        min=meta["min"],
        max=meta["max"],
        choices=meta["choices"],
        affects_output=meta["affects_output"],
    )


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
        for arg in typing.get_args(tp):
            with contextlib.suppress(ConfigError):
                return _coerce(value, arg, where)
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
    accepts = _SCALARS.get(tp)
    if accepts is None:
        raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")
    if not accepts(value):
        raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected {_type_name(tp)}")
    return float(value) if tp is float else value


# the scalar types a config field may have, and the TOML values each accepts (a bool is not a number)
_SCALARS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


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


def _unknown(key: str, allowed: Sequence[str], where: str, below: Sequence[str] = ()) -> ConfigError:
    """``key`` is not a field here; ``below``: the keys given under it (``[out] dir = ...``, ``out.dir=...``)."""
    for old in [f"{key}.{b}" for b in below] + [key]:  # the most specific rename first
        if old in RENAMED:
            return ConfigError(f"{where}: `{old}` was renamed; did you mean `{RENAMED[old]}`?")
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    dym = f" Did you mean `{hint[0]}`?" if hint else ""
    return ConfigError(f"{where}: unknown key `{key}`.{dym} Allowed here: {sorted(allowed)}")


def _section_table(tp: Any) -> type | None:
    """The section class of a ``dict[str, Section]`` field (a table of named sections), else None."""
    if typing.get_origin(tp) is dict:
        vt = typing.get_args(tp)[1]
        if dataclasses.is_dataclass(vt):
            return vt
    return None


def _check_keys(cls: type, data: dict, file: str, prefix: str = "") -> None:
    """Refuse unknown keys (with a "did you mean") and values where a table belongs, naming ``file``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            below = list(value) if isinstance(value, dict) else []
            raise _unknown(prefix + key, [prefix + k for k in fields], file, below)
        section, table = hints[key] if dataclasses.is_dataclass(hints[key]) else None, _section_table(hints[key])
        if (section or table) and not isinstance(value, dict):
            raise ConfigError(f"{file}: `{prefix}{key}` = {value!r}: expected a table [{prefix}{key}]")
        if section:
            _check_keys(section, value, file, f"{prefix}{key}.")
        elif table:
            _check_table(table, value, file, f"{prefix}{key}.")


def _check_table(table: type, value: dict, file: str, prefix: str) -> None:
    """Each entry of a table of sections (``prefix`` + its name) must be a table of ``table``'s keys."""
    for name, sub in value.items():
        if not isinstance(sub, dict):
            raise ConfigError(f"{file}: `{prefix}{name}` = {sub!r}: expected a table")
        _check_keys(table, sub, file, f"{prefix}{name}.")


def _merge(cls: type, base: dict, top: dict, origins: dict[str, str], file: str, prefix: str = "") -> dict:
    """``top`` over ``base``: sections (and each entry of a table of sections) merge key by key; any other
    value, a plain table such as ``bank.mix`` included, is replaced whole. ``origins`` records which file
    set each key."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in top.items():
        tp = hints.get(k)
        table = _section_table(tp) if tp is not None else None
        if dataclasses.is_dataclass(tp) and isinstance(out.get(k), dict):
            out[k] = _merge(tp, out[k], v, origins, file, f"{prefix}{k}.")
        elif table is not None and isinstance(out.get(k), dict):
            merged = dict(out[k])
            for name, sub in v.items():
                old = merged.get(name)
                merged[name] = (
                    _merge(table, old, sub, origins, file, f"{prefix}{k}.{name}.") if isinstance(old, dict) else sub
                )
                origins.setdefault(f"{prefix}{k}.{name}", file)
            out[k] = merged
        else:
            out[k] = v
            origins[f"{prefix}{k}"] = file
    return out


def _build(cls: type[T], data: dict, origins: dict[str, str], prefix: str, subst: dict[str, str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key_where = f"{origins.get(prefix + name, origins.get('', '<defaults>'))}: `{prefix}{name}`"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name, {}), origins, f"{prefix}{name}.", subst)
            continue
        if (table := _section_table(tp)) is not None and name in data:
            items = data[name].items()
            kwargs[name] = {k: _build(table, v, origins, f"{prefix}{name}.{k}.", subst) for k, v in items}
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


def _apply_override(data: dict, path: list[str], value: Any, cls: type, origin: str, prefix: str = "") -> None:
    """Set ``path`` (relative to ``prefix``, a section of class ``cls``) to ``value``, checked as a file's key."""
    node, node_cls = data, cls
    for i, part in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        where = prefix + "".join(p + "." for p in path[:i])
        if part not in fields:
            below = [".".join(path[i + 1 :])] if i + 1 < len(path) else []
            raise _unknown(where + part, [where + k for k in fields], origin, below)
        if i == len(path) - 1:  # a section or table given whole (an inline table) is checked like a file's
            _check_keys(node_cls, {part: value}, origin, where)
            node[part] = value
            return
        tp = typing.get_type_hints(node_cls)[part]
        if (table := _section_table(tp)) is not None:  # section.table.NAME[.key] = value
            _override_entry(node.setdefault(part, {}), path[i + 1 :], value, table, origin, f"{where}{part}.")
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{origin}: `{where}{part}` is a value, not a section")
        node = node.setdefault(part, {})
        node_cls = tp


def _override_entry(entries: dict, path: list[str], value: Any, table: type, origin: str, prefix: str) -> None:
    """An override inside a table of sections: ``path`` = [NAME] (the entry whole) or [NAME, key, ...]."""
    name, rest = path[0], path[1:]
    if not rest:
        _check_table(table, {name: value}, origin, prefix)
        entries[name] = value
        return
    _apply_override(entries.setdefault(name, {}), rest, value, table, origin, f"{prefix}{name}.")


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e


def _substitutions(work: str, profile: str, paths: dict[str, str]) -> dict[str, str]:
    base = {"work": work, "profile": profile, "assets": str(ASSETS)}
    return {**base, **{k: _substitute(v, base) for k, v in paths.items()}}


def load_config(
    cls: type[T],
    path: str | os.PathLike | Sequence[str | os.PathLike] | None,
    overrides: Sequence[str] = (),
    *,
    work_dir: str | os.PathLike | None = None,
    profile: str | None = None,
    paths: dict[str, str] | None = None,
) -> T:
    """Read ``path`` (TOML; a list is read in order, later files on top; None means all
    defaults) into ``cls`` and apply ``--set`` overrides."""
    files = [Path(p) for p in ([] if path is None else [path] if isinstance(path, str | os.PathLike) else path)]
    data: dict = {}
    origins: dict[str, str] = {"": str(files[-1]) if files else "<defaults>"}
    for f in files:
        layer = _read_toml(f)
        _check_keys(cls, layer, str(f))
        data = _merge(cls, data, layer, origins, str(f))
    if profile is None:
        profile = files[-1].parent.name if files else "default"
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, cls, f"--set {text}")
        origins[".".join(keys)] = f"--set {text}"
    work = str(work_dir) if work_dir is not None else f"runs/{profile}"
    return _build(cls, data, origins, "", _substitutions(work, profile, {**PATHS, **(paths or {})}))


def stages_root() -> Path:
    """The ``stages/`` folder: ``$D4IR_STAGES``, else ``./stages``, else beside the package."""
    env = os.environ.get("D4IR_STAGES")
    if env:
        return Path(env)
    cwd = Path.cwd() / "stages"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parent.parent / "stages"


def profile_chain(profile: str) -> list[tuple[Path, dict]]:
    """(folder, profile.toml contents) of ``profile`` and its bases, the root base first."""
    root = stages_root()
    chain: list[tuple[Path, dict]] = []
    name: str | None = profile
    while name is not None:
        folder = root / name
        if not folder.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            who = f"profile {profile!r}" + (f" (via base {name!r})" if name != profile else "")
            raise ConfigError(f"{who}: no folder {folder}; profiles: {have}")
        if any(folder == f for f, _ in chain):
            raise ConfigError(f"profile {profile!r}: `base` forms a cycle through {name!r}")
        meta = _read_toml(folder / PROFILE_FILE) if (folder / PROFILE_FILE).is_file() else {}
        where = str(folder / PROFILE_FILE)
        for key in meta:
            if key not in ("base", "paths"):
                raise _unknown(key, ["base", "paths"], where)
        for key, value in meta.get("paths", {}).items():
            if key not in PATHS:
                raise _unknown(f"paths.{key}", [f"paths.{k}" for k in PATHS], where)
            if not isinstance(value, str):
                raise ConfigError(f"{where}: `paths.{key}` = {value!r}: expected a string")
        chain.insert(0, (folder, meta))
        name = meta.get("base")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}: `base` = {name!r}: expected a profile name")
    return chain


def profile_paths(profile: str) -> dict[str, str]:
    """The profile's shared folders (``[paths]`` of its profile.toml files, bases first, over :data:`PATHS`)."""
    out = dict(PATHS)
    for _, meta in profile_chain(profile):
        out.update(meta.get("paths", {}))
    return out


def stage_files(stage: str, profile: str) -> list[Path]:
    """``stages/<p>/<stage>.toml`` of the profile's chain that exist, the root base first."""
    return [folder / f"{stage}.toml" for folder, _ in profile_chain(profile) if (folder / f"{stage}.toml").is_file()]


def load_stage_config(
    cls: type[T],
    stage: str,
    *,
    profile: str = "demo",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    work_dir: str | os.PathLike | None = None,
) -> T:
    """A stage's config: ``config`` if given, else the profile chain's ``<stage>.toml`` files
    (bases first; a stage no profile mentions runs on its defaults), then ``overrides``."""
    files = [Path(config)] if config is not None else stage_files(stage, profile)
    # an explicit file may name a profile that has no folder: then only the default shared paths
    paths = profile_paths(profile) if config is None or (stages_root() / profile).is_dir() else dict(PATHS)
    return load_config(cls, files, overrides, work_dir=work_dir, profile=profile, paths=paths)


def neutral_keys(cls: type) -> tuple[str, ...]:
    """Dotted keys of ``cls`` declared ``affects_output=False`` (left out of :func:`config_hash`).

    A section field marked ``field(..., metadata={"affects_output": False})`` (or
    ``opt(default_factory=Section, ..., affects_output=False)``) leaves out the whole section.
    """
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("affects_output") is False:  # a field, or a whole section
            out.append(f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += [f"{f.name}.{k}" for k in neutral_keys(hints[f.name])]
    return tuple(out)


def config_diff(old: dict, new: dict, *, ignore: Sequence[str] = (), prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (``ignore``: keys to skip)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if f"{prefix}{k}" in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, ignore=ignore, prefix=f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def config_to_dict(cfg: Any) -> dict:
    """Plain-JSON dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any, *, exclude: Sequence[str] = ()) -> str:
    """sha256 of the canonical JSON of ``cfg`` without its ``affects_output=False`` keys and ``exclude``."""
    d = config_to_dict(cfg)
    for dotted in (*neutral_keys(type(cfg)), *exclude):
        node = d
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
