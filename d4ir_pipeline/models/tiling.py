"""Any-size inputs: pad to a network's multiple and crop back; tiled inference with blending.

Tiled inference runs the model on overlapping ``tile x tile`` windows and blends them
with weights that are 0 on the outer quarter of each overlap, rise as a raised cosine
over the middle half and are 1 elsewhere (edges that touch the image border keep
weight 1). A fully convolutional model whose receptive-field radius is at most
``overlap // 4`` pixels gives the same result as whole-image inference (float
round-off only); models with global operations (channel attention, global pooling,
prompt interpolation) differ by an amount that depends on the weights: measure it
with :func:`tiled_forward` vs ``model(x)`` (numbers in docs/MODELS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pad_to_multiple", "crop_to", "gather_crop", "gather_pad", "resize_by", "ResizeBy", "tiled_forward",
           "blend_ramp"]  # fmt: skip


def resize_by(x: Tensor, *, up: int = 1, down: int = 1, mode: str = "nearest") -> Tensor:
    """Resize ``x`` (B, C, H, W) by ``up / down`` to integer output sizes (H * up // down, W * up // down).

    On sides divisible by ``down`` this is ``F.interpolate(scale_factor=up / down)`` to the
    bit (the source coordinates use in / out, the same exact float), and the sizes stay
    symbolic when the model is exported (a float scale factor makes the tracer guard every side).
    """
    h, w = x.shape[-2:]
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=(h * up // down, w * up // down), mode=mode, align_corners=align)


class ResizeBy(nn.Module):
    """:func:`resize_by` as a parameterless module (an ``nn.Upsample(scale_factor=...)`` that exports)."""

    def __init__(self, *, up: int = 1, down: int = 1, mode: str = "nearest"):
        super().__init__()
        self.up, self.down, self.mode = up, down, mode

    def forward(self, x: Tensor) -> Tensor:
        return resize_by(x, up=self.up, down=self.down, mode=self.mode)


def pad_to_multiple(x: Tensor, multiple: int, *, mode: str = "reflect") -> tuple[Tensor, tuple[int, int]]:
    """Pad ``x`` (B, C, H, W) at the bottom/right to a multiple of ``multiple``; return it and (H, W).

    ``reflect`` needs the pad to be smaller than the side; tiny inputs fall back to
    ``replicate`` for that call.
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must be (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if multiple <= 1:
        return x, (h, w)
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    use = mode
    if mode == "reflect" and (ph >= h or pw >= w):
        use = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=use), (h, w)


def gather_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """``F.pad(x, (left, right, top, bottom), "reflect")``, or ``"replicate"`` where a pad is as large as its
    side (the fallback of :func:`pad_to_multiple`), as two gathers: the same values to the bit, and an
    exporter keeps the sizes symbolic (a Python ``if`` on the sizes would freeze the traced branch)."""
    h, w = x.shape[-2], x.shape[-1]
    jh = torch.arange(h + top + bottom, device=x.device) - top  # the source row of each output row, unreflected
    jw = torch.arange(w + left + right, device=x.device) - left
    too_small = (jh.min() <= -h) | (jh.max() >= 2 * h - 1) | (jw.min() <= -w) | (jw.max() >= 2 * w - 1)
    ih = torch.where(too_small, jh.clamp(0, h - 1), (h - 1) - ((h - 1) - jh.abs()).abs())
    iw = torch.where(too_small, jw.clamp(0, w - 1), (w - 1) - ((w - 1) - jw.abs()).abs())
    return x.index_select(-2, ih).index_select(-1, iw)


def gather_crop(x: Tensor, dim: int, start: int, length: int) -> Tensor:
    """``x.narrow(dim, start, length)`` as a gather: the same values, and an exporter keeps ``length``
    symbolic (from a slice it freezes whether the crop drops anything, i.e. whether a pad was 0)."""
    return x.index_select(dim, torch.arange(start, start + length, device=x.device))


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop (B, C, H', W') back to the top-left (H, W)."""
    h, w = size
    return x[..., :h, :w]


def blend_ramp(length: int, overlap: int, *, ramp_start: bool, ramp_end: bool) -> Tensor:
    """1-D blending weights (length,) for one tile side: 0 guard, raised-cosine rise, then 1."""
    w = torch.ones(length, dtype=torch.float64)
    guard = overlap // 4
    rise = overlap - 2 * guard  # the middle half of the overlap
    d = torch.arange(length, dtype=torch.float64)  # distance from the tile's start edge
    prof = torch.ones(length, dtype=torch.float64)
    prof[d < guard] = 0.0
    if rise > 0:
        inside = (d >= guard) & (d < guard + rise)
        prof[inside] = 0.5 - 0.5 * torch.cos(math.pi * (d[inside] - guard + 0.5) / rise)
    if ramp_start:
        w = w * prof
    if ramp_end:
        w = w * prof.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tiled_forward(model: nn.Module, x: Tensor, *, tile: int, overlap: int) -> Tensor:
    """Run ``model`` on overlapping tiles of ``x`` (B, C, H, W) and blend them into (B, C', H, W).

    Runs in the caller's grad mode (wrap in ``torch.no_grad()`` for inference). Inputs
    no larger than ``tile`` on both sides go through the model whole.
    """
    if tile < 8:
        raise ValueError(f"`tile` = {tile}: expected >= 8 pixels")
    if not 0 <= overlap < tile:
        raise ValueError(f"`overlap` = {overlap}: expected 0 <= overlap < tile ({tile})")
    b, _, h, w = x.shape
    if h <= tile and w <= tile:
        return model(x)
    stride = tile - overlap
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    out: Tensor | None = None
    weight = torch.zeros(1, 1, h, w, dtype=torch.float32, device=x.device)
    for y0 in ys:
        wy = blend_ramp(th, overlap, ramp_start=y0 > 0, ramp_end=y0 + th < h)
        for x0 in xs:
            wx = blend_ramp(tw, overlap, ramp_start=x0 > 0, ramp_end=x0 + tw < w)
            patch = model(x[..., y0 : y0 + th, x0 : x0 + tw])  # (B, C', th, tw)
            if patch.shape[-2:] != (th, tw):
                raise ValueError(f"model output {tuple(patch.shape)} differs in size from its tile input ({th}, {tw})")
            if out is None:
                out = torch.zeros(b, patch.shape[1], h, w, dtype=torch.float32, device=x.device)
            w2d = (wy[:, None] * wx[None, :]).to(device=x.device, dtype=torch.float32)  # (th, tw)
            out[..., y0 : y0 + th, x0 : x0 + tw] += patch.float() * w2d
            weight[..., y0 : y0 + th, x0 : x0 + tw] += w2d
    assert out is not None
    assert bool((weight > 0).all()), "tile weights leave pixels uncovered (bug in tiling)"
    return (out / weight).to(x.dtype)
