"""Train the embedded demo's reference teacher on its paired "original training data".

`d4ir train-teacher --profile demo` (``make teacher``) trains a registered restoration
network (``demo_teacher``, a compact NAFNet) with L1 on the demo's paired
teacher-train manifest (rain, haze and snow), on the CPU, seeded and deterministic,
checkpointing every N steps (rerun to resume). It then scores the teacher and the
identity (degraded input vs target) on the paired test manifests with PSNR / SSIM
and, when ``output.publish_dir`` is set and every weather beats the identity by
``eval.min_gain_db``, writes the model and a README with the measured numbers there
(the committed ``d4ir_pipeline/demo/assets/reference_teacher``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.images import psnr, ssim_u8
from d4ir_pipeline.common.io import atomic_write_json, atomic_write_text, sha256_file
from d4ir_pipeline.common.runtime import package_versions, seed_everything, torch_threads
from d4ir_pipeline.common.train import CheckpointDir, MetricsLog, due, rng_state, set_rng_state, warmup_cosine
from d4ir_pipeline.config import ConfigError, config_hash, config_to_dict, opt
from d4ir_pipeline.data.manifests import load_manifest, open_pair
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import save_model
from d4ir_pipeline.models.cost import count_macs, count_params
from d4ir_pipeline.stage2.evaluate import DEMO_TEST_MANIFESTS

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class DataSection:
    """Paired manifests (input `path` + clean `target`) and the image root."""

    root: str = opt("{data}", help="Image root of the manifests (`d4ir demo-data --out {data}`).")
    train_manifest: str = opt(
        "data_manifests/demo/teacher-train.jsonl", help="Paired training manifest (all weathers)."
    )
    test_manifests: tuple[str, ...] = opt(
        tuple(DEMO_TEST_MANIFESTS.values()),
        help="Paired test manifests; scores are reported per weather.",
    )
    check_hash: bool = opt(True, help="Verify each image's sha256 against the manifest (the committed data).")


@dataclass(frozen=True)
class ModelSection:
    """Which registered network to train."""

    name: str = opt("demo_teacher", help="Registry name or package.module:Class (built with no kwargs).")


@dataclass(frozen=True)
class TrainSection:
    """Optimisation: AdamW, linear warm-up then cosine decay, L1 loss."""

    seed: int = opt(0, help="Seeds weights, batch order, crops and flips.", min=0)
    steps: int = opt(3000, help="Optimiser steps in total.", min=1)
    batch_size: int = opt(8, help="Patches per step.", min=1)
    patch_size: int = opt(64, help="Random crop side (<= the smallest training image).", min=8)
    lr: float = opt(2e-3, help="Peak learning rate (NAFNet-style networks train well at 1e-3..2e-3).", min=0.0)
    min_lr: float = opt(1e-5, help="Learning rate at the end of the cosine decay.", min=0.0)
    warmup_steps: int = opt(100, help="Linear warm-up steps.", min=0)
    weight_decay: float = opt(0.0, help="AdamW weight decay (NAFNet trains with 0).", min=0.0)
    betas: tuple[float, float] = opt((0.9, 0.9), help="AdamW betas (NAFNet's 0.9, 0.9).")
    grad_clip: float = opt(1.0, help="Max global gradient norm (0 disables).", min=0.0)
    hflip: bool = opt(True, help="Random horizontal flips (no vertical ones: haze depth and rain fall are vertical).")
    exposure: tuple[float, float] = opt(
        (1.0, 1.0),
        help="Random gain range applied to input and target alike (an exposure change keeps the rain / haze / "
        "snow models valid); widens a few bright source photos to dark scenes. [1, 1] disables it.",
        min=0.05,
        max=1.0,
    )
    channel_shuffle: bool = opt(
        False, help="Randomly permute RGB of input and target alike (more scene colours; the degradations are grey)."
    )
    threads: int = opt(2, help="torch CPU threads; fixed so reruns give the same weights.", min=1)
    ckpt_every: int = opt(250, help="Save a resumable checkpoint every N steps.", min=1, affects_output=False)
    ckpt_keep: int = opt(
        2, help="Checkpoints kept in <output.dir>/ckpt (older ones are deleted).", min=1, affects_output=False
    )
    stop_after: int = opt(
        0, help="Stop this run after N new steps (0 = run to the end); rerun resumes.", min=0, affects_output=False
    )


@dataclass(frozen=True)
class LogSection:
    """Progress and metrics."""

    every: int = opt(25, help="Append a metrics.jsonl line every N steps.", min=1)
    progress: bool = opt(True, help="tqdm progress bar.")
    tensorboard: bool = opt(False, help="Also write TensorBoard event files to <output.dir>/tensorboard.")


@dataclass(frozen=True)
class EvalSection:
    """Scoring on the paired test sets."""

    min_gain_db: float = opt(3.0, help="Required PSNR gain over the identity on every weather.", affects_output=False)
    max_images: int = opt(0, help="Images per test manifest (0 = all).", min=0, affects_output=False)


@dataclass(frozen=True)
class OutputSection:
    """Where the run and (optionally) the published teacher go."""

    dir: str = opt(
        "{work}/teacher", help="Run folder: ckpt/, metrics.jsonl, model/, report.json.", affects_output=False
    )
    publish_dir: str = opt("", help="If set, copy the model + a README here when the bar is met.", affects_output=False)
    command: str = opt(
        "d4ir train-teacher --profile {profile}",
        help="The command recorded in the published README.",
        affects_output=False,
    )


@dataclass(frozen=True)
class ReferenceTeacherConfig:
    """`d4ir train-teacher` (stages/<profile>/teacher.toml)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection, metadata={"affects_output": False})
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)


