"""CCD: one batch of content-driven conditional diffusion (img2img under DPA prompt tokens).

Method (docs method.md, CCD): a clean image is resized / cropped, VAE-encoded, noised to
the timestep given by the strength s and denoised by the UNet conditioned on a prompt
bank entry (or weather centroid), with classifier-free guidance against the empty
prompt; the decode is a degraded image with the clean image's content.

diffusers' ``StableDiffusionImg2ImgPipeline`` runs the sampler. This module adds what
mass production needs around it: per-sample seeds derived from (global seed, sample
key) so any sample can be regenerated alone, batched VAE encode with per-sample noise,
strength quantised to whole denoising steps (so a batch can share one call), and
checks that retry a non-finite latent or an all-constant decode once with another seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from d4ir_pipeline.common.seeds import text_seed
from d4ir_pipeline.errors import D4IRError

logger = logging.getLogger(__name__)

CROPS = ("center", "random")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# ---------------------------------------------------------------------------------------
# 1. keys, seeds and per-sample decisions (pure functions: the same on every rank)


def sample_key(source_id: str, variant: int = 0) -> str:
    """A webdataset-safe, unique key for variant ``variant`` of source image ``source_id``.

    Keys hold no dots (webdataset splits the extension at the first dot) and no slashes;
    a hash of the full id keeps two ids that sanitise alike apart.
    """
    slug = _KEY_UNSAFE.sub("_", source_id).strip("_")[:80] or "img"
    digest = hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}-v{variant}"


def sample_seed(global_seed: int, key: str, attempt: int = 0) -> int:
    """The 63-bit seed of sample ``key``: a hash of (global seed, key, attempt), so no
    sample's seed depends on which rank, batch or order produced it."""
    return text_seed(int(global_seed), key, *((f"retry{attempt}",) if attempt else ()))  # "seed/key[/retryN]"


