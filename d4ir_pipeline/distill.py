"""Stage two: stream a shard set through pixel-wise distillation against a frozen teacher.

The student S learns S(x) ~= T(x) on the synthetic degraded images x of a shard set
(method.md, PKD): L1 (or Charbonnier) between the two outputs; the clean source image
is not a target. Data flow, one small generator per role (webdataset style):

    shardset.json --verify--> epoch shard order (seeded by seed, epoch)
      -> split by node (rank) -> split by worker -> tar samples (+ cached teacher labels)
      -> hold-out filter -> shuffle buffer (seeded) -> decode + crop + flips (seeded per sample)
      -> batches -> [teacher] -> student -> loss -> AdamW

The stream is infinite (epochs repeat, "resampled epochs"), so every rank always has a
next batch and ranks never wait on each other at the end of their shards. Every random
choice is a pure function of (seed, epoch, rank, worker, index), and every batch carries
its worker's cursor, so a checkpoint records exactly where each worker stands and a
rerun resumes bit for bit (the workers replay the tar bytes up to their cursor without
decoding). ``d4ir label`` caches the teacher's outputs next to the shards once; later
students then skip the teacher entirely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from .cliutil import config_from_options, stage_options
from .config import config_hash, config_to_dict, opt
from .errors import BadImageError, D4IRError
from .io import atomic_write_json, fsync_dir, read_json, sha256_file, trim_jsonl
from .runtime import DTYPES, cap_cpu_threads, package_versions, pick_device, pick_dtype, seed_everything, usable_cpus
from .shards import SHARDSET_NAME, ShardInfo, ShardSetError, check_shard_file, read_listing

__all__ = [
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "LabelsConfig",
    "TrainConfig",
    "LogConfig",
    "ValConfig",
    "DistillConfig",
    "DistillResult",
    "LabelResult",
    "ShardSetError",
    "ShardSet",
    "open_shardset",
    "load_teacher",
    "teacher_identity",
    "distill",
    "label",
    "distill_command",
    "label_command",
]

logger = logging.getLogger(__name__)

LABELS_NAME = "labels.json"
_LABEL_EXT = {"png": "teacher.png", "npy": "teacher.npy"}
_IMAGE_EXTS = ("degraded.png", "degraded.jpg", "degraded.jpeg", "degraded.webp")


# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher: a model folder (save_model), or a weights file plus its architecture."""

    checkpoint: str = opt(
        "reference",
        help="'reference' (the packaged demo teacher), a folder from save_model (model.json + "
        "model.safetensors), or a .safetensors/.pth file (then give `arch` and `kwargs`)",
    )
    arch: str = opt("", help="registry name or 'pkg.module:Class' for a bare weights file; empty = from model.json")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments for `arch`")
    key: str = opt("", help="container key inside a .pth (e.g. 'params_ema'); empty = automatic")
    dtype: str = opt(
        "float16",
        help="teacher precision on CUDA (half halves its cost; the CPU always runs float32)",
        choices=DTYPES,
    )
    tile: int = opt(0, help="tiled teacher inference above this side in pixels (0 = whole images)", min=0)
    tile_overlap: int = opt(32, help="overlap of neighbouring tiles in pixels", min=0)


@dataclass(frozen=True)
class StudentConfig:
    """The student: a registry name or any 'pkg.module:Class' with kwargs."""

    name: str = opt("nafnet_s", help="registry name (nafnet_s, rescnn, unet_s, ...) or 'pkg.module:Class'")
    kwargs: dict[str, Any] = opt(default_factory=dict, help="constructor arguments of the student")
    tag: str = opt("", help="output sub-folder name; empty = derived from `name`")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are streamed."""

    shards: str = opt("{work}/shards", help="shard-set folder holding shardset.json (written by `d4ir synthesize`)")
    verify: str = opt(
        "full",
        help="'full' re-hashes every shard against shardset.json (refuses a mismatch); 'size' checks byte "
        "counts only (for very large sets); 'off' trusts the files",
        choices=("full", "size", "off"),
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
    )
    dir: str = opt("", help="cache folder; empty = <shards>/labels/<teacher id>")
    format: str = opt(
        "png",
        help="'png' (8-bit, like the inputs; small) or 'npy' (float16, no quantisation; 2x larger)",
        choices=("png", "npy"),
    )
    batch_size: int = opt(4, help="images per teacher forward while labelling (same-size neighbours)", min=1)


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
    device: str = opt("auto", help="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    ckpt_every: int = opt(250, help="checkpoint every N steps (rerunning resumes from the latest)", min=1)
    ckpt_keep: int = opt(2, help="checkpoints kept (older ones are deleted)", min=1)


@dataclass(frozen=True)
class LogConfig:
    """Progress and metrics."""

    every: int = opt(10, help="steps between metrics.jsonl lines", min=1)
    progress: bool = opt(True, help="tqdm progress bar on rank 0")
    sample_keys: bool = opt(False, help="write the sample keys of every step to keys-r<rank>.jsonl (audits, tests)")


@dataclass(frozen=True)
class ValConfig:
    """Student-vs-teacher PSNR on held-out synthetic samples."""

    samples: int = opt(32, help="held-out samples evaluated (0 = no check)", min=0)
    every: int = opt(0, help="also check every N steps (0 = only at the end)", min=0)
    size: int = opt(256, help="centre crop side of the checked images (0 = whole images)", min=0)


@dataclass(frozen=True)
class DistillConfig:
    """`d4ir distill` / `d4ir label` (stages/<profile>/distill.toml)."""

    out: str = opt("{work}/distill", help="runs go to <out>/<student tag>/")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    val: ValConfig = field(default_factory=ValConfig)


# keys that may change between a run and its resume (they do not change what is trained)
_RESUME_FREE = (
    "log.every",
    "log.progress",
    "log.sample_keys",
    "train.ckpt_every",
    "train.ckpt_keep",
    "train.device",
    "data.verify",
    "labels.use",
    "labels.dir",
    "labels.batch_size",
    "val.samples",
    "val.every",
    "val.size",
)


def student_tag(cfg: StudentConfig) -> str:
    """Folder name of a student's run: `tag`, else its name made filesystem-safe."""
    if cfg.tag:
        return cfg.tag
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name).strip("-") or "student"


