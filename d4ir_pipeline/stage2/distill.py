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
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.dist import Dist, init_process_group
from d4ir_pipeline.common.images import decode_rgb, psnr
from d4ir_pipeline.common.io import atomic_write_json, read_json
from d4ir_pipeline.common.runtime import cap_cpu_threads, package_versions, pick_device, seed_everything, usable_cpus
from d4ir_pipeline.common.train import CheckpointDir, MetricsLog, due, rng_state, set_rng_state, warmup_cosine
from d4ir_pipeline.config import config_diff, config_hash, config_to_dict, neutral_keys
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import load_weights, save_model
from d4ir_pipeline.shardset.format import SHARDSET_NAME, ShardSetError
from d4ir_pipeline.shardset.reader import ShardSet, open_shardset, verify_files
from d4ir_pipeline.stage2.config import DistillConfig, student_tag
from d4ir_pipeline.stage2.labels import LABEL_EXT, find_labels, labels_folder
from d4ir_pipeline.stage2.stream import (
    IMAGE_EXTS,
    BatchSourceContext,
    Stats,
    StreamSpec,
    decode_label,
    default_batch_source,
    is_holdout,
    sample_weather,
    shard_samples,
)
from d4ir_pipeline.stage2.teacher import Teachers, check_same_size, teacher_identity

logger = logging.getLogger(__name__)


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


def pixel_loss(s: Any, t: Any, kind: str, eps: float) -> Any:
    """Mean L1 or Charbonnier distance between student and teacher outputs (B, 3, H, W)."""

    if kind == "charbonnier":
        return torch.sqrt((s - t) ** 2 + eps * eps).mean()
    return (s - t).abs().mean()


def _val_samples(
    shardset: ShardSet, spec: StreamSpec, n: int, size: int
) -> list[tuple[str, np.ndarray, np.ndarray | None, str | None]]:
    """The first ``n`` held-out samples in manifest order, centre-cropped: (key, uint8 HWC, target or None, weather)."""
    out: list[tuple[str, np.ndarray, np.ndarray | None, str | None]] = []
    for key, sample in _held_out(shardset, spec):
        item = _val_sample(key, sample, spec, size)
        if item is not None:
            out.append(item)
        if len(out) >= n:
            break
    return out


def _held_out(shardset: ShardSet, spec: StreamSpec) -> Iterator[tuple[str, dict]]:
    """(key, raw sample) of every held-out sample, shard by shard (nothing counted or logged)."""
    stats = Stats(muted=True)
    label_dir = Path(spec.label_dir) if spec.label_dir else None
    for s in shardset.shards:
        lp = label_dir / s.name if label_dir is not None else None
        for sample in shard_samples(s, lp, spec.label_ext, stats):
            if is_holdout(sample["__key__"], spec.holdout):
                yield sample["__key__"], sample


