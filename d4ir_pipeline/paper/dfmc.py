"""DFMC-style GAN data-free distillation (the paper's GAN baseline row)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from d4ir_pipeline.common.images import image_grid, save_png, to_uint8
from d4ir_pipeline.common.io import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_bytes
from d4ir_pipeline.common.train import CheckpointDir, MetricsLog, rng_state, set_rng_state, warmup_cosine
from d4ir_pipeline.config import neutral_keys
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import save_model

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# DFMC-style GAN baseline


@dataclass(frozen=True)
class DFMCConfig:
    """Hyper-parameters of the GAN-based data-free baseline (defaults: small and CPU-friendly)."""

    steps: int = 200  # student updates (one generator update precedes each)
    batch: int = 8
    patch: int = 64  # generated image side; a multiple of 8
    seed: int = 0
    z_dim: int = 64
    g_width: int = 64  # generator channels at the coarsest level
    g_lr: float = 1e-3
    s_lr: float = 5e-4
    adv_weight: float = 1.0  # weight of -|S(G(z)) - T(G(z))|_1 in G's loss
    contrast_weight: float = 0.1  # weight of the InfoNCE regulariser in G's loss
    contrast_tau: float = 0.1
    contrast_sigma: float = 0.2  # z perturbation that makes the positive view
    student_steps: int = 1  # student updates per generator update
    grad_clip: float = 1.0
    # resumable checkpoint every N steps (none at the end: the student folder is the mark)
    ckpt_every: int = field(default=50, metadata={"affects_output": False})
    ckpt_keep: int = field(default=1, metadata={"affects_output": False})
    # also TensorBoard event files in <out_dir>/tensorboard
    tensorboard: bool = field(default=False, metadata={"affects_output": False})
    grid: int = 16  # samples in the saved grid


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, 3, patch, patch) in [0, 1]: linear seed, three x2 upsample-conv stages."""

    def __init__(self, z_dim: int = 64, width: int = 64, patch: int = 64):
        super().__init__()
        if patch % 8 or patch < 8:
            raise ValueError(f"`patch` = {patch}: expected a multiple of 8 (>= 8)")
        self.z_dim, self.width, self.patch = z_dim, width, patch
        self.base = patch // 8
        self.fc = nn.Linear(z_dim, width * self.base * self.base)
        chans = [width, width, width // 2, max(8, width // 4)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(cin, cout, kernel_size=3, padding=1),
                nn.GroupNorm(min(8, cout), cout),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(chans[-1], 3, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).view(z.shape[0], self.width, self.base, self.base)  # (B, width, p/8, p/8)
        return torch.sigmoid(self.body(x))  # (B, 3, p, p)

    def spec(self) -> dict:
        """Arguments that rebuild this generator."""
        return {"z_dim": self.z_dim, "width": self.width, "patch": self.patch}


class FeatureNet(nn.Module):
    """A fixed, seeded random conv encoder: image (B, 3, H, W) -> unit feature (B, 512)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.in_channels * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(fan_in))
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x * 2 - 1), 0.2)), 0.2)  # (B, 32, H/4, W/4)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)  # (B, 512)
        return F.normalize(h - h.mean(1, keepdim=True), dim=1)


def info_nce(anchor: Tensor, positive: Tensor, tau: float) -> Tensor:
    """InfoNCE over a batch: row i of ``anchor`` (B, F) should match row i of ``positive``, not the others."""
    logits = anchor @ positive.t() / tau  # (B, B)
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits, target)


def _build_student(student_spec: dict) -> nn.Module:

    if not isinstance(student_spec, dict) or "name" not in student_spec:
        raise D4IRError(f"`student_spec` = {student_spec!r}: expected {{'name': ..., 'kwargs': {{...}}}}")
    return build_model(student_spec["name"], **dict(student_spec.get("kwargs") or {}))


def module_digest(model: nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes and bytes): identifies a teacher's weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _mean_pairwise_l1(x: Tensor) -> float:
    """Mean L1 distance between distinct samples of a batch (B, 3, H, W): a diversity measure."""
    b = x.shape[0]
    if b < 2:
        return 0.0
    flat = x.flatten(1)
    d = torch.cdist(flat, flat, p=1) / flat.shape[1]  # (B, B)
    return float(d.sum() / (b * (b - 1)))


def train_dfmc(
    teacher: nn.Module,
    student_spec: dict,
    steps: int,
    batch: int,
    patch: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    config: DFMCConfig | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train generator + student (DFMC-style); returns the student folder ``out_dir/student``.

    Resumable: ``out_dir/ckpt/`` holds G, S, optimisers, step and RNG every ``ckpt_every``
    steps, and a rerun continues from it (a different config is refused). The student
    folder is written last, so its presence means the run is done.
    """
    cfg = DFMCConfig(**{**asdict(config or DFMCConfig()), "steps": steps, "batch": batch, "patch": patch, "seed": seed})
    if batch < 2:
        raise D4IRError(f"`batch` = {batch}: the contrastive term needs at least 2 samples per batch")
    out = Path(out_dir)
    run_meta = {"config": asdict(cfg), "student_spec": student_spec, "teacher_sha256": module_digest(teacher)}
    meta_hash = _meta_hash(run_meta)
    if _finished(out, meta_hash):
        logger.info("DFMC run already complete in %s", out)
        return out / "student"
    out.mkdir(parents=True, exist_ok=True)

    # 1. models: frozen teacher, fresh student and generator (seeded)
    gan = _GAN.build(cfg, teacher, student_spec, torch.device(device))

    # 2. resume
    ckpts = CheckpointDir(out / "ckpt", keep=cfg.ckpt_keep)
    start = _resume(ckpts, gan, meta_hash, out)

    # 3. alternate: G maximises the discrepancy (+ contrastive), S minimises it on T's pseudo-labels
    t0 = time.perf_counter()
    tb = out / "tensorboard" if cfg.tensorboard else None
    with MetricsLog(out / "metrics.jsonl", resume_step=start, tensorboard=tb) as log:  # later rows are redone
        for step in tqdm(range(start, cfg.steps), desc="dfmc", initial=start, total=cfg.steps, leave=False):
            row = _gan_step(cfg, gan)
            log.write({"step": step + 1, **row, "elapsed_s": round(time.perf_counter() - t0, 3)})
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
                ckpts.save(step + 1, state={**gan.state(), "meta_hash": meta_hash}, weights=gan.weights())

    # 4. outputs: generator, sample grid, then the student folder last (the completion mark)
    student_dir = _write_outputs(out, gan, cfg, {**run_meta, "meta_hash": meta_hash})
    ckpts.clear()
    logger.info("DFMC: student written to %s (%.1fs)", student_dir, time.perf_counter() - t0)
    return student_dir


def _meta_hash(run_meta: dict) -> str:
    """What a resumed or reused run must match: the config (less resume-neutral fields), student and teacher."""
    neutral = neutral_keys(DFMCConfig)  # fields that change neither the generator nor the student
    config = {k: v for k, v in run_meta["config"].items() if k not in neutral}
    return sha256_bytes(json.dumps({**run_meta, "config": config}, sort_keys=True).encode())


def _finished(out: Path, meta_hash: str) -> bool:
    """True when ``out`` holds a finished run of this config and teacher (another one is refused)."""
    if not ((out / "student" / "model.json").is_file() and (out / "dfmc.json").is_file()):
        return False
    if json.loads((out / "dfmc.json").read_text(encoding="utf-8")).get("meta_hash") != meta_hash:
        raise D4IRError(f"{out} holds a finished DFMC run with another config or teacher; use another out_dir")
    return True


@dataclass
class _GAN:
    """The frozen teacher, the trained student and generator, their optimisers and the latent generator."""

    teacher: nn.Module
    student: nn.Module
    gen: Generator
    feat: FeatureNet
    opt_g: torch.optim.Optimizer
    opt_s: torch.optim.Optimizer
    sched_s: torch.optim.lr_scheduler.LambdaLR
    zgen: torch.Generator
    device: torch.device

    @classmethod
    def build(cls, cfg: DFMCConfig, teacher: nn.Module, student_spec: dict, device: torch.device) -> _GAN:
        teacher = teacher.to(device).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the student's, then the generator's weights
        student = _build_student(student_spec).to(device).train()
        gen = Generator(cfg.z_dim, cfg.g_width, cfg.patch).to(device).train()
        feat = FeatureNet(cfg.seed).to(device)  # its weights come from its own generator
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.g_lr, betas=(0.5, 0.999))
        opt_s = torch.optim.AdamW(student.parameters(), lr=cfg.s_lr, weight_decay=0.0)
        total = cfg.steps * cfg.student_steps  # cosine to 0 over every student update, no warm-up
        sched_s = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda i: warmup_cosine(i, total=total, angle_first=True))
        zgen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        return cls(teacher, student, gen, feat, opt_g, opt_s, sched_s, zgen, device)

    def sample_z(self, n: int, z_dim: int) -> Tensor:
        return torch.randn(n, z_dim, generator=self.zgen).to(self.device)  # (n, z_dim)

    def weights(self) -> dict:
        return {"gen": self.gen.state_dict(), "student": self.student.state_dict()}

    def state(self) -> dict:
        return {
            "opt_g": self.opt_g.state_dict(),
            "opt_s": self.opt_s.state_dict(),
            "sched_s": self.sched_s.state_dict(),
            "zgen": self.zgen.get_state(),
            "rng": rng_state(),
        }