@dataclass
class DistillResult:
    """What a distillation run produced."""

    out_dir: Path
    student_dir: Path
    steps: int
    resumed_from: int
    final_loss: float | None
    samples_per_s: float | None
    seen_samples: int
    bad_samples: int
    targets: str  # "teacher" or "labels:<id>"
    shardset_sha256: str
    teacher_id: str
    val_psnr: float | None  # student vs teacher on held-out samples, dB
    val_samples: int


@dataclass
class LabelResult:
    """What `d4ir label` produced."""

    labels_dir: Path
    teacher_id: str
    shards: int
    samples: int
    skipped: int
    seconds: float


# ---------------------------------------------------------------------------------------
# shard set


# ShardSetError, ShardInfo and the listing / file checks live in shards.py (stage one
# writes what stage two reads; one reader for both); they are re-exported here.


@dataclass(frozen=True)
class ShardSet:
    """A verified shard set: its shards in manifest order and the manifest's own hash."""

    root: Path
    shards: tuple[ShardInfo, ...]
    manifest_sha256: str
    config_hash: str | None
    num_samples: int


def _verify_files(shards: list[ShardInfo], mode: str, where: str) -> None:
    """Refuse missing files, wrong sizes and (mode 'full') wrong hashes, listing every bad shard."""
    from tqdm import tqdm

    full = mode == "full"
    it = tqdm(shards, desc=f"verify {Path(where).parent.name}", unit="shard", disable=not full or len(shards) < 8)
    bad = [problem for s in it if (problem := check_shard_file(s, full=full))]
    if bad:
        more = f" ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ShardSetError(
            f"{where}: {len(bad)} of {len(shards)} shards fail verification ({mode}): "
            + "; ".join(bad[:10])
            + more
            + ". The set changed after it was written: rerun the command that wrote it (it resumes and "
            "rewrites bad shards), or restore the files."
        )


def open_shardset(root: str | os.PathLike, *, verify: str = "full") -> ShardSet:
    """Read ``root/shardset.json``; refuse incomplete sets and (per ``verify``) changed shards."""
    root = Path(root)
    manifest = root / SHARDSET_NAME
    if not manifest.is_file():
        hint = "" if root.is_dir() else " (the folder does not exist)"
        raise ShardSetError(
            f"`data.shards` = {str(root)!r}: no {SHARDSET_NAME}{hint}; run `d4ir synthesize` (make synthesize) "
            "first, or point `data.shards` at a finished shard-set folder"
        )
    doc, shards = read_listing(manifest, "d4ir-shardset")
    if doc.get("complete") is not True:
        raise ShardSetError(
            f"{manifest}: the shard set is incomplete (`complete` is not true): synthesis has not finished. "
            "Rerun `d4ir synthesize` with the same config to resume it."
        )
    if not shards:
        raise ShardSetError(f"{manifest}: lists no shards; point `data.shards` at a shard set with samples")
    if verify != "off":
        _verify_files(shards, verify, str(manifest))
    return ShardSet(
        root=root,
        shards=tuple(shards),
        manifest_sha256=sha256_file(manifest),
        config_hash=doc.get("config_hash"),
        num_samples=sum(s.samples for s in shards),
    )


# ---------------------------------------------------------------------------------------
# teacher


def _teacher_source(cfg: TeacherConfig) -> tuple[Path, Path, dict]:
    """(checkpoint path, weights file, build spec) without building anything."""
    from .models import reference_teacher_path
    from .models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_model_json

    path = reference_teacher_path() if cfg.checkpoint == "reference" else Path(cfg.checkpoint)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if cfg.arch:
            spec = {"name": cfg.arch, "kwargs": dict(cfg.kwargs)}
        elif (path / CONFIG_NAME).is_file():
            spec = read_model_json(path)["spec"]
        else:
            raise D4IRError(
                f"`teacher.checkpoint` = {str(path)!r}: the folder has no {CONFIG_NAME}; give `teacher.arch` "
                "(and `teacher.kwargs`) or a folder written by save_model"
            )
        if not weights.is_file():
            raise D4IRError(f"`teacher.checkpoint` = {str(path)!r}: no {WEIGHTS_NAME} in the folder")
        return path, weights, spec
    if path.is_file():
        if not cfg.arch:
            raise D4IRError(
                f"`teacher.checkpoint` = {str(path)!r} is a bare weights file: set `teacher.arch` (a registry "
                "name such as 'restormer' or 'pkg.module:Class') and `teacher.kwargs`"
            )
        return path, path, {"name": cfg.arch, "kwargs": dict(cfg.kwargs)}
    hint = " (build it with `make teacher`)" if cfg.checkpoint == "reference" else ""
    raise D4IRError(f"`teacher.checkpoint` = {cfg.checkpoint!r}: {str(path)!r} does not exist{hint}")


def teacher_identity(cfg: TeacherConfig) -> dict:
    """Hash of what determines the teacher's outputs: weights, architecture, tiling."""
    path, weights, spec = _teacher_source(cfg)
    wsha = sha256_file(weights)
    ident = {"weights_sha256": wsha, "spec": spec, "tile": cfg.tile, "tile_overlap": cfg.tile_overlap}
    tid = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": tid, "path": str(path), **ident}


def load_teacher(cfg: TeacherConfig, device: Any) -> tuple[Any, Any]:
    """Build + load the teacher strictly, frozen (eval, no grad), cast to the run's dtype: (model, dtype)."""
    from .models import build_model, load_weights

    path, weights, spec = _teacher_source(cfg)
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    # a key mismatch raises CheckpointMismatchError listing missing / unexpected keys
    load_weights(model, weights, strict=True, key=cfg.key or None)
    dtype = pick_dtype(cfg.dtype, device)
    model = model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    logger.info("teacher %s from %s (%s on %s)", spec["name"], path, dtype, device)
    return model, dtype


def _check_same_size(out: Any, x: Any, who: str) -> None:
    if tuple(out.shape) != tuple(x.shape):
        raise D4IRError(
            f"{who} returned {tuple(out.shape)} for an input of {tuple(x.shape)}: pixel distillation needs an "
            "image-to-image model whose output has the input's size and channels (check the model name / kwargs, "
            "e.g. an upscale factor or out_channels)"
        )


def teacher_forward(model: Any, x: Any, dtype: Any, cfg: TeacherConfig) -> Any:
    """Frozen teacher on ``x`` (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) clamped to [0, 1]."""

    from .models.tiling import tiled_forward

    with torch.no_grad():
        xin = x.to(dtype)
        if cfg.tile and max(x.shape[-2:]) > cfg.tile:
            y = tiled_forward(model, xin, tile=cfg.tile, overlap=min(cfg.tile_overlap, cfg.tile - 1))
        else:
            y = model(xin)
    _check_same_size(y, x, f"teacher ({cfg.checkpoint})")
    return y.float().clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------
