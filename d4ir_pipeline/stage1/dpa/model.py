"""The DPA networks: image encoders (clip | conv), the prompt adapter, and their input crops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d4ir_pipeline.common.io import (
    read_json,
)
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.config import DPAConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- models


def hf_dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype`` (``torch_dtype`` is deprecated in 5); older ones ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ConvEncoder(nn.Module):
    """A small CNN trained from scratch: stride-2 stages, GroupNorm, avg+max pooling.

    Weather shows as global statistics (haze: low contrast) and sparse local patterns
    (rain streaks, snow flakes): average pooling gives the first, max pooling the second.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), image_size: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in channels:
            layers += [
                nn.Conv2d(cin, c, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, c), c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(min(8, c), c),
                nn.SiLU(),
            ]
            cin = c
        self.body = nn.Sequential(*layers)
        self.channels = tuple(int(c) for c in channels)
        self.image_size = int(image_size)
        self.feature_dim = 2 * cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, F)."""
        h = self.body(x * 2.0 - 1.0)  # (B, C, S/2^n, S/2^n)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2C)

    def spec(self) -> dict:
        return {"kind": "conv", "channels": list(self.channels), "image_size": self.image_size}


class CLIPEncoder(nn.Module):
    """A CLIP vision tower from ``from_pretrained(path_or_hub_id)``, frozen except the last N blocks."""

    def __init__(self, model: str, *, projection: bool = True, unfreeze_last: int = 0, image_size: int = 0):
        super().__init__()
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        try:
            # float32 whatever the folder stores: transformers 5 keeps a float16 folder's dtype, and
            # unfrozen blocks must train in float32 (a float16 GradScaler refuses float16 gradients);
            # on CUDA, AMP runs the matmuls in half precision anyway
            self.clip = cls.from_pretrained(model, **{hf_dtype_kwarg(): torch.float32})
        except (OSError, ValueError) as e:
            raise D4IRError(
                f"`encoder.clip_model` = {model!r}: {cls.__name__}.from_pretrained failed ({e}). Give a local "
                "folder (save_pretrained layout) or a hub id available offline (HF_HUB_OFFLINE=1 is honoured)"
            ) from e
        self.model = model
        self.projection = projection
        cfg = self.clip.config
        n_layers = len(self.clip.vision_model.encoder.layers)
        if unfreeze_last > n_layers:
            raise D4IRError(f"`encoder.unfreeze_last` = {unfreeze_last}: the CLIP tower has only {n_layers} blocks")
        self.unfreeze_last = int(unfreeze_last)
        self.clip.requires_grad_(False).eval()
        if unfreeze_last:
            for block in self.clip.vision_model.encoder.layers[-unfreeze_last:]:
                block.requires_grad_(True)
            self.clip.vision_model.post_layernorm.requires_grad_(True)
            if projection:
                self.clip.visual_projection.requires_grad_(True)
        self.image_size = int(image_size or cfg.image_size)
        self.feature_dim = int(cfg.projection_dim if projection else cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPEncoder:
        """Frozen blocks stay in eval mode; unfrozen blocks follow ``mode``."""
        super().train(mode)
        self.clip.eval()
        if mode and self.unfreeze_last:
            for block in self.clip.vision_model.encoder.layers[-self.unfreeze_last :]:
                block.train()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, F)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.unfreeze_last > 0):
            out = self.clip(pixel_values=x.to(self.clip.dtype))
        feat = out.image_embeds if self.projection else out.pooler_output  # (B, F)
        return feat.float()

    def spec(self) -> dict:
        return {
            "kind": "clip",
            "model": self.model,
            "projection": self.projection,
            "unfreeze_last": self.unfreeze_last,
            "image_size": self.image_size,
        }


class PromptAdapter(nn.Module):
    """Feature (B, F) -> K prompt tokens (B, K, D): MLP, then LayerNorm per token (as IP-Adapter)."""

    def __init__(self, feature_dim: int, tokens: int, dim: int, hidden: int = 256):
        super().__init__()
        self.feature_dim, self.tokens, self.dim, self.hidden = int(feature_dim), int(tokens), int(dim), int(hidden)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, K, D)."""
        return self.norm(self.mlp(feat).view(feat.shape[0], self.tokens, self.dim))

    def spec(self) -> dict:
        return {"feature_dim": self.feature_dim, "tokens": self.tokens, "dim": self.dim, "hidden": self.hidden}


class DPAModel(nn.Module):
    """Encoder + adapter: images (B, 3, S, S) in [0, 1] -> prompt tokens (B, K, D)."""

    def __init__(self, encoder: nn.Module, adapter: PromptAdapter):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def tokens(self) -> int:
        return self.adapter.tokens

    @property
    def dim(self) -> int:
        return self.adapter.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, K, D) float32."""
        return self.adapter(self.encoder(x))

    def spec(self) -> dict:
        """Everything needed to rebuild the model (the weights aside)."""
        return {"encoder": self.encoder.spec(), "adapter": self.adapter.spec()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: all of a conv encoder; for CLIP only its trainable tensors."""
        state = self.state_dict()
        if isinstance(self.encoder, CLIPEncoder):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable or k.startswith("adapter.")}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], *, where: str) -> None:
        """Load :meth:`trainable_state_dict` output; any missing or extra key is an error naming ``where``."""
        want = set(self.trainable_state_dict())
        got = set(state)
        if want != got:
            missing, extra = sorted(want - got)[:5], sorted(got - want)[:5]
            raise D4IRError(f"{where}: weights do not match the model spec (missing {missing}, unexpected {extra})")
        self.load_state_dict(state, strict=False)


