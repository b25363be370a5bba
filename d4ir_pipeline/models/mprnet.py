"""MPRNet (Zamir et al., CVPR 2021, arXiv:2102.02808), deraining variant, written for this project.

Parameter names follow the official ``Deraining/MPRNet.py`` of swz30/MPRNet, so the
released ``model_deraining.pth`` (``{"state_dict": ..., "epoch": ..., "optimizer": ...}``;
keys may carry DataParallel's ``module.``) loads strictly. As in the official code one
PReLU is shared by every channel-attention block, so its weight appears under many
state_dict keys but counts once as a parameter. The forward returns the three stage
outputs ``[stage3, stage2, stage1]``; the first is the restoration
(``model_io("mprnet").output_index == 0``). Input of any size: padded (reflect) to a
multiple of 8 (the official ``demo.py`` does the same), cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiling import ResizeBy, crop_to, pad_to_multiple

__all__ = ["MPRNet"]


def conv(cin: int, cout: int, kernel_size: int, bias: bool = False, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias, stride=stride)


class CALayer(nn.Module):
    """Squeeze-excitation channel attention; keys ``conv_du.0``, ``conv_du.2``."""

    def __init__(self, channel: int, reduction: int, bias: bool):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel // reduction, channel, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(F.adaptive_avg_pool2d(x, 1))


class CAB(nn.Module):
    """Channel attention block: conv -> act -> conv -> CA, plus the input."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module):
        super().__init__()
        self.CA = CALayer(n_feat, reduction, bias)
        self.body = nn.Sequential(conv(n_feat, n_feat, kernel_size, bias), act, conv(n_feat, n_feat, kernel_size, bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.CA(self.body(x)) + x


class SAM(nn.Module):
    """Supervised attention module: a stage image (``img``) and features gated by it."""

    def __init__(self, n_feat: int, kernel_size: int, bias: bool):
        super().__init__()
        self.conv1 = conv(n_feat, n_feat, kernel_size, bias)
        self.conv2 = conv(n_feat, 3, kernel_size, bias)
        self.conv3 = conv(3, n_feat, kernel_size, bias)

    def forward(self, x: Tensor, x_img: Tensor) -> tuple[Tensor, Tensor]:
        img = self.conv2(x) + x_img
        return self.conv1(x) * torch.sigmoid(self.conv3(img)) + x, img


class DownSample(nn.Module):
    """Bilinear 0.5x (the official ``nn.Upsample(scale_factor=0.5)``, as integer sizes) then 1x1 conv (C -> C + s); key ``down.1``."""

    def __init__(self, cin: int, s: int):
        super().__init__()
        self.down = nn.Sequential(ResizeBy(down=2, mode="bilinear"), nn.Conv2d(cin, cin + s, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x)


class UpSample(nn.Module):
    """Bilinear 2x then 1x1 conv (C + s -> C); key ``up.1``; ``SkipUpSample`` adds a skip."""

    def __init__(self, cin: int, s: int):
        super().__init__()
        self.up = nn.Sequential(ResizeBy(up=2, mode="bilinear"), nn.Conv2d(cin + s, cin, 1, bias=False))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        return x if skip is None else x + skip


def _cabs(n: int, c: int, k: int, r: int, bias: bool, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(*[CAB(c, k, r, bias, act) for _ in range(n)])


class Encoder(nn.Module):
    """Three-level U-Net encoder; with ``csff`` it fuses the previous stage's encoder and decoder features."""

    def __init__(self, n_feat: int, k: int, r: int, act: nn.Module, bias: bool, s: int, csff: bool):
        super().__init__()
        c1, c2, c3 = n_feat, n_feat + s, n_feat + 2 * s
        self.encoder_level1 = _cabs(2, c1, k, r, bias, act)
        self.encoder_level2 = _cabs(2, c2, k, r, bias, act)
        self.encoder_level3 = _cabs(2, c3, k, r, bias, act)
        self.down12 = DownSample(c1, s)
        self.down23 = DownSample(c2, s)
        self.csff = csff
        if csff:
            for i, c in enumerate((c1, c2, c3), start=1):
                setattr(self, f"csff_enc{i}", nn.Conv2d(c, c, kernel_size=1, bias=bias))
                setattr(self, f"csff_dec{i}", nn.Conv2d(c, c, kernel_size=1, bias=bias))

    def forward(self, x: Tensor, enc_outs: list[Tensor] | None = None, dec_outs: list[Tensor] | None = None):
        fuse = self.csff and enc_outs is not None and dec_outs is not None
        outs = []
        for i, level in enumerate((self.encoder_level1, self.encoder_level2, self.encoder_level3)):
            if i:
                x = (self.down12 if i == 1 else self.down23)(x)
            x = level(x)
            if fuse:
                x = x + getattr(self, f"csff_enc{i + 1}")(enc_outs[i]) + getattr(self, f"csff_dec{i + 1}")(dec_outs[i])
            outs.append(x)
        return outs  # [(B, c1, H, W), (B, c2, H/2, W/2), (B, c3, H/4, W/4)]


class Decoder(nn.Module):
    """Three-level U-Net decoder with channel-attention skips."""

    def __init__(self, n_feat: int, k: int, r: int, act: nn.Module, bias: bool, s: int):
        super().__init__()
        c1, c2, c3 = n_feat, n_feat + s, n_feat + 2 * s
        self.decoder_level1 = _cabs(2, c1, k, r, bias, act)
        self.decoder_level2 = _cabs(2, c2, k, r, bias, act)
        self.decoder_level3 = _cabs(2, c3, k, r, bias, act)
        self.skip_attn1 = CAB(c1, k, r, bias, act)
        self.skip_attn2 = CAB(c2, k, r, bias, act)
        self.up21 = UpSample(c1, s)
        self.up32 = UpSample(c2, s)

    def forward(self, outs: list[Tensor]) -> list[Tensor]:
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class ORB(nn.Module):
    """Original-resolution block: CABs and a conv, plus the input."""

    def __init__(self, n_feat: int, k: int, r: int, act: nn.Module, bias: bool, num_cab: int):
        super().__init__()
        self.body = nn.Sequential(*[CAB(n_feat, k, r, bias, act) for _ in range(num_cab)], conv(n_feat, n_feat, k))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ORSNet(nn.Module):
    """Stage 3: full-resolution subnetwork fed with stage-2 encoder / decoder features."""

    def __init__(self, n_feat: int, s_ors: int, k: int, r: int, act: nn.Module, bias: bool, s: int, num_cab: int):
        super().__init__()
        c = n_feat + s_ors
        self.orb1 = ORB(c, k, r, act, bias, num_cab)
        self.orb2 = ORB(c, k, r, act, bias, num_cab)
        self.orb3 = ORB(c, k, r, act, bias, num_cab)
        self.up_enc1 = UpSample(n_feat, s)
        self.up_dec1 = UpSample(n_feat, s)
        self.up_enc2 = nn.Sequential(UpSample(n_feat + s, s), UpSample(n_feat, s))
        self.up_dec2 = nn.Sequential(UpSample(n_feat + s, s), UpSample(n_feat, s))
        for i in (1, 2, 3):
            setattr(self, f"conv_enc{i}", nn.Conv2d(n_feat, c, kernel_size=1, bias=bias))
            setattr(self, f"conv_dec{i}", nn.Conv2d(n_feat, c, kernel_size=1, bias=bias))

    def forward(self, x: Tensor, enc: list[Tensor], dec: list[Tensor]) -> Tensor:
        x = self.orb1(x) + self.conv_enc1(enc[0]) + self.conv_dec1(dec[0])
        x = self.orb2(x) + self.conv_enc2(self.up_enc1(enc[1])) + self.conv_dec2(self.up_dec1(dec[1]))
        return self.orb3(x) + self.conv_enc3(self.up_enc2(enc[2])) + self.conv_dec3(self.up_dec2(dec[2]))


class MPRNet(nn.Module):
    """Three-stage progressive restoration: 4 patches, 2 patches, full image; returns [stage3, stage2, stage1]."""

    multiple = 8  # the image is split in 2x2 patches, each goes through two 2x downsamplings

    def __init__(
        self,
        in_c: int = 3,
        out_c: int = 3,
        n_feat: int = 40,
        scale_unetfeats: int = 20,
        scale_orsnetfeats: int = 16,
        num_cab: int = 8,
        kernel_size: int = 3,
        reduction: int = 4,
        bias: bool = False,
    ):
        super().__init__()
        k, r, s = kernel_size, reduction, scale_unetfeats
        act = nn.PReLU()  # one module shared by every CAB, as in the official code
        for i in (1, 2, 3):
            setattr(self, f"shallow_feat{i}", nn.Sequential(conv(in_c, n_feat, k, bias), CAB(n_feat, k, r, bias, act)))
        self.stage1_encoder = Encoder(n_feat, k, r, act, bias, s, csff=False)
        self.stage1_decoder = Decoder(n_feat, k, r, act, bias, s)
        self.stage2_encoder = Encoder(n_feat, k, r, act, bias, s, csff=True)
        self.stage2_decoder = Decoder(n_feat, k, r, act, bias, s)
        self.stage3_orsnet = ORSNet(n_feat, scale_orsnetfeats, k, r, act, bias, s, num_cab)
        self.sam12 = SAM(n_feat, kernel_size=1, bias=bias)
        self.sam23 = SAM(n_feat, kernel_size=1, bias=bias)
        self.concat12 = conv(n_feat * 2, n_feat, k, bias)
        self.concat23 = conv(n_feat * 2, n_feat + scale_orsnetfeats, k, bias)
        self.tail = conv(n_feat + scale_orsnetfeats, out_c, k, bias)

    def forward(self, img: Tensor) -> list[Tensor]:
        x3, size = pad_to_multiple(img, self.multiple)  # (B, 3, H8, W8)
        h, w = x3.shape[-2:]
        top, bot = x3[:, :, : h // 2], x3[:, :, h // 2 :]
        quads = [top[..., : w // 2], top[..., w // 2 :], bot[..., : w // 2], bot[..., w // 2 :]]

        # 1. stage 1: four quarter patches through the stage-1 U-Net, joined into halves
        feats = [self.stage1_encoder(self.shallow_feat1(q)) for q in quads]  # 4 x [3 levels]
        feat1_top = [torch.cat(p, 3) for p in zip(feats[0], feats[1], strict=True)]
        feat1_bot = [torch.cat(p, 3) for p in zip(feats[2], feats[3], strict=True)]
        res1_top, res1_bot = self.stage1_decoder(feat1_top), self.stage1_decoder(feat1_bot)
        sam_top, img1_top = self.sam12(res1_top[0], top)
        sam_bot, img1_bot = self.sam12(res1_bot[0], bot)
        stage1_img = torch.cat([img1_top, img1_bot], 2)

        # 2. stage 2: two half patches, fused with stage-1 features
        x2_top = self.concat12(torch.cat([self.shallow_feat2(top), sam_top], 1))
        x2_bot = self.concat12(torch.cat([self.shallow_feat2(bot), sam_bot], 1))
        feat2_top = self.stage2_encoder(x2_top, feat1_top, res1_top)
        feat2_bot = self.stage2_encoder(x2_bot, feat1_bot, res1_bot)
        feat2 = [torch.cat(p, 2) for p in zip(feat2_top, feat2_bot, strict=True)]
        res2 = self.stage2_decoder(feat2)
        sam3, stage2_img = self.sam23(res2[0], x3)

        # 3. stage 3: the full image at original resolution
        x = self.concat23(torch.cat([self.shallow_feat3(x3), sam3], 1))
        stage3_img = self.tail(self.stage3_orsnet(x, feat2, res2)) + x3
        return [crop_to(t, size) for t in (stage3_img, stage2_img, stage1_img)]
