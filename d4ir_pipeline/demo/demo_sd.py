"""A small *pre-trained* demo Stable Diffusion: the embedded demo's stand-in for SD's web-scale pretraining.

The tiny random SD of :mod:`tiny_sd` exercises the loading code, but its img2img output
is colour noise, so CCD would synthesise garbage on the demo. Real users start from an
SD that already knows what photos, rain, haze and snow look like. This module gives the
demo the same starting point, at toy scale: starting from the tiny SD's configs (same
SD 1.x folder layout, D = 32, VAE factor 2, 64 px images, 32x32x4 latents) it

1. trains the ``AutoencoderKL`` as an autoencoder (L1 + a small KL) on random zoomed
   crops of the demo's **web** images, and sets ``scaling_factor`` so that scaled
   latents have unit standard deviation (measured);
2. trains the UNet on the DDPM noise-prediction objective (the DDIM scheduler's own
   training betas) over VAE latents of those images, conditioned on the frozen
   (random) CLIP text encoder's hidden states of one caption per weather, with
   caption dropout for classifier-free guidance.

Only ``web-clean`` and ``web-degraded`` records are used (refused otherwise): the
teacher's training pairs and the test sets are never seen. The text encoder stays at its
seeded random weights: distinct captions still give distinct hidden states, which is all
the UNet needs. Both phases are seeded, single-process and resumable (rerun the same
command). The result is a 64 px toy: numbers made with it say nothing about D4IR with a
real SD (see docs/DEMO_SD.md).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from d4ir_pipeline.common.images import psnr
from d4ir_pipeline.common.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
)
from d4ir_pipeline.common.runtime import package_versions, torch_threads
from d4ir_pipeline.common.train import (
    CheckpointDir,
    MetricsLog,
    due,
    rng_state,
    set_lr,
    set_rng_state,
    warmup_cosine,
)
from d4ir_pipeline.config import config_to_dict, opt
from d4ir_pipeline.data.manifests import ImageRecord, load_manifest, open_rgb
from d4ir_pipeline.demo.tiny_sd import TinySDSpec, write_tiny_sd
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.sd import load_img2img_pipeline

logger = logging.getLogger(__name__)

# One caption per weather; "" is the unconditional (dropout) caption.
CAPTIONS: dict[str, str] = {
    "clean": "a photo",
    "rain": "a photo in heavy rain",
    "haze": "a hazy photo",
    "snow": "a photo in snow",
}
WEB_SPLITS: tuple[str, ...] = ("web-clean", "web-degraded")
DEMO_SD_DIR = Path(__file__).resolve().parent / "assets" / "demo_sd"

README = """# Demo Stable Diffusion (d4ir-pipeline)

