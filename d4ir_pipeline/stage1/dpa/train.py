"""Stage one, part 1: the degradation-aware prompt adapter (DPA).

An image encoder E (``clip``: a CLIP vision tower loaded with transformers from a local
path or hub id, frozen by default; ``conv``: a small CNN trained from scratch, for the
CPU and the embedded demo) gives one feature per degraded image; an adapter A maps it
to K prompt tokens of width D (the SD UNet's cross-attention width), which diffusers
takes as ``prompt_embeds``. Training (see docs/method.md, "DPA"):

1. contrastive (supervised contrastive / InfoNCE, temperature tau) on the L2-normalised,
   flattened tokens: two random crops of one image are positives; with weather labels,
   every image of the same weather is a positive too; unlabelled images are positives
   only of themselves. Different content with the same weather being positives is what
   makes the tokens describe the degradation rather than the content;
2. diffusion alignment: the frozen SD's noise-prediction loss on the crop's own VAE
   latent, conditioned on its DPA tokens; gradients reach only E's trainable part and A;
3. optional text anchor: per-weather token centroids pulled (cosine) toward the text
   embedding of a weather phrase, when the SD folder has a text encoder.

[design] The contrastive loss acts on the tokens themselves (not on a separate
projection head), so the prompt the UNet sees is the weather-discriminative quantity,
and the report's embedding is that same quantity. [design] The adapter follows
IP-Adapter's image projection: Linear -> K*D, then LayerNorm(D) per token, which keeps
the tokens on the scale of the text encoder's final-layer-normed states.

Exact resume: every random draw of step s (batch indices, crops, flips, VAE sample,
noise, timesteps) comes from generators seeded by (seed, s), so a checkpoint needs only
the weights, the optimizer / scaler state and the step; the global RNG states are
saved and restored as well. Outputs in ``{work}/dpa/``: ``dpa.safetensors`` +
``dpa.json`` (model spec, run config; the completion marker), ``checkpoints/``,
``metrics.jsonl``, ``report.json`` and ``embeddings.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from d4ir_pipeline.cli import config_from_options, stage_options
from d4ir_pipeline.common.io import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    read_json,
    sha256_bytes,
    trim_jsonl,
)
from d4ir_pipeline.common.runtime import package_versions, pick_device, seed_everything
from d4ir_pipeline.config import config_to_dict
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.config import RESUME_NEUTRAL, DPAConfig, DPADataError, TrainSection, dpa_run_hash
from d4ir_pipeline.stage1.dpa.data import ImageStore, check_labels, make_views, progress_bar, usable_records
from d4ir_pipeline.stage1.dpa.losses import (
    FrozenSD,
    diffusion_alignment_loss,
    load_frozen_sd,
    phrase_anchors,
    prototype_loss,
    supcon_loss,
    text_anchor_loss,
    vae_posterior,
)
from d4ir_pipeline.stage1.dpa.model import (
    DPAModel,
    dpa_embedding,
    load_dpa,
    new_model,
    resize,
)
from d4ir_pipeline.stage1.dpa.report import maybe_report
from d4ir_pipeline.stage1.sd import check_sd_source, model_id, text_hidden_size

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


# --------------------------------------------------------------------------- data checks


# --------------------------------------------------------------------------- training helpers


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _batch_indices(n: int, seed: int, micro: int, batch: int) -> list[int]:
    """Dataset indices of global micro-batch ``micro``: a slice of per-epoch seeded permutations."""
    out: list[int] = []
    pos = micro * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(seed, 1, epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def _cache_latents(sd: FrozenSD, store: ImageStore, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each image's centre square at the SD resolution: two (N, 4, h, w)."""
    means, stds = [], []
    for i in progress_bar(range(0, len(store), batch), desc="VAE latents"):
        x = []
        for j in range(i, min(i + batch, len(store))):
            img = store.get(j)
            _, h, w = img.shape
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x.append(resize(img[None, :, top : top + s, left : left + s].float().div(255.0), sd.resolution))
        m, sdev = vae_posterior(sd, torch.cat(x))
        means.append(m)
        stds.append(sdev)
    return torch.cat(means), torch.cat(stds)


