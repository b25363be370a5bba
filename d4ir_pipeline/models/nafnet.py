"""NAFNet (Chen et al., ECCV 2022, arXiv:2204.04676), written for this project.

Parameter names follow megvii-research/NAFNet ``basicsr/models/archs/NAFNet_arch.py``
(``intro``, ``encoders.i.j.conv1..conv5``, ``sca.1``, ``norm1/2``, ``beta``, ``gamma``,
``downs``, ``ups.i.0``, ``middle_blks``, ``decoders``, ``ending``), so released
``NAFNet-*.pth`` files (``{"params": state_dict}``) load strictly. Differences from the
official forward, none of which change keys: inputs are padded with ``reflect`` (the
official code pads with zeros) and the ``NAFNetLocal`` test-time local pooling (TLC) of
the GoPro configs is not reproduced (global pooling is used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .tiling import crop_to, pad_to_multiple

__all__ = ["NAFNet", "NAFBlock", "LayerNorm2d", "layer_norm_2d"]


def _in_place_ok() -> bool:
    """True in plain inference (no autograd, no tracing or export): temporaries may be reused.

    The in-place forwards below run the same element-wise operations in the same order as
    the out-of-place ones (only operands of ``+`` and ``*`` swap sides, which IEEE arithmetic
    allows), so outputs are bit-identical, and the live tensors of a ``nafnet_s`` forward peak
    40 % lower (320 instead of 536 bytes per pixel). Tracing and export keep the
    out-of-place graph.
    """
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
    return not (torch.is_grad_enabled() or tracing)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (B, C, H, W), eps 1e-6; keys ``weight``, ``bias``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if not _in_place_ok():
            return layer_norm_2d(x, self.weight, self.bias, self.eps)
        d = x - x.mean(1, keepdim=True)
        d.div_((d.pow(2).mean(1, keepdim=True) + self.eps).sqrt())
        return d.mul_(self.weight.view(1, -1, 1, 1)).add_(self.bias.view(1, -1, 1, 1))


def layer_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the channels of (B, C, H, W), out of place (training, tracing and export)."""
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    return weight.view(1, -1, 1, 1) * y + bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split channels in two halves and multiply them."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Nonlinear-activation-free block: LN -> 1x1 -> dw3x3 -> gate -> SCA -> 1x1, then LN -> FFN."""

    def __init__(self, c: int, DW_Expand: int = 2, FFN_Expand: int = 2, drop_out_rate: float = 0.0):  # noqa: N803
        super().__init__()
        dw = c * DW_Expand
        self.conv1 = nn.Conv2d(c, dw, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(dw, dw, kernel_size=3, padding=1, groups=dw, bias=True)
        self.conv3 = nn.Conv2d(dw // 2, c, kernel_size=1, bias=True)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, kernel_size=1, bias=True))
        self.sg = SimpleGate()
        ffn = FFN_Expand * c
        self.conv4 = nn.Conv2d(c, ffn, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(ffn // 2, c, kernel_size=1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        # zero-initialised residual scales: each block starts as the identity
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: Tensor) -> Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))  # (B, dw/2, H, W)
        if _in_place_ok():
            x = self.conv3(x.mul_(self.sca(x)))
            y = self.dropout1(x).mul_(self.beta).add_(inp)
            x = self.conv5(self.sg(self.conv4(self.norm2(y))))
            return self.dropout2(x).mul_(self.gamma).add_(y)
        x = self.conv3(x * self.sca(x))
        y = inp + self.dropout1(x) * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + self.dropout2(x) * self.gamma


class NAFNet(nn.Module):
    """U-shaped NAFNet: intro conv, encoder levels (blocks + strided 2x2 conv), middle, decoders."""

    def __init__(
        self,
        img_channel: int = 3,
        width: int = 32,
        middle_blk_num: int = 12,
        enc_blk_nums: Sequence[int] = (2, 2, 4, 8),
        dec_blk_nums: Sequence[int] = (2, 2, 2, 2),
    ):
        super().__init__()
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(
                f"`enc_blk_nums` {list(enc_blk_nums)} and `dec_blk_nums` {list(dec_blk_nums)} need the same length"
            )
        if width < 1:
            raise ValueError(f"`width` = {width}: expected >= 1")
        self.intro = nn.Conv2d(img_channel, width, kernel_size=3, padding=1, bias=True)
        self.ending = nn.Conv2d(width, img_channel, kernel_size=3, padding=1, bias=True)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, kernel_size=2, stride=2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan) for _ in range(middle_blk_num)])
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, kernel_size=1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))
        self.multiple = 2 ** len(self.encoders)

    def forward(self, inp: Tensor) -> Tensor:
        x0, size = pad_to_multiple(inp, self.multiple)  # (B, 3, Hm, Wm)
        x = self.intro(x0)  # (B, width, Hm, Wm)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)  # (B, 2C, H/2, W/2)
        x = self.middle_blks(x)
        in_place = _in_place_ok()
        for decoder, up in zip(self.decoders, self.ups, strict=True):
            x = up(x)  # each skip is dropped once used (a local name would keep it alive in the decoder)
            x = decoder(x.add_(skips.pop()) if in_place else x + skips.pop())  # (B, C/2, 2H, 2W)
        x = self.ending(x)
        return crop_to(x.add_(x0) if in_place else x + x0, size)
