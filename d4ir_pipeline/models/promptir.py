"""PromptIR (Potlapalli et al., NeurIPS 2023, arXiv:2306.13090), written for this project.

All-in-one restoration (noise / rain / haze): a Restormer backbone whose decoder
levels are conditioned on prompts generated from the features (``PromptGenBlock``).
Parameter names follow va1shn9v/PromptIR ``net/model.py`` with ``decoder=True`` (the
released all-in-one ``model.ckpt``, a Lightning checkpoint whose ``state_dict`` keys
start with ``net.``; the loader unwraps both). The official module also creates
``chnl_reduce1/2/3`` and ``reduce_noise_channel_1/2/3`` that its forward never uses:
they are kept here so the official state_dict loads strictly.

The official code hard-codes the prompt widths for ``dim=48``; here they are the
arguments ``prompt_dims`` / ``prompt_sizes`` / ``prompt_len`` (official defaults), which
lets tests build a small PromptIR with the same structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .restormer import Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, check_heads
from .tiling import crop_to, pad_to_multiple

__all__ = ["PromptIR", "PromptGenBlock"]


class PromptGenBlock(nn.Module):
    """Mix ``prompt_len`` learned prompts by softmax weights from pooled features, resize, 3x3 conv."""

    def __init__(self, prompt_dim: int = 128, prompt_len: int = 5, prompt_size: int = 96, lin_dim: int = 192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, L)
        prompts = self.prompt_param[0]  # (L, D, S, S)
        prompt = torch.einsum("bl,ldhw->bdhw", weights, prompts)  # (B, D, S, S)
        prompt = F.interpolate(prompt, (h, w), mode="bilinear")  # (B, D, H, W)
        return self.conv3x3(prompt)


class PromptIR(nn.Module):
    """Restormer encoder-decoder with prompt blocks before decoder levels 3, 2 and 1."""

    multiple = 8

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
        LayerNorm_type: str = "WithBias",  # noqa: N803 - official keyword
        decoder: bool = True,
        prompt_dims: Sequence[int] = (64, 128, 320),
        prompt_sizes: Sequence[int] = (64, 32, 16),
        prompt_len: int = 5,
    ):
        super().__init__()
        if not decoder:
            raise ValueError(
                "`decoder` = False: the official PromptIR forward only works with decoder=True "
                "(the released checkpoint was trained with it); use build_model('restormer') for no prompts"
            )
        if len(num_blocks) != 4 or len(heads) != 4 or len(prompt_dims) != 3 or len(prompt_sizes) != 3:
            raise ValueError("`num_blocks`/`heads` need 4 entries and `prompt_dims`/`prompt_sizes` need 3")
        p1, p2, p3 = prompt_dims
        ln, ffn = LayerNorm_type, ffn_expansion_factor
        for i, (c, hd) in enumerate(zip((dim, dim * 2, dim * 4, dim * 8), heads, strict=True)):
            check_heads(f"PromptIR level {i + 1}", c, hd)
        for name, c in (("noise_level3", dim * 8 + p3), ("noise_level2", dim * 4 + p2), ("noise_level1", dim * 2 + p1)):
            check_heads(f"PromptIR {name}", c, heads[2])

        def stage(n: int, c: int, h: int) -> nn.Sequential:
            return nn.Sequential(*[TransformerBlock(c, h, ffn, bias, ln) for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.decoder = decoder
        self.prompt1 = PromptGenBlock(p1, prompt_len, prompt_sizes[0], lin_dim=dim * 2)
        self.prompt2 = PromptGenBlock(p2, prompt_len, prompt_sizes[1], lin_dim=dim * 4)
        self.prompt3 = PromptGenBlock(p3, prompt_len, prompt_sizes[2], lin_dim=dim * 8)
        # present in the official state_dict, unused by its forward (kept for strict loading)
        unused_c3 = 256  # the official constant
        self.chnl_reduce1 = nn.Conv2d(p1, p1, kernel_size=1, bias=bias)
        self.chnl_reduce2 = nn.Conv2d(p2, p2, kernel_size=1, bias=bias)
        self.chnl_reduce3 = nn.Conv2d(p3, unused_c3, kernel_size=1, bias=bias)
        self.reduce_noise_channel_1 = nn.Conv2d(dim + p1, dim, kernel_size=1, bias=bias)
        self.encoder_level1 = stage(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = nn.Conv2d(dim * 2 + p2, dim * 2, kernel_size=1, bias=bias)
        self.encoder_level2 = stage(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = nn.Conv2d(dim * 4 + unused_c3, dim * 4, kernel_size=1, bias=bias)
        self.encoder_level3 = stage(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(num_blocks[3], dim * 8, heads[3])
        # decoder level 3: prompt on the latent, then reduce to 4*dim before upsampling
        self.up4_3 = Upsample(dim * 4)
        self.reduce_chan_level3 = nn.Conv2d(dim * 2 + dim * 4, dim * 4, kernel_size=1, bias=bias)
        self.noise_level3 = TransformerBlock(dim * 8 + p3, heads[2], ffn, bias, ln)
        self.reduce_noise_level3 = nn.Conv2d(dim * 8 + p3, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(num_blocks[2], dim * 4, heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.noise_level2 = TransformerBlock(dim * 4 + p2, heads[2], ffn, bias, ln)
        self.reduce_noise_level2 = nn.Conv2d(dim * 4 + p2, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(num_blocks[1], dim * 2, heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.noise_level1 = TransformerBlock(dim * 2 + p1, heads[2], ffn, bias, ln)
        self.reduce_noise_level1 = nn.Conv2d(dim * 2 + p1, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level1 = stage(num_blocks[0], dim * 2, heads[0])
        self.refinement = stage(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)
        self.residual = inp_channels == out_channels

    def forward(self, inp_img: Tensor) -> Tensor:
        x, size = pad_to_multiple(inp_img, self.multiple)  # (B, 3, H8, W8)
        e1 = self.encoder_level1(self.patch_embed(x))  # (B, dim, H8, W8)
        e2 = self.encoder_level2(self.down1_2(e1))  # (B, 2dim, /2)
        e3 = self.encoder_level3(self.down2_3(e2))  # (B, 4dim, /4)
        lat = self.latent(self.down3_4(e3))  # (B, 8dim, /8)
        lat = torch.cat([lat, self.prompt3(lat)], 1)  # (B, 8dim + p3, /8)
        lat = self.reduce_noise_level3(self.noise_level3(lat))  # (B, 4dim, /8)
        d3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1))  # (B, 4dim, /4)
        d3 = self.decoder_level3(d3)
        d3 = torch.cat([d3, self.prompt2(d3)], 1)  # (B, 4dim + p2, /4)
        d3 = self.reduce_noise_level2(self.noise_level2(d3))  # (B, 4dim, /4)
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1)))  # (B, 2dim, /2)
        d2 = torch.cat([d2, self.prompt1(d2)], 1)  # (B, 2dim + p1, /2)
        d2 = self.reduce_noise_level1(self.noise_level1(d2))  # (B, 2dim, /2)
        d1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(d2), e1], 1)))  # (B, 2dim, H8, W8)
        out = self.output(d1) + x if self.residual else self.output(d1)
        return crop_to(out, size)
