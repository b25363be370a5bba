"""TransWeather (Valanarasu et al., CVPR 2022, arXiv:2111.14813), written for this project.

Parameter names follow the official ``transweather_model.py`` / ``base_networks.py`` of
jeya-maria-jose/TransWeather (``Tenc``, ``Tdec``, ``convtail``, ``clean``), so a
checkpoint saved by their ``train.py`` (``torch.save(net.state_dict())`` of an
``nn.DataParallel``: every key prefixed ``module.``) loads strictly once the prefix is
stripped (``models/checkpoint.py`` does that). The defaults are the official
``Transweather()`` (its ``Tenc`` / ``Tdec`` presets); the other kwargs exist for tiny test
variants. The official loaders feed inputs normalised to [-1, 1] (``Normalize(0.5, 0.5)``)
and train the tanh output against [0, 1] targets: see ``model_io("transweather")``.
Input of any size: padded (reflect) to a multiple of 16 (the official test loader resizes
to a multiple of 16), cropped back; the decoder's off-by-one crops are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import crop_to, pad_to_multiple

__all__ = ["TransWeather"]


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv then LayerNorm (eps 1e-5); returns tokens and (H, W)."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (B, HW, C)


class DWConv(nn.Module):
    """3x3 depthwise conv on a token sequence; key ``dwconv``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> depthwise conv -> GELU -> fc2 (Mix-FFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Attention(nn.Module):
    """Spatial-reduction attention (SegFormer); with ``task_queries`` > 0 the queries are learned weather queries."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int, task_queries: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TransWeather attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if task_queries:
            self.task_query = nn.Parameter(torch.randn(1, task_queries, dim))
        self.task = task_queries > 0
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        # (B, Nq, C); repeat, not expand: a no-grad view of a parameter trips autograd hooks (FLOP counter)
        src = (self.task_query if b == 1 else self.task_query.repeat(b, 1, 1)) if self.task else x
        q = self.q(src).reshape(b, src.shape[1], heads, d).permute(0, 2, 1, 3)  # (B, heads, Nq, d)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
        kv = self.kv(x).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, heads, Nkv, d)
        if self.task:
            # the official decoder stretches the learned queries to the token count (nearest)
            q = F.interpolate(q, size=(v.shape[2], v.shape[3]))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (norm eps 1e-6); the decoder's carries the task queries."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, task_queries: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, True, sr_ratio, task_queries)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


def _blocks(n: int, dim: int, heads: int, mlp: float, sr: int, task_queries: int = 0) -> nn.ModuleList:
    return nn.ModuleList([Block(dim, heads, mlp, sr, task_queries) for _ in range(n)])


def _to_map(x: Tensor, h: int, w: int) -> Tensor:
    return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class Encoder(nn.Module):
    """Four-stage hierarchical encoder plus intra-patch blocks on a parallel, finer patch grid."""

    def __init__(self, dims: Sequence[int], heads: Sequence[int], mlp: Sequence[float], depths: Sequence[int], sr):
        super().__init__()
        self.dims = list(dims)
        self.patch_embed1 = PatchEmbed(7, 4, 3, dims[0])
        self.patch_embed2 = PatchEmbed(3, 2, dims[0], dims[1])
        self.patch_embed3 = PatchEmbed(3, 2, dims[1], dims[2])
        self.patch_embed4 = PatchEmbed(3, 2, dims[2], dims[3])
        self.mini_patch_embed1 = PatchEmbed(3, 2, dims[0], dims[1])
        self.mini_patch_embed2 = PatchEmbed(3, 2, dims[1], dims[2])
        self.mini_patch_embed3 = PatchEmbed(3, 2, dims[2], dims[3])
        self.mini_patch_embed4 = PatchEmbed(3, 2, dims[0], dims[3])  # built but unused by the official forward
        self.block1 = _blocks(depths[0], dims[0], heads[0], mlp[0], sr[0])
        self.norm1 = nn.LayerNorm(dims[0], eps=1e-6)
        self.patch_block1 = _blocks(1, dims[1], heads[0], mlp[0], sr[0])
        self.pnorm1 = nn.LayerNorm(dims[1], eps=1e-6)
        self.block2 = _blocks(depths[1], dims[1], heads[1], mlp[1], sr[1])
        self.norm2 = nn.LayerNorm(dims[1], eps=1e-6)
        self.patch_block2 = _blocks(1, dims[2], heads[1], mlp[1], sr[1])
        self.pnorm2 = nn.LayerNorm(dims[2], eps=1e-6)
        self.block3 = _blocks(depths[2], dims[2], heads[2], mlp[2], sr[2])
        self.norm3 = nn.LayerNorm(dims[2], eps=1e-6)
        self.patch_block3 = _blocks(1, dims[3], heads[1], mlp[2], sr[2])
        self.pnorm3 = nn.LayerNorm(dims[3], eps=1e-6)
        self.block4 = _blocks(depths[3], dims[3], heads[3], mlp[3], sr[3])
        self.norm4 = nn.LayerNorm(dims[3], eps=1e-6)

    @staticmethod
    def _run(blocks: nn.ModuleList, norm: nn.LayerNorm, x: Tensor, h: int, w: int) -> Tensor:
        for blk in blocks:
            x = blk(x, h, w)
        return _to_map(norm(x), h, w)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        x1, h1, w1 = self.patch_embed1(x)  # stage 1: (B, H/4 * W/4, d0)
        x2, h2, w2 = self.mini_patch_embed1(_to_map(x1, h1, w1))
        x1 = self._run(self.block1, self.norm1, x1, h1, w1)
        x2 = self._run(self.patch_block1, self.pnorm1, x2, h2, w2)
        outs.append(x1)
        for i in (2, 3):  # stages 2 and 3: main path + intra-patch path
            x1, h1, w1 = getattr(self, f"patch_embed{i}")(x1)
            x1 = _to_map(x1, h1, w1) + x2
            x2, h2, w2 = getattr(self, f"mini_patch_embed{i}")(x1)
            x1 = self._run(getattr(self, f"block{i}"), getattr(self, f"norm{i}"), x1.flatten(2).transpose(1, 2), h1, w1)
            outs.append(x1)
            x2 = self._run(getattr(self, f"patch_block{i}"), getattr(self, f"pnorm{i}"), x2, h2, w2)
        x1, h1, w1 = self.patch_embed4(x1)  # stage 4
        x1 = _to_map(x1, h1, w1) + x2
        outs.append(self._run(self.block4, self.norm4, x1.flatten(2).transpose(1, 2), h1, w1))
        return outs  # [(B, d0, H/4, W/4), (B, d1, H/8, ..), (B, d2, H/16, ..), (B, d3, H/32, ..)]


class Decoder(nn.Module):
    """One stride-2 patch embedding and transformer blocks whose queries are learned weather-type embeddings."""

    def __init__(self, dim: int, heads: int, mlp: float, depth: int, task_queries: int):
        super().__init__()
        self.patch_embed1 = PatchEmbed(3, 2, dim, dim)
        self.block1 = _blocks(depth, dim, heads, mlp, 1, task_queries)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = self.patch_embed1(x)  # (B, H/64 * W/64, d3)
        for blk in self.block1:
            x = blk(x, h, w)
        return _to_map(self.norm1(x), h, w)


class UpConv(nn.Module):
    """4x4 stride-2 transposed conv (padding 1): exact 2x upsampling; key ``conv2d``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv2d = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2d(x)


class ConvLayer(nn.Module):
    """3x3 conv with bias; key ``conv2d``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv2d = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2d(x)


class ResidualBlock(nn.Module):
    """x + 0.1 * conv(relu(conv(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels)
        self.conv2 = ConvLayer(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x))) * 0.1


class ConvTail(nn.Module):
    """Convolutional projection decoder: transposed convs up to full size with encoder skips."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        d0, d1, d2, d3 = dims
        self.convd32x = UpConv(d3, d3)
        self.convd16x = UpConv(d3, d2)
        self.dense_4 = nn.Sequential(ResidualBlock(d2))
        self.convd8x = UpConv(d2, d1)
        self.dense_3 = nn.Sequential(ResidualBlock(d1))
        self.convd4x = UpConv(d1, d0)
        self.dense_2 = nn.Sequential(ResidualBlock(d0))
        self.convd2x = UpConv(d0, 16)
        self.dense_1 = nn.Sequential(ResidualBlock(16))
        self.convd1x = UpConv(16, 8)
        self.conv_output = ConvLayer(8, 3)  # built but unused by the official forward

    def forward(self, enc: list[Tensor], dec: Tensor) -> Tensor:
        # the official code crops one row / column when the upsampled map overshoots its skip
        res16 = crop_to(self.convd32x(dec), enc[3].shape[-2:]) + enc[3]  # (B, d3, H/32, W/32)
        res16 = crop_to(self.convd16x(res16), enc[2].shape[-2:])
        res8 = self.convd8x(self.dense_4(res16) + enc[2])
        res4 = self.convd4x(self.dense_3(res8) + enc[1])
        res2 = self.convd2x(self.dense_2(res4) + enc[0])
        return self.convd1x(self.dense_1(res2))  # (B, 8, H, W)


class TransWeather(nn.Module):
    """Encoder -> weather-query decoder -> convolutional tail -> tanh; official ``Transweather()`` by default."""

    multiple = 16

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        enc_heads: Sequence[int] = (1, 2, 4, 4),
        enc_mlp_ratios: Sequence[float] = (2, 2, 2, 2),
        enc_depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (4, 2, 2, 1),
        dec_heads: int = 8,
        dec_mlp_ratio: float = 4,
        dec_depth: int = 3,
        task_queries: int = 48,
    ):
        super().__init__()
        if not (len(embed_dims) == len(enc_heads) == len(enc_mlp_ratios) == len(enc_depths) == len(sr_ratios) == 4):
            raise ValueError(
                "TransWeather: `embed_dims`, `enc_heads`, `enc_mlp_ratios`, `enc_depths`, `sr_ratios` need 4 entries each"
            )
        self.Tenc = Encoder(embed_dims, enc_heads, enc_mlp_ratios, enc_depths, sr_ratios)
        self.Tdec = Decoder(embed_dims[3], dec_heads, dec_mlp_ratio, dec_depth, task_queries)
        self.convtail = ConvTail(embed_dims)
        self.clean = ConvLayer(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x, size = pad_to_multiple(x, self.multiple)  # (B, 3, H16, W16), values in [-1, 1]
        enc = self.Tenc(x)
        out = torch.tanh(self.clean(self.convtail(enc, self.Tdec(enc[3]))))
        return crop_to(out, size)