def _val_sample(key: str, sample: dict, spec: StreamSpec, size: int) -> tuple | None:
    """Decoded and centre-cropped (key, input, target or None, weather); None for an unusable sample or missing label."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    try:
        if ext is None:
            raise BadImageError("missing", "no image")
        x = np.array(decode_rgb(sample[ext], name=key)[0])  # (H, W, 3), writable
        t = decode_label(sample["__label__"], spec.label_ext, key) if "__label__" in sample else None
    except BadImageError:
        return None
    if spec.label_dir and t is None:
        return None
    if size:
        h, w = x.shape[:2]
        c = min(size, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        x = x[top : top + c, left : left + c]
        t = t[top : top + c, left : left + c] if t is not None else None
    return key, x, t, sample_weather(sample)


def _validate(m: _Models, cfg: DistillConfig, samples: list) -> float | None:
    """Mean student-vs-teacher PSNR (dB) on held-out samples (targets: teacher or its cached outputs)."""
    if not samples:
        return None
    student, device = m.student, m.device
    was = student.training
    student.eval()
    vals = []
    with torch.no_grad():
        for _key, x, t, weather in samples:
            # np.array copies: a decoded label may be a read-only view, which torch.from_numpy warns about
            xt = torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].to(device).float() / 255.0
            if t is not None:
                tt = torch.from_numpy(np.array(t)).permute(2, 0, 1)[None].to(device).float()
                tt = tt / 255.0 if t.dtype == np.uint8 else tt
            else:
                tt = m.teacher(xt, [weather])
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
    dist = init_process_group(cfg.runtime.device)
    threads_restore = None
    try:
        device, threads_restore = _device(cfg, dist, in_memory=batch_source is not None)
        return _distill(cfg, dist, device, batch_source)
    finally:
        if threads_restore is not None:
            torch.set_num_threads(threads_restore)
        if dist.initialised:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _distill(cfg: DistillConfig, dist: Dist, device: torch.device, batch_source) -> DistillResult:
    """The recipe, inside the process group."""
    # 1. shard set (sizes checked now), teacher identity, label cache, run.json
    run = _open_run(cfg, dist)

    # 2. finished already? Otherwise rank 0 re-hashes every shard, now that it will read them
    if run.result_path.is_file() and (done := read_json(run.result_path)).get("steps") == cfg.train.steps:
        logger.info("%s is finished (%d steps); delete it to train again", run.out, cfg.train.steps)
        return _result_from_json(done, run.out)
    if run.verify == "full":
        verify_files(list(run.shardset.shards), "full", str(run.shardset.root / SHARDSET_NAME))

    # 3. models, optimizer, schedule
    m = _models(cfg, device, run.labels_dir)

    # 4. resume: weights, optimizer, schedule, RNG, and each worker's cursor
    pos = _resume_state(cfg, dist, run, m)
    if dist.world > 1:
        m.model = torch.nn.parallel.DistributedDataParallel(
            m.student, device_ids=[device.index] if m.use_cuda else None
        )

    # 5. data: the stream's descriptor and the held-out check set
    spec = _stream_spec(cfg, dist, run)
    val_set = _val_set(cfg, dist, run.shardset, spec)

    # 6. train, 7. final student, held-out check, result
    tb = run.out / "tensorboard" if cfg.log.tensorboard else None
    with MetricsLog(run.out / "metrics.jsonl", resume_step=pos.start, enabled=dist.rank == 0, tensorboard=tb) as log:
        ctx = BatchSourceContext(spec, pos.cursors, pos.wstats, pos.rotation, cfg.data.num_workers, m.use_cuda)
        _train(cfg, dist, run, m, pos, batch_source or default_batch_source, ctx, val_set, log)
        return _finish(cfg, dist, run, m, pos, val_set, log)


# ---------------------------------------------------------------------------------------
# 1. device and run folder


@dataclass
class _Run:
    """The run folder and what it was started on."""

    shardset: ShardSet
    ident: dict  # teacher identity
    out: Path
    ckpts: CheckpointDir
    chash: str  # config hash without the resume-free keys
    labels_dir: Path | None
    targets: str  # "teacher" or "labels:<id>"
    verify: str  # this rank's shard check: full | size | off
    workers: int  # logical data workers per rank (>= 1)

    @property
    def result_path(self) -> Path:
        return self.out / "result.json"

    def extra(self) -> dict:
        """What model.json records about the run (checkpoints and the final student)."""
        return {
            "run": {
                "shardset_sha256": self.shardset.manifest_sha256,
                "teacher": self.ident,
                "targets": self.targets,
                "config_hash": self.chash,
            }
        }


def _device(cfg: DistillConfig, dist: Dist, *, in_memory: bool) -> tuple[torch.device, int | None]:
    """This rank's device; on the CPU the torch threads are capped so decoding workers fit (old count returned)."""
    if dist.world > 1 and torch.cuda.is_available() and cfg.runtime.device != "cpu":
        device = torch.device("cuda", dist.local_rank)
    else:
        device = pick_device(cfg.runtime.device)
    if device.type != "cpu":
        return device, None
    busy = cfg.data.num_workers if not in_memory else 0  # training threads + decoding workers must fit the cores
    threads_restore, now = cap_cpu_threads(busy)
    logger.info("CPU training: %d torch thread(s) (%d usable CPUs, %d data worker(s))", now, usable_cpus(), busy)
    return device, threads_restore