def _lr_at(step: int, cfg: TrainSection) -> float:
    """Linear warm-up, then cosine from lr to lr/10."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),  # plain data for weights_only loading
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((3, tuple(py), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Checkpoints:
    """``{out}/checkpoints/step-XXXXXXX/`` folders (written as ``.tmp``, then renamed) + ``latest.json``."""

    def __init__(self, out: Path, keep: int):
        self.dir = out / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.dir / "latest.json"
        if not pointer.is_file():
            return None
        path = self.dir / read_json(pointer)["dir"]
        if not (path / "state.pt").is_file():
            raise D4IRError(f"{pointer} points to {path}, which is incomplete; remove {self.dir} to start over")
        return path

    def save(self, step: int, model: DPAModel, meta: dict, state: dict) -> Path:
        from safetensors.torch import save_file

        name = f"step-{step:07d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(model.trainable_state_dict(), str(tmp / "dpa.safetensors"))
        atomic_write_json(tmp / "dpa.json", meta)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.dir)
        atomic_write_json(self.dir / "latest.json", {"dir": name, "step": step})
        steps = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


# --------------------------------------------------------------------------- stage


@dataclass
class DPAResult:
    """What `train_dpa` did."""

    out_dir: Path
    weights: Path
    steps: int
    resumed_from: int | None
    images_per_s: float | None  # source images per second in this process's training loop (each gives 2 crops)
    num_images: int
    weathers: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    report: dict | None = None
    already_done: bool = False


def _class_map(records: list, supervised: bool) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Weather -> class id (sorted); per record its contrastive label (unlabelled or unsupervised: its own
    instance id) and its weather class (-1: unlabelled)."""
    weathers = sorted({r.weather for r in records if r.weather is not None})
    class_of = {w: i for i, w in enumerate(weathers)}
    weather_cls = [class_of[r.weather] if r.weather is not None else -1 for r in records]
    labels = [c if supervised and c >= 0 else len(weathers) + i for i, c in enumerate(weather_cls)]
    return class_of, torch.tensor(labels, dtype=torch.long), torch.tensor(weather_cls, dtype=torch.long)


