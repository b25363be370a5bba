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
saved and restored as well. Outputs in ``{dpa}/``: ``dpa.safetensors`` +
``dpa.json`` (model spec, run config; the completion marker), ``checkpoints/``,
``metrics.jsonl``, ``report.json`` and ``embeddings.png``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from torch import nn
from tqdm.auto import tqdm

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.io import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes
from d4ir_pipeline.common.runtime import package_versions, pick_device, seed_everything
from d4ir_pipeline.common.seeds import splitmix_seed
from d4ir_pipeline.common.train import (
    CheckpointDir,
    MetricsLog,
    due,
    rng_state,
    set_lr,
    set_rng_state,
    warmup_cosine,
)
from d4ir_pipeline.config import config_diff, config_to_dict, neutral_keys
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.stage1.dpa.config import DPAConfig, DPADataError, dpa_run_hash
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
from d4ir_pipeline.stage1.dpa.model import DPAModel, dpa_embedding, load_dpa, new_model, resize
from d4ir_pipeline.stage1.dpa.report import maybe_report
from d4ir_pipeline.stage1.sd import check_sd_source, model_id, text_hidden_size

logger = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1  # the cosine ends at lr / 10
OUTPUTS = ("dpa.json", "dpa.safetensors", "report.json", "metrics.jsonl", "embeddings.png")


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


@dataclass
class _Trainer:
    """What every training step uses: the model, its frozen helpers, the optimiser and the cached latents."""

    model: DPAModel
    sd: FrozenSD | None
    anchors: dict[int, torch.Tensor]
    prototypes: nn.Parameter | None
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    device: torch.device
    labels: torch.Tensor  # (N,) contrastive label per image
    weather_cls: torch.Tensor  # (N,) weather class per image (-1: unlabelled)
    latents: tuple[torch.Tensor, torch.Tensor] | None = None  # VAE posterior (mean, std) of every image
    sd_size: int = 0  # pixel side of the per-step diffusion crops (0: cached latents or no diffusion loss)


def train_dpa(cfg: DPAConfig) -> DPAResult:
    """Train the DPA on the web-degraded manifest; checkpoint, resume, report."""
    out = Path(cfg.output.dir)

    # 1. inputs (checked before any training or model loading)
    store, dim = _inputs(cfg)
    class_of, labels, weather_cls = _class_map(store.records, cfg.loss.supervised)
    weathers = sorted(class_of)
    run_hash = dpa_run_hash(cfg)
    ckpts = CheckpointDir(out / "checkpoints", keep=cfg.train.ckpt_keep)
    if not cfg.train.resume and out.exists():
        _start_over(out)
    device = pick_device(cfg.runtime.device)
    seed_everything(cfg.train.seed)
    if _finished(cfg, out, run_hash):
        logger.info("DPA already trained (%d steps) in %s; rerunning the report only", cfg.train.steps, out)
        model, _ = load_dpa(out, device=device)
        report = maybe_report(cfg, model, store, device)
        return DPAResult(
            out,
            out / "dpa.safetensors",
            cfg.train.steps,
            None,
            None,
            len(store),
            weathers,
            dict(store.skipped),
            report,
            already_done=True,
        )

    # 2. models (the seeded global RNG draws the weights, then the prototypes)
    tr = _build(cfg, dim, class_of, labels, weather_cls, device)
    meta = _base_meta(cfg, tr.model, run_hash, weathers, store)

    # 3. resume
    start = _resume(cfg, ckpts, tr, run_hash)
    log = MetricsLog(
        out / "metrics.jsonl", resume_step=start, tensorboard=out / "tensorboard" if cfg.log.tensorboard else None
    )
    if tr.sd is not None and cfg.loss.cache_latents:  # the frozen VAE's posterior of every image, once
        tr.latents = _cache_latents(tr.sd, store)
    tr.sd_size = tr.sd.resolution if tr.sd is not None and tr.latents is None else 0

    # 4. train
    with log:
        images_per_s = _train(cfg, tr, store, start, ckpts, meta, log)

    # 5. final weights (the json is the completion marker, written last), report
    weights = _write_final(out, tr.model, meta, cfg.train.steps, images_per_s)
    logger.info(
        "DPA trained: %d steps, %s images/s -> %s",
        cfg.train.steps,
        f"{images_per_s:.1f}" if images_per_s else "n/a",
        weights,
    )
    tr.model.eval()
    report = maybe_report(cfg, tr.model, store, device)
    return DPAResult(
        out, weights, cfg.train.steps, start or None, images_per_s, len(store), weathers, dict(store.skipped), report
    )