@dataclass
class TeacherResult:
    """What a run produced and measured."""

    out_dir: Path
    model_dir: Path
    steps: int
    resumed_from: int
    finished: bool
    metrics: dict[str, dict[str, float]]
    passed: bool
    published_to: Path | None
    seconds: float

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [f"teacher: {self.steps} steps in {self.out_dir} (resumed from {self.resumed_from})"]
        if not self.finished:
            lines.append("  stopped early (train.stop_after): rerun the same command to resume")
        for w, m in sorted(self.metrics.items()):
            lines.append(
                f"  {w:<5} PSNR {m['psnr']:.2f} dB (identity {m['identity_psnr']:.2f}, {m['gain_db']:+.2f})"
                f"  SSIM {m['ssim']:.4f} (identity {m['identity_ssim']:.4f})"
            )
        if self.metrics:
            lines.append(f"  bar (every weather >= identity + min_gain_db): {'met' if self.passed else 'NOT met'}")
        if self.published_to:
            lines.append(f"  published to {self.published_to}")
        return "\n".join(lines)


class TeacherBarError(D4IRError):
    """The trained teacher does not beat the identity by the required margin."""


# ---------------------------------------------------------------------------------------
# data


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_pairs(manifest: str, root: str, *, check_hash: bool, limit: int = 0) -> list[dict[str, Any]]:
    """Paired records as ``{"id", "weather", "input": uint8 (3,H,W), "target": uint8 (3,H,W)}``."""

    records = load_manifest(manifest)
    if limit:
        records = records[:limit]
    if not records:
        raise D4IRError(f"manifest {manifest} holds no records")
    pairs = []
    for rec in records:
        if not rec.paired:
            raise D4IRError(f"{manifest}: record {rec.id!r} has no `target`; the teacher needs a paired manifest")
        try:
            inp, tgt = open_pair(root, rec, check_hash=check_hash)
        except FileNotFoundError as e:
            raise D4IRError(
                f"{manifest}: image of record {rec.id!r} not found under root {root!r} ({e}); "
                "generate the demo data first: d4ir demo-data --out runs/demo/data"
            ) from e
        pairs.append(
            {"id": rec.id, "weather": rec.weather or "unknown", "input": _to_tensor(inp), "target": _to_tensor(tgt)}
        )
    return pairs


