"""CycleGAN-style unpaired restoration: the comparison's unsupervised learned row (no teacher, no pairs).

Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017, applied to restoration as the unsupervised deraining /
dehazing / desnowing methods the paper compares against do: a degraded -> clean
generator ``G`` and a clean -> degraded generator ``F`` trained on the same unpaired
web-clean and web-degraded images D4IR itself sees, with

- LSGAN adversarial terms (Mao et al. 2017) from two PatchGAN discriminators
  (Isola et al. 2017), ``D_clean`` on clean images and ``D_deg`` on degraded ones;
- cycle consistency ``|F(G(y), w) - y|_1 + |G(F(x, w)) - x|_1`` (weight ``cycle_weight``);
- identity ``|G(x) - x|_1 + |F(y, w_y) - y|_1`` (weight ``identity_weight * cycle_weight``);
- a 50-image history pool of generated images for the discriminators (Shrivastava et al. 2017).

[design] ``G`` is the student's architecture (sizes match the distilled rows) and is NOT
weather-conditioned: it is the restorer and, like the student and the teacher, is scored
blind on every test weather. ``F`` and ``D_deg`` ARE conditioned on the weather label
(one-hot planes concatenated to the input, as in StarGAN / pix2pix), when every degraded
image has one (folder names give it for free, as for the DPA): the degraded domain is a
mixture of three, and a deterministic unconditioned ``F`` can only cover it by collapsing
to one "average" degradation, or by hiding the weather inside ``G(y)`` so the cycle can be
undone, which is exactly what a restorer must not learn. [design] The learning rate
follows the project's one schedule (warm-up + cosine, common.train.warmup_cosine) instead of
CycleGAN's constant-then-linear decay, so every row of the table uses the same shape.

Resumable like every loop of the project: ``ckpt/`` holds all four networks, both
optimisers and schedules, the history pool, the data generator and the global RNG every
``checkpoint_every`` steps, and a rerun (after a crash or SIGKILL) continues to exactly the
weights of an uninterrupted run. The student folder is written last: its presence means done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d4ir_pipeline.common.images import image_grid, save_png, to_uint8
from d4ir_pipeline.common.io import atomic_dir, atomic_write_bytes, atomic_write_json, read_json, sha256_bytes
from d4ir_pipeline.common.train import CheckpointDir, MetricsLog, rng_state, set_rng_state, warmup_cosine
from d4ir_pipeline.data.manifests import load_manifest, open_rgb
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import load_weights, save_model
from d4ir_pipeline.models.tiling import crop_to, pad_to_multiple
from d4ir_pipeline.stage1.ccd import prepare_image

logger = logging.getLogger(__name__)


_NEUTRAL = ("checkpoint_every", "stop_after")  # UnpairedConfig keys that do not change the trained weights


@dataclass(frozen=True)
class UnpairedConfig:
    """Hyper-parameters of the CycleGAN-style row (defaults: CycleGAN's, networks sized for a CPU)."""

    steps: int = 2000  # generator updates (one discriminator update follows each)
    batch: int = 8  # clean and degraded crops per step, each
    patch: int = 64  # crop side
    seed: int = 0  # networks' init, data order, crops, flips, target weathers, the pool
    lr: float = 2e-4  # Adam, generators and discriminators (CycleGAN)
    betas: tuple[float, float] = (0.5, 0.999)  # CycleGAN's
    warmup: int = 0  # learning-rate warm-up steps, then cosine to min_lr_ratio
    min_lr_ratio: float = 0.0
    gan_weight: float = 1.0
    cycle_weight: float = 10.0  # lambda_cyc (CycleGAN: 10)
    identity_weight: float = 0.5  # identity term = identity_weight * cycle_weight (CycleGAN: 0.5)
    pool_size: int = 50  # generated-image history for the discriminators (0 = off)
    conditioned: bool = True  # condition F and D_deg on the weather label (when every image has one)
    g_width: int = 32  # F's channels
    g_blocks: int = 4  # F's residual blocks at half resolution
    d_width: int = 32  # discriminators' first-layer channels
    d_layers: int = 3  # stride-2 layers of each PatchGAN
    grad_clip: float = 0.0  # max gradient norm per network pair (0 = off, as CycleGAN)
    checkpoint_every: int = 100
    stop_after: int = 0  # stop after N new steps (a checkpoint is written there); rerun resumes
    grid: int = 4  # samples per weather in samples.png


# ---------------------------------------------------------------------------------------
# networks


class Degrader(nn.Module):
    """F: clean (B, 3, H, W) [+ weather one-hot planes (B, W, H, W)] -> degraded (B, 3, H, W), residual.

    Head conv, a stride-2 conv, ``blocks`` residual blocks at half resolution (haze is a
    low-frequency veil: the receptive field must be large), nearest-upsample conv, tail.
    """

    def __init__(self, classes: int = 0, width: int = 32, blocks: int = 4):
        super().__init__()
        self.classes, self.width, self.blocks = classes, width, blocks
        act = nn.LeakyReLU(0.2, inplace=True)
        self.head = nn.Sequential(nn.Conv2d(3 + classes, width, 3, padding=1), act)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act)
        self.body = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(2 * width, 2 * width, 3, padding=1), act, nn.Conv2d(2 * width, 2 * width, 3, padding=1)
            )
            for _ in range(blocks)
        )
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1), act
        )
        self.tail = nn.Conv2d(2 * width, 3, 3, padding=1)

    def forward(self, x: Tensor, onehot: Tensor | None = None) -> Tensor:
        inp, size = pad_to_multiple(x, 2)  # (B, 3, H2, W2)
        h = torch.cat([inp, _planes(onehot, inp)], 1) if self.classes else inp
        f = self.head(h)  # (B, C, H2, W2)
        z = self.down(f)  # (B, 2C, H2/2, W2/2)
        for block in self.body:
            z = z + block(z)
        out = inp + self.tail(torch.cat([self.up(z), f], 1))  # (B, 3, H2, W2)
        return crop_to(out, size)

    def spec(self) -> dict:
        return {"classes": self.classes, "width": self.width, "blocks": self.blocks}


