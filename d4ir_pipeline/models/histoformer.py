"""Histoformer (Sun et al., ECCV 2024, arXiv:2407.10172), written for this project.

Parameter names follow the official ``basicsr/models/archs/histoformer_arch.py`` of
sunshangquan/Histoformer, so the released AllWeather ``net_g_best.pth``
(``{"params": state_dict}``) loads strictly. The registry entry ``histoformer`` uses the
released option file ``Allweather/Options/Allweather_Histoformer.yml`` (dim 36, blocks
[4, 4, 6, 8], ffn 2.667), not the class defaults (48, [4, 6, 6, 8], 2.66), which are kept
here as in the official constructor. Input of any size: padded (reflect) to a multiple of
8, cropped back (the official test script pads the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .restormer import Attention, OverlapPatchEmbed, add_levels, decode, stage
from .tiling import crop_to, gather_crop, pad_to_multiple

__all__ = ["Histoformer", "HistogramAttention", "DualScaleFeedForward"]


class FreeLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels with no weight or bias (the official code comments them out)."""

    def __init__(self, layernorm_type: str):
        super().__init__()
        if layernorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"`LayerNorm_type` = {layernorm_type!r}: expected 'WithBias' or 'BiasFree'")
        self.subtract_mean = layernorm_type == "WithBias"

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        var = y.var(-1, keepdim=True, unbiased=False)
        y = (y - y.mean(-1, keepdim=True)) if self.subtract_mean else y
        y = y / torch.sqrt(var + 1e-5)
        return y.transpose(1, 2).reshape(b, c, h, w)


class DualScaleFeedForward(nn.Module):
    """Dual-scale gated feed-forward (DGFF): pixel-shuffle up, 5x5 and dilated 3x3 depthwise, Mish gate."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        if hidden % 4:
            raise ValueError(
                f"Histoformer feed-forward: int({dim} * {ffn_expansion_factor}) = {hidden} hidden channels must be a "
                "multiple of 4 (pixel shuffle by 2, then a split in two)"
            )
        q = hidden // 4
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv_5 = nn.Conv2d(q, q, kernel_size=5, padding=2, groups=q, bias=bias)
        self.dwconv_dilated2_1 = nn.Conv2d(q, q, kernel_size=3, padding=2, dilation=2, groups=q, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pixel_shuffle(self.project_in(x), 2)  # (B, hidden/2, 2H, 2W)
        x1, x2 = x.chunk(2, dim=1)
        x = F.mish(self.dwconv_dilated2_1(x2)) * self.dwconv_5(x1)  # (B, hidden/4, 2H, 2W)
        return self.project_out(F.pixel_unshuffle(x, 2))


class HistogramAttention(Attention):
    """Dynamic-range histogram self-attention (DHSA): attention over intensity-sorted bins.

    Half the channels are sorted along H then W before the projection; values are
    sorted per channel and queries / keys follow that order; attention runs across
    bins ("box" grouping) and within bins ("interleaved" grouping), the two results are
    multiplied and every sort is undone.
    """

    qkv_parts = 5  # two queries, two keys and the values

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, box: bool) -> Tensor:
        """q, k, v (B, C, L) in sorted order -> (B, C, L); L is zero-padded to a multiple of the heads."""
        b, c, length = q.shape
        heads = self.num_heads
        pad = (-length) % heads
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        bins = (length + pad) // heads

        def split(t: Tensor) -> Tensor:  # (B, C, L') -> (B, heads, C/heads * heads, bins)
            t = t.reshape(b, heads, c // heads, heads, bins) if box else t.reshape(b, heads, c // heads, bins, heads)
            return t.reshape(b, heads, -1, bins) if box else t.transpose(-1, -2).reshape(b, heads, -1, bins)

        q, k, v = split(q), split(k), split(v)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.exp()
        attn = attn / (attn.sum(-1, keepdim=True) + 1)  # the official "softmax_1": one extra virtual key
        out = attn @ v  # (B, heads, C/heads * heads, bins)
        out = out.reshape(b, heads, c // heads, heads, bins)
        out = out.reshape(b, c, -1) if box else out.transpose(-1, -2).reshape(b, c, -1)
        return gather_crop(out, -1, 0, length)  # the official out[..., :length]

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        half = c // 2
        x_sort, idx_h = x[:, :half].sort(-2)
        x_sort, idx_w = x_sort.sort(-1)
        x = torch.cat([x_sort, x[:, half:]], dim=1)
        q1, k1, q2, k2, v = self.qkv_dwconv(self.qkv(x)).chunk(5, dim=1)  # each (B, C, H, W)

        v, idx = v.reshape(b, c, -1).sort(dim=-1)  # (B, C, HW), sorted by value per channel
        q1, k1, q2, k2 = (torch.gather(t.reshape(b, c, -1), 2, idx) for t in (q1, k1, q2, k2))
        out1 = self._attend(q1, k1, v, box=True)
        out2 = self._attend(q2, k2, v, box=False)
        out1 = torch.empty_like(out1).scatter_(2, idx, out1).reshape(b, c, h, w)  # undo the value sort
        out2 = torch.empty_like(out2).scatter_(2, idx, out2).reshape(b, c, h, w)
        out = self.project_out(out1 * out2)

        first = out[:, :half]
        first = torch.empty_like(first).scatter_(-1, idx_w, first)  # undo the W sort, then the H sort
        first = torch.empty_like(first).scatter_(-2, idx_h, first)
        return torch.cat([first, out[:, half:]], dim=1)


class HistoBlock(nn.Module):
    """norm_g -> DHSA -> residual, norm_ff1 -> DGFF -> residual (official attribute names)."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.attn_g = HistogramAttention(dim, num_heads, bias)
        self.norm_g = FreeLayerNorm(layernorm_type)
        self.ffn = DualScaleFeedForward(dim, ffn_expansion_factor, bias)
        self.norm_ff1 = FreeLayerNorm(layernorm_type)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn_g(self.norm_g(x))
        return x + self.ffn(self.norm_ff1(x))