def build_dpa_model(spec: dict) -> DPAModel:
    """Rebuild a :class:`DPAModel` from :meth:`DPAModel.spec` (random / pre-trained weights)."""
    enc = dict(spec["encoder"])
    kind = enc.pop("kind")
    if kind not in ENCODERS:
        raise ValueError(f"encoder kind {kind!r}: expected one of {sorted(ENCODERS)}")
    encoder = ENCODERS[kind](**enc)
    ad = spec["adapter"]
    if ad["feature_dim"] != encoder.feature_dim:
        raise D4IRError(f"adapter feature_dim {ad['feature_dim']} differs from the encoder's {encoder.feature_dim}")
    return DPAModel(encoder, PromptAdapter(**ad))


def new_model(cfg: DPAConfig, dim: int) -> DPAModel:
    e = cfg.encoder
    if e.kind == "conv":
        encoder: nn.Module = ConvEncoder(e.conv_channels, image_size=e.image_size or 64)
    else:
        encoder = CLIPEncoder(e.clip_model, projection=e.clip_projection, unfreeze_last=e.unfreeze_last,
                              image_size=e.image_size)  # fmt: skip
    return DPAModel(encoder, PromptAdapter(encoder.feature_dim, cfg.adapter.tokens, dim, cfg.adapter.hidden))


def load_dpa(dpa_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[DPAModel, dict]:
    """Load a finished DPA (``dpa.json`` + ``dpa.safetensors``): ``(model in eval mode, meta)``."""
    from safetensors.torch import load_file

    dpa_dir = Path(dpa_dir)
    meta_path, weights = dpa_dir / "dpa.json", dpa_dir / "dpa.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise D4IRError(
            f"no trained DPA in {str(dpa_dir)!r} (dpa.json / dpa.safetensors missing): run `d4ir train-dpa`"
        )
    meta = read_json(meta_path)
    if not meta.get("complete"):
        raise D4IRError(f"{meta_path}: the DPA run is not complete; rerun `d4ir train-dpa` to finish it")
    model = build_dpa_model(meta["spec"])
    model.load_trainable_state_dict(load_file(str(weights)), where=str(weights))
    return model.to(device).eval(), meta


def dpa_embedding(tokens: torch.Tensor) -> torch.Tensor:
    """The DPA embedding used by the contrastive loss and the report: (B, K, D) -> (B, K*D), unit norm."""
    return F.normalize(tokens.flatten(1).float(), dim=-1)


# --------------------------------------------------------------------------- images


def prepare_image(img, load_size: int) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W) with the short side resized to ``load_size`` (bicubic).

    [design] Every image, training or test, is brought to one short side: weather in a
    photo scales with the frame (rain streaks span a fraction of it), so this puts the
    degradation of differently sized photos on one scale before cropping.
    """
    from PIL import Image

    w, h = img.size
    if min(w, h) != load_size:
        s = load_size / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, 3, h, w) -> (B, 3, size, size), antialiased bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def eval_crops(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float (n, 3, size, size) in [0, 1]: a fixed grid of ``size`` px crops.

    Pixel scale 1 (the middle of the training crops' zoom range), ceil(side / size)
    positions per axis, corners included, so the crops cover the whole image; an image
    smaller than ``size`` gives one centre square, upscaled. No randomness.
    """
    _, h, w = img.shape
    x = img.float().div(255.0)
    if min(h, w) < size:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return resize(x[None, :, top : top + s, left : left + s], size)
    tops = torch.linspace(0, h - size, max(1, math.ceil(h / size))).round().long().tolist()
    lefts = torch.linspace(0, w - size, max(1, math.ceil(w / size))).round().long().tolist()
    return torch.stack([x[:, t : t + size, lf : lf + size] for t in tops for lf in lefts])


@torch.no_grad()
def encode_images(model: DPAModel, images: Sequence[torch.Tensor], device, *, batch: int = 64) -> torch.Tensor:
    """DPA tokens of whole images: uint8 (3, H, W) each -> (N, K, D) float32 on the CPU.

    An image's tokens are the mean of its :func:`eval_crops` tokens (one prompt per photo).
    """
    model.eval()
    crops, owner = [], []
    for i, img in enumerate(images):
        c = eval_crops(img, model.image_size)
        crops.append(c)
        owner += [i] * len(c)
    if not crops:
        return torch.zeros(0, model.tokens, model.dim)
    x_all, owner_t = torch.cat(crops), torch.tensor(owner)
    toks = torch.cat([model(x_all[i : i + batch].to(device)).float().cpu() for i in range(0, len(x_all), batch)])
    out = torch.zeros(len(images), model.tokens, model.dim).index_add_(0, owner_t, toks)
    return out / torch.bincount(owner_t, minlength=len(images)).clamp(min=1).view(-1, 1, 1).float()


ENCODERS: dict[str, type[nn.Module]] = {"clip": CLIPEncoder, "conv": ConvEncoder}
