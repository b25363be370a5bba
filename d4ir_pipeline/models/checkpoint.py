"""Safe checkpoint loading and our own model folders (model.safetensors + model.json).

Reading: safetensors, or ``.pth/.pt/.ckpt/.bin`` (or no suffix, sniffed) through
``torch.load(weights_only=True)`` with a small explicit allowlist of harmless classes
(:data:`SAFE_GLOBALS`, e.g. the ``argparse.Namespace`` that training scripts store next to
the weights) scoped to that one call; a pickle that needs anything else is refused with
the names of the globals it wants, never executed. Containers are
unwrapped in this order: ``params_ema``, ``params`` (BasicSR: NAFNet / Restormer save
``params``; when both exist the EMA weights are the ones their papers report, so they
win; pass ``key=`` to choose), ``state_dict`` (Lightning, e.g. PromptIR), ``model``,
``net``, ``network``. A prefix shared by every key (``module.`` from DDP, ``model.``,
``net.`` from Lightning wrappers) is stripped.

Writing: :func:`save_model` stores the weights and the model's build spec, so
:func:`load_model` needs nothing else to rebuild it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..common.io import atomic_write_bytes, atomic_write_json
from ..errors import D4IRError
from .cost import count_params
from .registry import build_model, model_spec

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "SAFE_GLOBALS",
    "load_state_dict_file",
    "unwrap_state_dict",
    "strip_prefixes",
    "load_weights",
    "save_model",
    "load_model",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model", "net", "network")
STRIP_PREFIXES = ("module.", "model.", "net.")
_SHOW = 10  # entries listed per category in mismatch messages

# Classes a checkpoint may pickle besides tensors and plain containers. Each is a plain
# data holder: unpickling it sets attributes and runs no code of the file's choosing.
# argparse.Namespace: the training arguments WeatherDiffusion-style checkpoints store
# (``{"state_dict": ..., "params": Namespace, "config": Namespace}``).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
_PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".pkl"}


class CheckpointError(D4IRError):
    """A checkpoint file that cannot be read or used; the message names the file and why."""


class CheckpointMismatchError(CheckpointError):
    """A state_dict that does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, message: str, *, missing: list[str], unexpected: list[str], shapes: list[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes


class LoadReport(dict):
    """What :func:`load_weights` did: ``loaded``, ``missing`` and ``unexpected`` key lists."""


# ---------------------------------------------------------------------------------------
# reading


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save) or 'pickle' (legacy torch.save), from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker
        return "pickle"
    return "unknown"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def unwrap_state_dict(
    obj: Any, *, key: str | None = None, where: str = "checkpoint", strip: bool = True
) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint object and strip shared wrapper prefixes."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{where}: no container key {key!r} (top-level keys: {have})")
        obj = obj[key]
    for _ in range(4):  # nested containers, e.g. {"state_dict": {"model": {...}}}
        if _is_tensor_dict(obj) or not isinstance(obj, Mapping):
            break
        found = next((k for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if found is None:
            break
        logger.info("%s: using container key %r", where, found)
        obj = obj[found]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(
            f"{where}: no tensors found (top-level keys: {sorted(map(str, obj))[:20]}); "
            f"expected a state_dict or one of the containers {list(CONTAINER_KEYS)}"
        )
    dropped = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if dropped:
        logger.warning("%s: ignoring %d non-tensor entries: %s", where, len(dropped), dropped[:_SHOW])
    return strip_prefixes(sd, where=where) if strip else sd


def strip_prefixes(sd: dict[str, Tensor], *, where: str = "checkpoint") -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``net.``) shared by every key, repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                logger.info("%s: stripped key prefix %r", where, p)
                changed = True
    return sd


def _global_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


def _torch_load(path: Path, allowed: tuple[Any, ...]) -> Any:
    """``torch.load(weights_only=True)`` with ``allowed`` added for this call only; refusals name the globals."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.findall(r"GLOBAL ([\w.]+)", text)
        try:  # every offending global, read statically from the pickle (zip checkpoints only); nothing runs
            with torch.serialization.safe_globals(list(allowed)):
                found = sorted(set(found) | set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
            pass
        if found:
            what = f"it pickles {', '.join(f'`{g}`' for g in found)}, outside the allowlist"
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            what = f"the unpickler refused it ({next((ln for ln in lines if 'error' in ln.lower()), lines[-1] if lines else '')})"
        raise CheckpointError(
            f"checkpoint {path}: refused to unpickle it with torch.load(weights_only=True): {what} "
            f"[{', '.join(_global_name(g) for g in allowed)} and tensors / plain containers are allowed]. "
            "Loading it fully would run whatever code the file names. To proceed: if these are harmless data "
            "classes from a source you trust, pass them as `extra_safe_globals=[...]` (or add them to "
            "`d4ir_pipeline.models.checkpoint.SAFE_GLOBALS`); otherwise convert the file once, in a separate Python "
            "session you trust it in (full unpickling, then safetensors.torch.save_file of its state_dict), and pass "
            "the .safetensors file."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({type(e).__name__}: {e})") from e


def load_state_dict_file(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    strip: bool = True,
    extra_safe_globals: Sequence[Any] = (),
) -> dict[str, Tensor]:
    """Read a state_dict from safetensors or a torch file (weights_only + :data:`SAFE_GLOBALS`); unwrap containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    kind = _sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({e})") from e
    elif path.suffix in _PICKLE_SUFFIXES or kind in ("zip", "pickle"):
        raw = _torch_load(path, tuple(SAFE_GLOBALS) + tuple(extra_safe_globals))
    else:
        raise CheckpointError(
            f"checkpoint {path}: unknown format (suffix {path.suffix!r}); expected .safetensors, .pth, .pt or .ckpt"
        )
    return unwrap_state_dict(raw, key=key, where=f"checkpoint {path}", strip=strip)


# ---------------------------------------------------------------------------------------
# matching a state_dict to a model


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"  {title} ({len(items)}): {shown}{more}"


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "_d4ir_spec", None)
    return f"{spec['name']!r} ({type(model).__name__})" if spec else type(model).__name__


