"""Stage one, part 1: the degradation-aware prompt adapter (DPA).

An image encoder E (``clip``: a CLIP vision tower loaded with transformers from a local
path or hub id, frozen by default; ``conv``: a small CNN trained from scratch, for the
CPU and the embedded demo) gives one feature per degraded image; an adapter A maps it
to K prompt tokens of width D (the SD UNet's cross-attention width), which diffusers
takes as ``prompt_embeds``. Training (see docs/method.md, "DPA"):

1. contrastive (supervised contrastive / InfoNCE, temperature tau) on the L2-normalised,
   flattened tokens: two random crops of one image are positives; with weather labels,
   every image of the same weather is a positive too; unlabelled images are positives
   only of themselves. Different content with the same weather being positives is what
   makes the tokens describe the degradation rather than the content;
2. diffusion alignment: the frozen SD's noise-prediction loss on the crop's own VAE
   latent, conditioned on its DPA tokens; gradients reach only E's trainable part and A;
3. optional text anchor: per-weather token centroids pulled (cosine) toward the text
   embedding of a weather phrase, when the SD folder has a text encoder.

[design] The contrastive loss acts on the tokens themselves (not on a separate
projection head), so the prompt the UNet sees is the weather-discriminative quantity,
and the report's embedding is that same quantity. [design] The adapter follows
IP-Adapter's image projection: Linear -> K*D, then LayerNorm(D) per token, which keeps
the tokens on the scale of the text encoder's final-layer-normed states.

Exact resume: every random draw of step s (batch indices, crops, flips, VAE sample,
noise, timesteps) comes from generators seeded by (seed, s), so a checkpoint needs only
the weights, the optimizer / scaler state and the step; the global RNG states are
saved and restored as well. Outputs in ``{work}/dpa/``: ``dpa.safetensors`` +
``dpa.json`` (model spec, run config; the completion marker), ``checkpoints/``,
``metrics.jsonl``, ``report.json`` and ``embeddings.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cliutil import config_from_options, stage_options
from .config import config_hash, config_to_dict, opt
from .errors import BadImageError, D4IRError
from .io import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    read_json,
    sha256_bytes,
    trim_jsonl,
)
from .runtime import DTYPES
from .sd import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)

__all__ = [
    "DPAConfig",
    "DPAResult",
    "DPAModel",
    "ConvEncoder",
    "CLIPEncoder",
    "PromptAdapter",
    "DPADataError",
    "ENCODERS",
    "build_dpa_model",
    "load_dpa",
    "dpa_embedding",
    "supcon_loss",
    "prepare_image",
    "eval_crops",
    "encode_images",
    "train_dpa",
    "dpa_report",
    "train_dpa_command",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEGRADED_WEATHERS = ("rain", "haze", "snow")


class DPADataError(D4IRError):
    """The DPA training / bank input cannot be used; raised before any training starts."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataSection:
    """The web-degraded images to train on."""

    manifest: str = opt("{work}/data/manifests/web-degraded.jsonl", help="Manifest of the web-degraded images.")
    root: str = opt("{work}/data", help="Image root the manifest's paths are relative to.")
    require_labels: bool = opt(
        True, help="Every image must carry a weather label and >= 2 weathers must be present (supervised contrast)."
    )
    max_images: int = opt(0, min=0, help="Use N evenly spaced images (0: all); for quick runs.")
    load_size: int = opt(512, min=16, help="Short side every image is resized to at load (then cropped).")
    cache_images: bool = opt(True, help="Keep the loaded images in memory (fast; off for very large sets).")
    crop_zoom: tuple[float, float] = opt(
        (0.75, 1.5),
        min=0.1,
        max=8.0,
        help="Side of the two random square crops, in units of the encoder input size (resized to it after).",
    )
    hflip: bool = opt(True, help="Random horizontal flips (weather is flip-invariant).")
    color_aug: bool = opt(
        True, help="Random RGB channel order and saturation (0.6-1.4x): weather is grey-white, content has colour."
    )
    veil_aug: float = opt(
        0.25,
        min=0.0,
        max=0.5,
        help="Max strength of a random grey veil + exposure change, so black level alone cannot tell a weather.",
    )


@dataclass(frozen=True)
class SDSection:
    """The frozen Stable Diffusion whose UNet the tokens must make sense to."""

    model: str = opt("{work}/tiny-sd", help="diffusers SD folder or hub id; D is read from its UNet config.")
    attention: str = opt("auto", choices=ATTENTION_BACKENDS, help="UNet attention backend.")
    dtype: str = opt("float32", choices=DTYPES, help="dtype of the frozen SD weights (CUDA only).")
    resolution: int = opt(0, min=0, help="Pixel size of the diffusion-alignment crops; 0: the UNet's native size.")


@dataclass(frozen=True)
class EncoderSection:
    """The image encoder E."""

    kind: str = opt("conv", choices=("clip", "conv"), help="clip: CLIP vision tower; conv: small CNN from scratch.")
    clip_model: str = opt("openai/clip-vit-large-patch14", help="CLIP vision weights: local folder or hub id.")
    clip_projection: bool = opt(
        True, help="Use CLIPVisionModelWithProjection.image_embeds (as IP-Adapter) instead of the pooled output."
    )
    unfreeze_last: int = opt(0, min=0, help="clip: train the last N transformer blocks too (0: fully frozen).")
    image_size: int = opt(0, min=0, help="Encoder input size; 0: CLIP's native size, or 64 for conv.")
    conv_channels: tuple[int, ...] = opt((16, 32, 64, 128), min=1, help="conv: channels of the stride-2 stages.")


@dataclass(frozen=True)
class AdapterSection:
    """The adapter A: feature -> K tokens of width D."""

    tokens: int = opt(4, min=1, max=77, help="K prompt tokens per image (4-8 as in IP-Adapter).")
    hidden: int = opt(256, min=8, help="Hidden width of the adapter MLP.")