# --------------------------------------------------------------------------- 1. inputs


def _inputs(cfg: DPAConfig) -> tuple[ImageStore, int]:
    """The readable training images and the prompt width D; every bad input is refused here."""
    records = usable_records(cfg.data.manifest, cfg.data.root)
    if cfg.data.max_images and cfg.data.max_images < len(records):  # evenly spaced: every weather folder is kept
        pick = torch.linspace(0, len(records) - 1, cfg.data.max_images).round().long().tolist()
        records = [records[i] for i in pick]
    check_labels(records, require=cfg.data.require_labels, where=f"`data.manifest` = {cfg.data.manifest!r}")
    missing = [p for p in cfg.report.test_manifests if not Path(p).is_file()] if cfg.report.enabled else []
    if missing:
        raise D4IRError(
            f"`report.test_manifests`: {missing[0]!r} does not exist; give the paired test sets, "
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
    weathers = Counter(r.weather or "unlabelled" for r in store.records)
    logger.info("DPA data: %d images, weathers %s", len(store), dict(weathers))
    if len({r.weather for r in store.records} - {None}) < 2 and cfg.loss.supervised:
        logger.warning("fewer than two labelled weathers: the contrastive loss is instance-level in effect")
    return store, dim


def _class_map(records: list, supervised: bool) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Weather -> class id (sorted); per record its contrastive label (unlabelled or unsupervised: its own
    instance id) and its weather class (-1: unlabelled)."""
    weathers = sorted({r.weather for r in records if r.weather is not None})
    class_of = {w: i for i, w in enumerate(weathers)}
    weather_cls = [class_of[r.weather] if r.weather is not None else -1 for r in records]
    labels = [c if supervised and c >= 0 else len(weathers) + i for i, c in enumerate(weather_cls)]
    return class_of, torch.tensor(labels, dtype=torch.long), torch.tensor(weather_cls, dtype=torch.long)


def _start_over(out: Path) -> None:
    logger.info("train.resume = false: starting over in %s", out)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def _finished(cfg: DPAConfig, out: Path, run_hash: str) -> bool:
    """True when ``out`` holds the final weights of this very config (another config is refused)."""
    path = out / "dpa.json"
    if not path.is_file():
        return False
    meta = read_json(path)
    _check_same_run(meta, run_hash, cfg, path)
    return bool(meta.get("complete")) and meta.get("step") == cfg.train.steps


# --------------------------------------------------------------------------- 2. models


def _build(
    cfg: DPAConfig,
    dim: int,
    class_of: dict[str, int],
    labels: torch.Tensor,
    weather_cls: torch.Tensor,
    device: torch.device,
) -> _Trainer:
    """The model (seeded weights), the frozen SD and text anchors, the prototypes, AdamW and the scaler."""
    model = new_model(cfg, dim).to(device)
    sd, anchors = _frozen_sd(cfg, device, class_of)
    params = [p for p in model.parameters() if p.requires_grad]
    use_proto = cfg.loss.prototype > 0 and cfg.loss.contrastive > 0 and cfg.loss.supervised and len(class_of) >= 2
    prototypes = None
    if use_proto:  # (W, K*D), drawn from the seeded global RNG after the model's weights
        prototypes = nn.Parameter(0.01 * torch.randn(len(class_of), model.tokens * model.dim).to(device))
        params = params + [prototypes]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = getattr(torch, cfg.train.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return _Trainer(
        model, sd, anchors, prototypes, params, optimizer, scaler, use_amp, amp_dtype, device, labels, weather_cls
    )


def _frozen_sd(cfg: DPAConfig, device: torch.device, class_of: dict[str, int]):
    """The frozen SD for the diffusion loss (None when its weight is 0) and the weather-phrase anchors."""
    if cfg.loss.diffusion == 0 and cfg.loss.text_anchor == 0:
        return None, {}
    sd, pipe = load_frozen_sd(cfg, device, need_text=cfg.loss.text_anchor > 0)
    anchors: dict[int, torch.Tensor] = {}
    if cfg.loss.text_anchor > 0:
        if pipe.text_encoder is None:
            raise D4IRError(f"`loss.text_anchor` > 0 but `sd.model` = {cfg.sd.model!r} has no text encoder")
        anchors = phrase_anchors(pipe, cfg.loss.weather_phrases, class_of)
        pipe.text_encoder = None  # free it: only the anchors are needed
    return (sd if cfg.loss.diffusion > 0 else None), anchors


def _base_meta(cfg: DPAConfig, model: DPAModel, run_hash: str, weathers: list[str], store: ImageStore) -> dict:
    """dpa.json without the step: model spec, run config and data summary."""
    spec = {
        **model.spec(),
        "sd_model": cfg.sd.model,
        "sd_model_id": model_id(cfg.sd.model),
        "load_size": cfg.data.load_size,
    }
    return {
        "kind": "d4ir-dpa",
        "version": 1,
        "spec": spec,
        "config": config_to_dict(cfg),
        "training_hash": run_hash,
        "weathers": weathers,
        "num_images": len(store),
        "skipped": dict(store.skipped),
    }


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


# --------------------------------------------------------------------------- 3. resume


def _resume(cfg: DPAConfig, ckpts: CheckpointDir, tr: _Trainer, run_hash: str) -> int:
    """Restore the last checkpoint of this config (weights, prototypes, optimiser, scaler, RNG); its step or 0."""
    ck = ckpts.load() if cfg.train.resume else None
    if ck is None:
        return 0
    _check_same_run(read_json(ck.path / "dpa.json"), run_hash, cfg, ck.path / "dpa.json")
    tr.model.load_trainable_state_dict(ck.weights("dpa"), where=str(ck.path))
    if tr.prototypes is not None:
        with torch.no_grad():
            tr.prototypes.copy_(ck.state["prototypes"].to(tr.device))
    tr.optimizer.load_state_dict(ck.state["optimizer"])
    tr.scaler.load_state_dict(ck.state["scaler"])
    set_rng_state(ck.state["rng"])
    if ck.step > cfg.train.steps:
        raise D4IRError(f"checkpoint {ck.path} is at step {ck.step}, beyond `train.steps` = {cfg.train.steps}")
    logger.info("resuming DPA training from step %d (%s)", ck.step, ck.path)
    return ck.step


def _save_checkpoint(ckpts: CheckpointDir, tr: _Trainer, step: int, meta: dict) -> None:
    state = {"optimizer": tr.optimizer.state_dict(), "scaler": tr.scaler.state_dict(), "rng": rng_state()}
    if tr.prototypes is not None:
        state["prototypes"] = tr.prototypes.detach().cpu().clone()
    ckpts.save(
        step,
        state=state,
        weights={"dpa": tr.model.trainable_state_dict()},
        write=lambda d: atomic_write_json(d / "dpa.json", {**meta, "step": step, "complete": False}),
    )


# --------------------------------------------------------------------------- 4. train


def _train(
    cfg: DPAConfig, tr: _Trainer, store: ImageStore, start: int, ckpts: CheckpointDir, meta: dict, log: MetricsLog
) -> float | None:
    """Steps ``start``..``train.steps``: batch -> loss -> step -> log -> maybe checkpoint; returns images/s."""
    t = cfg.train
    bar = tqdm(
        range(start, t.steps),
        desc="train-dpa",
        initial=start,
        total=t.steps,
        leave=False,
        disable=None if cfg.log.progress else True,
    )
    tr.model.train()
    n_img, t0, step = 0, time.perf_counter(), start
    try:
        for step in bar:
            lr = warmup_cosine(step, total=t.steps, warmup=t.warmup_steps, min_ratio=MIN_LR_RATIO, peak=t.lr)
            set_lr(tr.optimizer, lr)
            logs, n = _optimizer_step(cfg, tr, store, step)
            n_img += n
            if due(step + 1, cfg.log.every, t.steps):
                ips = n_img / max(time.perf_counter() - t0, 1e-9)
                log.write(
                    {
                        "step": step + 1,
                        "lr": lr,
                        "images_per_s": round(ips, 3),
                        **{k: round(v, 6) for k, v in logs.items()},
                    }
                )
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if due(step + 1, t.ckpt_every, t.steps):
                _save_checkpoint(ckpts, tr, step + 1, meta)
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d; the last checkpoint is kept: rerun the same command to resume", step)
        raise
    return n_img / (time.perf_counter() - t0) if n_img else None


def _optimizer_step(cfg: DPAConfig, tr: _Trainer, store: ImageStore, step: int) -> tuple[Counter, int]:
    """One optimizer step over ``train.grad_accum`` micro-batches: (mean loss terms, images used)."""
    t = cfg.train
    logs: Counter = Counter()
    n_img = 0
    for micro in range(t.grad_accum):
        gen = torch.Generator().manual_seed(splitmix_seed(t.seed, 2, step, micro))  # every draw of this micro-batch
        idx = _batch_indices(len(store), t.seed, step * t.grad_accum + micro, t.batch_size)
        v1, v2, vsd = make_views(store, idx, cfg, tr.model.image_size, tr.sd_size, gen)
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype, enabled=tr.use_amp):
            tokens = tr.model(torch.cat([v1, v2]).to(tr.device))  # (2B, K, D)
            loss, terms = _loss_terms(cfg, tr, tokens, idx, vsd, gen)
        for name, value in terms.items():
            logs[name] += value / t.grad_accum
        logs["loss"] += loss.item() / t.grad_accum
        tr.scaler.scale(loss / t.grad_accum).backward()
        n_img += len(idx)
    if t.grad_clip > 0:
        tr.scaler.unscale_(tr.optimizer)
        torch.nn.utils.clip_grad_norm_(tr.params, t.grad_clip)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    return logs, n_img


def _loss_terms(
    cfg: DPAConfig, tr: _Trainer, tokens: torch.Tensor, idx: list[int], vsd: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one micro-batch and each term's value; summed in this order (bit-exact resume)."""
    w = cfg.loss
    lab, wc = tr.labels[idx].to(tr.device), tr.weather_cls[idx].to(tr.device)
    loss, terms = tokens.new_zeros(()), {}
    if w.contrastive > 0:
        z = dpa_embedding(tokens)  # (2B, K*D)
        l_con = supcon_loss(z, torch.cat([lab, lab]), w.temperature)
        loss, terms["contrastive"] = loss + w.contrastive * l_con, l_con.item()
        if tr.prototypes is not None:
            l_pro = prototype_loss(z, torch.cat([wc, wc]), tr.prototypes, w.temperature)
            loss, terms["prototype"] = loss + w.prototype * l_pro, l_pro.item()
    if tr.sd is not None:
        nb = w.diffusion_batch or len(idx)
        latents = tr.latents
        posterior = (
            (latents[0][idx[:nb]], latents[1][idx[:nb]]) if latents is not None else vae_posterior(tr.sd, vsd[:nb])
        )
        l_diff = diffusion_alignment_loss(tr.sd, posterior, tokens[:nb], gen)
        loss, terms["diffusion"] = loss + w.diffusion * l_diff, l_diff.item()
    if tr.anchors:
        l_txt = text_anchor_loss(tokens, torch.cat([wc, wc]), tr.anchors)
        loss, terms["text_anchor"] = loss + w.text_anchor * l_txt, l_txt.item()
    return loss, terms


def _batch_indices(n: int, seed: int, micro: int, batch: int) -> list[int]:
    """Dataset indices of global micro-batch ``micro``: a slice of per-epoch seeded permutations."""
    out: list[int] = []
    pos = micro * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(splitmix_seed(seed, 1, epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


# --------------------------------------------------------------------------- 5. final


def _write_final(out: Path, model: DPAModel, meta: dict, steps: int, images_per_s: float | None) -> Path:
    """dpa.safetensors, then dpa.json (the completion marker; it never names a torn file)."""
    from safetensors.torch import save as safetensors_bytes

    weights = out / "dpa.safetensors"
    data = safetensors_bytes(model.trainable_state_dict())
    atomic_write_bytes(weights, data)
    atomic_write_json(
        out / "dpa.json",
        {
            **meta,
            "step": steps,
            "complete": True,
            "weights_sha256": sha256_bytes(data),
            "versions": package_versions(),
            "images_per_s": images_per_s,
        },
    )
    return weights


def _check_same_run(meta: dict, run_hash: str, cfg: DPAConfig, where: Path) -> None:
    """A checkpoint from a different training config cannot be resumed; say which keys differ."""
    if meta.get("training_hash") == run_hash:
        return
    diffs = config_diff(meta.get("config", {}), config_to_dict(cfg), ignore=neutral_keys(DPAConfig))
    raise D4IRError(
        f"{where} was written by a different training config ({'; '.join(diffs[:6]) or 'hash differs'}); "
        f"use another `output.dir` / --work-dir, or set train.resume = false to start over"
    )


# --------------------------------------------------------------------------- CLI


@stage_command("train-dpa", DPAConfig, "dpa")
def train_dpa_command(cfg: DPAConfig) -> None:
    """Stage one: train the degradation-aware prompt adapter (stages/<profile>/dpa.toml)."""
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