class SkipPatchEmbed(nn.Module):
    """Image pyramid branch: 2x2 average pool, 1x1 conv, 3x3 depthwise conv; key ``proj.1``, ``proj.2``."""

    def __init__(self, in_c: int = 3, dim: int = 3, bias: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            nn.AvgPool2d(2, stride=2),
            nn.Conv2d(in_c, dim, kernel_size=1, bias=bias),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Histoformer(nn.Module):
    """Restormer-shaped four-level encoder-decoder of histogram transformer blocks plus an image pyramid."""

    multiple = 8  # three 2x downsamplings

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",  # noqa: N803 - the official keyword, so YAML configs pass through
        dual_pixel_task: bool = False,
    ):
        super().__init__()
        if dual_pixel_task:
            raise ValueError(
                "`dual_pixel_task=True`: the official Histoformer builds a skip_conv for it but its forward never "
                "uses it, and no such checkpoint is released"
            )
        if inp_channels != 3:
            raise ValueError(f"`inp_channels` = {inp_channels}: the image-pyramid branch is fixed to 3 channels")
        ln, ffn = LayerNorm_type, ffn_expansion_factor
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        add_levels(self, "Histoformer", HistoBlock, dim, num_blocks, heads, ffn, bias, ln)
        self.refinement = stage(HistoBlock, num_refinement_blocks, dim * 2, heads[0], ffn, bias, ln)
        self.skip_patch_embed1 = SkipPatchEmbed(3, 3)
        self.skip_patch_embed2 = SkipPatchEmbed(3, 3)
        self.skip_patch_embed3 = SkipPatchEmbed(3, 3)
        self.reduce_chan_level_1 = nn.Conv2d(dim * 2 + 3, dim * 2, kernel_size=1, bias=bias)
        self.reduce_chan_level_2 = nn.Conv2d(dim * 4 + 3, dim * 4, kernel_size=1, bias=bias)
        self.reduce_chan_level_3 = nn.Conv2d(dim * 8 + 3, dim * 8, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)
        self.residual = inp_channels == out_channels

    def forward(self, inp_img: Tensor) -> Tensor:
        x, size = pad_to_multiple(inp_img, self.multiple)  # (B, 3, H8, W8)
        e1 = self.encoder_level1(self.patch_embed(x))  # (B, dim, H8, W8)
        s1 = self.skip_patch_embed1(x)  # (B, 3, H8/2, W8/2)
        e2 = self.encoder_level2(self.reduce_chan_level_1(torch.cat([self.down1_2(e1), s1], 1)))
        s2 = self.skip_patch_embed2(s1)
        e3 = self.encoder_level3(self.reduce_chan_level_2(torch.cat([self.down2_3(e2), s2], 1)))
        s3 = self.skip_patch_embed3(s2)
        lat = self.latent(self.reduce_chan_level_3(torch.cat([self.down3_4(e3), s3], 1)))  # (B, 8dim, H8/8, W8/8)
        d1 = self.refinement(decode(self, lat, e3, e2, e1))  # (B, 2dim, H8, W8)
        out = self.output(d1) + x if self.residual else self.output(d1)
        return crop_to(out, size)