def sample_batch(pairs: list[dict], cfg: TrainSection, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random pairs, aligned crops, flips, exposure and channel order -> float (B, 3, P, P) x, y."""
    p = cfg.patch_size
    idx = torch.randint(len(pairs), (cfg.batch_size,), generator=g).tolist()
    xs, ys = [], []
    for i in idx:
        inp, tgt = pairs[i]["input"], pairs[i]["target"]
        h, w = inp.shape[-2:]
        if h < p or w < p:
            raise D4IRError(f"`train.patch_size` = {p} exceeds image {pairs[i]['id']!r} ({w}x{h})")
        y0 = int(torch.randint(h - p + 1, (1,), generator=g))
        x0 = int(torch.randint(w - p + 1, (1,), generator=g))
        flip = bool(torch.randint(2, (1,), generator=g)) and cfg.hflip
        lo, hi = cfg.exposure
        gain = lo + (hi - lo) * float(torch.rand((), generator=g))
        perm = torch.randperm(3, generator=g) if cfg.channel_shuffle else torch.arange(3)
        a = inp[:, y0 : y0 + p, x0 : x0 + p].float() / 255.0  # (3, P, P)
        b = tgt[:, y0 : y0 + p, x0 : x0 + p].float() / 255.0
        if flip:
            a, b = a.flip(-1), b.flip(-1)
        xs.append(a[perm] * gain)
        ys.append(b[perm] * gain)
    return torch.stack(xs), torch.stack(ys)


def _u8(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3), rounded like a saved PNG."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean per-image PSNR / SSIM of the model and of the identity, per weather."""
    model.eval()
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pr in pairs:
        x = pr["input"].float()[None] / 255.0  # (1, 3, H, W)
        out = _u8(model(x)[0])
        inp, tgt = _u8(pr["input"].float() / 255.0), pr["target"].permute(1, 2, 0).numpy()
        a = acc[pr["weather"]]
        a["psnr"].append(psnr(out, tgt, data_range=255.0, max_db=100.0))
        a["ssim"].append(ssim_u8(out, tgt))
        a["identity_psnr"].append(psnr(inp, tgt, data_range=255.0, max_db=100.0))
        a["identity_ssim"].append(ssim_u8(inp, tgt))
    res = {}
    for w, a in acc.items():
        m = {k: float(np.mean(v)) for k, v in a.items()}
        m["gain_db"] = m["psnr"] - m["identity_psnr"]
        m["images"] = len(a["psnr"])
        res[w] = m
    return res


# ---------------------------------------------------------------------------------------
# training


def train_teacher(cfg: ReferenceTeacherConfig) -> TeacherResult:
    """Train (or resume), evaluate and optionally publish the demo teacher."""
    clock, tc, out = _Clock(), cfg.train, Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    if tc.exposure[0] > tc.exposure[1]:
        raise ConfigError(f"`train.exposure` = {list(tc.exposure)}: expected [low, high] with low <= high")
    chash = config_hash(cfg)
    with _deterministic(tc.threads):
        # 1. data (all in memory: the demo set is small)
        pairs = load_pairs(cfg.data.train_manifest, cfg.data.root, check_hash=cfg.data.check_hash)
        logger.info("teacher: %d training pairs from %s", len(pairs), cfg.data.train_manifest)

        # 2. model, optimiser, schedule, generator (seeded)
        seed_everything(tc.seed)
        model = build_model(cfg.model.name)
        optim = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        floor = tc.min_lr / tc.lr if tc.lr > 0 else 0.0
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda s: warmup_cosine(s, total=tc.steps, warmup=tc.warmup_steps, min_ratio=floor)
        )
        run = _Run(
            model, optim, sched, torch.Generator().manual_seed(tc.seed), CheckpointDir(out / "ckpt", keep=tc.ckpt_keep)
        )

        # 3. resume
        step = resumed_from = _resume_state(run, chash, clock, out)

        # 4. train, 5. evaluate and record
        tb = out / "tensorboard" if cfg.log.tensorboard else None
        with MetricsLog(out / "metrics.jsonl", resume_step=step, drop=lambda r: "eval" in r, tensorboard=tb) as log:
            step = _train(cfg, run, pairs, step, log, lambda s: _save(run, s, chash, clock))
            if step < tc.steps:
                logger.info("teacher: stopped at step %d of %d; rerun to resume", step, tc.steps)
                return TeacherResult(out, out / "model", step, resumed_from, False, {}, False, None, clock.total())
            report = _evaluate(cfg, model, out, chash, step, clock)
            log.write({"step": step, "eval": report["metrics"]})

        # 6. publish (the committed reference teacher) only when the bar is met
        published = _publish(cfg, model, report, out)
        return TeacherResult(
            out, out / "model", step, resumed_from, True, report["metrics"], report["passed"], published, clock.total()
        )


@dataclass
class _Run:
    """The trained state: model, optimiser, schedule, the batch generator and the checkpoint folder."""

    model: torch.nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator
    ckpts: CheckpointDir