class PatchDiscriminator(nn.Module):
    """PatchGAN: image (B, 3, H, W) [+ one-hot planes] -> real/fake score per overlapping patch (B, 1, h, w)."""

    def __init__(self, classes: int = 0, width: int = 32, layers: int = 3):
        super().__init__()
        self.classes = classes
        mods: list[nn.Module] = [nn.Conv2d(3 + classes, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c = width
        for i in range(1, layers + 1):
            nxt = width * 2 ** min(i, 3)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, nxt, 4, stride=stride, padding=1), nn.InstanceNorm2d(nxt), nn.LeakyReLU(0.2, True)]
            c = nxt
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*mods)

    def forward(self, x: Tensor, onehot: Tensor | None = None) -> Tensor:
        return self.body(torch.cat([x, _planes(onehot, x)], 1) if self.classes else x)


def _planes(onehot: Tensor | None, like: Tensor) -> Tensor:
    """(B, W) one-hot -> (B, W, H, W') constant planes the size of ``like``."""
    if onehot is None:
        raise D4IRError("a weather-conditioned network was called without a weather")
    return onehot[:, :, None, None].expand(-1, -1, like.shape[-2], like.shape[-1])


class HistoryPool:
    """The last ``size`` generated images (and their labels); half of each query is swapped for old ones."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.gen = size, generator
        self.images: list[Tensor] = []
        self.labels: list[Tensor] = []

    def query(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.size == 0:
            return images, labels
        out_i, out_l = [], []
        for img, lab in zip(images.detach(), labels, strict=True):
            if len(self.images) < self.size:
                self.images.append(img.clone())
                self.labels.append(lab.clone())
                out_i.append(img)
                out_l.append(lab)
            elif float(torch.rand((), generator=self.gen)) < 0.5:
                j = int(torch.randint(len(self.images), (), generator=self.gen))
                out_i.append(self.images[j])
                out_l.append(self.labels[j])
                self.images[j], self.labels[j] = img.clone(), lab.clone()
            else:
                out_i.append(img)
                out_l.append(lab)
        return torch.stack(out_i), torch.stack(out_l)

    def state(self) -> dict:
        return {"images": list(self.images), "labels": list(self.labels)}

    def load(self, state: dict) -> None:
        self.images, self.labels = list(state["images"]), list(state["labels"])


# ---------------------------------------------------------------------------------------
# data


@dataclass
class ImageSet:
    """Unpaired training images from a manifest, decoded on first use and kept (H, W, 3) uint8."""

    root: str
    records: list
    size: int = 0  # resize short side + centre crop to this (0 = as they are)
    digest: str = ""  # identifies the set (manifest bytes, size) for the run's identity
    cache: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> list[str | None]:
        return [r.weather for r in self.records]

    def get(self, i: int, min_side: int) -> np.ndarray:
        if i not in self.cache:
            img = open_rgb(self.root, self.records[i])
            if self.size:
                img = prepare_image(img, self.size, "center")[0]
            arr = np.asarray(img, dtype=np.uint8)
            if min(arr.shape[:2]) < min_side:
                raise D4IRError(
                    f"{self.records[i].id} ({arr.shape[1]}x{arr.shape[0]}) is smaller than the training crop "
                    f"`patch` = {min_side}: lower the patch or set a resize `size`"
                )
            self.cache[i] = arr
        return self.cache[i]


def image_set(manifest: str | os.PathLike, root: str | os.PathLike, *, size: int = 0, limit: int = 0) -> ImageSet:
    """The images of a manifest (sorted by id; the first ``limit``, 0 = all) as an :class:`ImageSet`."""
    records = sorted(load_manifest(manifest), key=lambda r: r.id)[: limit or None]
    if not records:
        raise D4IRError(f"manifest {str(manifest)!r} lists no images")
    ids = sha256_bytes("\n".join(f"{r.id} {r.sha256}" for r in records).encode())
    return ImageSet(str(root), records, size, f"{ids}-{size}")


def _crops(images: ImageSet, idx: list[int], patch: int, gen: torch.Generator) -> Tensor:
    """Seeded random ``patch`` crops with random horizontal flips -> (B, 3, patch, patch) in [0, 1]."""
    out = []
    for i in idx:
        arr = images.get(i, patch)
        h, w = arr.shape[:2]
        top = int(torch.randint(h - patch + 1, (), generator=gen))
        left = int(torch.randint(w - patch + 1, (), generator=gen))
        crop = torch.from_numpy(np.ascontiguousarray(arr[top : top + patch, left : left + patch]))
        if float(torch.rand((), generator=gen)) < 0.5:  # horizontal only: rain falls and haze deepens vertically
            crop = crop.flip(1)
        out.append(crop.permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


@dataclass
class _Batch:
    clean: Tensor  # (B, 3, p, p)
    degraded: Tensor  # (B, 3, p, p)
    w_deg: Tensor  # (B, W) one-hot weather of each degraded crop (W = 0: unconditioned)
    w_fake: Tensor  # (B, W) the weather F gives each clean crop


def _onehot(idx: Tensor, n: int) -> Tensor:
    """(B,) class indices -> (B, n) one-hot; (B, 0) when unconditioned."""
    return F.one_hot(idx, n).float() if n else torch.zeros(idx.shape[0], 0)


def _draw(clean: ImageSet, deg: ImageSet, classes: list[str], cfg: UnpairedConfig, gen: torch.Generator) -> _Batch:
    """One step's crops, all drawn from the run's data generator (so a resume continues the same stream)."""
    ci = torch.randint(len(clean), (cfg.batch,), generator=gen).tolist()
    di = torch.randint(len(deg), (cfg.batch,), generator=gen).tolist()
    wf = torch.randint(max(1, len(classes)), (cfg.batch,), generator=gen)
    x, y = _crops(clean, ci, cfg.patch, gen), _crops(deg, di, cfg.patch, gen)
    labels = deg.labels()
    wd = torch.tensor([classes.index(labels[i]) if classes else 0 for i in di])
    return _Batch(x, y, _onehot(wd, len(classes)), _onehot(wf, len(classes)))


# ---------------------------------------------------------------------------------------
# one step


@dataclass
class _Nets:
    g: nn.Module  # degraded -> clean (the student's architecture)
    f: Degrader  # clean -> degraded
    d_clean: PatchDiscriminator
    d_deg: PatchDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any
    pool_clean: HistoryPool
    pool_deg: HistoryPool


def _lsgan(score: Tensor, real: bool) -> Tensor:
    return F.mse_loss(score, torch.full_like(score, 1.0 if real else 0.0))


def _generator_step(n: _Nets, b: _Batch, cfg: UnpairedConfig) -> tuple[dict, Tensor, Tensor]:
    """Update G and F on adversarial + cycle + identity losses; returns the losses and the fakes."""
    n.d_clean.requires_grad_(False)
    n.d_deg.requires_grad_(False)
    fake_c = n.g(b.degraded)  # (B, 3, p, p) restored
    fake_d = n.f(b.clean, b.w_fake)  # (B, 3, p, p) degraded
    l_gan = _lsgan(n.d_clean(fake_c), True) + _lsgan(n.d_deg(fake_d, b.w_fake), True)
    l_cyc = F.l1_loss(n.f(fake_c, b.w_deg), b.degraded) + F.l1_loss(n.g(fake_d), b.clean)
    l_id = F.l1_loss(n.g(b.clean), b.clean) + F.l1_loss(n.f(b.degraded, b.w_deg), b.degraded)
    loss = cfg.gan_weight * l_gan + cfg.cycle_weight * (l_cyc + cfg.identity_weight * l_id)
    n.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([*n.g.parameters(), *n.f.parameters()], cfg.grad_clip)
    n.opt_g.step()
    n.sched_g.step()
    n.d_clean.requires_grad_(True)
    n.d_deg.requires_grad_(True)
    return (
        {"loss_g": loss.item(), "gan_g": l_gan.item(), "cycle": l_cyc.item(), "identity": l_id.item()},
        fake_c,
        fake_d,
    )


def _discriminator_step(n: _Nets, b: _Batch, fake_c: Tensor, fake_d: Tensor, cfg: UnpairedConfig) -> dict:
    """Update both PatchGANs (LSGAN, halved as in CycleGAN) on real images vs pooled fakes."""
    old_c, _ = n.pool_clean.query(fake_c, b.w_deg)
    old_d, old_w = n.pool_deg.query(fake_d, b.w_fake)
    l_c = 0.5 * (_lsgan(n.d_clean(b.clean), True) + _lsgan(n.d_clean(old_c.detach()), False))
    l_d = 0.5 * (_lsgan(n.d_deg(b.degraded, b.w_deg), True) + _lsgan(n.d_deg(old_d.detach(), old_w), False))
    n.opt_d.zero_grad(set_to_none=True)
    (l_c + l_d).backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([*n.d_clean.parameters(), *n.d_deg.parameters()], cfg.grad_clip)
    n.opt_d.step()
    n.sched_d.step()
    return {"d_clean": l_c.item(), "d_degraded": l_d.item()}


# ---------------------------------------------------------------------------------------
# the loop


def _build(student_spec: dict, classes: int, cfg: UnpairedConfig, device: torch.device, gen: torch.Generator) -> _Nets:
    torch.manual_seed(cfg.seed)
    g = build_model(student_spec["name"], **dict(student_spec.get("kwargs") or {})).to(device).train()
    f = Degrader(classes, cfg.g_width, cfg.g_blocks).to(device).train()
    d_clean = PatchDiscriminator(0, cfg.d_width, cfg.d_layers).to(device).train()
    d_deg = PatchDiscriminator(classes, cfg.d_width, cfg.d_layers).to(device).train()
    opt_g = torch.optim.Adam([*g.parameters(), *f.parameters()], lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam([*d_clean.parameters(), *d_deg.parameters()], lr=cfg.lr, betas=cfg.betas)

    def factor(step: int) -> float:
        return warmup_cosine(step, total=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)

    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, factor)
    pools = HistoryPool(cfg.pool_size, gen), HistoryPool(cfg.pool_size, gen)
    return _Nets(g, f, d_clean, d_deg, opt_g, opt_d, sched_g, sched_d, *pools)


_NETS = ("g", "f", "d_clean", "d_deg")  # saved as safetensors in each checkpoint
_OPTIMS = ("opt_g", "opt_d", "sched_g", "sched_d")  # saved in state.pt


def _save(ckpts: CheckpointDir, n: _Nets, gen: torch.Generator, step: int, run_hash: str) -> None:
    state = {name: getattr(n, name).state_dict() for name in _OPTIMS}
    state |= {"pool_clean": n.pool_clean.state(), "pool_deg": n.pool_deg.state(), "data_gen": gen.get_state()}
    state |= {"rng": rng_state(), "run_hash": run_hash}
    ckpts.save(step, state=state, weights={name: getattr(n, name).state_dict() for name in _NETS})


def _resume(n: _Nets, gen: torch.Generator, ckpts: CheckpointDir, run_hash: str) -> int:
    """Load the latest checkpoint into the networks; returns its step (0 = none)."""
    ck = ckpts.load()
    if ck is None:
        return 0
    if ck.state.get("run_hash") != run_hash:
        raise D4IRError(f"{ck.path} belongs to an unpaired run with another config or data; delete {ckpts.root.parent}")
    for name in _NETS:
        load_weights(getattr(n, name), ck.weights(name), strict=True)
    for name in _OPTIMS:
        getattr(n, name).load_state_dict(ck.state[name])
    n.pool_clean.load(ck.state["pool_clean"])
    n.pool_deg.load(ck.state["pool_deg"])
    gen.set_state(ck.state["data_gen"])
    set_rng_state(ck.state["rng"])
    logger.info("unpaired: resuming %s at step %d", ckpts.root.parent, ck.step)
    return ck.step


def weather_classes(degraded: ImageSet, conditioned: bool) -> list[str]:
    """The weathers F is conditioned on: the sorted labels, or [] when off or any image is unlabelled."""
    labels = degraded.labels()
    if not conditioned or any(w is None for w in labels):
        return []
    return sorted(set(labels))


def train_unpaired(
    clean: ImageSet,
    degraded: ImageSet,
    student_spec: dict,
    out_dir: str | os.PathLike,
    *,
    config: UnpairedConfig | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train G (the student's architecture) and F CycleGAN-style; returns G's folder ``out_dir/student``."""
    from tqdm.auto import tqdm

    # 1. the run's identity: a finished run is returned, a different one refused
    cfg = config or UnpairedConfig()
    out, device = Path(out_dir), torch.device(device)
    classes = weather_classes(degraded, cfg.conditioned)
    ident = {k: v for k, v in asdict(cfg).items() if k not in _NEUTRAL}
    meta = {"config": ident, "student_spec": student_spec, "classes": classes, "clean": clean.digest,
            "degraded": degraded.digest}  # fmt: skip
    run_hash = sha256_bytes(json.dumps(meta, sort_keys=True).encode())
    if (out / "student" / "model.json").is_file():
        if read_json(out / "unpaired.json").get("run_hash") != run_hash:
            raise D4IRError(f"{out} holds a finished unpaired run with another config or data; use another folder")
        return out / "student"
    # 2. networks, resume
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    nets = _build(student_spec, len(classes), cfg, device, gen)
    ckpts = CheckpointDir(out / "ckpt", keep=1)
    start = _resume(nets, gen, ckpts, run_hash)
    end = min(cfg.steps, start + cfg.stop_after) if cfg.stop_after else cfg.steps
    # 3. alternate a generator step and a discriminator step
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with MetricsLog(out / "metrics.jsonl", resume_step=start) as log:  # rows after the checkpoint are redone
        for step in tqdm(range(start, end), desc="unpaired", initial=start, total=cfg.steps, leave=False):
            b = _to(_draw(clean, degraded, classes, cfg, gen), device)
            row, fake_c, fake_d = _generator_step(nets, b, cfg)
            row |= _discriminator_step(nets, b, fake_c, fake_d, cfg)
            log.write({"step": step + 1, **row, "elapsed_s": round(time.perf_counter() - t0, 3)})
            done = step + 1
            if done < cfg.steps and (done % cfg.checkpoint_every == 0 or done == end):
                _save(ckpts, nets, gen, done, run_hash)
    if end < cfg.steps:
        logger.info("unpaired: stopped at step %d / %d (`stop_after`); rerun to resume", end, cfg.steps)
        return out / "student"
    # 4. outputs: F, samples, then G last (the completion mark)
    _finish(out, nets, clean, classes, cfg, {**meta, "run_hash": run_hash}, device)
    return out / "student"