def load_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = True,
    key: str | None = None,
    extra_safe_globals: Sequence[Any] = (),
) -> LoadReport:
    """Load weights into ``model``; any mismatch raises :class:`CheckpointMismatchError` listing keys.

    With ``strict=False`` missing and unexpected keys are logged and skipped; shape
    conflicts are always an error (those weights cannot be used).
    """
    if isinstance(path_or_state_dict, Mapping):
        where = "state_dict"
        raw = unwrap_state_dict(path_or_state_dict, key=key, where=where, strip=False)
    else:
        where = f"checkpoint {path_or_state_dict}"
        raw = load_state_dict_file(path_or_state_dict, key=key, strip=False, extra_safe_globals=extra_safe_globals)
    own = model.state_dict()
    # strip wrapper prefixes unless the model's own keys carry them (keep whichever matches better)
    stripped = strip_prefixes(raw, where=where)
    sd = raw if sum(k in own for k in raw) > sum(k in own for k in stripped) else stripped
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if shapes or (strict and (missing or unexpected)):
        lines = [
            f"{where} does not fit model {_model_name(model)}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} with a different shape "
            f"({len(own)} keys in the model, {len(sd)} in the checkpoint)"
        ]
        if missing:
            lines.append(_listing("missing from the checkpoint", missing))
        if unexpected:
            lines.append(_listing("unexpected in the checkpoint", unexpected))
        if shapes:
            lines.append(_listing("shape conflicts", shapes))
        lines.append(
            "  hint: check the architecture name and its kwargs (width, dim, num_blocks, ...) against the "
            "config the checkpoint was trained with"
        )
        raise CheckpointMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, shapes=shapes)
    if missing or unexpected:
        logger.warning(
            "%s: loaded non-strictly; %d missing and %d unexpected keys skipped (e.g. %s)",
            where,
            len(missing),
            len(unexpected),
            (missing + unexpected)[:5],
        )
    usable = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(usable, strict=False)
    return LoadReport(loaded=sorted(usable), missing=missing, unexpected=unexpected)


# ---------------------------------------------------------------------------------------
# our own model folders


def _state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    # contiguous private copies: safetensors refuses shared or strided storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys sorted. safetensors writes them from a hash
    map, in an order that changes from one call to the next: the same weights gave different bytes, and so
    different sha256s, which is what names a model here (teacher ids, caches, model cards)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_model(model: nn.Module, out_dir: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.json`` (spec, params, extra) atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    spec = model_spec(model)
    meta = {"spec": spec, "params": count_params(model), **(extra or {})}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(f"model.json for {out}: the spec or `extra` is not JSON-serialisable ({e})") from e
    data = _sorted_metadata(
        save(_state_for_saving(model), metadata={"format": "pt", "spec": json.dumps(spec, sort_keys=True)})
    )
    atomic_write_bytes(out / WEIGHTS_NAME, data)
    atomic_write_json(out / CONFIG_NAME, meta)  # written last: its presence marks a complete folder
    return out


def read_model_json(path_dir: str | os.PathLike) -> dict:
    """The ``model.json`` of a model folder (or of the folder holding a given model file)."""
    p = Path(path_dir)
    folder = p.parent if p.is_file() else p
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(
            f"{folder}: no {CONFIG_NAME}; a model folder written by save_model holds {WEIGHTS_NAME} + {CONFIG_NAME}"
        )
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e
    spec = meta.get("spec") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{cfg}: expected {{'spec': {{'name': ..., 'kwargs': {{...}}}}, ...}}")
    return meta


def load_model(path_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from ``model.json`` and load ``model.safetensors`` strictly; returns it in eval mode."""

    p = Path(path_dir)
    folder = p.parent if p.is_file() else p
    meta = read_model_json(folder)
    spec = meta["spec"]
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    load_weights(model, folder / WEIGHTS_NAME, strict=True)
    return model.to(device).eval()