def _open_run(cfg: DistillConfig, dist: Dist) -> _Run:
    """Open the shard set, check a run being resumed, find the label cache; rank 0 writes run.json."""
    verify = cfg.data.verify if dist.rank == 0 or cfg.data.verify == "off" else "size"
    shardset = open_shardset(cfg.data.shards, verify="size" if verify == "full" else verify)
    workers = max(1, cfg.data.num_workers)
    if len(shardset.shards) < dist.world * workers:
        raise ShardSetError(
            f"`data.shards` = {cfg.data.shards!r} has {len(shardset.shards)} shards, but {dist.world} rank(s) x "
            f"{workers} worker(s) = {dist.world * workers} readers each need at least one. Fix: lower "
            f"`data.num_workers` (at most {max(0, len(shardset.shards) // dist.world)} here), use fewer ranks, or "
            "synthesize more, smaller shards."
        )
    ident = teacher_identity(cfg.teacher)
    out = Path(cfg.output.dir) / student_tag(cfg.student)
    ckpts = CheckpointDir(out / "ckpt", keep=cfg.train.ckpt_keep)
    chash = config_hash(cfg)
    run_path = out / "run.json"
    # a run.json without any checkpoint is a run that never got going: it is simply replaced
    started = ckpts.latest() is not None or (out / "result.json").is_file()
    prev = read_json(run_path) if run_path.is_file() and started else None
    if prev is not None:
        _check_resumable(prev, chash, shardset, ident, cfg, run_path)
    labels_dir = _labels_dir(cfg, prev, shardset, ident, run_path)
    targets = f"labels:{ident['id']}" if labels_dir is not None else "teacher"
    run = _Run(shardset, ident, out, ckpts, chash, labels_dir, targets, verify, workers)
    dist.barrier()  # every rank has read run.json before rank 0 may replace it
    if dist.rank == 0 and prev is None:
        _write_run_json(cfg, dist, run, run_path)
    dist.barrier()
    return run


def _labels_dir(cfg: DistillConfig, prev: dict | None, shardset: ShardSet, ident: dict, run_path: Path) -> Path | None:
    """The label cache this run trains on: the one it started on, or (new run) a complete one when allowed."""
    if prev is not None and str(prev.get("targets", "")).startswith("labels:"):
        labels_dir = Path(prev["labels_dir"])
        find = find_labels(cfg, shardset, ident)
        if find is None or find.resolve() != labels_dir.resolve():
            raise D4IRError(
                f"{run_path}: this run started on the label cache {labels_dir}, which is no longer "
                f"complete or valid; rebuild it with `d4ir label` or delete {run_path.parent} to start over"
            )
        return labels_dir
    if prev is not None or cfg.labels.use == "off":
        return None
    labels_dir = find_labels(cfg, shardset, ident)
    if labels_dir is None and cfg.labels.use == "require":
        raise D4IRError(
            f"`labels.use` = 'require' but there is no complete label cache for teacher {ident['id']} at "
            f"{labels_folder(cfg, shardset, ident['id'])}; run `d4ir label` with the same config first"
        )
    return labels_dir


def _write_run_json(cfg: DistillConfig, dist: Dist, run: _Run, run_path: Path) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run_path,
        {
            "config": config_to_dict(cfg),
            "config_hash": run.chash,
            "shardset": str(run.shardset.root),
            "shardset_sha256": run.shardset.manifest_sha256,
            "shardset_config_hash": run.shardset.config_hash,
            "teacher": run.ident,
            "targets": run.targets,
            "labels_dir": str(run.labels_dir) if run.labels_dir else None,
            "world_size": dist.world,
            "num_workers": cfg.data.num_workers,
            "versions": package_versions(),
        },
    )


# ---------------------------------------------------------------------------------------
# 3. models


@dataclass
class _Models:
    """Teacher (None with a label cache), student (and its DDP wrapper), optimizer, schedule, AMP."""

    teacher: Teachers | None
    student: torch.nn.Module
    model: torch.nn.Module  # the student, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"


def _models(cfg: DistillConfig, device: torch.device, labels_dir: Path | None) -> _Models:
    tc = cfg.train
    seed_everything(tc.seed)
    teacher = None if labels_dir is not None else Teachers(cfg.teacher, device)
    student = build_model(cfg.student.name, **cfg.student.kwargs).to(device)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, total=tc.steps, warmup=tc.warmup_steps, min_ratio=tc.min_lr_ratio)
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return _Models(teacher, student, student, opt, sched, scaler, amp_dtype, device)


# ---------------------------------------------------------------------------------------
# 4. resume