@dataclass(frozen=True)
class LossSection:
    """Loss weights and parameters."""

    contrastive: float = opt(1.0, min=0.0, help="Weight of the (supervised) contrastive loss.")
    temperature: float = opt(0.1, min=1e-3, max=10.0, help="InfoNCE temperature tau (SupCon uses 0.07-0.1).")
    supervised: bool = opt(True, help="Same-weather images are positives (instance-level only when false).")
    prototype: float = opt(
        1.0, min=0.0, help="Weight of InfoNCE against learnable weather prototypes (labelled images; see supcon_loss)."
    )
    diffusion: float = opt(1.0, min=0.0, help="Weight of the frozen SD's noise-prediction loss (alignment).")
    diffusion_batch: int = opt(0, min=0, help="Images per micro-batch in the diffusion loss (0: all of them).")
    cache_latents: bool = opt(
        True,
        help="Encode each image's whole-image latent once (VAE posterior) instead of a crop per step; "
        "costs N x 4 x (R/f)^2 x 8 bytes of memory.",
    )
    text_anchor: float = opt(0.0, min=0.0, help="Weight of the weather-phrase anchor (needs a text encoder).")
    weather_phrases: dict[str, str] = opt(
        default_factory=lambda: {
            "rain": "a photo taken in heavy rain, rain streaks",
            "haze": "a hazy photo, thick fog",
            "snow": "a photo taken in falling snow",
        },
        help="Weather -> phrase whose text embedding anchors that weather's centroid.",
    )


