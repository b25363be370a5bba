"""Make a model's graph exportable at any size: padding inside the graph, export-friendly modules.

Why the padding lives here: our models pad to their ``multiple`` with
``pad_to_multiple``, whose ``if pad == 0`` branch and ``(-h) % m`` arithmetic a tracer
evaluates once, so a plain export freezes the pad of the example size (measured: a
graph exported at 256 px fails at 97x131, "Attempting to broadcast an axis by a
dimension other than 1. 64 by 65"). :class:`AnySize` pads before the model with index
arithmetic the exporter keeps symbolic: the padded side is written ``m * ceil(h / m)``,
which the shape solver can prove a multiple of ``m`` (so the model's own pad is a no-op
in the graph), and the reflection is a gather with indices ``(h-1) - |(h-1) - i|``
(``F.pad``'s reflect mode adds a guard ``pad < h`` the solver cannot prove). Where
``pad_to_multiple`` falls back to ``replicate`` (a pad as large as the side), the same
choice is made with a tensor ``where``. The crop back is a gather too. Output equals
the eager model at every size (tests: 1x1 to 256x192).

Export-hostile modules are swapped for equivalents from :data:`EXPORT_EQUIVALENTS`
(matched by class name, so the official NAFNet's ``LayerNorm2d``, a custom
``autograd.Function`` that older exporters cannot trace, is caught too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AnySize", "ChannelLayerNorm", "EXPORT_EQUIVALENTS", "export_ready", "model_multiple"]


def model_multiple(model: nn.Module, override: int = 0) -> int:
    """The side multiple the model pads to (its ``multiple`` attribute; 1 when it has none)."""
    if override > 0:
        return override
    m = getattr(model, "multiple", 1)
    return int(m) if isinstance(m, int) and m > 0 else 1


def _reflect_index(n: int, total: int, device: torch.device) -> Tensor:
    """Indices (total,) into a side of length ``n``, reflected without repeating the edge (F.pad 'reflect')."""
    i = torch.arange(total, device=device)
    return (n - 1) - ((n - 1) - i).abs()


class AnySize(nn.Module):
    """``model`` behind an in-graph pad to ``multiple`` (reflect, replicate for tiny sides) and crop back."""

    def __init__(self, model: nn.Module, multiple: int):
        super().__init__()
        self.model = model
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', H, W)
        if self.multiple <= 1:
            return self.model(x)
        h, w, m = x.shape[-2], x.shape[-1], self.multiple
        hp, wp = m * ((h + m - 1) // m), m * ((w + m - 1) // m)  # provably multiples of m
        rh, rw = _reflect_index(h, hp, x.device), _reflect_index(w, wp, x.device)
        too_small = (rh.min() < 0) | (rw.min() < 0)  # a pad >= the side: pad_to_multiple replicates instead
        ih = torch.where(too_small, torch.arange(hp, device=x.device).clamp(max=h - 1), rh)
        iw = torch.where(too_small, torch.arange(wp, device=x.device).clamp(max=w - 1), rw)
        y = self.model(x.index_select(2, ih).index_select(3, iw))  # (B, C', Hp, Wp)
        return y.index_select(2, torch.arange(h, device=x.device)).index_select(3, torch.arange(w, device=x.device))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) as one ``F.layer_norm`` (ONNX LayerNormalization)."""

    def __init__(self, weight: Tensor, bias: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1).contiguous(), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def _layer_norm_2d(module: nn.Module) -> nn.Module | None:
    w, b, eps = getattr(module, "weight", None), getattr(module, "bias", None), getattr(module, "eps", None)
    ok = isinstance(w, Tensor) and isinstance(b, Tensor) and w.ndim == 1 and w.shape == b.shape
    return ChannelLayerNorm(w, b, eps) if ok and isinstance(eps, float) else None


# class name -> builder of an exact equivalent (None: this instance does not match; left alone)
EXPORT_EQUIVALENTS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    # NAFNet's channel LayerNorm: ours is 9 element-wise ops per norm in the graph, the official one a
    # custom autograd.Function; one LayerNormalization op is what every ONNX consumer understands
    "LayerNorm2d": _layer_norm_2d,
}


def export_ready(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` with export-hostile modules replaced; returns it and {class name: count}."""
    ready = copy.deepcopy(model).eval()
    counts: dict[str, int] = {}

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            make = EXPORT_EQUIVALENTS.get(type(child).__name__)
            new = make(child) if make is not None else None
            if new is not None:
                setattr(parent, name, new.to(next(child.parameters()).device))
                counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
            else:
                swap(child)

    swap(ready)
    return ready, counts