def _resume(ckpts: CheckpointDir, gan: _GAN, meta_hash: str, out: Path) -> int:
    """Restore the last checkpoint of this config; returns its step (0 when none)."""
    ck = ckpts.load()
    if ck is None:
        return 0
    if ck.state.get("meta_hash") != meta_hash:
        raise D4IRError(
            f"{ck.path} was written by a DFMC run with a different config; delete {out} or use another out_dir"
        )
    gan.gen.load_state_dict(ck.weights("gen"))
    gan.student.load_state_dict(ck.weights("student"))
    gan.opt_g.load_state_dict(ck.state["opt_g"])
    gan.opt_s.load_state_dict(ck.state["opt_s"])
    gan.sched_s.load_state_dict(ck.state["sched_s"])
    gan.zgen.set_state(ck.state["zgen"])
    set_rng_state(ck.state["rng"])
    logger.info("DFMC: resuming %s at step %d", out, ck.step)
    return ck.step


def _gan_step(cfg: DFMCConfig, g: _GAN) -> dict:
    """One generator update, then ``student_steps`` student updates; the step's metrics row."""
    z, eps = g.sample_z(cfg.batch, cfg.z_dim), g.sample_z(cfg.batch, cfg.z_dim)
    g.student.requires_grad_(False)
    x = g.gen(z)  # (B, 3, p, p)
    x_pos = g.gen(z + cfg.contrast_sigma * eps)
    disc = (g.student(x) - g.teacher(x)).abs().mean()
    l_con = info_nce(g.feat(x), g.feat(x_pos), cfg.contrast_tau)
    loss_g = -cfg.adv_weight * disc + cfg.contrast_weight * l_con
    g.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    torch.nn.utils.clip_grad_norm_(g.gen.parameters(), cfg.grad_clip)
    g.opt_g.step()
    g.student.requires_grad_(True)
    for _ in range(cfg.student_steps):
        with torch.no_grad():
            xs = g.gen(g.sample_z(cfg.batch, cfg.z_dim))  # (B, 3, p, p)
            ys = g.teacher(xs)  # pseudo-labels
        loss_s = F.l1_loss(g.student(xs), ys)
        g.opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        torch.nn.utils.clip_grad_norm_(g.student.parameters(), cfg.grad_clip)
        g.opt_s.step()
        g.sched_s.step()
    return {
        "loss_student": loss_s.item(),
        "discrepancy": disc.item(),
        "contrast": l_con.item(),
        "diversity_l1": _mean_pairwise_l1(xs),
    }