@dataclass(frozen=True)
class TrainSection:
    """Optimisation, checkpoints and resume."""

    steps: int = opt(300, min=1, help="Optimizer steps.")
    batch_size: int = opt(32, min=2, help="Images per micro-batch (each gives two crops).")
    grad_accum: int = opt(1, min=1, help="Micro-batches per optimizer step.")
    lr: float = opt(1e-3, min=0.0, help="Peak AdamW learning rate (cosine to 10% after warm-up).")
    weight_decay: float = opt(1e-4, min=0.0, help="AdamW weight decay.")
    warmup_steps: int = opt(20, min=0, help="Linear warm-up steps.")
    grad_clip: float = opt(1.0, min=0.0, help="Clip the gradient norm (0: off).")
    seed: int = opt(0, min=0, help="Seeds weights, data order, crops and diffusion noise.")
    device: str = opt("auto", help="auto | cpu | cuda[:N].")
    amp: bool = opt(True, help="Automatic mixed precision on CUDA (ignored on the CPU).")
    amp_dtype: str = opt("bfloat16", choices=("bfloat16", "float16"), help="AMP dtype; float16 uses a GradScaler.")
    checkpoint_every: int = opt(100, min=1, help="Save a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int = opt(2, min=1, help="Number of step checkpoints kept.")
    log_every: int = opt(10, min=1, help="Write metrics.jsonl every N steps.")
    resume: bool = opt(True, help="Continue from the last checkpoint in the output dir (false: start over).")


@dataclass(frozen=True)
class ReportSection:
    """The DPA report: held-out weather accuracy and content invariance."""

    enabled: bool = opt(True, help="Write report.json after training.")
    test_manifests: tuple[str, ...] = opt(
        (
            "{work}/data/manifests/test-rain.jsonl",
            "{work}/data/manifests/test-haze.jsonl",
            "{work}/data/manifests/test-snow.jsonl",
        ),
        help="Paired test sets; their inputs whose source photo is not in training are the held-out set.",
    )
    test_root: str = opt("{work}/data", help="Image root of the test manifests.")
    knn_k: int = opt(5, min=1, help="k of the cosine k-NN weather classifier (the headline accuracy).")
    plot: bool = opt(True, help="Write embeddings.png (2-D PCA of the embeddings, coloured by weather).")


@dataclass(frozen=True)
class OutputSection:
    """Where the stage writes."""

    dir: str = opt("{work}/dpa", help="Output folder (weights, checkpoints, metrics, report).")


@dataclass(frozen=True)
class DPAConfig:
    """Config of `d4ir train-dpa` (stages/<profile>/dpa.toml)."""

    data: DataSection = field(default_factory=DataSection)
    sd: SDSection = field(default_factory=SDSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    report: ReportSection = field(default_factory=ReportSection)
    output: OutputSection = field(default_factory=OutputSection)


# keys that do not change the training trajectory: a resume may differ in these
_RESUME_NEUTRAL = (
    "data.root",
    "data.cache_images",
    "sd.attention",
    "encoder.clip_model",
    "train.device",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.resume",
    "report",
    "output",
)


def _training_hash(cfg: DPAConfig) -> str:
    return config_hash(cfg, exclude=_RESUME_NEUTRAL)


# --------------------------------------------------------------------------- models


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
            self.clip = cls.from_pretrained(model, **{_hf_dtype_kwarg(): torch.float32})
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


def _hf_dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype`` (``torch_dtype`` is deprecated in 5); older ones ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


ENCODERS: dict[str, type[nn.Module]] = {"clip": CLIPEncoder, "conv": ConvEncoder}


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


def _new_model(cfg: DPAConfig, dim: int) -> DPAModel:
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


# --------------------------------------------------------------------------- losses


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out); z (N, E) unit norm, labels (N,).

    Anchors with no positive are left out; with instance labels this is InfoNCE (SimCLR).
    """
    z = z.float()
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # (N, N)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    return per_anchor[has].mean()


def prototype_loss(z: torch.Tensor, weather_cls: torch.Tensor, prototypes: torch.Tensor, temperature: float):
    """InfoNCE of each labelled embedding z (N, E) against the W learnable weather prototypes (W, E).

    [design] Supervised contrast alone starts with every embedding alike and separates
    two weathers only slowly (its gradient is proportional to their current distance:
    on the demo, rain and snow stayed merged for hundreds of steps). Prototypes are free
    parameters, so this term separates the weathers from the first step, as in PaCo
    (Cui et al. 2021, parametric contrastive learning). Unlabelled rows (-1) are ignored.
    """
    keep = weather_cls >= 0
    if not bool(keep.any()):
        return z.sum() * 0.0
    logits = z[keep].float() @ F.normalize(prototypes.float(), dim=-1).T / temperature  # (N', W)
    return F.cross_entropy(logits, weather_cls[keep])


@torch.no_grad()
def vae_posterior(sd: _FrozenSD, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of ``pixels`` (B, 3, R, R) in [0, 1]: two (B, 4, R/f, R/f) float32 on the CPU."""
    post = sd.vae.encode((pixels * 2.0 - 1.0).to(sd.vae.device, sd.vae.dtype)).latent_dist
    return post.mean.float().cpu(), post.std.float().cpu()


def diffusion_alignment_loss(sd: _FrozenSD, posterior: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
                             gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Frozen SD noise-prediction MSE on a latent drawn from ``posterior`` (mean, std: (B, 4, h, w)),
    conditioned on ``tokens`` (B, K, D); gradients reach only what made the tokens."""
    dev = sd.unet.device
    mean, std = posterior
    with torch.no_grad():
        eps = torch.randn(mean.shape, generator=gen)
        latents = ((mean + std * eps) * sd.scaling_factor).to(dev, sd.unet.dtype)  # (B, 4, R/f, R/f)
    noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)  # drawn on the CPU: device-independent
    t = torch.randint(0, sd.num_train_timesteps, (latents.shape[0],), generator=gen).to(dev)
    noisy = sd.scheduler.add_noise(latents, noise, t)
    pred = sd.unet(noisy, t, encoder_hidden_states=tokens.to(sd.unet.dtype)).sample
    if sd.prediction_type == "epsilon":
        target = noise
    elif sd.prediction_type == "v_prediction":
        target = sd.scheduler.get_velocity(latents, noise, t)
    else:
        raise D4IRError(f"SD scheduler prediction_type {sd.prediction_type!r} is not supported (epsilon, v_prediction)")
    return F.mse_loss(pred.float(), target.float())


def text_anchor_loss(tokens: torch.Tensor, labels: torch.Tensor, anchors: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over weathers in the batch of 1 - cos(mean token of that weather, its phrase embedding (D,))."""
    terms = []
    for cls_idx, target in anchors.items():
        sel = labels == cls_idx
        if bool(sel.any()):
            centroid = tokens[sel].float().mean(dim=(0, 1))  # (D,)
            terms.append(1.0 - F.cosine_similarity(centroid, target.to(centroid.device), dim=0))
    if not terms:
        return tokens.sum() * 0.0
    return torch.stack(terms).mean()


@dataclass
class _FrozenSD:
    """The parts of a frozen SD that the alignment loss needs."""

    unet: Any
    vae: Any
    scheduler: Any
    scaling_factor: float
    num_train_timesteps: int
    prediction_type: str
    resolution: int


def _load_frozen_sd(cfg: DPAConfig, device: torch.device, need_text: bool):
    """Load the SD pipeline (frozen); return (_FrozenSD, pipe)."""
    from diffusers import DDPMScheduler

    from .runtime import pick_dtype
    from .sd import load_img2img_pipeline

    dtype = pick_dtype(cfg.sd.dtype, device)
    pipe = load_img2img_pipeline(cfg.sd.model, device=device, dtype=dtype, attention=cfg.sd.attention,
                                 with_text_encoder=need_text)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.sd.resolution or int(pipe.unet.config.sample_size) * vae_factor
    if resolution % vae_factor:
        raise D4IRError(f"`sd.resolution` = {resolution}: must be a multiple of the VAE factor {vae_factor}")
    sd = _FrozenSD(
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler=scheduler,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=str(scheduler.config.prediction_type),
        resolution=int(resolution),
    )
    return sd, pipe


def _phrase_anchors(pipe, phrases: dict[str, str], class_of: dict[str, int]) -> dict[int, torch.Tensor]:
    """Text embedding (D,) of each labelled weather's phrase: mean hidden state over its real tokens."""
    from .sd import encode_text

    anchors = {}
    for weather, idx in class_of.items():
        phrase = phrases.get(weather)
        if phrase is None:
            logger.warning("no `loss.weather_phrases` entry for %r: no text anchor for it", weather)
            continue
        hidden = encode_text(pipe, [phrase])[0].float()  # (77, D)
        mask = pipe.tokenizer([phrase], padding="max_length", max_length=hidden.shape[0], truncation=True,
                              return_tensors="pt").attention_mask[0].bool()  # fmt: skip
        anchors[idx] = hidden[mask.to(hidden.device)].mean(0).detach().cpu()
    return anchors


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


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
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
        return _resize(x[None, :, top : top + s, left : left + s], size)
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


def _random_crop_box(h: int, w: int, side: tuple[float, float], gen: torch.Generator) -> tuple[int, int, int]:
    """A random square (top, left, side) whose side is drawn in ``side`` px (clamped to the image)."""
    u = torch.rand(3, generator=gen).tolist()
    s = max(1, min(h, w, round(side[0] + (side[1] - side[0]) * u[0])))
    return int(u[1] * (h - s + 1)), int(u[2] * (w - s + 1)), s


class _ImageStore:
    """The usable training images: decoded once to check them, kept in memory when asked."""

    def __init__(self, records: list, root: str, load_size: int, cache: bool):
        from .manifests import open_rgb

        self.root, self.load_size, self.cache = root, load_size, cache
        self.records, self.images, self.skipped = [], [], Counter()
        for rec in _progress(records, desc="check images"):
            try:
                img = prepare_image(open_rgb(root, rec), load_size)
            except BadImageError as e:
                self.skipped[e.reason] += 1
                logger.warning("skipping %s: %s", rec.id, e)
                continue
            self.records.append(rec)
            if cache:
                self.images.append(img)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> torch.Tensor:
        """uint8 (3, H, W)."""
        if self.cache:
            return self.images[i]
        from .manifests import open_rgb

        return prepare_image(open_rgb(self.root, self.records[i]), self.load_size)


def _progress(it, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, disable=None, leave=False, **kw)


# --------------------------------------------------------------------------- data checks


def _usable_records(manifest: str, root: str, *, what: str = "data.manifest") -> list:
    """Load a degraded-image manifest and refuse, before any work, what cannot be trained on."""
    from .manifests import load_manifest

    records = load_manifest(manifest)
    clean = [r for r in records if r.weather == "clean"]
    if clean:
        logger.warning("%s: ignoring %d record(s) labelled 'clean' (not degraded)", manifest, len(clean))
    records = [r for r in records if r.weather != "clean"]
    if not records:
        raise DPADataError(
            f"`{what}` = {manifest!r}: no degraded images ({len(clean)} clean record(s), 0 rain/haze/snow/unlabelled); "
            "the DPA learns from web-degraded photos: build the manifest from a folder of degraded images"
        )
    rootp = Path(root)
    if not rootp.is_dir():
        raise DPADataError(f"image root {root!r} (for `{what}` = {manifest!r}) is not a folder")
    missing = [r for r in records if r.path is None or not (rootp / r.path).is_file()]
    if missing:
        shown = ", ".join(f"{r.id!r} ({r.path or 'url only'})" for r in missing[:5])
        raise DPADataError(
            f"`{what}` = {manifest!r}: {len(missing)} of {len(records)} image file(s) missing under root {root!r}, "
            f"e.g. {shown}; fix the root (data.root / --set) or rebuild the manifest"
        )
    return records


def _check_labels(records: list, *, require: bool, where: str) -> None:
    """With labels required: every record labelled and at least two weathers."""
    if not require:
        return
    unlabelled = [r for r in records if r.weather is None]
    if unlabelled:
        raise DPADataError(
            f"{where}: {len(unlabelled)} image(s) without a weather label (e.g. {unlabelled[0].id!r}) while "
            "`data.require_labels` = true; label them (folder names rain/ haze/ snow/) or set require_labels = false"
        )
    weathers = sorted({r.weather for r in records})
    if len(weathers) < 2:
        raise DPADataError(
            f"{where}: only one weather ({weathers}) while `data.require_labels` = true; supervised contrast needs "
            "at least two weathers (the others are its negatives): add images of another weather, or set "
            "data.require_labels = false and loss.supervised = false"
        )


# --------------------------------------------------------------------------- training helpers


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _batch_indices(n: int, seed: int, micro: int, batch: int) -> list[int]:
    """Dataset indices of global micro-batch ``micro``: a slice of per-epoch seeded permutations."""
    out: list[int] = []
    pos = micro * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(seed, 1, epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def _make_views(store: _ImageStore, idx: list[int], cfg: DPAConfig, enc_size: int, sd_size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Two random crops per image at the encoder size, and view one at the SD resolution.

    Returns (v1 (B,3,S,S), v2 (B,3,S,S), sd_view (B,3,R,R)), floats in [0, 1].
    """
    v1, v2, vsd = [], [], []
    side = (cfg.data.crop_zoom[0] * enc_size, cfg.data.crop_zoom[1] * enc_size)  # crop side range in px
    for i in idx:
        img = store.get(i)
        _, h, w = img.shape
        for which in (1, 2):
            top, left, cs = _random_crop_box(h, w, side, gen)
            crop = img[:, top : top + cs, left : left + cs].float().div(255.0)[None]  # (1, 3, cs, cs)
            flip = cfg.data.hflip and bool(torch.rand(1, generator=gen) < 0.5)
            if flip:
                crop = crop.flip(-1)
            if cfg.data.color_aug:
                crop = _color_jitter(crop, gen)
            if cfg.data.veil_aug > 0:
                crop = _veil_jitter(crop, cfg.data.veil_aug, gen)
            if which == 1:
                v1.append(_resize(crop, enc_size))
                vsd.append(_resize(crop, sd_size) if sd_size else crop.new_zeros(1, 3, 1, 1))
            else:
                v2.append(_resize(crop, enc_size))
    return torch.cat(v1), torch.cat(v2), torch.cat(vsd)


def _color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Permute RGB channels and scale saturation: (1, 3, h, w) in [0, 1].

    [design] Rain, snow and haze are grey-white (airlight, scattered light), so a
    channel permutation keeps the weather and changes the content's colours: with few
    source photos, this stops the encoder from tying a weather to a photo's palette.
    """
    perm = torch.randperm(3, generator=gen)
    sat = 0.6 + 0.8 * float(torch.rand(1, generator=gen))
    x = x[:, perm]
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (1, 1, h, w)
    return (grey + sat * (x - grey)).clamp(0.0, 1.0)


def _veil_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random exposure (0.8-1.2x) and a grey veil of up to ``strength``: (1, 3, h, w) in [0, 1].

    [design] Exposure and black level vary between photos whatever the weather; a light
    veil on every weather stops the encoder from reading snow's faint veil (or a dark
    sky) as the weather, and leaves haze, a strong depth-dependent veil, distinct.
    """
    u = torch.rand(3, generator=gen).tolist()
    gain = 0.8 + 0.4 * u[0]
    v = strength * u[1]
    level = 0.6 + 0.4 * u[2]
    return ((x * gain).clamp(0.0, 1.0) * (1.0 - v) + v * level).clamp(0.0, 1.0)


def _cache_latents(sd: _FrozenSD, store: _ImageStore, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each image's centre square at the SD resolution: two (N, 4, h, w)."""
    means, stds = [], []
    for i in _progress(range(0, len(store), batch), desc="VAE latents"):
        x = []
        for j in range(i, min(i + batch, len(store))):
            img = store.get(j)
            _, h, w = img.shape
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x.append(_resize(img[None, :, top : top + s, left : left + s].float().div(255.0), sd.resolution))
        m, sdev = vae_posterior(sd, torch.cat(x))
        means.append(m)
        stds.append(sdev)
    return torch.cat(means), torch.cat(stds)


def _lr_at(step: int, cfg: TrainSection) -> float:
    """Linear warm-up, then cosine from lr to lr/10."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),  # plain data for weights_only loading
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((3, tuple(py), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Checkpoints:
    """``{out}/checkpoints/step-XXXXXXX/`` folders (written as ``.tmp``, then renamed) + ``latest.json``."""

    def __init__(self, out: Path, keep: int):
        self.dir = out / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.dir / "latest.json"
        if not pointer.is_file():
            return None
        path = self.dir / read_json(pointer)["dir"]
        if not (path / "state.pt").is_file():
            raise D4IRError(f"{pointer} points to {path}, which is incomplete; remove {self.dir} to start over")
        return path

    def save(self, step: int, model: DPAModel, meta: dict, state: dict) -> Path:
        from safetensors.torch import save_file

        name = f"step-{step:07d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(model.trainable_state_dict(), str(tmp / "dpa.safetensors"))
        atomic_write_json(tmp / "dpa.json", meta)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.dir)
        atomic_write_json(self.dir / "latest.json", {"dir": name, "step": step})
        steps = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


# --------------------------------------------------------------------------- stage


@dataclass
class DPAResult:
    """What `train_dpa` did."""

    out_dir: Path
    weights: Path
    steps: int
    resumed_from: int | None
    images_per_s: float | None  # source images per second in this process's training loop (each gives 2 crops)
    num_images: int
    weathers: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    report: dict | None = None
    already_done: bool = False


def _class_map(records: list, supervised: bool) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Weather -> class id (sorted); per record its contrastive label (unlabelled or unsupervised: its own
    instance id) and its weather class (-1: unlabelled)."""
    weathers = sorted({r.weather for r in records if r.weather is not None})
    class_of = {w: i for i, w in enumerate(weathers)}
    weather_cls = [class_of[r.weather] if r.weather is not None else -1 for r in records]
    labels = [c if supervised and c >= 0 else len(weathers) + i for i, c in enumerate(weather_cls)]
    return class_of, torch.tensor(labels, dtype=torch.long), torch.tensor(weather_cls, dtype=torch.long)


def train_dpa(cfg: DPAConfig) -> DPAResult:
    """Train the DPA on the web-degraded manifest; checkpoint, resume, report."""
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes

    from .runtime import package_versions, pick_device, seed_everything
    from .sd import check_sd_source, model_id, text_hidden_size

    t_cfg = cfg.train
    out = Path(cfg.output.dir)

    # 1. check inputs (before any training or model loading)
    records = _usable_records(cfg.data.manifest, cfg.data.root)
    if cfg.data.max_images and cfg.data.max_images < len(records):  # evenly spaced: every weather folder is kept
        pick = torch.linspace(0, len(records) - 1, cfg.data.max_images).round().long().tolist()
        records = [records[i] for i in pick]
    _check_labels(records, require=cfg.data.require_labels, where=f"`data.manifest` = {cfg.data.manifest!r}")
    if cfg.report.enabled:
        for path in cfg.report.test_manifests:
            if not Path(path).is_file():
                raise D4IRError(
                    f"`report.test_manifests`: {path!r} does not exist; give the paired test sets, "
                    "or set report.enabled = false"
                )
    if cfg.loss.contrastive == 0 and cfg.loss.diffusion == 0 and cfg.loss.text_anchor == 0:
        raise D4IRError("all loss weights are 0 (`loss.contrastive`, `loss.diffusion`, `loss.text_anchor`)")
    check_sd_source(cfg.sd.model)
    dim = text_hidden_size(cfg.sd.model)
    store = _ImageStore(records, cfg.data.root, cfg.data.load_size, cfg.data.cache_images)
    if len(store) == 0:
        raise DPADataError(f"`data.manifest` = {cfg.data.manifest!r}: every image was unreadable {dict(store.skipped)}")
    if store.skipped:
        logger.warning("skipped %d unreadable image(s): %s", sum(store.skipped.values()), dict(store.skipped))
        _check_labels(store.records, require=cfg.data.require_labels, where="the readable images")
    if len(store) < 2:
        raise DPADataError(
            f"`data.manifest` = {cfg.data.manifest!r}: need at least 2 readable images, got {len(store)}"
        )
    class_of, labels, weather_cls = _class_map(store.records, cfg.loss.supervised)
    weathers = sorted(class_of)
    logger.info("DPA data: %d images, weathers %s", len(store),
                dict(Counter(r.weather or "unlabelled" for r in store.records)))  # fmt: skip
    if len(weathers) < 2 and cfg.loss.supervised:
        logger.warning("fewer than two labelled weathers: the contrastive loss is instance-level in effect")

    run_hash = _training_hash(cfg)
    final_meta_path = out / "dpa.json"
    ckpts = _Checkpoints(out, t_cfg.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    if not t_cfg.resume and out.exists():
        logger.info("train.resume = false: starting over in %s", out)
        for name in ("dpa.json", "dpa.safetensors", "report.json", "metrics.jsonl", "embeddings.png"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    device = pick_device(t_cfg.device)
    seed_everything(t_cfg.seed)

    # 2. finished already?
    if final_meta_path.is_file():
        meta = read_json(final_meta_path)
        _check_same_run(meta, run_hash, cfg, final_meta_path)
        if meta.get("complete") and meta.get("step") == t_cfg.steps:
            logger.info("DPA already trained (%d steps) in %s; rerunning the report only", t_cfg.steps, out)
            model, _ = load_dpa(out, device=device)
            report = _maybe_report(cfg, model, store, device)
            return DPAResult(out, out / "dpa.safetensors", t_cfg.steps, None, None, len(store), weathers,
                             dict(store.skipped), report, already_done=True)  # fmt: skip

    # 3. models
    model = _new_model(cfg, dim).to(device)
    need_sd = cfg.loss.diffusion > 0 or cfg.loss.text_anchor > 0
    sd, anchors = None, {}
    if need_sd:
        sd, pipe = _load_frozen_sd(cfg, device, need_text=cfg.loss.text_anchor > 0)
        if cfg.loss.text_anchor > 0:
            if pipe.text_encoder is None:
                raise D4IRError(f"`loss.text_anchor` > 0 but `sd.model` = {cfg.sd.model!r} has no text encoder")
            anchors = _phrase_anchors(pipe, cfg.loss.weather_phrases, class_of)
            pipe.text_encoder = None  # free it: only the anchors are needed
        del pipe
        if cfg.loss.diffusion == 0:
            sd = None
    params = [p for p in model.parameters() if p.requires_grad]
    use_proto = cfg.loss.prototype > 0 and cfg.loss.contrastive > 0 and cfg.loss.supervised and len(weathers) >= 2
    prototypes = None
    if use_proto:  # (W, K*D), drawn from the seeded global RNG after the model's weights
        prototypes = nn.Parameter(0.01 * torch.randn(len(weathers), model.tokens * model.dim).to(device))
        params = params + [prototypes]
    optimizer = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    use_amp = t_cfg.amp and device.type == "cuda"
    amp_dtype = getattr(torch, t_cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    spec = {**model.spec(), "sd_model": cfg.sd.model, "sd_model_id": model_id(cfg.sd.model),
            "load_size": cfg.data.load_size}  # fmt: skip
    base_meta = {
        "kind": "d4ir-dpa",
        "version": 1,
        "spec": spec,
        "config": config_to_dict(cfg),
        "training_hash": run_hash,
        "weathers": weathers,
        "num_images": len(store),
        "skipped": dict(store.skipped),
    }

    # 4. resume
    start, resumed_from = 0, None
    last = ckpts.latest() if t_cfg.resume else None
    if last is not None:
        meta = read_json(last / "dpa.json")
        _check_same_run(meta, run_hash, cfg, last / "dpa.json")
        model.load_trainable_state_dict(load_file(str(last / "dpa.safetensors")), where=str(last))
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        if prototypes is not None:
            with torch.no_grad():
                prototypes.copy_(state["prototypes"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        if start > t_cfg.steps:
            raise D4IRError(f"checkpoint {last} is at step {start}, beyond `train.steps` = {t_cfg.steps}")
        logger.info("resuming DPA training from step %d (%s)", start, last)
        trim_jsonl(metrics_path, start)
    elif metrics_path.exists():
        metrics_path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step: int) -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": _rng_state()}  # fmt: skip
        if prototypes is not None:
            state["prototypes"] = prototypes.detach().cpu().clone()
        ckpts.save(step, model, {**base_meta, "step": step, "complete": False}, state)

    # 5. the frozen VAE's posterior of every image, once (deterministic: mean and std)
    enc_size = model.image_size
    latents = None
    if sd is not None and cfg.loss.cache_latents:
        latents = _cache_latents(sd, store)
    sd_size = sd.resolution if sd is not None and latents is None else 0

    # 6. train
    model.train()
    n_img = 0
    t0 = time.perf_counter()
    bar = _progress(range(start, t_cfg.steps), desc="train-dpa", initial=start, total=t_cfg.steps)
    step = start
    try:
        for step in bar:
            lr = _lr_at(step, t_cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            logs = Counter()
            for micro in range(t_cfg.grad_accum):
                gen = torch.Generator().manual_seed(_mix_seed(t_cfg.seed, 2, step, micro))
                idx = _batch_indices(len(store), t_cfg.seed, step * t_cfg.grad_accum + micro, t_cfg.batch_size)
                v1, v2, vsd = _make_views(store, idx, cfg, enc_size, sd_size, gen)
                lab, wc = labels[idx].to(device), weather_cls[idx].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    tokens = model(torch.cat([v1, v2]).to(device))  # (2B, K, D)
                    loss = tokens.new_zeros(())
                    if cfg.loss.contrastive > 0:
                        z = dpa_embedding(tokens)  # (2B, K*D)
                        l_con = supcon_loss(z, torch.cat([lab, lab]), cfg.loss.temperature)
                        loss = loss + cfg.loss.contrastive * l_con
                        logs["contrastive"] += l_con.item() / t_cfg.grad_accum
                        if prototypes is not None:
                            l_pro = prototype_loss(z, torch.cat([wc, wc]), prototypes, cfg.loss.temperature)
                            loss = loss + cfg.loss.prototype * l_pro
                            logs["prototype"] += l_pro.item() / t_cfg.grad_accum
                    if sd is not None:
                        nb = cfg.loss.diffusion_batch or len(idx)
                        if latents is not None:
                            posterior = (latents[0][idx[:nb]], latents[1][idx[:nb]])
                        else:
                            posterior = vae_posterior(sd, vsd[:nb])
                        l_diff = diffusion_alignment_loss(sd, posterior, tokens[:nb], gen)
                        loss = loss + cfg.loss.diffusion * l_diff
                        logs["diffusion"] += l_diff.item() / t_cfg.grad_accum
                    if anchors:
                        l_txt = text_anchor_loss(tokens, torch.cat([wc, wc]), anchors)
                        loss = loss + cfg.loss.text_anchor * l_txt
                        logs["text_anchor"] += l_txt.item() / t_cfg.grad_accum
                logs["loss"] += loss.item() / t_cfg.grad_accum
                scaler.scale(loss / t_cfg.grad_accum).backward()
                n_img += len(idx)
            if t_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % t_cfg.log_every == 0 or done == t_cfg.steps:
                ips = n_img / max(time.perf_counter() - t0, 1e-9)
                row = {
                    "step": done,
                    "lr": lr,
                    "images_per_s": round(ips, 3),
                    **{k: round(v, 6) for k, v in logs.items()},
                }
                _append_metrics(metrics_path, row)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if done % t_cfg.checkpoint_every == 0 or done == t_cfg.steps:
                save_checkpoint(done)
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d; the last checkpoint is kept: rerun the same command to resume", step)
        raise
    elapsed = time.perf_counter() - t0
    images_per_s = n_img / elapsed if n_img else None

    # 7. final weights (the json is the completion marker, written last)
    weights = out / "dpa.safetensors"
    weights_bytes = safetensors_bytes(model.trainable_state_dict())
    atomic_write_bytes(weights, weights_bytes)  # tmp + fsync + rename: the marker never names a torn file
    atomic_write_json(
        final_meta_path,
        {
            **base_meta,
            "step": t_cfg.steps,
            "complete": True,
            "weights_sha256": sha256_bytes(weights_bytes),
            "versions": package_versions(),
            "images_per_s": images_per_s,
        },  # fmt: skip
    )
    logger.info("DPA trained: %d steps, %s images/s -> %s", t_cfg.steps,
                f"{images_per_s:.1f}" if images_per_s else "n/a", weights)  # fmt: skip
    model.eval()
    report = _maybe_report(cfg, model, store, device)
    return DPAResult(out, weights, t_cfg.steps, resumed_from, images_per_s, len(store), weathers,
                     dict(store.skipped), report)  # fmt: skip


def _check_same_run(meta: dict, run_hash: str, cfg: DPAConfig, where: Path) -> None:
    """A checkpoint from a different training config cannot be resumed; say which keys differ."""
    if meta.get("training_hash") == run_hash:
        return
    old, new = meta.get("config", {}), config_to_dict(cfg)
    diffs = []
    for sec in sorted(set(old) | set(new)):
        o, n = old.get(sec, {}), new.get(sec, {})
        if not isinstance(o, dict) or not isinstance(n, dict):
            continue
        for k in sorted(set(o) | set(n)):
            if o.get(k) != n.get(k) and f"{sec}.{k}" not in _RESUME_NEUTRAL and sec not in _RESUME_NEUTRAL:
                diffs.append(f"{sec}.{k}: {o.get(k)!r} -> {n.get(k)!r}")
    raise D4IRError(
        f"{where} was written by a different training config ({'; '.join(diffs[:6]) or 'hash differs'}); "
        f"use another `output.dir` / --work-dir, or set train.resume = false to start over"
    )


# --------------------------------------------------------------------------- report


def _embed_images(model: DPAModel, images: list[torch.Tensor], device) -> torch.Tensor:
    """uint8 (3, H, W) images -> DPA embeddings (N, K*D) of their :func:`encode_images` tokens."""
    return dpa_embedding(encode_images(model, images, device))


def _knn_predict(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine k-NN (embeddings are unit norm); votes weighted by similarity."""
    k = min(k, train.shape[0])
    sims, idx = (test @ train.T).topk(k, dim=1)  # (M, k)
    n_cls = int(train_y.max()) + 1
    votes = torch.zeros(test.shape[0], n_cls)
    votes.scatter_add_(1, train_y[idx], sims.clamp(min=0) + 1e-6)
    return votes.argmax(1)


def dpa_report(model: DPAModel, cfg: DPAConfig, store: _ImageStore, device) -> dict:
    """Held-out weather accuracy (k-NN + linear probe) and content invariance on the test sets."""
    from sklearn.linear_model import LogisticRegression

    from .manifests import load_manifest, open_rgb

    model.eval()
    train_recs = [(i, r) for i, r in enumerate(store.records) if r.weather is not None]
    if not train_recs:
        raise D4IRError("the DPA report needs weather labels on the training images (none has one)")
    weathers = sorted({r.weather for _, r in train_recs})
    cls = {w: i for i, w in enumerate(weathers)}
    train_x = _embed_images(model, [store.get(i) for i, _ in train_recs], device)
    train_y = torch.tensor([cls[r.weather] for _, r in train_recs])
    train_sources = {r.source for r in store.records if r.source is not None}

    test_imgs, test_recs, skipped, overlap = [], [], Counter(), 0
    for path in cfg.report.test_manifests:
        if not Path(path).is_file():
            raise D4IRError(f"`report.test_manifests`: {path!r} does not exist (or set report.enabled = false)")
        for rec in load_manifest(path):
            if rec.weather is None or rec.weather == "clean":
                continue
            if rec.source is not None and rec.source in train_sources:
                overlap += 1
                continue
            try:
                test_imgs.append(prepare_image(open_rgb(cfg.report.test_root, rec), cfg.data.load_size))
            except BadImageError as e:
                skipped[e.reason] += 1
                continue
            test_recs.append(rec)
    if not test_recs:
        raise D4IRError(
            f"no held-out test images in {list(cfg.report.test_manifests)} (overlap with training: {overlap})"
        )
    if overlap:
        logger.info("report: left out %d test image(s) whose source photo was in training", overlap)
    test_x = _embed_images(model, test_imgs, device)
    unknown = sorted({r.weather for r in test_recs} - set(cls))
    if unknown:
        logger.warning("test weathers %s were not in training: counted as errors", unknown)
    test_y = torch.tensor([cls.get(r.weather, -1) for r in test_recs])

    knn = _knn_predict(train_x, train_y, test_x, cfg.report.knn_k)
    acc_knn = float((knn == test_y).float().mean())
    per_weather = {
        w: float((knn[test_y == i] == i).float().mean()) for w, i in cls.items() if bool((test_y == i).any())
    }
    acc_lin = None
    if len(weathers) >= 2:
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(train_x.numpy(), train_y.numpy())
        acc_lin = float((torch.from_numpy(probe.predict(test_x.numpy())) == test_y).float().mean())

    # content invariance: "photo" = the clean target (same crop under every weather), else the source
    photo = [r.target_sha256 or r.source or r.id for r in test_recs]
    pid = {p: i for i, p in enumerate(sorted(set(photo)))}
    p = torch.tensor([pid[x] for x in photo])
    wid = {x: i for i, x in enumerate(sorted({r.weather for r in test_recs}))}
    w = torch.tensor([wid[r.weather] for r in test_recs])
    sim = test_x @ test_x.T
    off = ~torch.eye(len(test_recs), dtype=torch.bool)
    same_w_diff_p = (w[:, None] == w[None, :]) & (p[:, None] != p[None, :]) & off
    diff_w_same_p = (w[:, None] != w[None, :]) & (p[:, None] == p[None, :]) & off
    sw = float(sim[same_w_diff_p].mean()) if bool(same_w_diff_p.any()) else None
    dw = float(sim[diff_w_same_p].mean()) if bool(diff_w_same_p.any()) else None
    report = {
        "held_out_weather_accuracy": acc_knn,
        "classifier": f"cosine {min(cfg.report.knn_k, len(train_recs))}-NN on train embeddings",
        "linear_probe_accuracy": acc_lin,
        "per_weather_accuracy": per_weather,
        "same_weather_diff_photo_cos": sw,
        "diff_weather_same_photo_cos": dw,
        "content_invariance_margin": (sw - dw) if sw is not None and dw is not None else None,
        "pairs": {
            "same_weather_diff_photo": int(same_w_diff_p.sum()) // 2,
            "diff_weather_same_photo": int(diff_w_same_p.sum()) // 2,
        },  # fmt: skip
        "n_train": len(train_recs),
        "n_test": len(test_recs),
        "test_left_out_source_overlap": overlap,
        "test_skipped": dict(skipped),
        "weathers": weathers,
    }
    if cfg.report.plot:
        _plot_pca(train_x, [weathers[i] for i in train_y], test_x, [r.weather for r in test_recs],
                  Path(cfg.output.dir) / "embeddings.png")  # fmt: skip
        report["plot"] = "embeddings.png"
    return report


def _maybe_report(cfg: DPAConfig, model: DPAModel, store: _ImageStore, device) -> dict | None:
    if not cfg.report.enabled:
        return None
    report = dpa_report(model, cfg, store, device)
    atomic_write_json(Path(cfg.output.dir) / "report.json", report)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    logger.info(
        "DPA report: held-out weather accuracy %s (k-NN; linear probe %s; n=%d), content invariance: "
        "same-weather/different-photo cos %s vs different-weather/same-photo cos %s",
        fmt(report["held_out_weather_accuracy"]), fmt(report["linear_probe_accuracy"]), report["n_test"],
        fmt(report["same_weather_diff_photo_cos"]), fmt(report["diff_weather_same_photo_cos"]),
    )  # fmt: skip
    return report


def _plot_pca(train_x: torch.Tensor, train_w: list[str], test_x: torch.Tensor, test_w: list[str], path: Path) -> None:
    """2-D PCA (fit on train) of the embeddings: dots train, crosses held-out test; colour = weather."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean = train_x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(train_x - mean, full_matrices=False)
    proj = lambda x: ((x - mean) @ v[:2].T).numpy()  # noqa: E731
    a, b = proj(train_x), proj(test_x)
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"rain": "tab:blue", "haze": "tab:gray", "snow": "tab:orange"}
    for wname in sorted(set(train_w) | set(test_w)):
        c = colours.get(wname, None)
        m = [i for i, x in enumerate(train_w) if x == wname]
        ax.scatter(a[m, 0], a[m, 1], s=8, c=c, alpha=0.5, label=f"{wname} (train)")
        m = [i for i, x in enumerate(test_w) if x == wname]
        ax.scatter(b[m, 0], b[m, 1], s=20, c=c, marker="x", label=f"{wname} (held-out)")
    ax.set_title("DPA embeddings (PCA)")
    ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- CLI


@click.command("train-dpa")
@stage_options
def train_dpa_command(profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None) -> None:
    """Stage one: train the degradation-aware prompt adapter (stages/<profile>/dpa.toml)."""
    cfg = config_from_options(DPAConfig, "dpa", profile=profile, config_path=config_path, overrides=overrides,
                              work_dir=work_dir)  # fmt: skip
    res = train_dpa(cfg)
    line = f"DPA: {res.steps} steps on {res.num_images} images ({', '.join(res.weathers)}) -> {res.weights}"
    if res.resumed_from is not None:
        line += f" (resumed from step {res.resumed_from})"
    if res.images_per_s:
        line += f"; {res.images_per_s:.1f} images/s"
    if res.skipped:
        line += f"; skipped {res.skipped}"
    click.echo(line)
    if res.report:
        r = res.report
        click.echo(
            f"report: held-out weather accuracy {r['held_out_weather_accuracy']:.3f} (n={r['n_test']}); "
            f"same-weather/different-photo cos {r['same_weather_diff_photo_cos']} vs "
            f"different-weather/same-photo cos {r['diff_weather_same_photo_cos']}"
        )
