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
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from d4ir_pipeline.cli import config_from_options, stage_options
from d4ir_pipeline.common.dist import init_process_group
from d4ir_pipeline.common.images import decode_rgb, psnr
from d4ir_pipeline.common.io import atomic_write_json, read_json, trim_jsonl
from d4ir_pipeline.common.runtime import cap_cpu_threads, package_versions, pick_device, seed_everything, usable_cpus
from d4ir_pipeline.common.train import latest_checkpoint, lr_factor, rng_state, save_checkpoint, set_rng_state
from d4ir_pipeline.config import config_hash, config_to_dict
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.models import build_model
from d4ir_pipeline.models.checkpoint import load_weights, save_model
from d4ir_pipeline.shardset.format import SHARDSET_NAME, ShardSetError
from d4ir_pipeline.shardset.reader import ShardSet, open_shardset, verify_files
from d4ir_pipeline.stage2.config import RESUME_FREE, DistillConfig, student_tag
from d4ir_pipeline.stage2.labels import LABEL_EXT, find_labels, labels_folder
from d4ir_pipeline.stage2.stream import (
    IMAGE_EXTS,
    BatchSourceContext,
    Stats,
    StreamSpec,
    decode_label,
    default_batch_source,
    is_holdout,
    shard_samples,
)
from d4ir_pipeline.stage2.teacher import (
    check_same_size,
    load_teacher,
    teacher_forward,
    teacher_identity,
)

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
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """The first ``n`` held-out samples in manifest order, centre-cropped: (key, uint8 HWC, target or None)."""

    out: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    stats = Stats(muted=True)
    label_dir = Path(spec.label_dir) if spec.label_dir else None
    for s in shardset.shards:
        lp = label_dir / s.name if label_dir is not None else None
        for sample in shard_samples(s, lp, spec.label_ext, stats):
            key = sample["__key__"]
            if not is_holdout(key, spec.holdout):
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            try:
                if ext is None:
                    raise BadImageError("missing", "no image")
                x = np.array(decode_rgb(sample[ext], name=key)[0])  # (H, W, 3), writable
                t = decode_label(sample["__label__"], spec.label_ext, key) if "__label__" in sample else None
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

    # 1. processes and device
    dist = init_process_group(cfg.train.device)
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
        chash = config_hash(cfg, exclude=RESUME_FREE)
        result_path = out / "result.json"
        latest = latest_checkpoint(ckpt_root)
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
                    f"{labels_folder(cfg, shardset, ident['id'])}; run `d4ir label` with the same config first"
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
            verify_files(list(shardset.shards), "full", str(shardset.root / SHARDSET_NAME))

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
            set_rng_state(state["rng"][dist.rank])
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
            label_ext=LABEL_EXT[cfg.labels.format],
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
                    check_same_size(s, x, f"student {cfg.student.name!r}")
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
                    rng_states = dist.gather(rng_state())
                    if dist.rank == 0:
                        save_checkpoint(
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
            if f"{sec}.{k}" not in RESUME_FREE and old.get(sec, {}).get(k) != v
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