def _to(b: _Batch, device: torch.device) -> _Batch:
    return _Batch(*(t.to(device) for t in (b.clean, b.degraded, b.w_deg, b.w_fake)))


def _finish(out: Path, n: _Nets, clean: ImageSet, classes: list[str], cfg: UnpairedConfig, meta: dict, device) -> None:
    from safetensors.torch import save

    n.g.eval()
    n.f.eval()
    f_sd = {k: v.detach().cpu().contiguous().clone() for k, v in n.f.state_dict().items()}
    atomic_write_bytes(out / "degrader.safetensors", save(f_sd))
    atomic_write_json(out / "degrader.json", {"spec": n.f.spec(), "classes": classes})
    _save_samples(out / "samples.png", n, clean, classes, cfg, device)
    atomic_write_json(out / "unpaired.json", meta)
    with atomic_dir(out / "student") as tmp:
        save_model(n.g, tmp, extra={"trained_by": "unpaired", "unpaired": asdict(cfg), "classes": classes})
    CheckpointDir(out / "ckpt").clear()
    logger.info("unpaired: G written to %s", out / "student")


def _save_samples(path: Path, n: _Nets, clean: ImageSet, classes: list[str], cfg: UnpairedConfig, device) -> None:
    """Rows: clean crops, then F(clean, w) for each weather and G(F(clean, w)) (its cycle)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x = _crops(clean, list(range(min(cfg.grid, len(clean)))), cfg.patch, gen).to(device)  # (k, 3, p, p)
    rows = [[to_uint8(t) for t in x]]
    with torch.no_grad():
        for j in range(max(1, len(classes))):
            w = F.one_hot(torch.full((x.shape[0],), j), len(classes)).float().to(device) if classes else None
            fake = n.f(x, w)
            rows += [[to_uint8(t) for t in fake], [to_uint8(t) for t in n.g(fake)]]
    labels = ["clean"] + [f"{s} {w}" for w in (classes or ["degraded"]) for s in ("F:", "G(F):")]
    save_png(path, image_grid(rows, cell=max(64, cfg.patch), labels=labels))


def load_degrader(run_dir: str | os.PathLike) -> tuple[Degrader, list[str]]:
    """F of a finished unpaired run and its weather classes (``degrader.safetensors`` + ``degrader.json``)."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    if not (run / "degrader.json").is_file():
        raise D4IRError(f"{run}: no degrader.json (not a finished unpaired run)")
    doc = read_json(run / "degrader.json")
    f = Degrader(**doc["spec"])
    f.load_state_dict(load_file(str(run / "degrader.safetensors")))
    return f.eval(), list(doc["classes"])


def degrade(run_dir: str | os.PathLike, images: list[np.ndarray], weathers: list[str]) -> list[np.ndarray]:
    """F(image, weather) of a finished run for (H, W, 3) uint8 images (the inputs figure)."""
    f, classes = load_degrader(run_dir)
    out = []
    with torch.no_grad():
        for img, w in zip(images, weathers, strict=True):
            if classes and w not in classes:
                raise D4IRError(f"{run_dir}: weather {w!r} is not one of the degrader's {classes}")
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
            oh = _onehot(torch.tensor([classes.index(w) if classes else 0]), len(classes))
            out.append(to_uint8(f(x, oh)[0]))
    return out


__all__ = [
    "UnpairedConfig",
    "Degrader",
    "PatchDiscriminator",
    "HistoryPool",
    "ImageSet",
    "image_set",
    "weather_classes",
    "train_unpaired",
    "load_degrader",
    "degrade",
]
