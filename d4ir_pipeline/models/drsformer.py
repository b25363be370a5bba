"""DRSformer (Chen et al., CVPR 2023), sparse-transformer deraining, written for this project.

Parameter names follow the official ``basicsr/models/archs/DRSformer_arch.py`` of
cschenxiang/DRSformer, so the released ``deraining.pth`` files (``{"params": state_dict}``)
load strictly. The default keeps the two mixture-of-experts feature compensators (MEFC:
``encoder_level0`` and ``refinement``) used for the Rain200H, DID-Data and DDN-Data
models; the Rain200L and SPA-Data models were trained without them
(``DRSformer_arch_200L+SPA.py``): pass ``mefc=False``. Input of any size: padded (reflect)
to a multiple of 8 (as the official ``test.py``), cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .restormer import Attention, OverlapPatchEmbed, TransformerBlock, add_levels, decode, encode
from .tiling import crop_to, pad_to_multiple

__all__ = ["DRSformer", "TopKAttention", "MixedScaleFeedForward"]


class MixedScaleFeedForward(nn.Module):
    """Mixed-scale feed-forward network (MSFN): parallel 3x3 / 5x5 depthwise branches, crossed and fused."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hid = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hid * 2, kernel_size=1, bias=bias)
        self.dwconv3x3 = nn.Conv2d(hid * 2, hid * 2, kernel_size=3, padding=1, groups=hid * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hid * 2, hid * 2, kernel_size=5, padding=2, groups=hid * 2, bias=bias)
        self.dwconv3x3_1 = nn.Conv2d(hid * 2, hid, kernel_size=3, padding=1, groups=hid, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hid * 2, hid, kernel_size=5, padding=2, groups=hid, bias=bias)
        self.project_out = nn.Conv2d(hid * 2, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        a3, b3 = F.relu(self.dwconv3x3(x)).chunk(2, dim=1)
        a5, b5 = F.relu(self.dwconv5x5(x)).chunk(2, dim=1)
        x1 = F.relu(self.dwconv3x3_1(torch.cat([a3, a5], dim=1)))
        x2 = F.relu(self.dwconv5x5_1(torch.cat([b3, b5], dim=1)))
        return self.project_out(torch.cat([x1, x2], dim=1))


class TopKAttention(Attention):
    """Top-k sparse channel attention (TKSA): four top-k masks (1/2, 2/3, 3/4, 4/5), mixed by learned weights."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__(dim, num_heads, bias)
        for i in (1, 2, 3, 4):
            setattr(self, f"attn{i}", nn.Parameter(torch.tensor([0.2])))

    def forward(self, x: Tensor) -> Tensor:
        attn, v = self.scores(x)  # (B, heads, C/h, C/h), (B, heads, C/h, HW)
        ch = attn.shape[-1]
        out = 0
        for i, keep in enumerate((int(ch / 2), int(ch * 2 / 3), int(ch * 3 / 4), int(ch * 4 / 5)), start=1):
            mask = torch.zeros_like(attn).scatter_(-1, torch.topk(attn, k=keep, dim=-1)[1], 1.0)
            sparse = torch.where(mask > 0, attn, torch.full_like(attn, float("-inf"))).softmax(dim=-1)
            out = out + (sparse @ v) * getattr(self, f"attn{i}")
        return self.project_out(out.reshape(x.shape))


class SparseBlock(TransformerBlock):
    """Sparse transformer block (STB): norm1 -> TKSA -> residual, norm2 -> MSFN -> residual."""

    attention = TopKAttention
    feed_forward = MixedScaleFeedForward


# --- mixture of experts feature compensator (MEFC) -------------------------------------

OPERATIONS = ("sep_conv_1x1", "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5")
OPERATIONS += ("dil_conv_7x7", "avg_pool_3x3")


class SepConv(nn.Module):
    """Two (depthwise k x k, pointwise) pairs with a ReLU between; keys ``op.0``, ``op.1``, ``op.3``, ``op.4``."""

    def __init__(self, c: int, k: int):
        super().__init__()
        p = k // 2
        self.op = nn.Sequential(
            nn.Conv2d(c, c, k, padding=p, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c, c, k, padding=p, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """Dilated (2) depthwise k x k then pointwise; keys ``op.0``, ``op.1``."""

    def __init__(self, c: int, k: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c, c, k, padding=k - 1, dilation=2, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def _expert(name: str, c: int) -> nn.Module:
    kind, _, size = name.rpartition("_")
    k = int(size.split("x")[0])
    if kind == "avg_pool":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return SepConv(c, k) if kind == "sep_conv" else DilConv(c, k)


class OperationLayer(nn.Module):
    """Eight experts weighted per sample, concatenated, fused by a 1x1 conv + ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self._ops = nn.ModuleList([_expert(o, c) for o in OPERATIONS])
        self._out = nn.Sequential(nn.Conv2d(c * len(OPERATIONS), c, 1, bias=False), nn.ReLU())

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:  # weights (B, n_ops)
        states = [op(x) * w.view(-1, 1, 1, 1) for w, op in zip(weights.transpose(1, 0), self._ops, strict=True)]
        return self._out(torch.cat(states, dim=1))


class ReLUConv(nn.Module):
    """1x1 conv then ReLU; key ``op.0``."""

    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class GroupOLs(nn.Module):
    """``steps`` operation layers, each residual."""

    def __init__(self, steps: int, c: int):
        super().__init__()
        self.preprocess = ReLUConv(c)
        self._ops = nn.ModuleList([OperationLayer(c) for _ in range(steps)])

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:  # weights (B, steps, n_ops)
        x = self.preprocess(x)
        for i, op in enumerate(self._ops):
            x = F.relu(op(x, weights[:, i, :]) + x)
        return x


class OALayer(nn.Module):
    """Operation attention: pooled features -> MLP -> (B, steps, n_ops) logits; keys ``ca_fc.0``, ``ca_fc.2``."""

    def __init__(self, channel: int, k: int, num_ops: int):
        super().__init__()
        self.k, self.num_ops = k, num_ops
        self.ca_fc = nn.Sequential(
            nn.Linear(channel, k * num_ops * 2), nn.ReLU(), nn.Linear(k * num_ops * 2, k * num_ops)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.ca_fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return y.view(-1, self.k, self.num_ops)


class MEFC(nn.Module):
    """Mixture of experts feature compensator (official ``subnet``: ``layers`` = [OALayer, GroupOLs])."""

    def __init__(self, dim: int, steps: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([OALayer(dim, steps, len(OPERATIONS)), GroupOLs(steps, dim)])

    def forward(self, x: Tensor) -> Tensor:
        weights = F.softmax(self.layers[0](x), dim=-1)
        return self.layers[1](x, weights)


class DRSformer(nn.Module):
    """Restormer-shaped encoder-decoder of sparse transformer blocks with MEFC before and after."""

    multiple = 8

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",  # noqa: N803 - the official keyword, so YAML configs pass through
        mefc: bool = True,
    ):
        super().__init__()
        ln, ffn = LayerNorm_type, ffn_expansion_factor
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.mefc = mefc
        if mefc:
            self.encoder_level0 = MEFC(dim)
        add_levels(self, "DRSformer", SparseBlock, dim, num_blocks, heads, ffn, bias, ln)
        if mefc:
            self.refinement = MEFC(dim * 2)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)
        self.residual = inp_channels == out_channels

    def forward(self, inp_img: Tensor) -> Tensor:
        x, size = pad_to_multiple(inp_img, self.multiple)  # (B, 3, H8, W8)
        e1 = self.patch_embed(x)  # (B, dim, H8, W8)
        e1, e2, e3, lat = encode(self, self.encoder_level0(e1) if self.mefc else e1)
        d1 = decode(self, lat, e3, e2, e1)  # (B, 2dim, H8, W8)
        d1 = self.refinement(d1) if self.mefc else d1
        out = self.output(d1) + x if self.residual else self.output(d1)
        return crop_to(out, size)
