"""Teacher I/O adapter: what a network expects around its forward, so every teacher is called the same way.

Published teachers differ in four ways that change their output: the value range they
were trained on (DehazeFormer: [-1, 1]; TransWeather: [-1, 1] in, [0, 1] out), which
element of a returned list is the restoration (MPRNet: the first of three stages), the
size multiple they need, and, for non-blind networks (WGWS-Net), a one-hot weather flag
whose order is fixed by the checkpoint. :class:`ModelIO` records those facts (the
registry's defaults come from ``models.model_io``); :func:`adapted_forward` applies them
to a batch in [0, 1]; :class:`AdaptedModel` is the same call as a module with one fixed
weather (what ``d4ir restore`` runs and ``d4ir export`` traces: [0, 1] in, [0, 1] out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import D4IRError
from .tiling import crop_to, pad_to_multiple

__all__ = ["AdaptedModel", "ModelIO", "ModelIOError", "adapted_forward", "RANGES"]

RANGES = ("0,1", "-1,1")


class ModelIOError(D4IRError, ValueError):
    """A teacher I/O description that cannot be applied (bad range, missing flag, wrong output index)."""


@dataclass(frozen=True)
class ModelIO:
    """How to call a network on images in [0, 1] and read its result back in [0, 1].

    ``input_range`` / ``output_range``: "0,1" or "-1,1" (two fields: TransWeather takes
    [-1, 1] but was trained to output [0, 1]). ``output_index``: the element to take when
    the forward returns a list / tuple. ``pad_multiple``: pad (reflect) the input to this
    multiple and crop back (registered models also pad themselves; this is for
    ``module:Class`` teachers that do not). ``weather_flag``: for non-blind networks, the
    weather names in the order of the one-hot flag passed as the forward's second argument.
    """

    input_range: str = "0,1"
    output_range: str = "0,1"
    output_index: int | None = None
    pad_multiple: int = 1
    weather_flag: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("input_range", "output_range"):
            value = getattr(self, name)
            if value not in RANGES:
                raise ModelIOError(f"`{name}` = {value!r}: expected one of {list(RANGES)}")
        if self.output_index is not None and (
            isinstance(self.output_index, bool) or not isinstance(self.output_index, int)
        ):
            raise ModelIOError(f"`output_index` = {self.output_index!r}: expected an int or None")
        if isinstance(self.pad_multiple, bool) or not isinstance(self.pad_multiple, int) or self.pad_multiple < 1:
            raise ModelIOError(f"`pad_multiple` = {self.pad_multiple!r}: expected an int >= 1")
        flag = self.weather_flag
        if flag is not None:
            if isinstance(flag, str) or not flag or not all(isinstance(w, str) and w for w in flag):
                raise ModelIOError(f"`weather_flag` = {flag!r}: expected a non-empty tuple of weather names")
            if len(set(flag)) != len(flag):
                raise ModelIOError(f"`weather_flag` = {flag!r}: weather names must be unique")
            object.__setattr__(self, "weather_flag", tuple(flag))

    @property
    def is_plain(self) -> bool:
        """True when calling the network directly is the same call: [0, 1] in and out, one tensor, blind."""
        return (self.input_range, self.output_range) == ("0,1", "0,1") and (
            self.output_index is None and self.weather_flag is None
        )

    def to_dict(self) -> dict:
        """JSON-ready form (for teacher identities and ``d4ir models --json``)."""
        return {
            "input_range": self.input_range,
            "output_range": self.output_range,
            "output_index": self.output_index,
            "pad_multiple": self.pad_multiple,
            "weather_flag": list(self.weather_flag) if self.weather_flag else None,
        }


def _one_hot(io: ModelIO, weather: str) -> list[int]:
    assert io.weather_flag is not None
    if weather not in io.weather_flag:
        raise ModelIOError(f"weather {weather!r}: this teacher's flag knows {list(io.weather_flag)}")
    return [int(w == weather) for w in io.weather_flag]


def _call(model: nn.Module, x: Tensor, io: ModelIO, flag: list[int] | None) -> Tensor:
    out = model(x) if flag is None else model(x, flag)
    if isinstance(out, list | tuple):
        if io.output_index is None:
            raise ModelIOError(
                f"{type(model).__name__} returned a {type(out).__name__} of {len(out)} outputs; set `output_index` "
                "to the one that is the restoration"
            )
        if not -len(out) <= io.output_index < len(out):
            raise ModelIOError(
                f"`output_index` = {io.output_index}: {type(model).__name__} returned {len(out)} outputs"
            )
        out = out[io.output_index]
    elif io.output_index is not None:
        raise ModelIOError(
            f"`output_index` = {io.output_index}, but {type(model).__name__} returned a single "
            f"{type(out).__name__}, not a list / tuple"
        )
    if not isinstance(out, Tensor):
        raise ModelIOError(f"{type(model).__name__} returned {type(out).__name__}, expected a tensor")
    return out


def adapted_forward(model: nn.Module, x: Tensor, io: ModelIO, weather: str | Sequence[str] | None = None) -> Tensor:
    """Run ``model`` on ``x`` (B, C, H, W) in [0, 1] as ``io`` says; the result is on the [0, 1] scale (not clamped).

    ``weather``: for a non-blind model, one weather name for the batch or one per sample
    (samples are grouped by weather, one forward per group); ignored by blind models, so
    callers can always pass it.
    """
    # 1. check inputs
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ModelIOError(
            f"`x` must be a (B, C, H, W) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    batch = x.shape[0]
    # 2. value range and size multiple
    inp = x * 2 - 1 if io.input_range == "-1,1" else x
    inp, size = pad_to_multiple(inp, io.pad_multiple)
    # 3. forward, with the weather flag where the model takes one
    if io.weather_flag is None:
        out = _call(model, inp, io, None)
    else:
        if weather is None:
            raise ModelIOError(
                f"{type(model).__name__} is not blind: pass `weather` (one of {list(io.weather_flag)}, or one per sample)"
            )
        if isinstance(weather, str):  # one flag for the batch (no per-sample list: the batch stays symbolic)
            return _finish(_call(model, inp, io, _one_hot(io, weather)), size, io)
        names = list(weather)
        if len(names) != batch:
            raise ModelIOError(f"`weather` has {len(names)} entries for a batch of {batch}")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:
            out = _call(model, inp, io, _one_hot(io, names[0]))
        else:
            order = [i for idx in groups.values() for i in idx]
            parts = [_call(model, inp[idx], io, _one_hot(io, name)) for name, idx in groups.items()]
            out = torch.cat(parts)[torch.argsort(torch.tensor(order, device=inp.device))]
    return _finish(out, size, io)


def _finish(out: Tensor, size: tuple[int, int], io: ModelIO) -> Tensor:
    """4. back to the input size and the [0, 1] scale."""
    out = crop_to(out, size)
    return (out + 1) / 2 if io.output_range == "-1,1" else out


class AdaptedModel(nn.Module):
    """``model`` behind its I/O adapter with one fixed weather: (B, 3, H, W) in [0, 1] -> one tensor on [0, 1].

    For the callers that want a plain image-to-image module (``d4ir restore``, ``d4ir export``):
    the value ranges, the output index and the weather flag become part of the module, so an
    exported graph takes and returns [0, 1] images like every other export. ``multiple`` is the
    least common multiple of the network's own and ``io.pad_multiple``.
    """

    def __init__(self, model: nn.Module, io: ModelIO, weather: str | None = None):
        super().__init__()
        if io.weather_flag is not None:
            if not weather:
                raise ModelIOError(
                    f"{type(model).__name__} is not blind: choose the weather it restores (`weather`, one of "
                    f"{list(io.weather_flag)})"
                )
            _one_hot(io, weather)  # names the known weathers when ``weather`` is not one of them
        self.model, self.io = model, io
        self.weather = weather if io.weather_flag is not None else None
        own = getattr(model, "multiple", 1)
        self.multiple = math.lcm(own if isinstance(own, int) and own > 0 else 1, io.pad_multiple)

    def forward(self, x: Tensor) -> Tensor:
        return adapted_forward(self.model, x, self.io, self.weather)
