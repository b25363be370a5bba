"""DFMC-style GAN data-free distillation (the paper's GAN baseline row)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d4ir_pipeline.common.images import image_grid, save_png, to_uint8
from d4ir_pipeline.common.io import atomic_write_bytes, atomic_write_json, sha256_bytes, trim_jsonl
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
    checkpoint_every: int = 50
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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


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

    Resumable: ``out_dir/state.pt`` holds G, S, optimisers, step and RNG every
    ``checkpoint_every`` steps, and a rerun continues from it (a different config is
    refused). The student folder is written last, so its presence means the run is done.
    """

    cfg = DFMCConfig(**{**asdict(config or DFMCConfig()), "steps": steps, "batch": batch, "patch": patch, "seed": seed})
    if batch < 2:
        raise D4IRError(f"`batch` = {batch}: the contrastive term needs at least 2 samples per batch")
    out = Path(out_dir)
    student_dir = out / "student"
    run_meta = {"config": asdict(cfg), "student_spec": student_spec, "teacher_sha256": module_digest(teacher)}
    meta_hash = sha256_bytes(json.dumps(run_meta, sort_keys=True).encode())
    if (student_dir / "model.json").is_file() and (out / "dfmc.json").is_file():
        if json.loads((out / "dfmc.json").read_text(encoding="utf-8")).get("meta_hash") != meta_hash:
            raise D4IRError(f"{out} holds a finished DFMC run with another config or teacher; use another out_dir")
        logger.info("DFMC run already complete in %s", out)
        return student_dir
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)

    # 1. models: frozen teacher, fresh student and generator (seeded)
    teacher = teacher.to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student = _build_student(student_spec).to(device).train()
    gen = Generator(cfg.z_dim, cfg.g_width, cfg.patch).to(device).train()
    feat = FeatureNet(cfg.seed).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.g_lr, betas=(0.5, 0.999))
    opt_s = torch.optim.AdamW(student.parameters(), lr=cfg.s_lr, weight_decay=0.0)
    sched_s = torch.optim.lr_scheduler.LambdaLR(
        opt_s,
        lambda i: (
            0.5
            * (1 + math.cos(math.pi * min(i, cfg.steps * cfg.student_steps) / max(1, cfg.steps * cfg.student_steps)))
        ),
    )
    zgen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    # 2. resume
    start = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("meta_hash") != meta_hash:
            raise D4IRError(
                f"{state_path} was written by a DFMC run with a different config; delete {out} or use another out_dir"
            )
        gen.load_state_dict(state["gen"])
        student.load_state_dict(state["student"])
        opt_g.load_state_dict(state["opt_g"])
        opt_s.load_state_dict(state["opt_s"])
        sched_s.load_state_dict(state["sched_s"])
        zgen.set_state(state["zgen"])
        torch.set_rng_state(state["rng"]["torch"])
        start = int(state["step"])
        logger.info("DFMC: resuming %s at step %d / %d", out, start, cfg.steps)

    def sample_z(n: int) -> Tensor:
        return torch.randn(n, cfg.z_dim, generator=zgen).to(device)  # (n, z_dim)

    # 3. alternate: G maximises the discrepancy (+ contrastive), S minimises it on T's pseudo-labels
    metrics_path = out / "metrics.jsonl"
    trim_jsonl(metrics_path, start)  # lines after the last checkpoint are written again
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as mf:
        for step in tqdm(range(start, cfg.steps), desc="dfmc", initial=start, total=cfg.steps, leave=False):
            z = sample_z(cfg.batch)
            eps = sample_z(cfg.batch)
            student.requires_grad_(False)
            x = gen(z)  # (B, 3, p, p)
            x_pos = gen(z + cfg.contrast_sigma * eps)
            disc = (student(x) - teacher(x)).abs().mean()
            l_con = info_nce(feat(x), feat(x_pos), cfg.contrast_tau)
            loss_g = -cfg.adv_weight * disc + cfg.contrast_weight * l_con
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
            opt_g.step()
            student.requires_grad_(True)

            for _ in range(cfg.student_steps):
                with torch.no_grad():
                    xs = gen(sample_z(cfg.batch))  # (B, 3, p, p)
                    ys = teacher(xs)  # pseudo-labels
                loss_s = F.l1_loss(student(xs), ys)
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt_s.step()
                sched_s.step()
            row = {
                "step": step + 1,
                "loss_student": loss_s.item(),
                "discrepancy": disc.item(),
                "contrast": l_con.item(),
                "diversity_l1": _mean_pairwise_l1(xs),
                "elapsed_s": round(time.perf_counter() - t0, 3),
            }
            mf.write(json.dumps(row, sort_keys=True) + "\n")
            mf.flush()
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_state(state_path, gen, student, opt_g, opt_s, sched_s, zgen, done, meta_hash)

    # 4. outputs: generator, sample grid, then the student folder last (the completion mark)
    _save_generator(out, gen, cfg)
    gen.eval()
    with torch.no_grad():
        zg = torch.randn(cfg.grid, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 2)).to(device)
        samples = gen(zg)  # (grid, 3, p, p)
    ncol = int(math.ceil(math.sqrt(cfg.grid)))
    arrs = [to_uint8(s) for s in samples]
    tiles = [arrs[i : i + ncol] for i in range(0, len(arrs), ncol)]
    save_png(out / "samples.png", image_grid(tiles, cell=cfg.patch))
    atomic_write_json(out / "dfmc.json", {**run_meta, "meta_hash": meta_hash})
    tmp = out / "student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(student.eval(), tmp, extra={"trained_by": "dfmc", "dfmc": asdict(cfg)})
    if student_dir.exists():
        shutil.rmtree(student_dir)
    tmp.rename(student_dir)
    state_path.unlink(missing_ok=True)
    logger.info("DFMC: student written to %s (%.1fs)", student_dir, time.perf_counter() - t0)
    return student_dir


def _save_state(path: Path, gen, student, opt_g, opt_s, sched_s, zgen, step: int, meta_hash: str) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "gen": gen.state_dict(),
            "student": student.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_s": opt_s.state_dict(),
            "sched_s": sched_s.state_dict(),
            "zgen": zgen.get_state(),
            "rng": _rng_state(),
            "step": step,
            "meta_hash": meta_hash,
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


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
