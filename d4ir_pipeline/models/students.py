"""Student families of different cost: a plain residual CNN and a small U-Net.

(The third family, small NAFNets, reuses :class:`~d4ir_pipeline.models.nafnet.NAFNet`.)
All predict a residual added to the input and accept any input size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .tiling import crop_to, pad_to_multiple

__all__ = ["ResCNN", "UNetS", "LocalCNN"]


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, added to the input."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ResCNN(nn.Module):
    """Full-resolution residual CNN (EDSR-like, no BN): head conv, ``blocks`` ResBlocks, tail conv.

    Every layer runs at full resolution, so it is cheap in parameters but not in MACs,
    and its receptive field is local: ``2 * (2 * blocks + 2) + 1`` pixels wide.
    """

    multiple = 1

    def __init__(self, in_channels: int = 3, width: int = 16, blocks: int = 6):
        super().__init__()
        if width < 1 or blocks < 0:
            raise ValueError(f"`width` = {width}, `blocks` = {blocks}: expected width >= 1, blocks >= 0")
        self.head = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, in_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.head(x)  # (B, width, H, W)
        return x + self.tail(self.body(f) + f)


class LocalCNN(nn.Module):
    """``layers`` 3x3 convolutions with ReLU: a model whose receptive-field radius is ``layers`` px.

    Used to check tiled inference (exact when the radius is at most ``overlap // 4``).
    """

    multiple = 1

    def __init__(self, in_channels: int = 3, width: int = 16, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"`layers` = {layers}: expected >= 1")
        mods: list[nn.Module] = []
        c = in_channels
        for i in range(layers):
            out = in_channels if i == layers - 1 else width
            mods.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
            c = out
        self.body = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class UNetS(nn.Module):
    """Small U-Net: ``depth`` levels of double convs, strided-conv down, transposed-conv up, skips."""

    def __init__(self, in_channels: int = 3, base: int = 16, depth: int = 3):
        super().__init__()
        if base < 1 or depth < 1:
            raise ValueError(f"`base` = {base}, `depth` = {depth}: expected both >= 1")
        chans = [base * 2**i for i in range(depth + 1)]  # e.g. 16, 32, 64, 128
        self.inc = _double_conv(in_channels, chans[0])
        self.downs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, stride=2, padding=1) for i in range(depth)
        )
        self.enc = nn.ModuleList(_double_conv(chans[i + 1], chans[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], kernel_size=2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(_double_conv(chans[i] * 2, chans[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(chans[0], in_channels, kernel_size=1)
        self.multiple = 2**depth

    def forward(self, inp: Tensor) -> Tensor:
        x0, size = pad_to_multiple(inp, self.multiple)  # (B, 3, Hm, Wm)
        x = self.inc(x0)
        skips = [x]
        for down, enc in zip(self.downs, self.enc, strict=True):
            x = enc(down(x))  # (B, 2C, H/2, W/2)
            skips.append(x)
        skips.pop()  # the deepest level is x itself
        for up, dec in zip(self.ups, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], 1))  # (B, C/2, 2H, 2W)
        return crop_to(x0 + self.outc(x), size)