@dataclass
class _Position:
    """Where training stands: the step, each worker's cursor and counts, and the running figures."""

    start: int = 0
    cursors: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (epoch, index)
    wstats: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (good, bad) samples
    rotation: int = 0  # the worker that delivers the first batch after `start`
    next_worker: int = 0
    consumed: int = 0
    epoch: int = 0
    data_wait: float = 0.0  # seconds spent waiting for the input pipeline (near 0 when it keeps up)
    seen: int = 0
    bad: int = 0
    loss: float | None = None
    samples_per_s: float | None = None

    def take(self, batches: Iterator[dict], workers: int) -> dict:
        """The next batch; its worker's cursor and counts are recorded (they go into the checkpoint)."""
        t_wait = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - t_wait
        w, self.epoch, idx = batch["cursor"]
        self.cursors[w] = (self.epoch, idx)
        sw, good_w, bad_w = batch["stats"]
        self.wstats[sw] = (good_w, bad_w)
        self.consumed += 1
        self.next_worker = (self.rotation + self.consumed) % workers
        return batch

    def data_state(self) -> dict:
        return {
            "cursors": {str(k): list(v) for k, v in self.cursors.items()},
            "stats": {str(k): list(v) for k, v in self.wstats.items()},
            "next_worker": self.next_worker,
        }


def _resume_state(cfg: DistillConfig, dist: Dist, run: _Run, m: _Models) -> _Position:
    """Restore the last checkpoint (same ranks x workers only: the sample stream depends on both)."""
    ck = run.ckpts.load()
    if ck is None:
        return _Position()
    state = ck.state
    if state["world_size"] != dist.world or state["workers"] != run.workers:
        raise D4IRError(
            f"{ck.path}: saved with {state['world_size']} rank(s) x {state['workers']} worker(s), now "
            f"{dist.world} x {run.workers}; the sample stream depends on both: resume with the same numbers"
        )
    load_weights(m.student, ck.path / "student" / "model.safetensors", strict=True)
    m.opt.load_state_dict(state["optimizer"])
    m.sched.load_state_dict(state["scheduler"])
    m.scaler.load_state_dict(state["scaler"])
    mine = state["data"][dist.rank]
    set_rng_state(state["rng"][dist.rank])
    rotation = int(mine["next_worker"])
    logger.info("resuming %s from step %d (%s)", run.out, ck.step, ck.path.name)
    return _Position(
        start=ck.step,
        cursors={int(k): tuple(v) for k, v in mine["cursors"].items()},
        wstats={int(k): tuple(v) for k, v in mine["stats"].items()},
        rotation=rotation,
        next_worker=rotation,
    )


def _checkpoint(cfg: DistillConfig, dist: Dist, run: _Run, m: _Models, pos: _Position, step: int) -> None:
    """Every rank's cursors and RNG to rank 0, which writes ckpt/step-N/ (student folder + state.pt)."""
    data_state = dist.gather(pos.data_state())
    rng_states = dist.gather(rng_state())
    if dist.rank == 0:
        state = {
            "optimizer": m.opt.state_dict(),
            "scheduler": m.sched.state_dict(),
            "scaler": m.scaler.state_dict(),
            "rng": rng_states,
            "data": data_state,
            "world_size": dist.world,
            "workers": run.workers,
            "config": config_to_dict(cfg),
            "config_hash": run.chash,
        }
        run.ckpts.save(step, state=state, write=lambda d: save_model(m.student, d / "student", extra=run.extra()))
    dist.barrier()


# ---------------------------------------------------------------------------------------
# 5. data


def _stream_spec(cfg: DistillConfig, dist: Dist, run: _Run) -> StreamSpec:
    return StreamSpec(
        shards=run.shardset.shards,
        label_dir=str(run.labels_dir) if run.labels_dir else None,
        label_ext=LABEL_EXT[cfg.labels.format],
        seed=cfg.train.seed,
        rank=dist.rank,
        world=dist.world,
        workers=run.workers,
        patch=cfg.data.patch,
        batch_size=cfg.data.batch_size,
        flips=cfg.data.flips,
        buffer=cfg.data.shuffle_buffer,
        initial=cfg.data.shuffle_initial,
        holdout=cfg.data.holdout_fraction,
    )