def denoise_steps(strength: float, steps: int) -> int:
    """Denoising steps img2img runs for ``strength`` (rounded, at least 1, at most ``steps``)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` = {strength!r}: expected a value in (0, 1]")
    return int(min(steps, max(1, round(strength * steps))))


def normalise_mix(mix: Mapping[str, float], weathers: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """Weather mix ratios -> (weathers, probabilities); an empty mix is uniform over ``weathers``."""
    if not weathers:
        raise D4IRError("the prompt bank lists no weathers")
    if not mix:
        names = tuple(weathers)
        return names, np.full(len(names), 1.0 / len(names))
    unknown = sorted(set(mix) - set(weathers))
    if unknown:
        raise D4IRError(
            f"`bank.mix` names weathers {unknown} that the prompt bank does not hold; it holds {list(weathers)}"
        )
    names = tuple(w for w in weathers if mix.get(w, 0.0) > 0)  # bank order: stable across runs
    ratios = np.array([float(mix[w]) for w in names], dtype=np.float64)
    if any(v < 0 for v in mix.values()) or ratios.sum() <= 0:
        raise D4IRError(f"`bank.mix` = {dict(mix)}: ratios must be >= 0 with a positive sum")
    return names, ratios / ratios.sum()


@dataclass(frozen=True)
class SampleDecision:
    """Everything drawn for one sample before its image is read (recorded in its JSON)."""

    key: str
    seed: int  # seed of attempt 0; decisions below are drawn from it
    weather: str
    row: int | None  # prompt-bank row; None = the weather's centroid
    prompt_id: str
    strength: float  # effective strength k / steps (what img2img actually runs)
    denoise: int  # k: the number of denoising steps run
    crop_u: float  # in [0, 1): position of a random crop along the long side
    crop_v: float


def decide_sample(
    key: str,
    *,
    global_seed: int,
    weathers: Sequence[str],
    probs: np.ndarray,
    rows_for: Mapping[str, Sequence[int]],
    row_ids: Sequence[str],
    use: str,
    strength: float | tuple[float, float],
    steps: int,
) -> SampleDecision:
    """Draw weather (by mix ratio), prompt (bank entry or centroid), strength and crop for ``key``."""
    seed = sample_seed(global_seed, key)
    rng = np.random.default_rng(seed)
    weather = weathers[int(rng.choice(len(weathers), p=probs))]
    if use == "centroid":
        row, prompt_id = None, f"centroid/{weather}"
    else:
        rows = rows_for[weather]
        row = int(rows[int(rng.integers(len(rows)))])
        prompt_id = row_ids[row]
    s = float(strength) if isinstance(strength, int | float) else float(rng.uniform(strength[0], strength[1]))
    k = denoise_steps(s, steps)
    u, v = (float(x) for x in rng.random(2))
    return SampleDecision(key, seed, weather, row, prompt_id, k / steps, k, u, v)


# ---------------------------------------------------------------------------------------
# 2. image preparation and encoding


def prepare_image(img: Image.Image, resolution: int, crop: str, u: float = 0.5, v: float = 0.5):
    """Resize the short side to ``resolution`` and cut a square ``resolution`` crop.

    ``crop`` 'center' or 'random' (position from the seeded ``u``, ``v`` in [0, 1)).
    Returns (image, box) with box = (left, top, right, bottom) in the resized image.
    """
    if crop not in CROPS:
        raise ValueError(f"`crop` = {crop!r}: expected one of {list(CROPS)}")
    if resolution % 8:
        raise ValueError(f"`resolution` = {resolution}: must be a multiple of 8 (the VAE's downsampling)")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if crop == "center":
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = min(nw - resolution, math.floor(u * (nw - resolution + 1)))
        top = min(nh - resolution, math.floor(v * (nh - resolution + 1)))
    box = (left, top, left + resolution, top + resolution)
    return img.crop(box), box


# ---------------------------------------------------------------------------------------
# 3. the pipeline's speed options


def configure_pipeline(
    pipe,
    *,
    channels_last: bool = False,
    compile_unet: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    vae_fp32: bool = False,
):
    """Apply memory-format, compile and VAE memory options to a loaded img2img pipeline."""
    import torch

    if vae_fp32:
        pipe.vae.to(dtype=torch.float32)  # the SD VAE can overflow in fp16 at high resolution
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, fullgraph=False)  # default mode: no CUDA graphs (batch sizes vary)
        logger.info("UNet wrapped in torch.compile (the first batches compile; later ones are fast)")
    return pipe


# ---------------------------------------------------------------------------------------
# 4. one batch of synthesis


@dataclass(frozen=True)
class CCDInput:
    """One sample to synthesise: its prepared clean image, prompt tokens and seeds."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8, already resized / cropped
    prompt: torch.Tensor  # noqa: F821 - (K, D) float32 DPA tokens, looked up in the bank
    denoise: int  # k denoising steps (strength = k / steps)
    seeds: tuple[int, ...]  # attempt 0, then the retry seed(s)


@dataclass(frozen=True)
class CCDOutput:
    """The result for one sample: an image, or ``failure`` after every attempt failed."""

    key: str
    image: np.ndarray | None  # (H, W, 3) uint8
    seed: int  # the seed that produced ``image`` (or the last one tried)
    attempt: int  # 0 = first seed, 1 = retried with the second seed
    failure: str | None  # 'nonfinite_latent' | 'constant_image' when dropped


