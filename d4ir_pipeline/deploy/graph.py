"""Make a model's graph exportable at any size: padding inside the graph, export-friendly modules.

Why the padding lives here: our models pad to their ``multiple`` with
``pad_to_multiple``, whose ``if pad == 0`` branch and ``(-h) % m`` arithmetic a tracer
evaluates once, so a plain export freezes the pad of the example size (measured: a
graph exported at 256 px fails at 97x131, "Attempting to broadcast an axis by a
dimension other than 1. 64 by 65"). :class:`AnySize` pads before the model with index
arithmetic the exporter keeps symbolic: the padded side is written ``m * ceil(h / m)``,
which the shape solver can prove a multiple of ``m`` (so the model's own pad is a no-op
in the graph), and the reflection is ``models.tiling.gather_pad``: a gather with indices
``(h-1) - |(h-1) - i|`` (``F.pad``'s reflect mode adds a guard ``pad < h`` the solver
cannot prove); where ``pad_to_multiple`` falls back to ``replicate`` (a pad as large as
the side), the same choice is made with a tensor ``where``. The crop back is a gather too. Output equals
the eager model at every size (tests: 1x1 to 256x192).

Export-hostile modules are swapped for equivalents from :data:`EXPORT_EQUIVALENTS`
(matched by class name, so the official NAFNet's ``LayerNorm2d``, a custom
``autograd.Function`` that older exporters cannot trace, is caught too). NAFNet's block
is swapped for one whose gates read two half-width convolutions instead of a ``Split``
of one: ONNX Runtime keeps both halves in its blocked (NCHWc) convolution layout and
the gate multiplies them there (``nafnet_s``, one CPU thread, medians of interleaved
runs: 256 px 77.6 -> 69.1 ms, 512 px 363 -> 333 ms, 1024 px 1.69 -> 1.67 s; the same
outputs), and whose norms' scale and shift are then folded into the 1x1 convolutions
that read them (:class:`ChannelLayerNorm` says why). :data:`SWAP_NOTES` says what each
swap does, for the model card.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.tiling import gather_crop, gather_pad

__all__ = [
    "AnySize",
    "ChannelLayerNorm",
    "EXPORT_EQUIVALENTS",
    "SWAP_NOTES",
    "SplitGateNAFBlock",
    "export_ready",
    "model_multiple",
]


def model_multiple(model: nn.Module, override: int = 0) -> int:
    """The side multiple the model pads to (its ``multiple`` attribute; 1 when it has none)."""
    if override > 0:
        return override
    m = getattr(model, "multiple", 1)
    return int(m) if isinstance(m, int) and m > 0 else 1


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
        y = self.model(gather_pad(x, 0, hp - h, 0, wp - w))  # (B, C', Hp, Wp), as pad_to_multiple pads
        return gather_crop(gather_crop(y, 2, 0, h), 3, 0, w)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) with its channel sums as 1x1 convolutions.

    ``d = conv(x, I - 1/C)`` centres every pixel's channels, ``var = conv(d * d, 1/C) + eps``
    (eps as the conv's bias, one output channel), ``r = rsqrt(var)`` is spread back over the
    channels by a 1x1 conv of ones, and ``y = weight * (d * r) + bias``:
    ``models.nafnet.layer_norm_2d`` to float rounding (the swap is checked before every
    export; <= 1e-5 in the tests, on inputs with a large mean). Inside a NAFNet block the
    scale and shift are folded into the 1x1 convs that read the norm (:meth:`fold_affine`).

    Why convolutions: ONNX Runtime runs a 1x1 conv in its blocked (NCHWc) layout with vector
    dot products, a ``ReduceMean`` over axis 1 as a strided reduction, and a product with a
    one-channel (or per-channel) operand only after reordering the tensor out of the blocked
    layout and back. nafnet_s, 1 thread, medians of interleaved runs on one machine, ReduceMean
    -> conv means -> conv means, spread ``r`` and folded affine: 256 px 112 -> 73 -> 46 ms,
    512 px 375 -> 292 -> 241 ms, 1024 px 1674 -> 1332 -> 1127 ms. Not one
    ``LayerNormalization``: ONNX normalises only trailing axes, so that needs a transpose each
    way, which take the norm out of the blocked layout and scale badly with threads (2
    threads, 512 px: 222 -> 160 ms when they went, on the machine of 2026-12-04). Swapped for
    our ``LayerNorm2d`` and the official one (a custom ``autograd.Function``) alike.
    """

    def __init__(self, weight: Tensor, bias: Tensor, eps: float):
        super().__init__()
        c = weight.numel()
        self.weight: nn.Parameter | None = nn.Parameter(weight.detach().clone())
        self.bias: nn.Parameter | None = nn.Parameter(bias.detach().clone())
        self.eps = float(eps)
        w = weight.detach()
        eye = torch.eye(c, dtype=w.dtype, device=w.device)
        self.register_buffer("centre", (eye - 1.0 / c).view(c, c, 1, 1), persistent=False)
        self.register_buffer("mean", torch.full_like(w, 1.0 / c).view(1, c, 1, 1), persistent=False)
        self.register_buffer("eps_bias", torch.full_like(w[:1], self.eps), persistent=False)
        self.register_buffer("spread", torch.ones_like(w).view(c, 1, 1, 1), persistent=False)

    def fold_affine(self, convs: tuple[nn.Conv2d, ...]) -> None:
        """Move ``weight`` / ``bias`` into the 1x1 ``convs`` that are the only readers of this norm."""
        g, b = self.weight.detach().double(), self.bias.detach().double()
        for conv in convs:
            w = conv.weight.detach().double()  # (O, C, 1, 1)
            shift = w[:, :, 0, 0] @ b
            old = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
            conv.weight = nn.Parameter((w * g.view(1, -1, 1, 1)).to(conv.weight.dtype))
            conv.bias = nn.Parameter((old + shift).to(conv.weight.dtype))
        self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        d = F.conv2d(x, self.centre)  # x - mean over channels
        r = torch.rsqrt(F.conv2d(d * d, self.mean, self.eps_bias))  # (B, 1, H, W): 1 / sqrt(var + eps)
        y = d * F.conv2d(r, self.spread)  # r on every channel: a same-shape product
        return y if self.weight is None else self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