class _Clock:
    """Training wall / CPU seconds summed over every invocation of a resumed run (recorded in the checkpoint)."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.spent = {"wall_s": 0.0, "cpu_s": 0.0}
        self.mark()

    def mark(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def tick(self) -> dict[str, float]:
        self.spent["wall_s"] += time.perf_counter() - self._wall
        self.spent["cpu_s"] += time.process_time() - self._cpu
        self.mark()
        return dict(self.spent)

    def total(self) -> float:
        return time.perf_counter() - self.t_start


@contextlib.contextmanager
def _deterministic(threads: int):
    """A fixed torch thread count and deterministic algorithms for the run (restored after)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(prev_det)


def _resume_state(run: _Run, chash: str, clock: _Clock, out: Path) -> int:
    """Restore the last checkpoint of this config; returns its step (0 when none)."""
    ck = run.ckpts.load()
    if ck is None:
        return 0
    if ck.state.get("config_hash") != chash:
        raise D4IRError(
            f"{ck.path} was written with a different config (hash {str(ck.state.get('config_hash'))[:12]} vs "
            f"{chash[:12]}); use another `output.dir` or delete {out} to start over"
        )
    run.model.load_state_dict(ck.weights("model"))
    run.optim.load_state_dict(ck.state["optimizer"])
    run.sched.load_state_dict(ck.state["scheduler"])
    run.gen.set_state(ck.state["generator"])
    set_rng_state(ck.state["rng"])
    clock.spent = {k: float(v) for k, v in ck.state["spent"].items()}
    clock.mark()
    logger.info("teacher: resuming from step %d (%s)", ck.step, ck.path)
    return ck.step


def _save(run: _Run, step: int, chash: str, clock: _Clock) -> None:
    state = {
        "optimizer": run.optim.state_dict(),
        "scheduler": run.sched.state_dict(),
        "generator": run.gen.get_state(),
        "rng": rng_state(),
        "config_hash": chash,
        "spent": clock.tick(),
    }
    run.ckpts.save(step, state=state, weights={"model": run.model.state_dict()})


def _train(cfg: ReferenceTeacherConfig, run: _Run, pairs: list[dict], step: int, log: MetricsLog, save) -> int:
    """From ``step`` to the end (or ``train.stop_after`` new steps): batch -> L1 -> step -> log -> maybe save."""
    tc = cfg.train
    end = tc.steps if not tc.stop_after else min(tc.steps, step + tc.stop_after)
    run.model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(
        total=tc.steps, initial=step, desc="teacher", unit="step", dynamic_ncols=True, disable=not cfg.log.progress
    )
    while step < end:
        x, y = sample_batch(pairs, tc, run.gen)  # (B, 3, P, P) each
        loss = F.l1_loss(run.model(x), y)
        run.optim.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip)
        run.optim.step()
        run.sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if due(step, cfg.log.every, end):
            rate = tc.batch_size * len(losses) / max(1e-9, time.perf_counter() - t0)
            log.write(
                {"step": step, "loss": float(np.mean(losses)), "lr": run.sched.get_last_lr()[0], "samples_s": rate}
            )
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", samples_s=f"{rate:.1f}")
            t0, losses = time.perf_counter(), []
        if due(step, tc.ckpt_every, end):
            save(step)
    bar.close()
    return step


def _evaluate(
    cfg: ReferenceTeacherConfig, model: torch.nn.Module, out: Path, chash: str, step: int, clock: _Clock
) -> dict:
    """Score teacher and identity on the paired test sets; write model/ and report.json; returns the report."""
    test_pairs = []
    for m in cfg.data.test_manifests:
        test_pairs += load_pairs(m, cfg.data.root, check_hash=cfg.data.check_hash, limit=cfg.eval.max_images)
    metrics = evaluate_pairs(model, test_pairs)
    passed = bool(metrics) and all(m["gain_db"] >= cfg.eval.min_gain_db for m in metrics.values())
    report = {
        "config": config_to_dict(cfg),
        "config_hash": chash,
        "steps": step,
        "metrics": metrics,
        "passed": passed,
        "min_gain_db": cfg.eval.min_gain_db,
        "params": count_params(model),
        "macs_256": count_macs(model, (256, 256)),
        "threads": cfg.train.threads,
        "train_wall_s": clock.spent["wall_s"],
        "train_cpu_s": clock.spent["cpu_s"],
        "versions": package_versions(("torch", "numpy", "scikit-image", "pillow")),
    }
    save_model(model, out / "model", extra={"train": report})
    atomic_write_json(out / "report.json", report)
    for w, m in sorted(metrics.items()):
        logger.info("teacher %s: PSNR %.2f dB (identity %.2f), SSIM %.4f", w, m["psnr"], m["identity_psnr"], m["ssim"])
    return report