def _val_set(cfg: DistillConfig, dist: Dist, shardset: ShardSet, spec: StreamSpec) -> list:
    """Rank 0's held-out samples for the student-vs-teacher check (none on other ranks)."""
    if dist.rank != 0 or not cfg.val.samples:
        return []
    val_set = _val_samples(shardset, spec, cfg.val.samples, cfg.val.size) if cfg.data.holdout_fraction > 0 else []
    if not val_set:
        logger.warning(
            "no held-out samples for the student-vs-teacher check (data.holdout_fraction = %s)",
            cfg.data.holdout_fraction,
        )
    return val_set


# ---------------------------------------------------------------------------------------
# 6. train


def _train(
    cfg: DistillConfig, dist: Dist, run: _Run, m: _Models, pos: _Position, source, ctx, val_set: list, log: MetricsLog
) -> None:
    """Steps ``pos.start``..``train.steps``: batch -> loss -> step -> log -> maybe validate -> maybe checkpoint."""
    tc = cfg.train
    bar = tqdm(
        total=tc.steps,
        initial=pos.start,
        unit="step",
        desc=f"distill {student_tag(cfg.student)}",
        disable=dist.rank != 0 or not cfg.log.progress,
        dynamic_ncols=True,
    )
    keys = MetricsLog(run.out / f"keys-r{dist.rank}.jsonl", resume_step=pos.start, enabled=cfg.log.sample_keys)
    batches = source(ctx)
    clock = (time.perf_counter(), pos.start)  # for samples/s
    try:
        for step in range(pos.start, tc.steps):
            batch = pos.take(batches, run.workers)
            loss = _train_step(cfg, m, batch, check_size=step == pos.start)
            keys.write({"step": step + 1, "keys": batch["keys"]})
            bar.update(1)
            if due(step + 1, cfg.log.every, tc.steps):
                _log_step(cfg, dist, run, m, pos, loss, step + 1, clock, log, bar)
            if cfg.val.every and (step + 1) % cfg.val.every == 0 and step + 1 != tc.steps and val_set:
                log.write({"step": step + 1, "val_psnr_vs_teacher": _validate(m, cfg, val_set)})
            if due(step + 1, tc.ckpt_every, tc.steps):
                _checkpoint(cfg, dist, run, m, pos, step + 1)
    finally:
        bar.close()
        keys.close()
        del batches  # stops DataLoader workers


def _train_step(cfg: DistillConfig, m: _Models, batch: dict, *, check_size: bool) -> torch.Tensor:
    """Targets (cached labels or the teacher), student forward, pixel loss, one optimizer and schedule step."""
    tc = cfg.train
    x = batch["x"].to(m.device, non_blocking=True).float().div_(255.0)  # (B, 3, P, P)
    if batch["t"] is not None:
        tt = batch["t"].to(m.device, non_blocking=True).float()
        t = tt.div_(255.0) if batch["t"].dtype == torch.uint8 else tt
    else:
        t = m.teacher(x, batch.get("weathers"))  # (B, 3, P, P); each sample's weather picks its teacher
    with torch.autocast(device_type="cuda", dtype=m.amp_dtype) if m.amp_dtype else nullcontext():
        s = m.model(x)  # (B, 3, P, P)
    if check_size:
        check_same_size(s, x, f"student {cfg.student.name!r}")
    loss = pixel_loss(s.float(), t, tc.loss, tc.charbonnier_eps)
    m.opt.zero_grad(set_to_none=True)
    m.scaler.scale(loss).backward()
    if tc.grad_clip > 0:
        m.scaler.unscale_(m.opt)
        torch.nn.utils.clip_grad_norm_(m.student.parameters(), tc.grad_clip)
    m.scaler.step(m.opt)
    m.scaler.update()
    m.sched.step()
    return loss