A 64 px toy Stable Diffusion in the SD 1.x folder layout, trained by `d4ir demo-sd` on
the embedded demo's web images only (web-clean + web-degraded). It stands in for SD's
web-scale pretraining so the demo's CCD synthesis starts from a model that knows the
demo's photos and weathers. Captions: {captions}. Training record: `d4ir_demo_sd.json`,
`metrics.jsonl`. Numbers made with it say nothing about D4IR with a real SD.
"""


class DemoSDError(D4IRError):
    """The demo SD cannot be trained or found (bad data split, missing folder)."""


@dataclass(frozen=True)
class VAETrain:
    """Autoencoder phase."""

    steps: int = opt(700, help="optimizer steps; ~0.6-1 s each on one busy CPU core at the defaults", min=0)
    batch_size: int = opt(8, help="crops per step (small batches, more steps: faster in wall time here)", min=1)
    crop: int = opt(32, help="training crop (px) cut from the 64 px view: 4x cheaper than 64, the VAE is conv", min=8)
    full_frac: float = opt(
        0.15,
        help="last fraction of steps on whole 64 px views (batch/4), so the mid attention sees 32x32",
        min=0,
        max=1,
    )
    lr: float = opt(2e-3, help="AdamW peak learning rate (cosine decay to 10%); 4e-3 was worse", min=0)
    init_logvar: float = opt(-6.0, help="initial posterior log-variance (std 0.05): trains faster than std 1", max=0)
    kl_weight: float = opt(1e-4, help="weight of the mean per-element KL: small, keeps latents near N(0, 1)", min=0)


@dataclass(frozen=True)
class UNetTrain:
    """Noise-prediction phase."""

    steps: int = opt(1200, help="optimizer steps; ~1 s each on one busy CPU core at the defaults", min=0)
    batch_size: int = opt(32, help="latent crops per step", min=1)
    crop: int = opt(16, help="latent crop (16 = 32 px): the UNet is conv + attention, trained cheaply on crops", min=4)
    full_frac: float = opt(0.2, help="last fraction of steps on whole 32x32 latents (batch/4)", min=0, max=1)
    lr: float = opt(1e-3, help="AdamW peak learning rate (cosine decay to 10%)", min=0)
    ema: float = opt(0.995, help="EMA decay of the saved weights (short runs: a short half-life)", min=0, max=1)
    cond_dropout: float = opt(0.15, help="probability of the empty caption (classifier-free guidance)", min=0, max=1)
    t_focus_max: int = opt(650, help="img2img at strength <= 0.65 only visits t < this: sample it more", min=1)
    t_focus_prob: float = opt(0.7, help="fraction of timesteps drawn from [0, t_focus_max); rest uniform", min=0, max=1)
    context_trunc_prob: float = opt(
        0.5,
        help="fraction of batches whose text context is cut to 7-12 tokens (DPA uses K-token contexts)",
        min=0,
        max=1,
    )
    views: int = opt(4, help="cached augmented 64 px views (zoom crop + flip) per web image", min=1)
    weather_balanced: bool = opt(True, help="draw each weather equally often (web-clean has 1/4 of the images)")


@dataclass(frozen=True)
class DemoSDLog:
    """Progress and metrics of both phases (``<work>/metrics.jsonl``, one ``phase`` per row)."""

    every: int = opt(25, help="steps between metrics.jsonl records", min=1)
    progress: bool = opt(True, help="tqdm progress bars")
    tensorboard: bool = opt(False, help="also write TensorBoard event files to <work>/tensorboard/<phase>")


@dataclass(frozen=True)
class DemoSDConfig:
    """Everything that decides the demo SD (recorded in ``d4ir_demo_sd.json``)."""

    data: str = opt("runs/demo/data", help="demo data root (d4ir demo-data); manifests read from <data>/manifests")
    manifests: tuple[str, ...] = opt(
        ("web-clean.jsonl", "web-degraded.jsonl"), help="manifest files under <data>/manifests (web splits only)"
    )
    out: str = opt("runs/demo/demo-sd", help="output diffusers folder")
    work: str = opt("", help="checkpoints, latents and metrics of the resumable training (empty: <out>.train)")
    seed: int = opt(0, help="seeds the initial weights (tiny SD spec), the data order, noise and dropout")
    resolution: int = opt(64, help="image size the UNet was built for (tiny SD: 64 px)", min=16)
    load_size: int = opt(96, help="every web image resized (short side) and centre-cropped to this first", min=16)
    zoom: tuple[float, float] = opt((0.67, 1.0), help="side of the random crop, as a fraction of load_size")
    threads: int = opt(1, help="torch CPU threads; 1 is fastest on a shared 2-core machine (0 = torch default)", min=0)
    ckpt_every: int = opt(100, help="steps between resumable checkpoints", min=1)
    ckpt_keep: int = opt(1, help="checkpoints kept per phase (older ones are deleted)", min=1)
    eval_images: int = opt(16, help="web images for the final PSNR check", min=1)
    vae: VAETrain = field(default_factory=VAETrain)
    unet: UNetTrain = field(default_factory=UNetTrain)
    log: DemoSDLog = field(default_factory=DemoSDLog)


@dataclass
class DemoSDResult:
    """What ``build_demo_sd`` produced and measured."""

    out: Path
    scaling_factor: float
    vae_psnr: float  # dB, web images, 64 px
    img2img_psnr: dict[str, float]  # "s0.3" -> dB vs input (web-clean, caption "a photo")
    seconds: float


def demo_sd_path() -> Path:
    """The committed demo SD folder shipped in the package."""
    if not (DEMO_SD_DIR / "model_index.json").is_file():
        raise DemoSDError(
            f"the committed demo SD is missing at {DEMO_SD_DIR}; rebuild it with "
            f"`d4ir demo-sd --out {DEMO_SD_DIR}` (see docs/DEMO_SD.md)"
        )
    return DEMO_SD_DIR


# ---------------------------------------------------------------------------------------
# data


def load_web_images(data: str | Path, manifests: tuple[str, ...], load_size: int):
    """All web images as uint8 (N, 3, S, S) plus their weather labels; other splits are refused."""
    import torch

    data = Path(data)
    arrays: list[np.ndarray] = []
    weathers: list[str] = []
    for name in manifests:
        path = data / "manifests" / name
        if not path.is_file():
            raise DemoSDError(
                f"`data` = {str(data)!r}: no manifest {path} (build the demo data: d4ir demo-data --out {data})"
            )
        records: list[ImageRecord] = load_manifest(path)
        for rec in records:
            if rec.split not in WEB_SPLITS:
                raise DemoSDError(
                    f"{path}: record {rec.id!r} has split {rec.split!r}; the demo SD trains on {list(WEB_SPLITS)} only"
                )
            weather = rec.weather or "clean"
            if weather not in CAPTIONS:
                raise DemoSDError(
                    f"{path}: record {rec.id!r} has weather {weather!r}; expected one of {sorted(CAPTIONS)}"
                )
            arrays.append(square(open_rgb(data, rec), load_size))
            weathers.append(weather)
    if not arrays:
        raise DemoSDError(f"`manifests` = {list(manifests)}: no images under {data}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    return images, weathers


def square(img, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop: (size, size, 3) uint8."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def random_views(images, idx, gen, out: int, zoom: tuple[float, float]):
    """Random zoomed square crops of ``images[idx]``, resized to ``out``, random h-flip: (B, 3, out, out) in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    s = images.shape[-1]
    u = torch.rand(3 * len(idx) + 1, generator=gen)
    side = max(8, round(s * (zoom[0] + (zoom[1] - zoom[0]) * float(u[-1]))))  # one zoom per batch
    crops = []
    for j, i in enumerate(idx.tolist()):
        x0 = int(u[3 * j] * (s - side + 1))
        y0 = int(u[3 * j + 1] * (s - side + 1))
        c = images[i, :, y0 : y0 + side, x0 : x0 + side]
        crops.append(c.flip(-1) if u[3 * j + 2] < 0.5 else c)
    x = torch.stack(crops).float() / 127.5 - 1.0  # (B, 3, side, side)
    if side != out:
        x = F.interpolate(x, size=(out, out), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def _rand_crop(x, size: int, gen):
    """A random ``size`` square crop per sample of (B, C, H, W)."""
    import torch

    b, _, h, w = x.shape
    if size >= h and size >= w:
        return x
    ys = torch.randint(0, h - size + 1, (b,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=gen).tolist()
    return torch.stack([x[i, :, y : y + size, z : z + size] for i, (y, z) in enumerate(zip(ys, xs, strict=True))])


# ---------------------------------------------------------------------------------------
# resumable training state


def zero_init_residuals(model) -> int:
    """Zero the last layer of every residual branch (LDM / ADM ``zero_module``): each block starts as identity.

    diffusers' from-config init does not do this (it expects pretrained weights); from
    scratch it makes both the autoencoder and the UNet train several times faster.
    Returns how many layers were zeroed.
    """
    import torch

    layers = [layer for m in model.modules() if (layer := _residual_out(m)) is not None]
    if hasattr(model, "conv_norm_out") and hasattr(model, "conv_out"):  # the UNet's noise head
        layers.append(model.conv_out)
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return len(layers)


def _residual_out(m):
    """The last layer of a residual branch (ResNet block, transformer, residual attention), else None."""
    kind = type(m).__name__
    if kind == "ResnetBlock2D":
        return m.conv2
    if kind == "Transformer2DModel":
        return m.proj_out
    if kind == "Attention" and getattr(m, "residual_connection", False):
        return m.to_out[0]
    return None


def phase_warmup(steps: int) -> int:
    """Warm-up steps of a phase: 20, fewer for short runs (a tenth of them, at least 1)."""
    return min(20, max(1, steps // 10))


def _phase_lr(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return warmup_cosine(step, total=steps, warmup=phase_warmup(steps), min_ratio=0.1, peak=peak)


class _Phase:
    """One training phase in ``work/<name>``: checkpoints, ``done.json`` and its rows of ``work/metrics.jsonl``."""

    def __init__(self, cfg: DemoSDConfig, work: Path, name: str):
        self.name, self.work, self.cfg = name, work, cfg
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpts = CheckpointDir(self.dir / "ckpt", keep=cfg.ckpt_keep)

    def done(self) -> dict | None:
        """The phase's record when it has finished (its weights are those of the last checkpoint)."""
        path = self.dir / "done.json"
        return read_json(path) if path.is_file() else None

    def final_weights(self, key: str) -> dict:
        return self.ckpts.load().weights(key)

    def resume(self, modules: dict, optimizer, gen) -> int:
        """Restore the last checkpoint; returns its step (0 when none)."""
        ck = self.ckpts.load()
        if ck is None:
            return 0
        for key, module in modules.items():
            module.load_state_dict(ck.weights(key))
        optimizer.load_state_dict(ck.state["optimizer"])
        gen.set_state(ck.state["gen"])
        set_rng_state(ck.state["rng"])
        logger.info("resuming %s from step %d (%s)", self.name, ck.step, ck.path)
        return ck.step

    def metrics(self, start: int) -> MetricsLog:
        """This phase's rows of ``work/metrics.jsonl`` (the other phase's rows are left alone)."""
        tb = self.work / "tensorboard" / self.name if self.cfg.log.tensorboard else None
        return MetricsLog(self.work / "metrics.jsonl", resume_step=start, owns=self.owns, tensorboard=tb)

    def owns(self, row: dict) -> bool:
        return row.get("phase") == self.name

    def save(self, step: int, modules: dict, optimizer, gen) -> None:
        weights = {key: module.state_dict() for key, module in modules.items()}
        state = {"optimizer": optimizer.state_dict(), "gen": gen.get_state(), "rng": rng_state()}
        self.ckpts.save(step, state=state, weights=weights)

    def finish(self, info: dict) -> None:
        atomic_write_json(self.dir / "done.json", info)

    def bar(self, start: int, steps: int, progress: bool):
        from tqdm.auto import tqdm

        show = progress and self.cfg.log.progress
        return tqdm(range(start, steps), initial=start, total=steps, desc=f"demo-sd {self.name}", disable=not show)


# ---------------------------------------------------------------------------------------
# phase 1: the autoencoder


def train_vae(vae, images, cfg: DemoSDConfig, work: Path, *, progress: bool = True) -> dict:
    """Train ``vae`` in place as an autoencoder on random views of ``images`` (uint8 (N, 3, S, S)); resumable."""
    import torch

    vc, phase = cfg.vae, _Phase(cfg, work, "vae")
    # 1. finished already?
    if (info := phase.done()) is not None:
        vae.load_state_dict(phase.final_weights("vae"))
        logger.info("VAE phase already done (%s)", phase.dir)
        return info
    # 2. model, optimizer, generator; zero-init residual branches and a near-deterministic posterior (std e^-3:
    # sampling noise slows early training)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=vc.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    zero_init_residuals(vae)
    with torch.no_grad():
        vae.quant_conv.weight[vae.config.latent_channels :].zero_()
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(vc.init_logvar)
    # 3. resume
    start = phase.resume({"vae": vae}, optimizer, gen)
    # 4. train: batch -> loss -> step -> log -> maybe checkpoint
    full_from = round(vc.steps * (1 - vc.full_frac))
    psnrs: list[float] = []
    with phase.metrics(start) as log:
        bar = phase.bar(start, vc.steps, progress)
        for step in bar:
            row, psnr = _vae_step(vae, images, cfg, optimizer, gen, step, full=step >= full_from)
            psnrs.append(psnr)
            if due(step + 1, cfg.log.every, vc.steps):
                log.write({"phase": "vae", "step": step + 1, **row, "psnr_train": float(np.mean(psnrs))})
                bar.set_postfix(psnr=f"{np.mean(psnrs):.2f}", l1=f"{row['l1']:.4f}")
                psnrs = []
            if due(step + 1, cfg.ckpt_every, vc.steps):
                phase.save(step + 1, {"vae": vae}, optimizer, gen)
    # 5. final
    vae.eval().requires_grad_(False)
    info = {"steps": vc.steps, "last": _last_row(work, phase)}
    phase.finish(info)
    return info


def _vae_step(vae, images, cfg: DemoSDConfig, optimizer, gen, step: int, *, full: bool) -> tuple[dict, float]:
    """One autoencoder step on a batch of random views: the loss terms and the batch's PSNR (dB)."""
    import torch
    import torch.nn.functional as F

    vc = cfg.vae
    bs = max(1, vc.batch_size // 4) if full else vc.batch_size
    idx = torch.randint(0, len(images), (bs,), generator=gen)
    x = random_views(images, idx, gen, cfg.resolution, cfg.zoom)  # (B, 3, 64, 64)
    if not full:
        x = _rand_crop(x, vc.crop, gen)  # (B, 3, c, c)
    set_lr(optimizer, _phase_lr(step, vc.steps, vc.lr))
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)  # (B, 4, c/2, c/2)
    rec = vae.decode(z).sample
    l1 = F.l1_loss(rec, x)
    kl = post.kl().mean() / z[0].numel()
    loss = l1 + vc.kl_weight * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():  # images in [-1, 1]: a data range of 2
        p = psnr(rec.clamp(-1, 1), x, data_range=2.0, max_db=100.0)
    return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}, p


def _last_row(work: Path, phase: _Phase) -> dict | None:
    """The phase's last metrics row (recorded in done.json)."""
    path = work / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if phase.owns(r)] if path.is_file() else []
    return rows[-1] if rows else None


def measure_latent_std(vae, images, resolution: int) -> tuple[float, float]:
    """(std, mean) of posterior samples of ``images`` at ``resolution`` (sets ``scaling_factor = 1/std``)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    zs = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = _fit(images[i : i + 32], resolution)
            zs.append(vae.encode(x).latent_dist.sample(generator=gen))
    z = torch.cat(zs)  # (N, 4, r/2, r/2)
    return float(z.std()), float(z.mean())


def _fit(images_u8, resolution: int):
    """uint8 (B, 3, S, S) -> float (B, 3, r, r) in [-1, 1] (antialiased resize)."""
    import torch.nn.functional as F

    x = images_u8.float() / 127.5 - 1.0
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def vae_psnr(vae, images, resolution: int) -> float:
    """Mean reconstruction PSNR (dB, [0, 1] range) of the posterior mode of ``images``."""
    import torch

    vals = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = _fit(images[i : i + 32], resolution)
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            vals += psnr(rec, x, data_range=2.0, max_db=100.0, per_sample=True)
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------
# phase 2: the UNet


def cache_latents(vae, images, weathers: list[str], cfg: DemoSDConfig, work: Path):
    """Posterior (mean, std) of ``views`` augmented views per image: (M, 4, r/2, r/2) each, labels (M,).

    Cached in ``work/latents.safetensors``, reused only when the VAE weights and view options match.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    key = {
        "vae": _state_digest(vae),
        "views": cfg.unet.views,
        "zoom": list(cfg.zoom),
        "seed": cfg.seed,
        "resolution": cfg.resolution,
        "n": len(images),
    }
    key_s = json.dumps(key, sort_keys=True)
    path = work / "latents.safetensors"
    if path.is_file():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key_s:
                t = load_file(path)
                return t["mean"], t["std"], t["label"]
        logger.info("latent cache %s was made with other VAE weights or options: recomputing", path)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    names = list(CAPTIONS)
    labels = torch.tensor([names.index(w) for w in weathers])
    means, stds, labs = [], [], []
    with torch.no_grad():
        for _ in range(cfg.unet.views):
            for i in range(0, len(images), 32):
                idx = torch.arange(i, min(i + 32, len(images)))
                x = random_views(images, idx, gen, cfg.resolution, cfg.zoom)  # (b, 3, r, r)
                post = vae.encode(x).latent_dist
                means.append(post.mean)
                stds.append(post.std)
                labs.append(labels[idx])
    t = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "label": torch.cat(labs)}
    atomic_write_bytes(path, save(t, metadata={"key": key_s}))
    return t["mean"], t["std"], t["label"]


def _state_digest(module) -> str:
    """sha256 of a module's weights (identifies the VAE a latent cache was made with)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def text_contexts(text_encoder, tokenizer):
    """Hidden states of [*CAPTIONS.values(), ""]: (W + 1, 77, D), and the longest token count."""
    import torch

    prompts = [*CAPTIONS.values(), ""]
    tok = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ctx = text_encoder(tok.input_ids)[0]
    n_tokens = int(tok.attention_mask.sum(dim=1).max())
    return ctx, n_tokens


def _sample_t(b: int, uc: UNetTrain, num_train: int, gen):
    """Timesteps: ``t_focus_prob`` of them in [0, t_focus_max), the rest uniform in [0, T)."""
    import torch

    focus = torch.rand(b, generator=gen) < uc.t_focus_prob
    t_all = torch.randint(0, num_train, (b,), generator=gen)
    t_low = torch.randint(0, min(uc.t_focus_max, num_train), (b,), generator=gen)
    return torch.where(focus, t_low, t_all)


def train_unet(unet, scheduler, latents, contexts, cfg: DemoSDConfig, work: Path, *, progress: bool = True) -> dict:
    """Train ``unet`` in place on epsilon prediction; ``latents`` = (mean, std, label) scaled; resumable.

    ``contexts`` = (hidden states (W + 1, 77, D) of the captions then "", longest caption token count).
    The saved weights are the EMA weights.
    """
    import copy

    import torch

    uc, phase = cfg.unet, _Phase(cfg, work, "unet")
    ema = copy.deepcopy(unet).requires_grad_(False)
    # 1. finished already?
    if (info := phase.done()) is not None:
        unet.load_state_dict(phase.final_weights("ema"))
        logger.info("UNet phase already done (%s)", phase.dir)
        return info
    # 2. model (zero-init residual branches), EMA copy, optimizer, generator
    data = _UNetData.of(latents, contexts, scheduler)
    zero_init_residuals(unet)
    ema.load_state_dict(unet.state_dict())
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=uc.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 3)
    # 3. resume
    start = phase.resume({"unet": unet, "ema": ema}, optimizer, gen)
    # 4. train: batch -> loss -> step -> EMA -> log -> maybe checkpoint
    full_from = round(uc.steps * (1 - uc.full_frac))
    losses: list[float] = []
    with phase.metrics(start) as log:
        bar = phase.bar(start, uc.steps, progress)
        for step in bar:
            losses.append(_unet_step(unet, ema, data, uc, optimizer, gen, step, full=step >= full_from))
            if due(step + 1, cfg.log.every, uc.steps):
                lr = _phase_lr(step, uc.steps, uc.lr)
                log.write({"phase": "unet", "step": step + 1, "loss": float(np.mean(losses)), "lr": lr})
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses = []
            if due(step + 1, cfg.ckpt_every, uc.steps):
                phase.save(step + 1, {"unet": unet, "ema": ema}, optimizer, gen)
    # 5. final: the EMA weights
    unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    info = {"steps": uc.steps, "last": _last_row(work, phase)}
    phase.finish(info)
    return info


@dataclass
class _UNetData:
    """What the UNet steps draw from: scaled latent posteriors, their weather labels, caption contexts, alphas."""

    mean: object  # (M, 4, r/2, r/2)
    std: object
    label: object  # (M,) caption index
    by_weather: list  # per weather: indices into mean
    ctx_all: object  # (W + 1, 77, D): the captions, then ""
    n_tok: int
    alphas: object  # (T,) DDIM's training alphas_cumprod

    @classmethod
    def of(cls, latents, contexts, scheduler) -> _UNetData:
        import torch

        mean, std, label = latents
        ctx_all, n_tok = contexts
        by_weather = [torch.nonzero(label == w).flatten() for w in range(ctx_all.shape[0] - 1)]
        return cls(mean, std, label, by_weather, ctx_all, n_tok, scheduler.alphas_cumprod)


def _unet_step(unet, ema, d: _UNetData, uc: UNetTrain, optimizer, gen, step: int, *, full: bool) -> float:
    """One noise-prediction step plus the EMA update; returns the loss."""
    import torch
    import torch.nn.functional as F

    bs = max(1, uc.batch_size // 4) if full else uc.batch_size
    # 1. pick images (weather-balanced), sample their posterior, crop
    if uc.weather_balanced:
        w = torch.randint(0, len(d.by_weather), (bs,), generator=gen)
        idx = torch.stack([d.by_weather[k][torch.randint(0, len(d.by_weather[k]), (1,), generator=gen)][0] for k in w])
    else:
        idx = torch.randint(0, len(d.label), (bs,), generator=gen)
    z0 = d.mean[idx] + d.std[idx] * torch.randn(d.mean[idx].shape, generator=gen)  # (B, 4, 32, 32), already scaled
    if not full:
        z0 = _rand_crop(z0, uc.crop, gen)
    # 2. captions with dropout, optionally truncated contexts
    cap = d.label[idx].clone()
    cap[torch.rand(bs, generator=gen) < uc.cond_dropout] = d.ctx_all.shape[0] - 1
    ctx = d.ctx_all[cap]  # (B, 77, D)
    if float(torch.rand(1, generator=gen)) < uc.context_trunc_prob:
        ctx = ctx[:, : int(torch.randint(d.n_tok, d.n_tok + 6, (1,), generator=gen))]
    # 3. noise, predict it, step, EMA
    t = _sample_t(bs, uc, len(d.alphas), gen)
    noise = torch.randn(z0.shape, generator=gen)
    a = d.alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    set_lr(optimizer, _phase_lr(step, uc.steps, uc.lr))
    loss = F.mse_loss(unet(zt, t, encoder_hidden_states=ctx).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    decay = min(uc.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
            pe.lerp_(p, 1 - decay)
    return loss.item()


# ---------------------------------------------------------------------------------------
# measuring


def img2img_psnr(
    pipe,
    images,
    *,
    strength: float,
    steps: int = 20,
    guidance: float = 3.0,
    prompt: str = "a photo",
    seed: int = 0,
):
    """Run img2img on float (B, 3, r, r) ``images`` in [0, 1]; returns (mean PSNR vs input in dB, outputs (B, r, r, 3))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = pipe(
        prompt=[prompt] * len(images),
        image=images,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gen,
        output_type="np",
    ).images  # (B, r, r, 3) float in [0, 1]
    ref = images.permute(0, 2, 3, 1).cpu().numpy()
    return float(np.mean(psnr(out, ref, max_db=100.0, per_sample=True))), out


def save_grid(path: str | Path, rows: list[np.ndarray], *, scale: int = 2) -> Path:
    """Write rows of (B, H, W, 3) float [0, 1] images as one PNG (rows top to bottom), upscaled ``scale`` x."""
    from PIL import Image

    tiles = [np.concatenate(list(r), axis=1) for r in rows]  # (H, B*W, 3)
    grid = (np.clip(np.concatenate(tiles, axis=0), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())


def _luma_stats(images: np.ndarray) -> dict[str, float]:
    """Mean and spatial std of luminance of (B, H, W, 3) [0, 1] images (haze: brighter, flatter)."""
    y = images @ np.array([0.299, 0.587, 0.114])  # (B, H, W)
    return {"luma_mean": float(y.mean()), "luma_std": float(y.std(axis=(1, 2)).mean())}


def measure(
    path: str | Path,
    data: str | Path,
    *,
    n: int = 20,
    steps: int = 20,
    guidance: float = 3.0,
    grid: str | Path | None = None,
) -> dict:
    """The numbers of docs/DEMO_SD.md for the SD folder ``path`` (evaluation only; nothing trains here).

    VAE PSNR on web-clean images and on the unseen test targets; img2img PSNR vs input at
    strength 0.3 / 0.5 (caption "a photo"); at strength 0.6 under each weather caption, the
    PSNR to the "a photo" output and luminance statistics (to compare with the web-degraded
    images of that weather). ``grid``: inputs, VAE reconstructions, s 0.3, s 0.5, then one
    row per weather caption at s 0.6.
    """
    import torch

    data = Path(data)
    recs = load_manifest(data / "manifests" / "test-rain.jsonl")[:n]
    test = torch.from_numpy(np.stack([square(open_rgb(data, r.target), 64) for r in recs])).permute(0, 3, 1, 2)
    clean_web, _ = load_web_images(data, ("web-clean.jsonl",), 64)
    web = clean_web[:: max(1, len(clean_web) // n)][:n]
    pipe = load_img2img_pipeline(str(path), device="cpu", attention="sdpa")
    res: dict = {"n": len(test), "steps": steps, "guidance": guidance}
    res["vae_psnr"] = {"web-clean": vae_psnr(pipe.vae, web, 64), "test-targets": vae_psnr(pipe.vae, test, 64)}
    x = test.float() / 255.0
    with torch.no_grad():
        recon = (pipe.vae.decode(pipe.vae.encode(x * 2 - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    rows = [x.permute(0, 2, 3, 1).numpy(), recon.permute(0, 2, 3, 1).numpy()]
    res["img2img_psnr"] = {}
    for name, imgs in (("test-targets", x), ("web-clean", web.float() / 255.0)):
        for s in (0.3, 0.5):
            p, out = img2img_psnr(pipe, imgs, strength=s, steps=steps, guidance=guidance, prompt=CAPTIONS["clean"])
            res["img2img_psnr"][f"{name} s{s}"] = p
            if name == "test-targets":
                rows.append(out)
    _, base = img2img_psnr(pipe, x, strength=0.6, steps=steps, guidance=guidance, prompt=CAPTIONS["clean"])
    res["weather_s0.6"] = {"clean": {"psnr_to_clean_caption": float("inf"), **_luma_stats(base)}}
    for w in ("rain", "haze", "snow"):
        _, out = img2img_psnr(pipe, x, strength=0.6, steps=steps, guidance=guidance, prompt=CAPTIONS[w])
        p = float(np.mean(psnr(out, base, max_db=100.0, per_sample=True)))
        res["weather_s0.6"][w] = {"psnr_to_clean_caption": p}
        res["weather_s0.6"][w].update(_luma_stats(out))
        rows.append(out)
    deg, dw = load_web_images(data, ("web-degraded.jsonl",), 64)
    res["web_reference"] = {"clean": _luma_stats(clean_web.permute(0, 2, 3, 1).numpy() / 255.0)}
    for w in ("rain", "haze", "snow"):
        sel = deg[[i for i, k in enumerate(dw) if k == w]].permute(0, 2, 3, 1).numpy() / 255.0
        res["web_reference"][w] = _luma_stats(sel)
    if grid is not None:
        save_grid(grid, [r[:8] for r in rows], scale=2)
    return res


# ---------------------------------------------------------------------------------------
# the stage


def _check_phase_config(phase_dir: Path, wanted: dict) -> None:
    """Record a phase's config; refuse to resume a phase that was started with another one."""
    path = phase_dir / "config.json"
    if path.is_file() and read_json(path) != wanted:
        raise DemoSDError(
            f"{phase_dir} holds a training phase started with a different config ({path}); "
            f"delete {phase_dir} to retrain it, or rerun with the same options"
        )
    phase_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, wanted)


def _existing(out: Path) -> DemoSDResult:
    """The result recorded with a demo SD folder that is already there (nothing is retrained)."""
    info = read_json(out / "d4ir_demo_sd.json") if (out / "d4ir_demo_sd.json").is_file() else {}
    logger.info("demo SD already at %s (use --overwrite to rebuild)", out)
    m = info.get("measured", {})
    return DemoSDResult(
        out, float(info.get("scaling_factor", 0.0)), m.get("vae_psnr", float("nan")), m.get("img2img_psnr", {}), 0.0
    )


def _work_dir(cfg: DemoSDConfig, out: Path) -> Path:
    """The training work folder, with each phase's config recorded (a phase started with another is refused)."""
    work = Path(cfg.work) if cfg.work else out.with_name(out.name + ".train")
    work.mkdir(parents=True, exist_ok=True)
    full = config_to_dict(cfg)
    shared = {k: full[k] for k in ("data", "manifests", "seed", "resolution", "load_size", "zoom")}
    _check_phase_config(work / "vae", {**shared, "vae": full["vae"]})  # the VAE phase is reused when only UNet
    _check_phase_config(work / "unet", {**shared, "vae": full["vae"], "unet": full["unet"]})  # options change
    return work


def _measure_folder(folder: Path, images, weathers: list[str], cfg: DemoSDConfig) -> dict:
    """VAE PSNR on the web images and img2img PSNR vs input at strength 0.3 / 0.5 on web-clean ones."""
    pipe = load_img2img_pipeline(str(folder), device="cpu", attention="sdpa")
    n = min(cfg.eval_images, len(images))
    clean = [i for i, w in enumerate(weathers) if w == "clean"][:n]
    x = _fit(images[clean], cfg.resolution)
    measured = {"vae_psnr": vae_psnr(pipe.vae, images, cfg.resolution), "img2img_psnr": {}}
    for s in (0.3, 0.5):
        psnr, _ = img2img_psnr(pipe, (x + 1) / 2, strength=s, steps=20, guidance=3.0, prompt=CAPTIONS["clean"])
        measured["img2img_psnr"][f"s{s}"] = psnr
    return measured


def build_demo_sd(cfg: DemoSDConfig, *, overwrite: bool = False, progress: bool = True) -> DemoSDResult:
    """Train the demo SD described by ``cfg`` and write it to ``cfg.out`` (resumable; see the module docstring).

    ``threads`` holds for the call; the caller's torch thread count is restored after it.
    """
    with torch_threads(cfg.threads):
        return _build_demo_sd(cfg, overwrite, progress)


def _build_demo_sd(cfg: DemoSDConfig, overwrite: bool, progress: bool) -> DemoSDResult:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    t0 = time.time()
    out = Path(cfg.out)
    if (out / "model_index.json").is_file() and not overwrite:
        return _existing(out)
    work = _work_dir(cfg, out)

    # 1. the starting point: the tiny SD's configs and seeded weights (text encoder stays as is)
    base = write_tiny_sd(work / "init", TinySDSpec(sample_size=cfg.resolution // 2, seed=cfg.seed))
    vae = AutoencoderKL.from_pretrained(base / "vae")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    scheduler = DDIMScheduler.from_pretrained(base / "scheduler")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")

    # 2. the web images (web-clean + web-degraded only)
    images, weathers = load_web_images(cfg.data, cfg.manifests, cfg.load_size)
    logger.info("demo SD: %d web images (%s)", len(images), {w: weathers.count(w) for w in CAPTIONS})

    # 3. autoencoder, then the latent scale
    torch.manual_seed(cfg.seed)
    train_vae(vae, images, cfg, work, progress=progress)
    vae.eval().requires_grad_(False)
    lat_std, lat_mean = measure_latent_std(vae, images, cfg.resolution)
    scaling = 1.0 / lat_std
    vae.register_to_config(scaling_factor=scaling)
    logger.info("latent std %.4f mean %.4f -> scaling_factor %.5f", lat_std, lat_mean, scaling)

    # 4. UNet on cached, scaled latents of augmented views
    mean, std, label = cache_latents(vae, images, weathers, cfg, work)
    contexts = text_contexts(text_encoder, tokenizer)
    train_unet(unet, scheduler, (mean * scaling, std * scaling, label), contexts, cfg, work, progress=progress)

    # 5. write the diffusers folder (built in a staging folder, then renamed)
    with atomic_dir(out) as tmp:  # a staging folder beside `out`, renamed into place when complete
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        vae.save_pretrained(tmp / "vae")
        unet.save_pretrained(tmp / "unet")
        (tmp / "d4ir_tiny_sd.json").unlink(missing_ok=True)
        if (work / "metrics.jsonl").is_file():
            shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")

        # 6. measure on web images and record
        measured = _measure_folder(tmp, images, weathers, cfg)
        info = {
            "kind": "d4ir-demo-sd",
            "captions": CAPTIONS,
            "config": config_to_dict(cfg),
            "scaling_factor": scaling,
            "latent_std_unscaled": lat_std,
            "latent_mean_unscaled": lat_mean,
            "data": {
                "images": len(images),
                "per_weather": {w: weathers.count(w) for w in CAPTIONS},
                "splits": list(WEB_SPLITS),
            },
            "measured": measured,
            "measured_on": "web-clean images (training data), 64 px, 20 DDIM steps, guidance 3, caption 'a photo'",
            "versions": package_versions(),
            "train_seconds": round(time.time() - t0, 1),
        }
        atomic_write_json(tmp / "d4ir_demo_sd.json", info)
        atomic_write_text(
            tmp / "README.md", README.format(captions=", ".join(f"{k}: {v!r}" for k, v in CAPTIONS.items()))
        )
    logger.info("demo SD written to %s: vae %.2f dB, img2img %s", out, measured["vae_psnr"], measured["img2img_psnr"])
    return DemoSDResult(out, scaling, measured["vae_psnr"], measured["img2img_psnr"], time.time() - t0)


@click.command("demo-sd")
@click.option(
    "--out", default=DemoSDConfig.out, show_default=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option("--work", default="", type=click.Path(file_okay=False), help="Training work dir (default OUT.train).")
@click.option(
    "--data", default=DemoSDConfig.data, show_default=True, type=click.Path(file_okay=False), help="Demo data root."
)
@click.option(
    "--vae-steps", default=VAETrain.steps, show_default=True, type=click.IntRange(0), help="Autoencoder steps."
)
@click.option("--unet-steps", default=UNetTrain.steps, show_default=True, type=click.IntRange(0), help="UNet steps.")
@click.option("--seed", default=DemoSDConfig.seed, show_default=True, help="Seed of weights, data order and noise.")
@click.option(
    "--threads",
    default=DemoSDConfig.threads,
    show_default=True,
    type=click.IntRange(0),
    help="Torch threads (0 = default).",
)
@click.option(
    "--overwrite", is_flag=True, help="Rebuild even if OUT already holds a model (training resumes from OUT.train)."
)
def demo_sd_command(
    out: str, work: str, data: str, vae_steps: int, unet_steps: int, seed: int, threads: int, overwrite: bool
) -> None:
    """Train the small demo SD on the demo's web images (resumable: rerun to continue)."""
    cfg = DemoSDConfig(
        data=data,
        out=out,
        work=work,
        seed=seed,
        threads=threads,
        vae=dataclasses.replace(VAETrain(), steps=vae_steps),
        unet=dataclasses.replace(UNetTrain(), steps=unet_steps),
    )
    r = build_demo_sd(cfg, overwrite=overwrite)
    psnrs = ", ".join(f"{k} {v:.2f} dB" for k, v in r.img2img_psnr.items())
    click.echo(
        f"demo SD at {r.out}: VAE {r.vae_psnr:.2f} dB; img2img vs input ({psnrs}); scaling {r.scaling_factor:.4f}"
    )
