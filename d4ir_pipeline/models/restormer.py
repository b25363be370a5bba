"""Restormer (Zamir et al., CVPR 2022, arXiv:2111.09881), written for this project.

Parameter names follow the official ``basicsr/models/archs/restormer_arch.py`` of
swz30/Restormer, so the released ``*.pth`` files (``{"params": state_dict}``, e.g.
``deraining.pth``) load strictly with ``build_model("restormer")``. The constructor
takes the official keyword names, so a ``network_g`` block from their YAML can be passed
as ``**kwargs``. Input of any size: padded (reflect) to a multiple of 8, cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import crop_to, pad_to_multiple

__all__ = [
    "Restormer",
    "TransformerBlock",
    "LayerNorm",
    "OverlapPatchEmbed",
    "Downsample",
    "Upsample",
    "check_heads",
]


class BiasFreeLayerNorm(nn.Module):
    """Channel LayerNorm without mean subtraction in the output and without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, HW, C)
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight


class WithBiasLayerNorm(nn.Module):
    """Channel LayerNorm with weight and bias (eps 1e-5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, HW, C)
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels of a (B, C, H, W) map; keys ``body.weight[/bias]``."""

    def __init__(self, dim: int, layernorm_type: str):
        super().__init__()
        if layernorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"`LayerNorm_type` = {layernorm_type!r}: expected 'WithBias' or 'BiasFree'")
        self.body = BiasFreeLayerNorm(dim) if layernorm_type == "BiasFree" else WithBiasLayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.body(x.flatten(2).transpose(1, 2))  # (B, HW, C)
        return y.transpose(1, 2).reshape(b, c, h, w)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class Attention(nn.Module):
    """Multi-Dconv head transposed self-attention (MDTA): attention across channels.

    The base of DRSformer's top-k and Histoformer's histogram attention too (the same
    parameters and keys; Histoformer projects ``qkv_parts = 5`` maps).
    """

    qkv_parts = 3  # q, k, v

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        n = dim * self.qkv_parts
        self.qkv = nn.Conv2d(dim, n, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(n, n, kernel_size=3, padding=1, groups=n, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(temperature * q k^T across channels (B, heads, C/h, C/h), v (B, heads, C/h, HW)); q, k unit rows."""
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        heads = self.num_heads
        q = F.normalize(q.reshape(b, heads, c // heads, h * w), dim=-1)
        k = F.normalize(k.reshape(b, heads, c // heads, h * w), dim=-1)
        return (q @ k.transpose(-2, -1)) * self.temperature, v.reshape(b, heads, c // heads, h * w)

    def forward(self, x: Tensor) -> Tensor:
        attn, v = self.scores(x)
        return self.project_out((attn.softmax(dim=-1) @ v).reshape(x.shape))


class TransformerBlock(nn.Module):
    """norm1 -> attention (MDTA) -> residual, norm2 -> feed-forward (GDFN) -> residual.

    Subclasses swap ``attention`` / ``feed_forward`` (DRSformer's sparse block); the keys stay.
    """

    attention: type[nn.Module] = Attention
    feed_forward: type[nn.Module] = FeedForward

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, layernorm_type)
        self.attn = self.attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, layernorm_type)
        self.ffn = self.feed_forward(dim, ffn_expansion_factor, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution embedding; key ``proj``."""

    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve resolution, double channels: conv (C -> C/2) then PixelUnshuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double resolution, halve channels: conv (C -> 2C) then PixelShuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def check_heads(name: str, channels: int, heads: int) -> None:
    """Channel attention splits channels evenly across heads; say which level breaks that."""
    if heads < 1 or channels % heads:
        raise ValueError(f"{name}: {channels} channels cannot be split into {heads} attention heads")


def stage(block: type[nn.Module], n: int, dim: int, heads: int, ffn: float, bias: bool, ln: str) -> nn.Sequential:
    """``n`` blocks in a row; ``block(dim, heads, ffn, bias, ln)`` is the family's transformer block."""
    return nn.Sequential(*[block(dim, heads, ffn, bias, ln) for _ in range(n)])


def add_levels(
    net: nn.Module,
    name: str,
    block: type[nn.Module],
    dim: int,
    num_blocks: Sequence[int],
    heads: Sequence[int],
    ffn: float,
    bias: bool,
    ln: str,
) -> None:
    """Register the Restormer skeleton shared by Restormer, Histoformer and DRSformer on ``net``.

    ``encoder_level1`` ... ``decoder_level1`` under the official names and in the official
    order (the order fixes the random init and the state_dict order); the patch embedding
    before and the refinement / output after stay with the caller, as do the extra branches.
    """
    if len(num_blocks) != 4 or len(heads) != 4:
        raise ValueError(f"`num_blocks` and `heads` need 4 entries, got {list(num_blocks)} and {list(heads)}")
    for i, (c, hd) in enumerate(zip((dim, dim * 2, dim * 4, dim * 8), heads, strict=True)):
        check_heads(f"{name} level {i + 1}", c, hd)
    check_heads(f"{name} decoder level 1", dim * 2, heads[0])
    net.encoder_level1 = stage(block, num_blocks[0], dim, heads[0], ffn, bias, ln)
    net.down1_2 = Downsample(dim)
    net.encoder_level2 = stage(block, num_blocks[1], dim * 2, heads[1], ffn, bias, ln)
    net.down2_3 = Downsample(dim * 2)
    net.encoder_level3 = stage(block, num_blocks[2], dim * 4, heads[2], ffn, bias, ln)
    net.down3_4 = Downsample(dim * 4)
    net.latent = stage(block, num_blocks[3], dim * 8, heads[3], ffn, bias, ln)
    net.up4_3 = Upsample(dim * 8)
    net.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
    net.decoder_level3 = stage(block, num_blocks[2], dim * 4, heads[2], ffn, bias, ln)
    net.up3_2 = Upsample(dim * 4)
    net.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
    net.decoder_level2 = stage(block, num_blocks[1], dim * 2, heads[1], ffn, bias, ln)
    net.up2_1 = Upsample(dim * 2)  # no 1x1 reduction at level 1: the decoder works at 2*dim
    net.decoder_level1 = stage(block, num_blocks[0], dim * 2, heads[0], ffn, bias, ln)


def encode(net: nn.Module, e1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encoder levels 1-3 and the latent of :func:`add_levels` from the embedded image (B, dim, H8, W8)."""
    e1 = net.encoder_level1(e1)
    e2 = net.encoder_level2(net.down1_2(e1))  # (B, 2dim, H8/2, W8/2)
    e3 = net.encoder_level3(net.down2_3(e2))  # (B, 4dim, H8/4, W8/4)
    return e1, e2, e3, net.latent(net.down3_4(e3))  # latent: (B, 8dim, H8/8, W8/8)


def decode(net: nn.Module, lat: Tensor, e3: Tensor, e2: Tensor, e1: Tensor) -> Tensor:
    """Decoder levels 3-1 of :func:`add_levels` with the skip connections; (B, 2dim, H8, W8)."""
    d3 = net.decoder_level3(net.reduce_chan_level3(torch.cat([net.up4_3(lat), e3], 1)))
    d2 = net.decoder_level2(net.reduce_chan_level2(torch.cat([net.up3_2(d3), e2], 1)))
    return net.decoder_level1(torch.cat([net.up2_1(d2), e1], 1))


class Restormer(nn.Module):
    """Four-level encoder-decoder of transformer blocks; output = conv(features) + input."""

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
        ln, ffn = LayerNorm_type, ffn_expansion_factor
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        add_levels(self, "Restormer", TransformerBlock, dim, num_blocks, heads, ffn, bias, ln)
        self.refinement = stage(TransformerBlock, num_refinement_blocks, dim * 2, heads[0], ffn, bias, ln)
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)
        self.residual = inp_channels == out_channels and not dual_pixel_task

    def forward(self, inp_img: Tensor) -> Tensor:
        x, size = pad_to_multiple(inp_img, self.multiple)  # (B, 3, H8, W8)
        e1_in = self.patch_embed(x)  # (B, dim, H8, W8)
        e1, e2, e3, lat = encode(self, e1_in)
        d1 = self.refinement(decode(self, lat, e3, e2, e1))  # (B, 2dim, H8, W8)
        if self.dual_pixel_task:
            out = self.output(d1 + self.skip_conv(e1_in))
        else:
            out = self.output(d1) + x if self.residual else self.output(d1)
        return crop_to(out, size)