def _channel_layer_norm(module: nn.Module) -> nn.Module | None:
    w, b, eps = getattr(module, "weight", None), getattr(module, "bias", None), getattr(module, "eps", None)
    ok = isinstance(w, Tensor) and isinstance(b, Tensor) and w.ndim == 1 and w.shape == b.shape
    return ChannelLayerNorm(w, b, eps) if ok and isinstance(eps, float) else None


def _halves(conv: nn.Conv2d) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The first and second half of ``conv``'s output channels as two convs (depthwise stays depthwise)."""
    out, depthwise = conv.out_channels // 2, conv.groups > 1
    halves = []
    for part in (slice(0, out), slice(out, 2 * out)):
        half = nn.Conv2d(out if depthwise else conv.in_channels, out, conv.kernel_size, conv.stride, conv.padding,
                         groups=out if depthwise else 1, bias=conv.bias is not None)  # fmt: skip
        half.weight = nn.Parameter(conv.weight.detach()[part].clone())
        if conv.bias is not None:
            half.bias = nn.Parameter(conv.bias.detach()[part].clone())
        halves.append(half)
    return halves[0], halves[1]


class SplitGateNAFBlock(nn.Module):
    """A NAFBlock whose two SimpleGates multiply the outputs of half-width convs: no Split op in the graph."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.sca = block.norm1, block.norm2, block.sca
        self.conv3, self.conv5, self.beta, self.gamma = block.conv3, block.conv5, block.beta, block.gamma
        self.dropout1, self.dropout2 = block.dropout1, block.dropout2
        (self.conv1a, self.conv1b), (self.conv2a, self.conv2b) = _halves(block.conv1), _halves(block.conv2)
        self.conv4a, self.conv4b = _halves(block.conv4)

    def fold_norms(self) -> None:
        """Fold each channel norm's scale and shift into the half-width 1x1 convs, its only readers."""
        for norm, convs in ((self.norm1, (self.conv1a, self.conv1b)), (self.norm2, (self.conv4a, self.conv4b))):
            if isinstance(norm, ChannelLayerNorm) and norm.weight is not None:
                norm.fold_affine(convs)

    def forward(self, inp: Tensor) -> Tensor:
        x = self.norm1(inp)
        x = self.conv2a(self.conv1a(x)) * self.conv2b(self.conv1b(x))  # SimpleGate of conv2(conv1(x))
        x = self.conv3(x * self.sca(x))
        y = inp + self.dropout1(x) * self.beta
        x = self.norm2(y)
        x = self.conv5(self.conv4a(x) * self.conv4b(x))  # SimpleGate of conv4(x)
        return y + self.dropout2(x) * self.gamma


def _is_pointwise(conv: object) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1


def _split_gate_block(module: nn.Module) -> nn.Module | None:
    """The NAFBlock layout (ours and the official): 1x1 -> depthwise 3x3 -> gate, 1x1 -> gate; else None."""
    conv1, conv2, conv4 = (getattr(module, n, None) for n in ("conv1", "conv2", "conv4"))
    ok = _is_pointwise(conv1) and _is_pointwise(conv4) and isinstance(conv2, nn.Conv2d)
    ok = ok and conv2.groups == conv2.in_channels == conv2.out_channels == conv1.out_channels
    ok = ok and conv1.out_channels % 2 == 0 and conv4.out_channels % 2 == 0 and conv2.stride == (1, 1)
    ok = ok and type(getattr(module, "sg", None)).__name__ == "SimpleGate"
    parts = ("norm1", "norm2", "sca", "conv3", "conv5", "beta", "gamma", "dropout1", "dropout2")
    ok = ok and all(hasattr(module, n) for n in parts)
    return SplitGateNAFBlock(module) if ok else None


# class name -> builder of an exact equivalent (None: this instance does not match; left alone)
EXPORT_EQUIVALENTS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    # NAFNet's channel LayerNorm: the official one is a custom autograd.Function; ops every ONNX consumer
    # understands, the channel means as 1x1 convs, which ONNX Runtime runs fastest (ChannelLayerNorm says why)
    "LayerNorm2d": _channel_layer_norm,
    # NAFNet's block: the Split of each gate keeps ONNX Runtime's convs out of its blocked layout
    "NAFBlock": _split_gate_block,
}
SWAP_NOTES = {
    "LayerNorm2d": "channel means as 1x1 convs",
    "NAFBlock": "gates over half-width convs, no Split; the norms' scale and shift folded into the convs after them",
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
            swap(new if new is not None else child)  # a new module may hold swappable ones (a block's norms)

    swap(ready)
    for module in ready.modules():
        if isinstance(module, SplitGateNAFBlock):
            module.fold_norms()  # after the swaps, when the block's norms are ChannelLayerNorms
    return ready, counts
