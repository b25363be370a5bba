"""The DPA losses: supervised contrastive, weather prototypes, diffusion alignment, text anchor."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from d4ir_pipeline.common.runtime import pick_dtype
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.config import DPAConfig
from d4ir_pipeline.stage1.sd import encode_text, load_img2img_pipeline

logger = logging.getLogger(__name__)

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
def vae_posterior(sd: FrozenSD, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of ``pixels`` (B, 3, R, R) in [0, 1]: two (B, 4, R/f, R/f) float32 on the CPU."""
    post = sd.vae.encode((pixels * 2.0 - 1.0).to(sd.vae.device, sd.vae.dtype)).latent_dist
    return post.mean.float().cpu(), post.std.float().cpu()


def diffusion_alignment_loss(sd: FrozenSD, posterior: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
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
class FrozenSD:
    """The parts of a frozen SD that the alignment loss needs."""

    unet: Any
    vae: Any
    scheduler: Any
    scaling_factor: float
    num_train_timesteps: int
    prediction_type: str
    resolution: int


def load_frozen_sd(cfg: DPAConfig, device: torch.device, need_text: bool):
    """Load the SD pipeline (frozen); return (FrozenSD, pipe)."""
    from diffusers import DDPMScheduler

    dtype = pick_dtype(cfg.sd.dtype, device)
    pipe = load_img2img_pipeline(cfg.sd.model, device=device, dtype=dtype, attention=cfg.sd.attention,
                                 with_text_encoder=need_text)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.sd.resolution or int(pipe.unet.config.sample_size) * vae_factor
    if resolution % vae_factor:
        raise D4IRError(f"`sd.resolution` = {resolution}: must be a multiple of the VAE factor {vae_factor}")
    sd = FrozenSD(
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler=scheduler,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=str(scheduler.config.prediction_type),
        resolution=int(resolution),
    )
    return sd, pipe


def phrase_anchors(pipe, phrases: dict[str, str], class_of: dict[str, int]) -> dict[int, torch.Tensor]:
    """Text embedding (D,) of each labelled weather's phrase: mean hidden state over its real tokens."""

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
