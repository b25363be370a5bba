"""DehazeFormer (Song et al., IEEE TIP 2023, arXiv:2204.03883), written for this project.

Parameter names follow the official ``models/dehazeformer.py`` of IDKiro/DehazeFormer,
so the released ``dehazeformer-{t,s,b,m,l}.pth`` (``{"state_dict": ...}`` saved from an
``nn.DataParallel``: keys prefixed ``module.``) load strictly; the window attention's
``relative_positions`` is a persistent buffer there and here. The five variants are the
official ``dehazeformer_t`` ... ``dehazeformer_l`` functions (:data:`VARIANTS`). Inputs
and outputs are in [-1, 1] (the official loaders map images with ``x * 2 - 1``):
``model_io("dehazeformer_b")`` says so. Input of any size: padded (reflect) to a multiple
of 4 as the official forward does, cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import crop_to, gather_crop, gather_pad, pad_to_multiple

__all__ = ["DehazeFormer", "VARIANTS"]


class RLN(nn.Module):
    """Revised LayerNorm: normalise over (C, H, W) and return the rescale / rebias that undo it later."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones((1, dim, 1, 1)))
        self.bias = nn.Parameter(torch.zeros((1, dim, 1, 1)))
        self.meta1 = nn.Conv2d(1, dim, 1)
        self.meta2 = nn.Conv2d(1, dim, 1)
        nn.init.trunc_normal_(self.meta1.weight, std=0.02)
        nn.init.constant_(self.meta1.bias, 1)
        nn.init.trunc_normal_(self.meta2.weight, std=0.02)
        nn.init.constant_(self.meta2.bias, 0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        std = torch.sqrt((x - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        out = (x - mean) / std * self.weight + self.bias
        return out, self.meta1(std), self.meta2(mean)


class Mlp(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv; keys ``mlp.0``, ``mlp.2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(True), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def relative_positions(window_size: int) -> Tensor:
    """(ws^2, ws^2, 2) log-scaled relative offsets between the positions of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    flat = coords.flatten(1)  # (2, ws^2)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    return torch.sign(rel) * torch.log(1.0 + rel.abs())


class WindowAttention(nn.Module):
    """Window self-attention with an MLP-predicted relative position bias (``meta``)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.register_buffer("relative_positions", relative_positions(window_size))
        self.meta = nn.Sequential(nn.Linear(2, 256, bias=True), nn.ReLU(True), nn.Linear(256, num_heads, bias=True))

    def forward(self, qkv: Tensor) -> Tensor:  # (nW*B, ws^2, 3C)
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.meta(self.relative_positions).permute(2, 0, 1).contiguous().unsqueeze(0)
        return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.dim)


def _partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)


def _reverse(windows: Tensor, ws: int, b: int, h: int, w: int) -> Tensor:
    # b given: the official int(n / (h * w / ws / ws)) is a float a tracer freezes
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class Attention(nn.Module):
    """Shifted-window attention (when ``use_attn``) plus a parallel conv branch (``DWConv`` / ``Conv``)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, use_attn: bool, conv_type: str):
        super().__init__()
        if conv_type not in ("Conv", "DWConv"):
            raise ValueError(f"`conv_type` = {conv_type!r}: expected 'Conv' or 'DWConv'")
        self.window_size, self.shift_size = window_size, shift_size
        self.use_attn, self.conv_type = use_attn, conv_type
        if conv_type == "Conv":
            self.conv = nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1, padding_mode="reflect"),
                nn.ReLU(True),
                nn.Conv2d(dim, dim, 3, padding=1, padding_mode="reflect"),
            )
        else:
            self.conv = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim, padding_mode="reflect")
        if conv_type == "DWConv" or use_attn:
            self.V = nn.Conv2d(dim, dim, 1)
            self.proj = nn.Conv2d(dim, dim, 1)
        if use_attn:
            self.QK = nn.Conv2d(dim, dim * 2, 1)
            self.attn = WindowAttention(dim, window_size, num_heads)

    def _pad(self, x: Tensor, shift: bool) -> Tensor:
        ws, ss = self.window_size, self.shift_size if shift else 0
        h, w = x.shape[-2:]
        # the official (ss, (ws - ss + pw) % ws) pads: the padded side is the multiple of ws that follows side + ss
        ht, wt = ws * ((h + ss + ws - 1) // ws), ws * ((w + ss + ws - 1) // ws)
        # reflect as the official code; a map smaller than its pad (where the official code fails) replicates
        return gather_pad(x, ss, ht - h - ss, ss, wt - w - ss)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if not self.use_attn:
            return self.conv(x) if self.conv_type == "Conv" else self.proj(self.conv(self.V(x)))
        v = self.V(x)
        qkv = self._pad(torch.cat([self.QK(x), v], dim=1), self.shift_size > 0)  # (B, 3C, Ht, Wt)
        ht, wt = qkv.shape[-2:]
        windows = self.attn(_partition(qkv.permute(0, 2, 3, 1), self.window_size))
        out = _reverse(windows, self.window_size, b, ht, wt)  # (B, Ht, Wt, C)
        ss = self.shift_size  # crop [ss, ss + side) back out, as gathers (no bounds a tracer freezes)
        attn_out = gather_crop(gather_crop(out, 1, ss, h), 2, ss, w).permute(0, 3, 1, 2)
        return self.proj(self.conv(v) + attn_out)


class Block(nn.Module):
    """RLN -> attention -> rescale -> residual, then MLP -> residual (the official ``mlp_norm`` is off)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, shift: int, use_attn: bool, conv_type: str
    ):
        super().__init__()
        self.use_attn = use_attn
        self.norm1 = RLN(dim) if use_attn else nn.Identity()
        self.attn = Attention(dim, num_heads, window_size, shift, use_attn, conv_type)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_attn:
            y, rescale, rebias = self.norm1(x)
            x = x + (self.attn(y) * rescale + rebias)  # official order of additions
        else:
            x = x + self.attn(x)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """``depth`` blocks; attention in the last ``attn_ratio * depth``, shifted windows in every odd block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        attn_ratio: float,
        conv_type: str,
    ):
        super().__init__()
        attn_depth = attn_ratio * depth
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads,
                    mlp_ratio,
                    window_size,
                    0 if i % 2 == 0 else window_size // 2,
                    i >= depth - attn_depth,
                    conv_type,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class PatchEmbed(nn.Module):
    """Strided conv (reflect padding); key ``proj``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kernel_size: int | None = None):
        super().__init__()
        k = kernel_size or patch_size
        self.proj = nn.Conv2d(
            in_chans, embed_dim, k, stride=patch_size, padding=(k - patch_size + 1) // 2, padding_mode="reflect"
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PatchUnEmbed(nn.Module):
    """Conv to ``out * p^2`` channels then PixelShuffle(p); key ``proj.0``."""

    def __init__(self, patch_size: int, out_chans: int, embed_dim: int, kernel_size: int | None = None):
        super().__init__()
        k = kernel_size or 1
        self.proj = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans * patch_size**2, k, padding=k // 2, padding_mode="reflect"),
            nn.PixelShuffle(patch_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class SKFusion(nn.Module):
    """Selective-kernel fusion of two maps with a softmax over the two (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, height: int = 2, reduction: int = 8):
        super().__init__()
        self.height = height
        d = max(int(dim / reduction), 4)
        self.mlp = nn.Sequential(nn.Conv2d(dim, d, 1, bias=False), nn.ReLU(), nn.Conv2d(d, dim * height, 1, bias=False))

    def forward(self, feats: list[Tensor]) -> Tensor:
        b, c, h, w = feats[0].shape
        x = torch.cat(feats, dim=1).view(b, self.height, c, h, w)
        attn = self.mlp(F.adaptive_avg_pool2d(x.sum(dim=1), 1))
        attn = attn.view(b, self.height, c, 1, 1).softmax(dim=1)
        return (x * attn).sum(dim=1)


class DehazeFormer(nn.Module):
    """Five-level U-shaped Swin-style network predicting K and B of ``J = K * I - B + I``."""

    multiple = 4  # two 2x patch merges

    def __init__(
        self,
        in_chans: int = 3,
        out_chans: int = 4,
        window_size: int = 8,
        embed_dims: Sequence[int] = (24, 48, 96, 48, 24),
        mlp_ratios: Sequence[float] = (2.0, 4.0, 4.0, 2.0, 2.0),
        depths: Sequence[int] = (16, 16, 16, 8, 8),
        num_heads: Sequence[int] = (2, 4, 6, 1, 1),
        attn_ratio: Sequence[float] = (1 / 4, 1 / 2, 3 / 4, 0, 0),
        conv_type: Sequence[str] = ("DWConv",) * 5,
    ):
        super().__init__()
        if not all(len(s) == 5 for s in (embed_dims, mlp_ratios, depths, num_heads, attn_ratio, conv_type)):
            raise ValueError(
                "DehazeFormer: `embed_dims`, `mlp_ratios`, `depths`, `num_heads`, `attn_ratio`, `conv_type` need 5 entries each"
            )
        if embed_dims[1] != embed_dims[3] or embed_dims[0] != embed_dims[4]:
            raise ValueError(f"DehazeFormer: `embed_dims` {list(embed_dims)} must be symmetric (d0 == d4, d1 == d3)")
        if out_chans != 4:
            raise ValueError(f"`out_chans` = {out_chans}: DehazeFormer predicts K (1 channel) and B (3 channels)")
        for i, (d, hd, r) in enumerate(zip(embed_dims, num_heads, attn_ratio, strict=True)):
            if r > 0 and d % hd:
                raise ValueError(f"DehazeFormer level {i + 1}: {d} channels cannot be split into {hd} heads")
        e, ws = embed_dims, window_size

        def layer(i: int) -> BasicLayer:
            return BasicLayer(e[i], depths[i], num_heads[i], mlp_ratios[i], ws, attn_ratio[i], conv_type[i])

        self.patch_embed = PatchEmbed(1, in_chans, e[0], kernel_size=3)
        self.layer1 = layer(0)
        self.patch_merge1 = PatchEmbed(2, e[0], e[1])
        self.skip1 = nn.Conv2d(e[0], e[0], 1)
        self.layer2 = layer(1)
        self.patch_merge2 = PatchEmbed(2, e[1], e[2])
        self.skip2 = nn.Conv2d(e[1], e[1], 1)
        self.layer3 = layer(2)
        self.patch_split1 = PatchUnEmbed(2, e[3], e[2])
        self.fusion1 = SKFusion(e[3])
        self.layer4 = layer(3)
        self.patch_split2 = PatchUnEmbed(2, e[4], e[3])
        self.fusion2 = SKFusion(e[4])
        self.layer5 = layer(4)
        self.patch_unembed = PatchUnEmbed(1, out_chans, e[4], kernel_size=3)
        # the official init: not needed to load weights, but keeps random models well scaled
        depth = sum(depths)
        for m in self.modules():
            if isinstance(m, Mlp | Attention):
                qk = getattr(m, "QK", None) if isinstance(m, Attention) else None
                for conv in (c for c in m.modules() if isinstance(c, nn.Conv2d)):
                    _init_conv(conv, depth, is_qk=conv is qk)

    def forward(self, inp: Tensor) -> Tensor:
        x, size = pad_to_multiple(inp, self.multiple)  # (B, 3, H4, W4), values in [-1, 1]
        f = self.layer1(self.patch_embed(x))
        skip1 = f
        f = self.layer2(self.patch_merge1(f))
        skip2 = f
        f = self.patch_split1(self.layer3(self.patch_merge2(f)))
        f = self.fusion1([f, self.skip2(skip2)]) + f
        f = self.patch_split2(self.layer4(f))
        f = self.fusion2([f, self.skip1(skip1)]) + f
        feat = self.patch_unembed(self.layer5(f))  # (B, 4, H4, W4)
        k, b = torch.split(feat, (1, 3), dim=1)
        return crop_to(k * x - b + x, size)


def _init_conv(conv: nn.Conv2d, network_depth: int, *, is_qk: bool) -> None:
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    fan_out = conv.out_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    gain = 1.0 if is_qk else (8 * network_depth) ** (-1 / 4)
    nn.init.trunc_normal_(conv.weight, std=gain * math.sqrt(2.0 / float(fan_in + fan_out)))
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


# The official dehazeformer_* functions (models/dehazeformer.py), name -> kwargs.
_DW, _CV = ("DWConv",) * 5, ("Conv",) * 5
_NARROW, _WIDE = (24, 48, 96, 48, 24), (48, 96, 192, 96, 48)
VARIANTS: dict[str, dict] = {
    "t": dict(embed_dims=_NARROW, depths=(4, 4, 4, 2, 2), attn_ratio=(0, 1 / 2, 1, 0, 0), conv_type=_DW),
    "s": dict(embed_dims=_NARROW, depths=(8, 8, 8, 4, 4), conv_type=_DW),
    "b": dict(embed_dims=_NARROW, depths=(16, 16, 16, 8, 8), conv_type=_DW),
    "m": dict(embed_dims=_NARROW, depths=(12, 12, 12, 6, 6), conv_type=_CV),
    "l": dict(embed_dims=_WIDE, depths=(16, 16, 16, 12, 12), conv_type=_CV),
}