class CCD:
    """Batched img2img under prompt tokens, with classifier-free guidance and sanity checks.

    ``uncond`` (1, K, D) is the CFG unconditional context (the empty prompt's first K
    hidden states, or zeros without a text encoder). Prompts are given as tokens: nothing
    is text-encoded per image.
    """

    def __init__(self, pipe, *, steps: int, guidance: float, uncond: torch.Tensor):  # noqa: F821
        self.pipe = pipe
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.uncond = uncond.to(self.device, self.dtype)  # (1, K, D)
        self.scaling = float(pipe.vae.config.scaling_factor)

    def __call__(self, inputs: Sequence[CCDInput]) -> list[CCDOutput]:
        """Synthesise ``inputs``; samples whose attempt fails are retried with their next seed."""
        done: dict[str, CCDOutput] = {}
        pending = list(inputs)
        attempt = 0
        while pending:
            results = self._attempt(pending, attempt)
            retry = []
            for item, (img, failure) in zip(pending, results, strict=True):
                seed = item.seeds[attempt]
                if failure is not None and attempt + 1 < len(item.seeds):
                    logger.info("sample %s: %s with seed %d; retrying with another seed", item.key, failure, seed)
                    retry.append(item)
                    continue
                done[item.key] = CCDOutput(item.key, img, seed, attempt, failure)
                if failure is not None:
                    logger.warning("sample %s dropped after %d attempts: %s", item.key, attempt + 1, failure)
            pending, attempt = retry, attempt + 1
        return [done[item.key] for item in inputs]

    def _attempt(self, items: Sequence[CCDInput], attempt: int) -> list[tuple[np.ndarray | None, str | None]]:
        """One attempt for every item, one pipeline call per distinct denoising-step count."""
        out: list[tuple[np.ndarray | None, str | None]] = [(None, None)] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.denoise, []).append(i)
        for k, idx in sorted(groups.items()):
            res = self._run_group([items[i] for i in idx], k, attempt)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def _run_group(self, items: Sequence[CCDInput], k: int, attempt: int) -> list[tuple[np.ndarray | None, str | None]]:
        import torch

        pipe, vae = self.pipe, self.pipe.vae
        b = len(items)
        gens = [torch.Generator("cpu").manual_seed(item.seeds[attempt]) for item in items]
        with torch.inference_mode():
            # 1. clean pixels -> [-1, 1]                                  # (B, 3, H, W)
            x = torch.from_numpy(np.stack([item.image for item in items])).permute(0, 3, 1, 2)
            x = x.to(self.device, vae.dtype).div_(127.5).sub_(1.0)
            # 2. batched VAE encode, latent sampled with each sample's own generator
            dist = vae.encode(x).latent_dist
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens])  # (B, 4, h, w)
            z0 = (dist.mean + dist.std * eps.to(self.device, dist.mean.dtype)) * self.scaling
            ok = torch.isfinite(z0).flatten(1).all(dim=1).tolist()
            result: list[tuple[np.ndarray | None, str | None]] = [
                (None, None) if good else (None, "nonfinite_latent") for good in ok
            ]
            keep = [i for i in range(b) if ok[i]]
            if not keep:
                return result
            # 3. noise to strength k/steps and denoise under the prompt tokens with CFG
            prompts = torch.stack([items[i].prompt for i in keep]).to(self.device, self.dtype)  # (B', K, D)
            uncond = self.uncond.expand(len(keep), -1, -1)  # (B', K, D)
            latents = pipe(
                image=z0[keep].to(self.dtype),  # 4 channels: diffusers treats it as latents
                prompt_embeds=prompts,
                negative_prompt_embeds=uncond,
                strength=min(1.0, (k + 0.5) / self.steps),  # img2img floors steps*strength: this gives k
                guidance_scale=self.guidance,
                num_inference_steps=self.steps,
                generator=[gens[i] for i in keep],
                output_type="latent",
                return_dict=False,
            )[0]  # (B', 4, h, w)
            # 4. decode, check, quantise
            finite = torch.isfinite(latents).flatten(1).all(dim=1)
            img = vae.decode(latents.to(vae.dtype) / self.scaling).sample  # (B', 3, H, W) in [-1, 1]
            finite &= torch.isfinite(img).flatten(1).all(dim=1)
            img = ((img.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
            img = img.permute(0, 2, 3, 1).cpu().numpy()  # (B', H, W, 3)
        for j, i in enumerate(keep):
            if not bool(finite[j]):
                result[i] = (None, "nonfinite_latent")
            elif img[j].min() == img[j].max():
                result[i] = (None, "constant_image")
            else:
                result[i] = (np.ascontiguousarray(img[j]), None)
        return result
