"""d4ir_pipeline.stage2.config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d4ir_pipeline.config import opt
from d4ir_pipeline.stage2.teacher import (
    TeacherConfig,
)


@dataclass(frozen=True)
class StudentConfig:
    """The student: a registry name or any 'pkg.module:Class' with kwargs."""

    name: str = opt("nafnet_s", help="registry name (nafnet_s, rescnn, unet_s, ...) or 'pkg.module:Class'")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments of the student")
    tag: str = opt("", help="output sub-folder name; empty = derived from `name`")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are streamed."""

    shards: str = opt("{shards}", help="shard-set folder holding shardset.json (written by `d4ir synthesize`)")
    verify: str = opt(
        "full",
        help="'full' re-hashes every shard against shardset.json (refuses a mismatch); 'size' checks byte "
        "counts only (for very large sets); 'off' trusts the files",
        choices=("full", "size", "off"),
        affects_output=False,
    )
    patch: int = opt(128, help="random crop side; restoration students train on crops, run on full images", min=8)
    batch_size: int = opt(8, help="crops per step and rank", min=1)
    flips: bool = opt(True, help="random horizontal and vertical flips (the same on input and target)")
    shuffle_buffer: int = opt(256, help="sample shuffle buffer per worker (samples held in memory)", min=1)
    shuffle_initial: int = opt(64, help="samples buffered before the first one is emitted", min=1)
    num_workers: int = opt(2, help="DataLoader worker processes per rank (0 = decode in the training process)", min=0)
    holdout_fraction: float = opt(
        0.05,
        help="fraction of samples (by key hash) kept out of training for the student-vs-teacher check",
        min=0.0,
        max=0.5,
    )
    max_error_fraction: float = opt(
        0.01, help="fail once more than this fraction of samples is unusable (each one is logged)", min=0.0, max=1.0
    )
    error_min_samples: int = opt(50, help="samples to see before the error fraction is judged", min=1)


@dataclass(frozen=True)
class LabelsConfig:
    """The teacher-target cache (`d4ir label`)."""

    use: str = opt(
        "auto",
        help="'auto' uses a complete cache for this teacher and shard set when one exists; 'off' always runs "
        "the teacher; 'require' fails without a cache",
        choices=("auto", "off", "require"),
        affects_output=False,
    )
    dir: str = opt("", help="cache folder; empty = <shards>/labels/<teacher id>", affects_output=False)
    format: str = opt(
        "png",
        help="'png' (8-bit, like the inputs; small) or 'npy' (float16, no quantisation; 2x larger)",
        choices=("png", "npy"),
    )
    batch_size: int = opt(
        4, help="images per teacher forward while labelling (same-size neighbours)", min=1, affects_output=False
    )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, checkpoints."""

    steps: int = opt(2000, help="optimizer steps (the schedule's length)", min=1)
    lr: float = opt(5e-4, help="peak AdamW learning rate", min=0.0)
    weight_decay: float = opt(1e-4, help="AdamW weight decay", min=0.0)
    betas: tuple[float, float] = opt((0.9, 0.99), help="AdamW betas (0.99: the restoration papers' choice)")
    warmup_steps: int = opt(100, help="linear warm-up steps before the cosine decay", min=0)
    min_lr_ratio: float = opt(0.01, help="final learning rate as a fraction of `lr`", min=0.0, max=1.0)
    loss: str = opt("l1", help="pixel loss between student and teacher outputs", choices=("l1", "charbonnier"))
    charbonnier_eps: float = opt(1e-3, help="epsilon of the Charbonnier loss", min=0.0)
    grad_clip: float = opt(1.0, help="max gradient norm (0 = off)", min=0.0)
    amp: str = opt(
        "bf16", help="mixed precision for the student on CUDA (the CPU runs float32)", choices=("off", "bf16", "fp16")
    )
    seed: int = opt(0, help="seeds the student's init, shard order, shuffles and crops", min=0)
    ckpt_every: int = opt(
        250, help="checkpoint every N steps (rerunning resumes from the latest)", min=1, affects_output=False
    )
    ckpt_keep: int = opt(2, help="checkpoints kept (older ones are deleted)", min=1, affects_output=False)


@dataclass(frozen=True)
class LogConfig:
    """Progress and metrics."""

    every: int = opt(10, help="steps between metrics.jsonl lines", min=1, affects_output=False)
    progress: bool = opt(True, help="tqdm progress bar on rank 0", affects_output=False)
    sample_keys: bool = opt(
        False, help="write the sample keys of every step to keys-r<rank>.jsonl (audits, tests)", affects_output=False
    )
    tensorboard: bool = opt(
        False,
        help="also write TensorBoard event files to <output.dir>/<student tag>/tensorboard (rank 0)",
        affects_output=False,
    )


@dataclass(frozen=True)
class ValConfig:
    """Student-vs-teacher PSNR on held-out synthetic samples."""

    samples: int = opt(32, help="held-out samples evaluated (0 = no check)", min=0, affects_output=False)
    every: int = opt(0, help="also check every N steps (0 = only at the end)", min=0, affects_output=False)
    size: int = opt(256, help="centre crop side of the checked images (0 = whole images)", min=0, affects_output=False)


@dataclass(frozen=True)
class OutputConfig:
    """Where the runs go."""

    dir: str = opt("{distill}", help="runs go to <output.dir>/<student tag>/")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the run computes."""

    device: str = opt("auto", help="'auto' (cuda when available; cuda:LOCAL_RANK under torchrun), 'cpu' or 'cuda[:N]'")


@dataclass(frozen=True)
class DistillConfig:
    """`d4ir distill` / `d4ir label` (stages/<profile>/distill.toml)."""

    output: OutputConfig = field(default_factory=OutputConfig, metadata={"affects_output": False})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata={"affects_output": False})
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    val: ValConfig = field(default_factory=ValConfig)


def student_tag(cfg: StudentConfig) -> str:
    """Folder name of a student's run: `tag`, else its name made filesystem-safe."""
    if cfg.tag:
        return cfg.tag
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name).strip("-") or "student"


def student_dir(distill_out: str | Path, cfg: StudentConfig) -> Path:
    """The model folder `d4ir distill` leaves for a student: ``<output.dir>/<student_tag>/student``."""
    return Path(distill_out) / student_tag(cfg) / "student"
