"""WGWS-Net (Zhu et al., CVPR 2023), weather-general + weather-specific restoration, written for this project.

Parameter names follow the official stage-2 network ``networks/Network_Stage2_K1_Flag.py``
of zhuyr97/WGWS-Net (the ``--flag K1`` models of its README), so the released
``Setting{1,2,3}_K1.pth`` (a raw ``state_dict``) load strictly. The network is NOT blind:
every convolution adds, for each weather k whose learned indicator is >= 0.1, a 1x1
weather-specific residual convolution scaled by ``flag[k]``; ``forward(x, flag)`` takes the
one-hot weather flag, either one flag for the batch (as the official code) or one per
sample (``(B, K)``). The flag order differs between the released settings and is part of
the registry entry (``model_io(name).weather_flag``). Inputs and outputs in [0, 1]; any
size, padded (reflect) to a multiple of 4 and cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import crop_to, pad_to_multiple, resize_by

__all__ = ["WGWSNet", "FlagConv"]

INDICATOR_THRESHOLD = 0.1  # the official BinarizeIndictator: a weather's residual is on when its indicator >= .1


class FlagConv(nn.Conv2d):
    """A shared (weather-general) conv plus K weather-specific 1x1 residual convs gated by flag and indicator.

    Keys: ``weight`` and, per weather k = 1..K, ``B{k}_residual`` (out, in, 1, 1) and
    ``B{k}_indicator`` (1,) (official ``freeze_conv``).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, num_weathers: int = 3):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.num_weathers = num_weathers
        for k in range(1, num_weathers + 1):
            self.register_parameter(f"B{k}_residual", nn.Parameter(torch.zeros(cout, cin, 1, 1)))
            self.register_parameter(f"B{k}_indicator", nn.Parameter(torch.ones(1) * 0.15))

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:  # flag (K,) or (B, K)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        for k in range(self.num_weathers):
            on = (getattr(self, f"B{k + 1}_indicator") >= INDICATOR_THRESHOLD).float()
            f = flag[k] if flag.ndim == 1 else flag[:, k].view(-1, 1, 1, 1)
            out = out + f * on * F.conv2d(x, getattr(self, f"B{k + 1}_residual"), self.bias, self.stride)
        return out