def _write_outputs(out: Path, g: _GAN, cfg: DFMCConfig, record: dict) -> Path:
    """generator.safetensors + json, samples.png, dfmc.json, then the student folder (renamed into place)."""
    _save_generator(out, g.gen, cfg)
    g.gen.eval()
    with torch.no_grad():
        zg = torch.randn(cfg.grid, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 2)).to(g.device)
        samples = g.gen(zg)  # (grid, 3, p, p)
    ncol = int(math.ceil(math.sqrt(cfg.grid)))
    arrs = [to_uint8(s) for s in samples]
    tiles = [arrs[i : i + ncol] for i in range(0, len(arrs), ncol)]
    save_png(out / "samples.png", image_grid(tiles, cell=cfg.patch))
    atomic_write_json(out / "dfmc.json", record)
    with atomic_dir(out / "student") as tmp:
        save_model(g.student.eval(), tmp, extra={"trained_by": "dfmc", "dfmc": asdict(cfg)})
    return out / "student"


def _save_generator(out: Path, gen: Generator, cfg: DFMCConfig) -> None:
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in gen.state_dict().items()}
    atomic_write_bytes(out / "generator.safetensors", save(sd))
    atomic_write_json(out / "generator.json", {"spec": gen.spec(), "seed": cfg.seed})


def load_generator(run_dir: str | os.PathLike) -> Generator:
    """Rebuild the generator a DFMC run saved (``generator.safetensors`` + ``generator.json``)."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    meta_path = run / "generator.json"
    if not meta_path.is_file():
        raise D4IRError(f"{run}: no generator.json (not a finished DFMC run)")
    spec = json.loads(meta_path.read_text(encoding="utf-8"))["spec"]
    gen = Generator(**spec)
    gen.load_state_dict(load_file(str(run / "generator.safetensors")))
    return gen.eval()


def generator_samples(run_dir: str | os.PathLike, n: int, seed: int) -> list[np.ndarray]:
    """``n`` seeded samples of a saved DFMC generator as (H, W, 3) uint8 arrays."""
    gen = load_generator(run_dir)
    with torch.no_grad():
        z = torch.randn(n, gen.z_dim, generator=torch.Generator().manual_seed(seed))
        return [to_uint8(x) for x in gen(z)]