def _publish(cfg: ReferenceTeacherConfig, model: torch.nn.Module, report: dict, out: Path) -> Path | None:
    """Copy the model and a README to ``output.publish_dir`` when it is set and the bar is met (refused otherwise)."""
    if not cfg.output.publish_dir:
        return None
    if not report["passed"]:
        raise TeacherBarError(
            "teacher does not beat the identity by "
            f"{cfg.eval.min_gain_db} dB on every weather: "
            + ", ".join(f"{w} {m['gain_db']:+.2f} dB" for w, m in sorted(report["metrics"].items()))
            + f"; not publishing to {cfg.output.publish_dir} (see {out / 'report.json'})"
        )
    published = Path(cfg.output.publish_dir)
    save_model(model, published, extra={"train": report})
    atomic_write_text(published / "README.md", _readme(cfg, report, published))
    return published


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _readme(cfg: ReferenceTeacherConfig, report: dict, folder: Path) -> str:
    """README of the published teacher: what it is, how it was made, what it scores."""
    d = config_to_dict(cfg)
    toml = []
    for section, values in d.items():
        toml.append(f"[{section}]")
        toml += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        toml.append("")
    rows = [
        f"| {w} | {m['images']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['identity_psnr']:.2f} | "
        f"{m['identity_ssim']:.4f} | {m['gain_db']:+.2f} |"
        for w, m in sorted(report["metrics"].items())
    ]
    spec = report["config"]["model"]["name"]
    weights = folder / "model.safetensors"
    return f"""# Reference teacher of the embedded demo

A compact restoration network (`{spec}`: {type_name(cfg)}, {report["params"]:,} parameters,
{report["macs_256"] / 1e9:.2f} GMACs at 256x256) trained from scratch with L1 on the demo's
paired "original training data" (`{cfg.data.train_manifest}`: rain, haze and snow,
procedurally degraded crops of real photos). `make demo` distills students from it.
It is a real but small teacher for a CPU demo, not a benchmark model.

Files: `model.safetensors` (sha256 `{sha256_file(weights)}`), `model.json`
(build spec; `d4ir_pipeline.models.load_model(reference_teacher_path())` rebuilds it).

## How it was made

```
make teacher
# = d4ir demo-data --out runs/demo/data
#   {cfg.output.command}
```

{report["steps"]} steps with {report["threads"]} CPU thread(s): {report["train_cpu_s"] / 60:.1f} CPU-minutes
({report["train_wall_s"] / 60:.1f} min wall clock on a shared machine); deterministic (seeded,
`torch.use_deterministic_algorithms`; a rerun with the same thread count on the same machine gives
the same weights). Versions:
{", ".join(f"{k} {v}" for k, v in report["versions"].items())}. Resolved config
(stages/demo/teacher.toml after substitution; config hash `{report["config_hash"][:16]}`):

```toml
{chr(10).join(toml).rstrip()}
```

## Measured on the demo test sets

Mean per-image PSNR (dB, RGB, 8-bit) and SSIM (skimage, 7x7 window, RGB channels averaged)
of the teacher's output and of the identity (the degraded input scored against the
target). Bar: the teacher beats the identity by >= {report["min_gain_db"]} dB on every weather.

| weather | images | teacher PSNR | teacher SSIM | identity PSNR | identity SSIM | gain (dB) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def type_name(cfg: ReferenceTeacherConfig) -> str:
    """Class name of the configured model (built on the meta device: no weights)."""
    with torch.device("meta"):
        return type(build_model(cfg.model.name)).__name__


@stage_command("train-teacher", ReferenceTeacherConfig, "teacher")
def train_teacher_command(cfg: ReferenceTeacherConfig) -> None:
    """Train the demo's reference teacher (stages/<profile>/teacher.toml)."""
    res = train_teacher(cfg)
    click.echo(res.summary())