def train_dpa(cfg: DPAConfig) -> DPAResult:
    """Train the DPA on the web-degraded manifest; checkpoint, resume, report."""
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes

    t_cfg = cfg.train
    out = Path(cfg.output.dir)

    # 1. check inputs (before any training or model loading)
    records = usable_records(cfg.data.manifest, cfg.data.root)
    if cfg.data.max_images and cfg.data.max_images < len(records):  # evenly spaced: every weather folder is kept
        pick = torch.linspace(0, len(records) - 1, cfg.data.max_images).round().long().tolist()
        records = [records[i] for i in pick]
    check_labels(records, require=cfg.data.require_labels, where=f"`data.manifest` = {cfg.data.manifest!r}")
    if cfg.report.enabled:
        for path in cfg.report.test_manifests:
            if not Path(path).is_file():
                raise D4IRError(
                    f"`report.test_manifests`: {path!r} does not exist; give the paired test sets, "
                    "or set report.enabled = false"
                )
    if cfg.loss.contrastive == 0 and cfg.loss.diffusion == 0 and cfg.loss.text_anchor == 0:
        raise D4IRError("all loss weights are 0 (`loss.contrastive`, `loss.diffusion`, `loss.text_anchor`)")
    check_sd_source(cfg.sd.model)
    dim = text_hidden_size(cfg.sd.model)
    store = ImageStore(records, cfg.data.root, cfg.data.load_size, cfg.data.cache_images)
    if len(store) == 0:
        raise DPADataError(f"`data.manifest` = {cfg.data.manifest!r}: every image was unreadable {dict(store.skipped)}")
    if store.skipped:
        logger.warning("skipped %d unreadable image(s): %s", sum(store.skipped.values()), dict(store.skipped))
        check_labels(store.records, require=cfg.data.require_labels, where="the readable images")
    if len(store) < 2:
        raise DPADataError(
            f"`data.manifest` = {cfg.data.manifest!r}: need at least 2 readable images, got {len(store)}"
        )
    class_of, labels, weather_cls = _class_map(store.records, cfg.loss.supervised)
    weathers = sorted(class_of)
    logger.info("DPA data: %d images, weathers %s", len(store),
                dict(Counter(r.weather or "unlabelled" for r in store.records)))  # fmt: skip
    if len(weathers) < 2 and cfg.loss.supervised:
        logger.warning("fewer than two labelled weathers: the contrastive loss is instance-level in effect")

    run_hash = dpa_run_hash(cfg)
    final_meta_path = out / "dpa.json"
    ckpts = _Checkpoints(out, t_cfg.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    if not t_cfg.resume and out.exists():
        logger.info("train.resume = false: starting over in %s", out)
        for name in ("dpa.json", "dpa.safetensors", "report.json", "metrics.jsonl", "embeddings.png"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    device = pick_device(t_cfg.device)
    seed_everything(t_cfg.seed)

    # 2. finished already?
    if final_meta_path.is_file():
        meta = read_json(final_meta_path)
        _check_same_run(meta, run_hash, cfg, final_meta_path)
        if meta.get("complete") and meta.get("step") == t_cfg.steps:
            logger.info("DPA already trained (%d steps) in %s; rerunning the report only", t_cfg.steps, out)
            model, _ = load_dpa(out, device=device)
            report = maybe_report(cfg, model, store, device)
            return DPAResult(out, out / "dpa.safetensors", t_cfg.steps, None, None, len(store), weathers,
                             dict(store.skipped), report, already_done=True)  # fmt: skip

    # 3. models
    model = new_model(cfg, dim).to(device)
    need_sd = cfg.loss.diffusion > 0 or cfg.loss.text_anchor > 0
    sd, anchors = None, {}
    if need_sd:
        sd, pipe = load_frozen_sd(cfg, device, need_text=cfg.loss.text_anchor > 0)
        if cfg.loss.text_anchor > 0:
            if pipe.text_encoder is None:
                raise D4IRError(f"`loss.text_anchor` > 0 but `sd.model` = {cfg.sd.model!r} has no text encoder")
            anchors = phrase_anchors(pipe, cfg.loss.weather_phrases, class_of)
            pipe.text_encoder = None  # free it: only the anchors are needed
        del pipe
        if cfg.loss.diffusion == 0:
            sd = None
    params = [p for p in model.parameters() if p.requires_grad]
    use_proto = cfg.loss.prototype > 0 and cfg.loss.contrastive > 0 and cfg.loss.supervised and len(weathers) >= 2
    prototypes = None
    if use_proto:  # (W, K*D), drawn from the seeded global RNG after the model's weights
        prototypes = nn.Parameter(0.01 * torch.randn(len(weathers), model.tokens * model.dim).to(device))
        params = params + [prototypes]
    optimizer = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    use_amp = t_cfg.amp and device.type == "cuda"
    amp_dtype = getattr(torch, t_cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    spec = {**model.spec(), "sd_model": cfg.sd.model, "sd_model_id": model_id(cfg.sd.model),
            "load_size": cfg.data.load_size}  # fmt: skip
    base_meta = {
        "kind": "d4ir-dpa",
        "version": 1,
        "spec": spec,
        "config": config_to_dict(cfg),
        "training_hash": run_hash,
        "weathers": weathers,
        "num_images": len(store),
        "skipped": dict(store.skipped),
    }

    # 4. resume
    start, resumed_from = 0, None
    last = ckpts.latest() if t_cfg.resume else None
    if last is not None:
        meta = read_json(last / "dpa.json")
        _check_same_run(meta, run_hash, cfg, last / "dpa.json")
        model.load_trainable_state_dict(load_file(str(last / "dpa.safetensors")), where=str(last))
        state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        if prototypes is not None:
            with torch.no_grad():
                prototypes.copy_(state["prototypes"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        if start > t_cfg.steps:
            raise D4IRError(f"checkpoint {last} is at step {start}, beyond `train.steps` = {t_cfg.steps}")
        logger.info("resuming DPA training from step %d (%s)", start, last)
        trim_jsonl(metrics_path, start)
    elif metrics_path.exists():
        metrics_path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step: int) -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": _rng_state()}  # fmt: skip
        if prototypes is not None:
            state["prototypes"] = prototypes.detach().cpu().clone()
        ckpts.save(step, model, {**base_meta, "step": step, "complete": False}, state)

    # 5. the frozen VAE's posterior of every image, once (deterministic: mean and std)
    enc_size = model.image_size
    latents = None
    if sd is not None and cfg.loss.cache_latents:
        latents = _cache_latents(sd, store)
    sd_size = sd.resolution if sd is not None and latents is None else 0

    # 6. train
    model.train()
    n_img = 0
    t0 = time.perf_counter()
    bar = progress_bar(range(start, t_cfg.steps), desc="train-dpa", initial=start, total=t_cfg.steps)
    step = start
    try:
        for step in bar:
            lr = _lr_at(step, t_cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            logs = Counter()
            for micro in range(t_cfg.grad_accum):
                gen = torch.Generator().manual_seed(_mix_seed(t_cfg.seed, 2, step, micro))
                idx = _batch_indices(len(store), t_cfg.seed, step * t_cfg.grad_accum + micro, t_cfg.batch_size)
                v1, v2, vsd = make_views(store, idx, cfg, enc_size, sd_size, gen)
                lab, wc = labels[idx].to(device), weather_cls[idx].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    tokens = model(torch.cat([v1, v2]).to(device))  # (2B, K, D)
                    loss = tokens.new_zeros(())
                    if cfg.loss.contrastive > 0:
                        z = dpa_embedding(tokens)  # (2B, K*D)
                        l_con = supcon_loss(z, torch.cat([lab, lab]), cfg.loss.temperature)
                        loss = loss + cfg.loss.contrastive * l_con
                        logs["contrastive"] += l_con.item() / t_cfg.grad_accum
                        if prototypes is not None:
                            l_pro = prototype_loss(z, torch.cat([wc, wc]), prototypes, cfg.loss.temperature)
                            loss = loss + cfg.loss.prototype * l_pro
                            logs["prototype"] += l_pro.item() / t_cfg.grad_accum
                    if sd is not None:
                        nb = cfg.loss.diffusion_batch or len(idx)
                        if latents is not None:
                            posterior = (latents[0][idx[:nb]], latents[1][idx[:nb]])
                        else:
                            posterior = vae_posterior(sd, vsd[:nb])
                        l_diff = diffusion_alignment_loss(sd, posterior, tokens[:nb], gen)
                        loss = loss + cfg.loss.diffusion * l_diff
                        logs["diffusion"] += l_diff.item() / t_cfg.grad_accum
                    if anchors:
                        l_txt = text_anchor_loss(tokens, torch.cat([wc, wc]), anchors)
                        loss = loss + cfg.loss.text_anchor * l_txt
                        logs["text_anchor"] += l_txt.item() / t_cfg.grad_accum
                logs["loss"] += loss.item() / t_cfg.grad_accum
                scaler.scale(loss / t_cfg.grad_accum).backward()
                n_img += len(idx)
            if t_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % t_cfg.log_every == 0 or done == t_cfg.steps:
                ips = n_img / max(time.perf_counter() - t0, 1e-9)
                row = {
                    "step": done,
                    "lr": lr,
                    "images_per_s": round(ips, 3),
                    **{k: round(v, 6) for k, v in logs.items()},
                }
                _append_metrics(metrics_path, row)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if done % t_cfg.checkpoint_every == 0 or done == t_cfg.steps:
                save_checkpoint(done)
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d; the last checkpoint is kept: rerun the same command to resume", step)
        raise
    elapsed = time.perf_counter() - t0
    images_per_s = n_img / elapsed if n_img else None

    # 7. final weights (the json is the completion marker, written last)
    weights = out / "dpa.safetensors"
    weights_bytes = safetensors_bytes(model.trainable_state_dict())
    atomic_write_bytes(weights, weights_bytes)  # tmp + fsync + rename: the marker never names a torn file
    atomic_write_json(
        final_meta_path,
        {
            **base_meta,
            "step": t_cfg.steps,
            "complete": True,
            "weights_sha256": sha256_bytes(weights_bytes),
            "versions": package_versions(),
            "images_per_s": images_per_s,
        },  # fmt: skip
    )
    logger.info("DPA trained: %d steps, %s images/s -> %s", t_cfg.steps,
                f"{images_per_s:.1f}" if images_per_s else "n/a", weights)  # fmt: skip
    model.eval()
    report = maybe_report(cfg, model, store, device)
    return DPAResult(out, weights, t_cfg.steps, resumed_from, images_per_s, len(store), weathers,
                     dict(store.skipped), report)  # fmt: skip


def _check_same_run(meta: dict, run_hash: str, cfg: DPAConfig, where: Path) -> None:
    """A checkpoint from a different training config cannot be resumed; say which keys differ."""
    if meta.get("training_hash") == run_hash:
        return
    old, new = meta.get("config", {}), config_to_dict(cfg)
    diffs = []
    for sec in sorted(set(old) | set(new)):
        o, n = old.get(sec, {}), new.get(sec, {})
        if not isinstance(o, dict) or not isinstance(n, dict):
            continue
        for k in sorted(set(o) | set(n)):
            if o.get(k) != n.get(k) and f"{sec}.{k}" not in RESUME_NEUTRAL and sec not in RESUME_NEUTRAL:
                diffs.append(f"{sec}.{k}: {o.get(k)!r} -> {n.get(k)!r}")
    raise D4IRError(
        f"{where} was written by a different training config ({'; '.join(diffs[:6]) or 'hash differs'}); "
        f"use another `output.dir` / --work-dir, or set train.resume = false to start over"
    )


# --------------------------------------------------------------------------- CLI


@click.command("train-dpa")
@stage_options
def train_dpa_command(profile: str, config_path: str | None, overrides: tuple[str, ...], work_dir: str | None) -> None:
    """Stage one: train the degradation-aware prompt adapter (stages/<profile>/dpa.toml)."""
    cfg = config_from_options(DPAConfig, "dpa", profile=profile, config_path=config_path, overrides=overrides,
                              work_dir=work_dir)  # fmt: skip
    res = train_dpa(cfg)
    line = f"DPA: {res.steps} steps on {res.num_images} images ({', '.join(res.weathers)}) -> {res.weights}"
    if res.resumed_from is not None:
        line += f" (resumed from step {res.resumed_from})"
    if res.images_per_s:
        line += f"; {res.images_per_s:.1f} images/s"
    if res.skipped:
        line += f"; skipped {res.skipped}"
    click.echo(line)
    if res.report:
        r = res.report
        click.echo(
            f"report: held-out weather accuracy {r['held_out_weather_accuracy']:.3f} (n={r['n_test']}); "
            f"same-weather/different-photo cos {r['same_weather_diff_photo_cos']} vs "
            f"different-weather/same-photo cos {r['diff_weather_same_photo_cos']}"
        )
