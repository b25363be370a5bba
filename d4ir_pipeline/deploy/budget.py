"""Memory budget -> tile side and batch size, from a model's activation bytes per pixel.

The bytes per pixel are measured, not guessed: one forward on the ``meta`` device (no
arithmetic, no memory) under a dispatch mode that adds up the storages of the tensors
alive at each op and keeps the maximum. Convolutional restorers (and Restormer's
channel attention) hold activations linear in the pixel count, so one small forward
gives the figure for every size (measured: nafnet_s 320 B/px, full Restormer 6312 B/px,
constant from 128 to 512 px). Weights, the allocator's cache and the input image are
not in it; docs/DEPLOY.md compares it with the peak RSS the benchmark measures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["DEFAULT_BYTES_PER_PIXEL", "LiveBytes", "activation_bytes_per_pixel", "Plan", "plan"]

logger = logging.getLogger(__name__)

# used for an .onnx without the exporter's metadata: about 2x nafnet_s, 1/3 of a full Restormer
DEFAULT_BYTES_PER_PIXEL = 2048.0
MIN_TILE = 64


class LiveBytes(TorchDispatchMode):
    """Track the bytes of tensor storages alive during the ops it sees; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage -> number of live tensor objects on it
        self._tracked: set[int] = set()

    def _release(self, tid: int, key: int, nbytes: int) -> None:
        self._tracked.discard(tid)
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self._tracked:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key not in self._refs:
                self._refs[key] = 0
                self.live += nbytes
            self._refs[key] += 1
            self._tracked.add(id(t))
            weakref.finalize(t, self._release, id(t), key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def activation_bytes_per_pixel(
    model: nn.Module, *, size: int = 128, dtype: torch.dtype = torch.float32, in_channels: int = 3
) -> float:
    """Peak bytes of live activations per input pixel of one no-grad forward (counted on ``meta``).

    A model whose forward cannot run on ``meta`` (a ``module:Class`` that makes tensors on a fixed
    device) gets :data:`DEFAULT_BYTES_PER_PIXEL`, with a warning: the figure only sizes tiles.
    """
    x = torch.empty(1, in_channels, size, size, device="meta", dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with _on_meta(model, dtype), torch.no_grad(), LiveBytes() as lb:
            y = model(x)
            del y
    except (RuntimeError, NotImplementedError) as e:
        logger.warning(
            "%s cannot run on the meta device to measure its activations (%s); assuming %.0f B/px",
            type(model).__name__, str(e).splitlines()[0][:200], DEFAULT_BYTES_PER_PIXEL,
        )  # fmt: skip
        return DEFAULT_BYTES_PER_PIXEL
    finally:
        model.train(was_training)
    return lb.peak / float(size * size)


@contextlib.contextmanager
def _on_meta(model: nn.Module, dtype: torch.dtype):
    """Every parameter and buffer swapped for a ``meta`` stand-in for the block, put back after.

    Module by module (each once): ``torch.func.functional_call`` left a module used at several
    places (MPRNet's one PReLU) on ``meta`` after the call.
    """
    saved = []
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None:
                    saved.append((store, k, v))
                    meta = torch.empty_like(v, device="meta", dtype=dtype if v.is_floating_point() else v.dtype)
                    store[k] = nn.Parameter(meta, requires_grad=False) if isinstance(v, nn.Parameter) else meta
    try:
        yield
    finally:
        for store, k, v in reversed(saved):
            store[k] = v


@dataclass(frozen=True)
class Plan:
    """How one image size runs: ``tile`` side (0 = whole image) and images per batch."""

    tile: int
    batch: int


def tile_for_budget(bytes_per_pixel: float, budget_bytes: float, multiple: int = 1) -> int:
    """The largest square tile whose activations fit the budget, a multiple of 8 (and of ``multiple``)."""
    step = math.lcm(8, max(1, multiple))
    side = int(math.sqrt(max(budget_bytes, 1.0) / max(bytes_per_pixel, 1e-9)))
    return max(MIN_TILE, side // step * step)


def plan(
    h: int,
    w: int,
    *,
    bytes_per_pixel: float,
    budget_bytes: float,
    max_batch: int,
    tile: int = 0,
    multiple: int = 1,
) -> Plan:
    """Tile an image whose activations exceed the budget (or a side exceeds a fixed ``tile``); else batch it."""
    need = h * w * bytes_per_pixel
    side = tile if tile > 0 else tile_for_budget(bytes_per_pixel, budget_bytes, multiple)
    if (tile > 0 and max(h, w) > tile) or (tile <= 0 and need > budget_bytes):
        return Plan(tile=side, batch=1)
    fits = int(budget_bytes // max(need, 1.0))
    return Plan(tile=0, batch=max(1, min(max_batch, fits)))