def _log_step(
    cfg: DistillConfig,
    dist: Dist,
    run: _Run,
    m: _Models,
    pos: _Position,
    loss: torch.Tensor,
    step: int,
    clock: tuple[float, int],
    log: MetricsLog,
    bar,
) -> None:
    """Sum counts and loss over ranks (the same steps on every rank: no rank is left waiting), check the
    unusable-sample fraction, write the metrics row."""
    good = sum(v[0] for v in pos.wstats.values())
    bad = sum(v[1] for v in pos.wstats.values())
    seen_f, bad_f, loss_sum = dist.sum([good + bad, bad, float(loss.detach())])
    pos.seen, pos.bad = int(seen_f), int(bad_f)
    if pos.seen >= cfg.data.error_min_samples and pos.bad > cfg.data.max_error_fraction * pos.seen:
        raise D4IRError(
            f"{pos.bad} of {pos.seen} samples ({pos.bad / pos.seen:.1%}) of {run.shardset.root} were unusable, more "
            f"than `data.max_error_fraction` = {cfg.data.max_error_fraction}; the warnings above name each shard "
            "and key. Repair the shard set (rerun synthesis) or raise the fraction."
        )
    pos.loss = loss_sum / dist.world
    elapsed = time.perf_counter() - clock[0]
    pos.samples_per_s = (step - clock[1]) * cfg.data.batch_size * dist.world / max(elapsed, 1e-9)
    bar.set_postfix(loss=f"{pos.loss:.4f}", samples_s=f"{pos.samples_per_s:.1f}")
    log.write(
        {
            "step": step,
            "loss": pos.loss,
            "lr": m.sched.get_last_lr()[0],
            "samples_per_s": pos.samples_per_s,
            "elapsed_s": elapsed,
            "data_wait_s": pos.data_wait,
            "epoch": pos.epoch,
            "seen_samples": pos.seen,
            "bad_samples": pos.bad,
        }
    )


# ---------------------------------------------------------------------------------------
# 7. final


def _finish(
    cfg: DistillConfig, dist: Dist, run: _Run, m: _Models, pos: _Position, val_set: list, log: MetricsLog
) -> DistillResult:
    """Held-out check, then (rank 0) the student folder, the last metrics row and result.json."""
    val_psnr = _validate(m, cfg, val_set) if dist.rank == 0 else None
    result = DistillResult(
        out_dir=run.out,
        student_dir=run.out / "student",
        steps=cfg.train.steps,
        resumed_from=pos.start,
        final_loss=pos.loss,
        samples_per_s=pos.samples_per_s,
        seen_samples=pos.seen,
        bad_samples=pos.bad,
        targets=run.targets,
        shardset_sha256=run.shardset.manifest_sha256,
        teacher_id=run.ident["id"],
        val_psnr=val_psnr,
        val_samples=len(val_set),
    )
    if dist.rank == 0:
        extra = {**run.extra(), "steps": cfg.train.steps, "val_psnr_vs_teacher": val_psnr}
        save_model(m.student, run.out / "student", extra=extra)
        log.write({"step": cfg.train.steps, "val_psnr_vs_teacher": val_psnr, "val_samples": len(val_set)})
        atomic_write_json(run.result_path, dataclasses.asdict(result))  # atomic_write_json writes Paths as str
        logger.info(
            "student -> %s (val PSNR vs teacher: %s dB on %d held-out samples)",
            run.out / "student",
            f"{val_psnr:.2f}" if val_psnr is not None else "n/a",
            len(val_set),
        )
    dist.barrier()
    return result


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
        diffs = config_diff(old, new, ignore=neutral_keys(DistillConfig))
        raise D4IRError(
            f"{run_path}: the config differs from the run being resumed ({'; '.join(diffs) or 'see run.json'}); "
            "use another `student.tag` / `out`, or delete the run folder to start over"
        )


def _result_from_json(d: dict, out: Path) -> DistillResult:
    fields_ = {f.name for f in dataclasses.fields(DistillResult)}
    kw = {k: v for k, v in d.items() if k in fields_}
    kw["out_dir"], kw["student_dir"] = Path(kw["out_dir"]), Path(kw["student_dir"])
    return DistillResult(**kw)


# ---------------------------------------------------------------------------------------
# CLI


@stage_command("distill", DistillConfig)
def distill_command(cfg: DistillConfig) -> None:
    """Stage two: distil a student from the frozen teacher on a shard set (rerun to resume)."""
    r = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        vp = f"{r.val_psnr:.2f} dB" if r.val_psnr is not None else "n/a"
        click.echo(
            f"student: {r.student_dir}  steps {r.steps}  loss {r.final_loss}  targets {r.targets}  "
            f"held-out PSNR vs teacher {vp} ({r.val_samples} samples)  unusable samples {r.bad_samples}"
        )