class BasicConv(nn.Module):
    """A flag conv (1x1 or 3x3, stride 1 or 2) or a plain 4x4 transposed conv, optionally followed by GELU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        relu: bool = True,
        transpose: bool = False,
        num_weathers: int = 3,
    ):
        super().__init__()
        self.transpose = transpose
        if transpose:
            self.layer = nn.ConvTranspose2d(
                cin, cout, kernel_size, padding=kernel_size // 2 - 1, stride=stride, bias=True
            )
        elif kernel_size in (1, 3):
            self.layer = FlagConv(
                cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, num_weathers=num_weathers
            )
        else:
            raise ValueError(f"WGWS BasicConv: kernel_size {kernel_size} is neither 1 nor 3 (nor transposed)")
        self.relu = relu

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        x = self.layer(x) if self.transpose else self.layer(x, flag)
        return F.gelu(x) if self.relu else x


class RDBConv(nn.Module):
    """3x3 flag conv + GELU, concatenated to its input (dense connection); key ``conv``."""

    def __init__(self, cin: int, growth: int, nw: int):
        super().__init__()
        self.conv = BasicConv(cin, growth, 3, num_weathers=nw)

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x, flag)), 1)


class RDBlock(nn.Module):
    """Residual dense block: three dense convs and a 1x1 local feature fusion (``LFF``)."""

    def __init__(self, c: int, nw: int):
        super().__init__()
        self.conv0 = RDBConv(c, c, nw)
        self.conv1 = RDBConv(2 * c, c, nw)
        self.conv2 = RDBConv(3 * c, c, nw)
        self.LFF = BasicConv(4 * c, c, 1, relu=False, num_weathers=nw)

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        out = self.conv2(self.conv1(self.conv0(x, flag), flag), flag)
        return self.LFF(out, flag) + x


class RDBStack(nn.Module):
    """``num_res`` residual dense blocks (official ``EBlock`` / ``DBlock``: keys ``layer1`` .. ``layerN``)."""

    def __init__(self, c: int, num_res: int, nw: int):
        super().__init__()
        self.num_res = num_res
        for i in range(1, num_res + 1):
            setattr(self, f"layer{i}", RDBlock(c, nw))

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        for i in range(1, self.num_res + 1):
            x = getattr(self, f"layer{i}")(x, flag)
        return x


class AFF(nn.Module):
    """Asymmetric feature fusion of the three encoder scales."""

    def __init__(self, cin: int, cout: int, nw: int):
        super().__init__()
        self.conv1 = BasicConv(cin, cout, 1, relu=True, num_weathers=nw)
        self.conv2 = BasicConv(cout, cout, 3, relu=False, num_weathers=nw)

    def forward(self, x1: Tensor, x2: Tensor, x4: Tensor, flag: Tensor) -> Tensor:
        return self.conv2(self.conv1(torch.cat([x1, x2, x4], dim=1), flag), flag)


class SCM(nn.Module):
    """Shallow convolutional module on a downscaled copy of the image."""

    def __init__(self, out_plane: int, nw: int):
        super().__init__()
        self.layer1 = BasicConv(3, out_plane // 4, 3, num_weathers=nw)
        self.layer2 = BasicConv(out_plane // 4, out_plane // 2, 1, num_weathers=nw)
        self.layer3 = BasicConv(out_plane // 2, out_plane // 2, 3, num_weathers=nw)
        self.layer4 = BasicConv(out_plane // 2, out_plane - 3, 1, num_weathers=nw)
        self.conv = BasicConv(out_plane, out_plane, 1, relu=False, num_weathers=nw)

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        out = x
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out, flag)
        return self.conv(torch.cat([x, out], dim=1), flag)


class FAM(nn.Module):
    """Feature attention module: x1 + conv(x1 * x2)."""

    def __init__(self, c: int, nw: int):
        super().__init__()
        self.merge = BasicConv(c, c, 3, relu=False, num_weathers=nw)

    def forward(self, x1: Tensor, x2: Tensor, flag: Tensor) -> Tensor:
        return x1 + self.merge(x1 * x2, flag)


class WGWSNet(nn.Module):
    """MIMO-UNet-like three-scale network of residual dense blocks with weather-specific residual convs."""

    # two 2x scales (nearest 0.5x resizes must meet the stride-2 convs exactly); the official
    # F.interpolate(scale_factor=0.5 / 0.25 / 2) are written resize_by (the same pixels, and an export keeps sizes)
    multiple = 4

    def __init__(self, base_channel: int = 20, num_res: int = 6, num_weathers: int = 3):
        # num_res blocks per level; the official class ignores its num_res and always builds 6
        super().__init__()
        c, nw = base_channel, num_weathers
        if num_res < 1:
            raise ValueError(f"`num_res` = {num_res}: expected >= 1 residual dense blocks per level")
        self.num_weathers = num_weathers
        self.Encoder = nn.ModuleList(
            [RDBStack(c, num_res, nw), RDBStack(c * 2, num_res, nw), RDBStack(c * 4, num_res, nw)]
        )
        self.feat_extract = nn.ModuleList(
            [
                BasicConv(3, c, 3, relu=True, stride=1, num_weathers=nw),
                BasicConv(c, c * 2, 3, relu=True, stride=2, num_weathers=nw),
                BasicConv(c * 2, c * 4, 3, relu=True, stride=2, num_weathers=nw),
                BasicConv(c * 4, c * 2, 4, relu=True, stride=2, transpose=True, num_weathers=nw),
                BasicConv(c * 2, c, 4, relu=True, stride=2, transpose=True, num_weathers=nw),
                BasicConv(c, 3, 3, relu=False, stride=1, num_weathers=nw),
            ]
        )
        self.Decoder = nn.ModuleList(
            [RDBStack(c * 4, num_res, nw), RDBStack(c * 2, num_res, nw), RDBStack(c, num_res, nw)]
        )
        self.Convs = nn.ModuleList(
            [BasicConv(c * 4, c * 2, 1, relu=True, num_weathers=nw), BasicConv(c * 2, c, 1, relu=True, num_weathers=nw)]
        )
        self.AFFs = nn.ModuleList([AFF(c * 7, c, nw), AFF(c * 7, c * 2, nw), AFF(c * 7, c * 4, nw)])
        self.FAM1 = FAM(c * 4, nw)
        self.SCM1 = SCM(c * 4, nw)
        self.FAM2 = FAM(c * 2, nw)
        self.SCM2 = SCM(c * 2, nw)

    def _flag(self, flag: Sequence[float] | Tensor, x: Tensor) -> Tensor:
        f = torch.as_tensor(flag, dtype=x.dtype, device=x.device)
        batch = x.shape[0]
        if f.shape not in ((self.num_weathers,), (batch, self.num_weathers)):
            raise ValueError(
                f"WGWS-Net `flag` of shape {tuple(f.shape)}: expected ({self.num_weathers},) for the whole batch or "
                f"({batch}, {self.num_weathers}) per sample (a one-hot weather flag)"
            )
        return f

    def forward(self, inp: Tensor, flag: Sequence[float] | Tensor = (1, 0, 0)) -> Tensor:
        x, size = pad_to_multiple(inp, self.multiple)  # (B, 3, H4, W4)
        f = self._flag(flag, x)
        x_2 = resize_by(x, down=2)
        x_4 = resize_by(x_2, down=2)
        z2, z4 = self.SCM2(x_2, f), self.SCM1(x_4, f)

        res1 = self.Encoder[0](self.feat_extract[0](x, f), f)  # (B, c, H, W)
        z = self.FAM2(self.feat_extract[1](res1, f), z2, f)
        res2 = self.Encoder[1](z, f)  # (B, 2c, H/2, W/2)
        z = self.FAM1(self.feat_extract[2](res2, f), z4, f)
        z = self.Encoder[2](z, f)  # (B, 4c, H/4, W/4)

        z12 = resize_by(res1, down=2)
        z14 = resize_by(res1, down=4)
        z21 = resize_by(res2, up=2)
        z24 = resize_by(res2, down=2)
        z42 = resize_by(z, up=2)
        z41 = resize_by(z42, up=2)
        z = self.AFFs[2](z14, z24, z, f)
        res2 = self.AFFs[1](z12, res2, z42, f)
        res1 = self.AFFs[0](res1, z21, z41, f)

        z = self.feat_extract[3](self.Decoder[0](z, f), f)
        z = self.Decoder[1](self.Convs[0](torch.cat([z, res2], dim=1), f), f)
        z = self.feat_extract[4](z, f)
        z = self.Decoder[2](self.Convs[1](torch.cat([z, res1], dim=1), f), f)
        return crop_to(self.feat_extract[5](z, f) + x, size)