# reading shards (raw bytes; no decoding)


def _mix(*parts: int) -> int:
    """A 64-bit seed from integers (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()[:8], "little")


def is_holdout(key: str, fraction: float) -> bool:
    """Deterministic hold-out by key hash (independent of the shard layout)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _split_name(fname: str) -> tuple[str | None, str]:
    """webdataset's key convention: key = path up to the first dot of the basename; ext = the rest."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(fname)
    return key, (ext or "").lower()


class _TarTruncated(Exception):
    def __init__(self, key: str | None, cause: BaseException):
        super().__init__(str(cause))
        self.key, self.cause = key, cause


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, streaming; a corrupt / truncated tar raises _TarTruncated."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isreg():
                        continue
                    k, ext = _split_name(member.name)
                    if k is None:
                        continue
                    if k != key:
                        if key is not None and parts:
                            yield key, parts
                        key, parts = k, {}
                    fobj = tf.extractfile(member)
                    assert fobj is not None
                    parts[ext] = fobj.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise _TarTruncated(key, e) from e
    if key is not None and parts:
        yield key, parts


@dataclass
class _Stats:
    """Cumulative per-worker counts, reported with every batch."""

    good: int = 0
    bad: int = 0
    muted: bool = False  # while replaying to a resume cursor nothing is counted or logged
    warned: set = field(default_factory=set)

    def bad_sample(self, shard: str, key: str | None, reason: str, n: int = 1) -> None:
        if self.muted:
            return
        self.bad += n
        tag = (shard, key, reason)
        if tag not in self.warned:
            self.warned.add(tag)
            logger.warning("skipped %d sample(s): shard %s, key %s: %s", n, shard, key, reason)


def _read_shard(shard: ShardInfo, label_path: Path | None, label_ext: str, stats: _Stats) -> Iterator[dict]:
    """Raw samples of one shard (+ the cached label of each); damage is counted, never fatal."""
    got = 0
    last: str | None = None
    labels = _iter_tar(label_path) if label_path is not None else None
    pending: tuple[str, dict[str, bytes]] | None = None
    try:
        for key, parts in _iter_tar(shard.path):
            got += 1
            last = key
            sample = {"__key__": key, "__shard__": shard.name, **parts}
            if labels is not None:
                # label tars hold the shard's decodable samples in the shard's order
                if pending is None:
                    pending = next(labels, None)
                if pending is not None and pending[0] == key:
                    if label_ext in pending[1]:
                        sample["__label__"] = pending[1][label_ext]
                    pending = None
            yield sample
    except _TarTruncated as e:
        where = f"while reading key {e.key}" if e.key else "before the first sample"
        stats.bad_sample(shard.name, e.key, f"corrupt or truncated tar {where} ({e.cause})")
        got += 1  # the partial sample is lost
    missing = shard.samples - got
    if missing > 0:
        stats.bad_sample(
            shard.name,
            last,
            f"shard ended early: {missing} of {shard.samples} listed samples missing after key {last}",
            n=missing,
        )


# ---------------------------------------------------------------------------------------
# the training stream (one logical worker)


@dataclass(frozen=True)
class StreamSpec:
    """Small frozen descriptor that crosses into DataLoader workers."""

    shards: tuple[ShardInfo, ...]
    label_dir: str | None
    label_ext: str
    seed: int
    rank: int
    world: int
    workers: int  # logical workers per rank (>= 1)
    patch: int
    batch_size: int
    flips: bool
    buffer: int
    initial: int
    holdout: float


def epoch_shards(spec: StreamSpec, epoch: int, worker: int) -> list[ShardInfo]:
    """Shards of one (rank, worker) in one epoch: seeded shuffle by (seed, epoch), split by node, then worker.

    The same split as webdataset's ``split_by_node`` + ``split_by_worker``, with rank and
    worker passed explicitly (DataLoader workers have no process group, and resume
    rotates physical workers over logical ones).
    """
    order = list(spec.shards)
    random.Random(_mix(spec.seed, epoch)).shuffle(order)
    node = islice(order, spec.rank, None, spec.world)  # split_by_node
    return list(islice(node, worker, None, spec.workers))  # split_by_worker


def _decode(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode + crop + flip one sample: uint8 (3, P, P) input and its cached target (or None)."""
    from .manifests import decode_rgb

    key = sample["__key__"]
    ext = next((e for e in _IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadImageError(
            "missing", f"no degraded image in the sample (has {sorted(k for k in sample if k[:2] != '__')})"
        )
    img, _ = decode_rgb(sample[ext], name=f"{key}.{ext}")
    x = np.asarray(img)  # (H, W, 3) uint8
    t = None
    if spec.label_dir is not None:
        if "__label__" not in sample:
            raise BadImageError("missing", "no cached teacher output for this key (it failed while labelling)")
        t = _decode_label(sample["__label__"], spec.label_ext, key)
        if t.shape[:2] != x.shape[:2]:
            raise BadImageError("size_mismatch", f"cached target {t.shape[:2]} vs input {x.shape[:2]}")
    h, w = x.shape[:2]
    p = spec.patch
    if h < p or w < p:
        raise BadImageError("too_small", f"{w}x{h} is smaller than the crop `data.patch` = {p}")
    top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
    hflip, vflip = (bool(rng.integers(0, 2)), bool(rng.integers(0, 2))) if spec.flips else (False, False)

    def aug(a: np.ndarray) -> np.ndarray:
        a = a[top : top + p, left : left + p]
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1]
        return np.ascontiguousarray(a.transpose(2, 0, 1))  # (3, P, P)

    return aug(x), (aug(t) if t is not None else None)


def _decode_label(data: bytes, ext: str, key: str) -> np.ndarray:
    if ext.endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadImageError("corrupt", f"{key}.{ext}: not a readable .npy ({e})") from e
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise BadImageError("corrupt", f"{key}.{ext}: shape {arr.shape}, expected (H, W, 3)")
        return arr
    from .manifests import decode_rgb

    img, _ = decode_rgb(data, name=f"{key}.{ext}")
    return np.asarray(img)


def worker_batches(spec: StreamSpec, worker: int, epoch: int, index: int, stats: _Stats) -> Iterator[dict]:
    """Infinite batches of one logical worker, starting at its cursor (epoch, index into the shuffled stream)."""
    import webdataset as wds

    label_dir = Path(spec.label_dir) if spec.label_dir else None
    xs: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    keys: list[str] = []
    while True:
        shards = epoch_shards(spec, epoch, worker)

        def raw(shards: list[ShardInfo] = shards) -> Iterator[dict]:
            for s in shards:
                lp = label_dir / s.name if label_dir is not None else None
                for sample in _read_shard(s, lp, spec.label_ext, stats):
                    if not is_holdout(sample["__key__"], spec.holdout):
                        yield sample

        rng_buf = random.Random(_mix(spec.seed, epoch, spec.rank, worker, 1))
        stream = wds.shuffle(spec.buffer, initial=min(spec.initial, spec.buffer), rng=rng_buf)(raw())
        usable = 0
        stats.muted = index > 0
        for i, sample in enumerate(stream):
            if i < index:  # replaying to the resume cursor: no decoding, nothing counted twice
                stats.muted = i < index - 1  # the reads after the cursor's sample count again
                continue
            rng = np.random.default_rng([spec.seed, epoch, spec.rank, worker, i])
            try:
                x, t = _decode(sample, spec, rng)
            except BadImageError as e:
                stats.bad_sample(sample["__shard__"], sample["__key__"], f"{e.reason}: {e}")
                continue
            stats.good += 1
            usable += 1
            xs.append(x)
            keys.append(sample["__key__"])
            if t is not None:
                ts.append(t)
            if len(xs) == spec.batch_size:
                yield {
                    "x": torch.from_numpy(np.stack(xs)),  # (B, 3, P, P) uint8
                    "t": torch.from_numpy(np.stack(ts)) if ts else None,  # (B, 3, P, P) uint8 / float16
                    "keys": keys,
                    "cursor": (worker, epoch, i + 1),
                    "stats": (worker, stats.good, stats.bad),
                }
                xs, ts, keys = [], [], []
        stats.muted = False
        if usable == 0 and index == 0:
            names = [s.name for s in shards]
            raise D4IRError(
                f"rank {spec.rank} worker {worker}: no usable training sample in a whole epoch of shards {names} "
                "(all held out or unusable); lower `data.holdout_fraction` or use a larger shard set"
            )
        epoch, index = epoch + 1, 0


class ShardStream(torch.utils.data.IterableDataset):
    """The shard stream of one rank: physical worker w plays logical worker (w + rotation) % W."""

    def __init__(
        self, spec: StreamSpec, cursors: dict[int, tuple[int, int]], stats: dict[int, tuple[int, int]], rotation: int
    ):
        super().__init__()
        self.spec, self.cursors, self.stats, self.rotation = spec, cursors, stats, rotation

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        phys = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # workers decode PNGs; the training process owns the cores
        lw = (phys + self.rotation) % self.spec.workers
        epoch, index = self.cursors.get(lw, (0, 0))
        good, bad = self.stats.get(lw, (0, 0))
        yield from worker_batches(self.spec, lw, epoch, index, _Stats(good=good, bad=bad))


def _make_loader(ds: ShardStream, num_workers: int, pin: bool, seed: int) -> torch.utils.data.DataLoader:
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    kw: dict[str, Any] = {
        "batch_size": None,
        "num_workers": num_workers,
        "pin_memory": pin,
        "generator": torch.Generator().manual_seed(seed),
    }
    if num_workers > 0:
        kw["prefetch_factor"] = 4
    return torch.utils.data.DataLoader(ds, **kw)


# ---------------------------------------------------------------------------------------
# label cache


def _labels_dir(cfg: DistillConfig, shardset: ShardSet, tid: str) -> Path:
    return Path(cfg.labels.dir) if cfg.labels.dir else shardset.root / "labels" / tid


def find_labels(cfg: DistillConfig, shardset: ShardSet, ident: dict) -> Path | None:
    """A complete label cache for this teacher and shard set, verified per `data.verify`, or None."""
    d = _labels_dir(cfg, shardset, ident["id"])
    doc_path = d / LABELS_NAME
    if not doc_path.is_file():
        return None
    doc, shards = read_listing(doc_path, "d4ir-labels")
    why = None
    if doc.get("complete") is not True:
        why = "incomplete (rerun `d4ir label` to finish it)"
    elif doc.get("teacher", {}).get("id") != ident["id"]:
        why = f"made by teacher {doc.get('teacher', {}).get('id')}, not {ident['id']}"
    elif doc.get("shardset_sha256") != shardset.manifest_sha256:
        why = "made for another version of the shard set"
    elif doc.get("format") != cfg.labels.format:
        why = f"format {doc.get('format')!r}, config asks {cfg.labels.format!r}"
    if why:
        logger.info("label cache %s not used: %s", d, why)
        return None
    if cfg.data.verify != "off":
        _verify_files(shards, cfg.data.verify, str(doc_path))
    if sorted(s.name for s in shards) != sorted(s.name for s in shardset.shards):
        raise ShardSetError(f"{doc_path}: its shards differ from the shard set's; rebuild it with `d4ir label`")
    return d


def _write_tar(path: Path, samples: list[dict]) -> tuple[int, str]:
    """Write a tar atomically (tmp + fsync + rename); returns (bytes, sha256)."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as w:
            for s in samples:
                w.write(s)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path.stat().st_size, sha256_file(path)


def _encode_label(t: Any, fmt: str) -> bytes:
    """float (3, H, W) in [0, 1] -> PNG (8-bit) or .npy (float16 HWC) bytes."""
    from PIL import Image

    hwc = t.permute(1, 2, 0).cpu()
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, hwc.numpy().astype(np.float16), allow_pickle=False)
        return buf.getvalue()
    arr = (hwc * 255.0).round_().clamp_(0, 255).to(dtype=__import__("torch").uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def label(cfg: DistillConfig) -> LabelResult:
    """Run the teacher once over every sample of the shard set and cache its outputs next to the shards."""
    from tqdm import tqdm

    from .manifests import decode_rgb

    t0 = time.perf_counter()
    # 1. inputs: verified shard set, teacher identity, cache folder
    shardset = open_shardset(cfg.data.shards, verify=cfg.data.verify)
    ident = teacher_identity(cfg.teacher)
    out = _labels_dir(cfg, shardset, ident["id"])
    out.mkdir(parents=True, exist_ok=True)
    doc_path = out / LABELS_NAME
    ext = _LABEL_EXT[cfg.labels.format]
    doc = {
        "kind": "d4ir-labels",
        "version": 1,
        "complete": False,
        "teacher": ident,
        "shardset": str(shardset.root),
        "shardset_sha256": shardset.manifest_sha256,
        "format": cfg.labels.format,
        "shards": [],
        "skipped": 0,
        "versions": package_versions(),
    }
    # 2. resume: keep shards already written for the same teacher, shard set and format
    if doc_path.is_file():
        old = read_json(doc_path)
        same = (
            old.get("teacher", {}).get("id") == ident["id"]
            and old.get("shardset_sha256") == shardset.manifest_sha256
            and old.get("format") == cfg.labels.format
        )
        if not same:
            raise ShardSetError(
                f"{doc_path} belongs to another teacher / shard set / format; remove the folder or set `labels.dir`"
            )
        if old.get("complete") is True:
            logger.info("label cache %s is complete", out)
            return LabelResult(
                out,
                ident["id"],
                len(old["shards"]),
                sum(s["samples"] for s in old["shards"]),
                int(old.get("skipped", 0)),
                0.0,
            )
        done = {
            s["name"]: s
            for s in old.get("shards", [])
            if (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
        }
        doc["shards"] = [done[s.name] for s in shardset.shards if s.name in done]
        doc["skipped"] = int(old.get("skipped", 0))
    done_names = {s["name"] for s in doc["shards"]}
    # 3. teacher
    device = pick_device(cfg.train.device)
    teacher, dtype = load_teacher(cfg.teacher, device)
    stats = _Stats()
    total = 0
    todo = [s for s in shardset.shards if s.name not in done_names]
    for shard in tqdm(todo, desc="label", unit="shard", disable=not cfg.log.progress):
        written: list[dict] = []
        group: list[tuple[str, np.ndarray]] = []

        def flush(group: list[tuple[str, np.ndarray]] = group, written: list[dict] = written) -> None:
            if not group:
                return
            x = torch.from_numpy(np.stack([a for _, a in group])).to(device).permute(0, 3, 1, 2).float() / 255.0
            y = teacher_forward(teacher, x, dtype, cfg.teacher)  # (B, 3, H, W)
            for (key, _), yi in zip(group, y, strict=True):
                written.append({"__key__": key, ext: _encode_label(yi, cfg.labels.format)})
            group.clear()

        for sample in _read_shard(shard, None, ext, stats):
            key = sample["__key__"]
            img_ext = next((e for e in _IMAGE_EXTS if e in sample), None)
            try:
                if img_ext is None:
                    raise BadImageError("missing", "no degraded image in the sample")
                arr = np.asarray(decode_rgb(sample[img_ext], name=f"{key}.{img_ext}")[0])  # (H, W, 3)
            except BadImageError as e:
                stats.bad_sample(shard.name, key, f"{e.reason}: {e}")
                continue
            if group and (group[0][1].shape != arr.shape or len(group) >= cfg.labels.batch_size):
                flush()
            group.append((key, arr))
        flush()
        size, sha = _write_tar(out / shard.name, written)
        doc["shards"].append({"name": shard.name, "samples": len(written), "bytes": size, "sha256": sha})
        doc["skipped"] = int(doc["skipped"]) + stats.bad
        stats.bad = 0
        total += len(written)
        atomic_write_json(doc_path, doc)  # progress: finished shards survive an interrupt
    order = {s.name: i for i, s in enumerate(shardset.shards)}
    doc["shards"].sort(key=lambda s: order[s["name"]])
    doc["complete"] = True
    atomic_write_json(doc_path, doc)
    secs = time.perf_counter() - t0
    logger.info("labelled %d samples in %d shards -> %s (%.1fs)", total, len(todo), out, secs)
    return LabelResult(
        out, ident["id"], len(doc["shards"]), sum(s["samples"] for s in doc["shards"]), int(doc["skipped"]), secs
    )


# ---------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False
    device: str = "cpu"  # where collectives' tensors live (nccl needs CUDA tensors)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _init_dist(device_name: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(
        rank=rank, world=world, local_rank=local, initialised=True, device=f"cuda:{local}" if use_cuda else "cpu"
    )


# ---------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict:

    st = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": st[0],
            "keys": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached": float(st[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest.json"
    if not pointer.is_file():
        return None
    d = ckpt_root / read_json(pointer)["dir"]
    if not (d / "state.pt").is_file():
        raise D4IRError(f"{pointer} names {d}, which has no state.pt; delete {ckpt_root} to start over")
    return d


def _save_checkpoint(ckpt_root: Path, step: int, student: Any, state: dict, keep: int, extra: dict) -> Path:
    """Write ckpt/step-N/ (student safetensors + state.pt) via a tmp folder + rename, then move latest.json."""

    from .models import save_model

    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, tmp / "student", extra=extra)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_json(ckpt_root / "latest.json", {"dir": name, "step": step})
    listed = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))
    for old in listed[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------
# the loop


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pixel_loss(s: Any, t: Any, kind: str, eps: float) -> Any:
    """Mean L1 or Charbonnier distance between student and teacher outputs (B, 3, H, W)."""

    if kind == "charbonnier":
        return torch.sqrt((s - t) ** 2 + eps * eps).mean()
    return (s - t).abs().mean()


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of images in [0, 1] (RGB, whole tensor)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


@dataclass
class BatchSourceContext:
    """What a batch source gets: the stream descriptor and where each logical worker resumes."""

    spec: StreamSpec
    cursors: dict[int, tuple[int, int]]
    stats: dict[int, tuple[int, int]]
    rotation: int
    num_workers: int
    pin_memory: bool


def default_batch_source(ctx: BatchSourceContext) -> Iterator[dict]:
    """Batches streamed from the shards through DataLoader workers."""
    ds = ShardStream(ctx.spec, ctx.cursors, ctx.stats, ctx.rotation)
    return iter(_make_loader(ds, ctx.num_workers, ctx.pin_memory, ctx.spec.seed))


def _val_samples(
    shardset: ShardSet, spec: StreamSpec, n: int, size: int
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """The first ``n`` held-out samples in manifest order, centre-cropped: (key, uint8 HWC, target or None)."""
    from .manifests import decode_rgb

    out: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    stats = _Stats(muted=True)
    label_dir = Path(spec.label_dir) if spec.label_dir else None
    for s in shardset.shards:
        lp = label_dir / s.name if label_dir is not None else None
        for sample in _read_shard(s, lp, spec.label_ext, stats):
            key = sample["__key__"]
            if not is_holdout(key, spec.holdout):
                continue
            ext = next((e for e in _IMAGE_EXTS if e in sample), None)
            try:
                if ext is None:
                    raise BadImageError("missing", "no image")
                x = np.array(decode_rgb(sample[ext], name=key)[0])  # (H, W, 3), writable
                t = _decode_label(sample["__label__"], spec.label_ext, key) if "__label__" in sample else None
            except BadImageError:
                continue
            if label_dir is not None and t is None:
                continue
            if size:
                h, w = x.shape[:2]
                c = min(size, h, w)
                top, left = (h - c) // 2, (w - c) // 2
                x = x[top : top + c, left : left + c]
                t = t[top : top + c, left : left + c] if t is not None else None
            out.append((key, x, t))
            if len(out) >= n:
                return out
    return out


def _validate(student: Any, teacher: Any, tdtype: Any, cfg: DistillConfig, samples: list, device: Any) -> float | None:
    """Mean student-vs-teacher PSNR (dB) on held-out samples (targets: teacher or its cached outputs)."""

    if not samples:
        return None
    was = student.training
    student.eval()
    vals = []
    with torch.no_grad():
        for _key, x, t in samples:
            xt = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].to(device).float() / 255.0
            if t is not None:
                tt = torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None].to(device).float()
                tt = tt / 255.0 if t.dtype == np.uint8 else tt
            else:
                tt = teacher_forward(teacher, xt, tdtype, cfg.teacher)
            s = student(xt).float().clamp(0, 1)
            vals.append(psnr(s, tt))
    student.train(was)
    return float(np.mean(vals))


def distill(
    cfg: DistillConfig, *, batch_source: Callable[[BatchSourceContext], Iterator[dict]] | None = None
) -> DistillResult:
    """Distil ``cfg.student`` from the frozen teacher on the shard set; rerunning resumes exactly.

    ``batch_source`` replaces the shard stream (benchmarks compare against in-memory data).
    """
    from tqdm import tqdm

    from .models import build_model, save_model

    # 1. processes and device
    dist = _init_dist(cfg.train.device)
    threads_restore = None
    try:
        if dist.world > 1 and torch.cuda.is_available() and cfg.train.device != "cpu":
            device = torch.device("cuda", dist.local_rank)
        else:
            device = pick_device(cfg.train.device)
        W = max(1, cfg.data.num_workers)
        if device.type == "cpu":  # training threads + decoding workers must fit the cores
            busy = cfg.data.num_workers if batch_source is None else 0
            threads_restore, now = cap_cpu_threads(busy)
            logger.info(
                "CPU training: %d torch thread(s) (%d usable CPUs, %d data worker(s))", now, usable_cpus(), busy
            )

        # 2. shard set (sizes checked now; rank 0 re-hashes it below, once it knows it will train), teacher
        # identity, labels
        verify = cfg.data.verify if dist.rank == 0 or cfg.data.verify == "off" else "size"
        shardset = open_shardset(cfg.data.shards, verify="size" if verify == "full" else verify)
        if len(shardset.shards) < dist.world * W:
            raise ShardSetError(
                f"`data.shards` = {cfg.data.shards!r} has {len(shardset.shards)} shards, but {dist.world} rank(s) x "
                f"{W} worker(s) = {dist.world * W} readers each need at least one. Fix: lower `data.num_workers` "
                f"(at most {max(0, len(shardset.shards) // dist.world)} here), use fewer ranks, or synthesize more, "
                "smaller shards."
            )
        ident = teacher_identity(cfg.teacher)
        out = Path(cfg.out) / student_tag(cfg.student)
        ckpt_root = out / "ckpt"
        run_path = out / "run.json"
        chash = config_hash(cfg, exclude=_RESUME_FREE)
        result_path = out / "result.json"
        latest = _latest_checkpoint(ckpt_root)
        # a run.json without any checkpoint is a run that never got going: it is simply replaced
        started = latest is not None or result_path.is_file()
        prev = read_json(run_path) if run_path.is_file() and started else None
        if prev is not None:
            _check_resumable(prev, chash, shardset, ident, cfg, run_path)
        labels_dir: Path | None = None
        if prev is not None and str(prev.get("targets", "")).startswith("labels:"):
            labels_dir = Path(prev["labels_dir"])
            find = find_labels(cfg, shardset, ident)
            if find is None or find.resolve() != labels_dir.resolve():
                raise D4IRError(
                    f"{run_path}: this run started on the label cache {labels_dir}, which is no longer "
                    f"complete or valid; rebuild it with `d4ir label` or delete {out} to start over"
                )
        elif prev is None and cfg.labels.use != "off":
            labels_dir = find_labels(cfg, shardset, ident)
            if labels_dir is None and cfg.labels.use == "require":
                raise D4IRError(
                    f"`labels.use` = 'require' but there is no complete label cache for teacher {ident['id']} at "
                    f"{_labels_dir(cfg, shardset, ident['id'])}; run `d4ir label` with the same config first"
                )
        targets = f"labels:{ident['id']}" if labels_dir is not None else "teacher"
        dist.barrier()  # every rank has read run.json before rank 0 may replace it
        if dist.rank == 0 and prev is None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                run_path,
                {
                    "config": config_to_dict(cfg),
                    "config_hash": chash,
                    "shardset": str(shardset.root),
                    "shardset_sha256": shardset.manifest_sha256,
                    "shardset_config_hash": shardset.config_hash,
                    "teacher": ident,
                    "targets": targets,
                    "labels_dir": str(labels_dir) if labels_dir else None,
                    "world_size": dist.world,
                    "num_workers": cfg.data.num_workers,
                    "versions": package_versions(),
                },
            )
        dist.barrier()

        # 3. finished already?
        if result_path.is_file():
            done = read_json(result_path)
            if done.get("steps") == cfg.train.steps:
                logger.info("%s is finished (%d steps); delete it to train again", out, cfg.train.steps)
                return _result_from_json(done, out)
        if verify == "full":  # the sha256 pass over every shard, only when this run will read them
            _verify_files(list(shardset.shards), "full", str(shardset.root / SHARDSET_NAME))

        # 4. models, optimizer, schedule
        seed_everything(cfg.train.seed)
        teacher, tdtype = (None, None) if labels_dir is not None else load_teacher(cfg.teacher, device)
        student = build_model(cfg.student.name, **cfg.student.kwargs).to(device)
        student.train()
        opt_ = torch.optim.AdamW(
            student.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay
        )
        tc = cfg.train

        def factor(step: int) -> float:
            return lr_factor(step, warmup=tc.warmup_steps, total=tc.steps, min_ratio=tc.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt_, factor)
        use_cuda = device.type == "cuda"
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp) if use_cuda else None
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        # 5. resume
        start, cursors, wstats, rotation = 0, {}, {}, 0
        if latest is not None:
            from .models import load_weights

            state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
            if state["world_size"] != dist.world or state["workers"] != W:
                raise D4IRError(
                    f"{latest}: saved with {state['world_size']} rank(s) x {state['workers']} worker(s), now "
                    f"{dist.world} x {W}; the sample stream depends on both: resume with the same numbers"
                )
            load_weights(student, latest / "student" / "model.safetensors", strict=True)
            opt_.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            mine = state["data"][dist.rank]
            cursors = {int(k): tuple(v) for k, v in mine["cursors"].items()}
            wstats = {int(k): tuple(v) for k, v in mine["stats"].items()}
            rotation = int(mine["next_worker"])
            _set_rng_state(state["rng"][dist.rank])
            start = int(state["step"])
            logger.info("resuming %s from step %d (%s)", out, start, latest.name)
        # lines a killed run wrote after its last checkpoint are dropped (they will be written again)
        if dist.rank == 0:
            trim_jsonl(out / "metrics.jsonl", start)
        if cfg.log.sample_keys:
            trim_jsonl(out / f"keys-r{dist.rank}.jsonl", start)
        model = student
        if dist.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if use_cuda else None)

        # 6. data
        spec = StreamSpec(
            shards=shardset.shards,
            label_dir=str(labels_dir) if labels_dir else None,
            label_ext=_LABEL_EXT[cfg.labels.format],
            seed=tc.seed,
            rank=dist.rank,
            world=dist.world,
            workers=W,
            patch=cfg.data.patch,
            batch_size=cfg.data.batch_size,
            flips=cfg.data.flips,
            buffer=cfg.data.shuffle_buffer,
            initial=cfg.data.shuffle_initial,
            holdout=cfg.data.holdout_fraction,
        )
        ctx = BatchSourceContext(spec, cursors, wstats, rotation, cfg.data.num_workers, use_cuda)
        batches = (batch_source or default_batch_source)(ctx)
        val_set = (
            _val_samples(shardset, spec, cfg.val.samples, cfg.val.size)
            if dist.rank == 0 and cfg.val.samples and cfg.data.holdout_fraction > 0
            else []
        )
        if dist.rank == 0 and cfg.val.samples and not val_set:
            logger.warning(
                "no held-out samples for the student-vs-teacher check (data.holdout_fraction = %s)",
                cfg.data.holdout_fraction,
            )

        # 7. train
        extra = {
            "run": {
                "shardset_sha256": shardset.manifest_sha256,
                "teacher": ident,
                "targets": targets,
                "config_hash": chash,
            }
        }
        metrics_f = open(out / "metrics.jsonl", "a", encoding="utf-8") if dist.rank == 0 else None
        keys_f = open(out / f"keys-r{dist.rank}.jsonl", "a", encoding="utf-8") if cfg.log.sample_keys else None
        bar = tqdm(
            total=tc.steps,
            initial=start,
            unit="step",
            desc=f"distill {student_tag(cfg.student)}",
            disable=dist.rank != 0 or not cfg.log.progress,
            dynamic_ncols=True,
        )
        t_start, n_start = time.perf_counter(), start
        loss_v: float | None = None
        samples_per_s: float | None = None
        seen = bad = 0
        consumed = 0
        next_worker = rotation
        data_wait = 0.0  # seconds spent waiting for the input pipeline (near 0 when it keeps up)
        try:
            for step in range(start, tc.steps):
                t_wait = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - t_wait
                w, ep, idx = batch["cursor"]
                cursors[w] = (ep, idx)
                sw, good_w, bad_w = batch["stats"]
                wstats[sw] = (good_w, bad_w)
                consumed += 1
                next_worker = (rotation + consumed) % W
                x = batch["x"].to(device, non_blocking=True).float().div_(255.0)  # (B, 3, P, P)
                if batch["t"] is not None:
                    tt = batch["t"].to(device, non_blocking=True).float()
                    t = tt.div_(255.0) if batch["t"].dtype == torch.uint8 else tt
                else:
                    t = teacher_forward(teacher, x, tdtype, cfg.teacher)  # (B, 3, P, P)
                amp_ctx = torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
                with amp_ctx:
                    s = model(x)  # (B, 3, P, P)
                if step == start:
                    _check_same_size(s, x, f"student {cfg.student.name!r}")
                loss = pixel_loss(s.float(), t, tc.loss, tc.charbonnier_eps)
                opt_.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.grad_clip > 0:
                    scaler.unscale_(opt_)
                    torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip)
                scaler.step(opt_)
                scaler.update()
                sched.step()
                done_step = step + 1
                if keys_f is not None:
                    keys_f.write(json.dumps({"step": done_step, "keys": batch["keys"]}) + "\n")
                    keys_f.flush()
                bar.update(1)
                if done_step % cfg.log.every == 0 or done_step == tc.steps:
                    # the same steps on every rank: these collectives cannot leave a rank waiting
                    g_local = sum(v[0] for v in wstats.values())
                    b_local = sum(v[1] for v in wstats.values())
                    seen_f, bad_f, loss_sum = dist.sum([g_local + b_local, b_local, float(loss.detach())])
                    seen, bad = int(seen_f), int(bad_f)
                    if seen >= cfg.data.error_min_samples and bad > cfg.data.max_error_fraction * seen:
                        raise D4IRError(
                            f"{bad} of {seen} samples ({bad / seen:.1%}) of {shardset.root} were unusable, more "
                            f"than `data.max_error_fraction` = {cfg.data.max_error_fraction}; the warnings above "
                            "name each shard and key. Repair the shard set (rerun synthesis) or raise the fraction."
                        )
                    loss_v = loss_sum / dist.world
                    elapsed = time.perf_counter() - t_start
                    samples_per_s = (done_step - n_start) * cfg.data.batch_size * dist.world / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{loss_v:.4f}", samples_s=f"{samples_per_s:.1f}")
                    if metrics_f is not None:
                        rec = {
                            "step": done_step,
                            "loss": loss_v,
                            "lr": sched.get_last_lr()[0],
                            "samples_per_s": samples_per_s,
                            "elapsed_s": elapsed,
                            "data_wait_s": data_wait,
                            "epoch": ep,
                            "seen_samples": seen,
                            "bad_samples": bad,
                        }
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                if cfg.val.every and done_step % cfg.val.every == 0 and done_step != tc.steps and val_set:
                    v = _validate(student, teacher, tdtype, cfg, val_set, device)
                    if metrics_f is not None:
                        metrics_f.write(json.dumps({"step": done_step, "val_psnr_vs_teacher": v}) + "\n")
                        metrics_f.flush()
                if done_step % tc.ckpt_every == 0 or done_step == tc.steps:
                    data_state = dist.gather(
                        {
                            "cursors": {str(k): list(v) for k, v in cursors.items()},
                            "stats": {str(k): list(v) for k, v in wstats.items()},
                            "next_worker": next_worker,
                        }
                    )
                    rng_states = dist.gather(_rng_state())
                    if dist.rank == 0:
                        _save_checkpoint(
                            ckpt_root,
                            done_step,
                            student,
                            {
                                "step": done_step,
                                "optimizer": opt_.state_dict(),
                                "scheduler": sched.state_dict(),
                                "scaler": scaler.state_dict(),
                                "rng": rng_states,
                                "data": data_state,
                                "world_size": dist.world,
                                "workers": W,
                                "config": config_to_dict(cfg),
                                "config_hash": chash,
                            },
                            tc.ckpt_keep,
                            extra,
                        )
                    dist.barrier()
        finally:
            bar.close()
            if metrics_f is not None:
                metrics_f.close()
            if keys_f is not None:
                keys_f.close()
            del batches  # stops DataLoader workers

        # 8. final student, held-out check, result
        val_psnr = _validate(student, teacher, tdtype, cfg, val_set, device) if dist.rank == 0 else None
        result = DistillResult(
            out_dir=out,
            student_dir=out / "student",
            steps=tc.steps,
            resumed_from=start,
            final_loss=loss_v,
            samples_per_s=samples_per_s,
            seen_samples=seen,
            bad_samples=bad,
            targets=targets,
            shardset_sha256=shardset.manifest_sha256,
            teacher_id=ident["id"],
            val_psnr=val_psnr,
            val_samples=len(val_set),
        )
        if dist.rank == 0:
            save_model(student, out / "student", extra={**extra, "steps": tc.steps, "val_psnr_vs_teacher": val_psnr})
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(
                    json.dumps({"step": tc.steps, "val_psnr_vs_teacher": val_psnr, "val_samples": len(val_set)}) + "\n"
                )
            atomic_write_json(result_path, _result_to_json(result))
            logger.info(
                "student -> %s (val PSNR vs teacher: %s dB on %d held-out samples)",
                out / "student",
                f"{val_psnr:.2f}" if val_psnr is not None else "n/a",
                len(val_set),
            )
        dist.barrier()
        return result
    finally:
        if threads_restore is not None:
            torch.set_num_threads(threads_restore)
        if dist.initialised:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _check_resumable(
    prev: dict, chash: str, shardset: ShardSet, ident: dict, cfg: DistillConfig, run_path: Path
) -> None:
    """Refuse to continue a run on another shard set, teacher or config (names what differs)."""
    if prev.get("shardset_sha256") != shardset.manifest_sha256:
        raise D4IRError(
            f"{run_path}: this run was trained on shard set {prev.get('shardset')} (manifest sha256 "
            f"{str(prev.get('shardset_sha256'))[:12]}...), but {shardset.root} has {shardset.manifest_sha256[:12]}...; "
            "use another `student.tag` / `out`, or delete the run folder to start over"
        )
    if prev.get("teacher", {}).get("id") != ident["id"]:
        raise D4IRError(
            f"{run_path}: this run used teacher {prev.get('teacher', {}).get('id')}, the config gives "
            f"{ident['id']}; use another `student.tag` or delete the run folder"
        )
    if prev.get("config_hash") != chash:
        old = prev.get("config", {})
        new = config_to_dict(cfg)
        diffs = [
            f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}"
            for sec, body in new.items()
            if isinstance(body, dict)
            for k, v in body.items()
            if f"{sec}.{k}" not in _RESUME_FREE and old.get(sec, {}).get(k) != v
        ]
        raise D4IRError(
            f"{run_path}: the config differs from the run being resumed ({'; '.join(diffs) or 'see run.json'}); "
            "use another `student.tag` / `out`, or delete the run folder to start over"
        )


def _result_to_json(r: DistillResult) -> dict:
    d = dataclasses.asdict(r)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _result_from_json(d: dict, out: Path) -> DistillResult:
    fields_ = {f.name for f in dataclasses.fields(DistillResult)}
    kw = {k: v for k, v in d.items() if k in fields_}
    kw["out_dir"], kw["student_dir"] = Path(kw["out_dir"]), Path(kw["student_dir"])
    return DistillResult(**kw)


# ---------------------------------------------------------------------------------------
# CLI


@click.command("distill")
@stage_options
def distill_command(profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None) -> None:
    """Stage two: distil a student from the frozen teacher on a shard set (rerun to resume)."""
    cfg = config_from_options(
        DistillConfig, "distill", profile=profile, config_path=config_path, overrides=overrides, work_dir=work_dir
    )
    r = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        vp = f"{r.val_psnr:.2f} dB" if r.val_psnr is not None else "n/a"
        click.echo(
            f"student: {r.student_dir}  steps {r.steps}  loss {r.final_loss}  targets {r.targets}  "
            f"held-out PSNR vs teacher {vp} ({r.val_samples} samples)  unusable samples {r.bad_samples}"
        )


@click.command("label")
@stage_options
def label_command(profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None) -> None:
    """Cache the teacher's outputs next to a shard set (reads the distill config)."""
    cfg = config_from_options(
        DistillConfig, "distill", profile=profile, config_path=config_path, overrides=overrides, work_dir=work_dir
    )
    r = label(cfg)
    click.echo(
        f"labels: {r.labels_dir}  teacher {r.teacher_id}  {r.samples} samples in {r.shards} shards  skipped {r.skipped}"
    )
