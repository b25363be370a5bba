"""Stage one, part 2: CCD synthesis into webdataset shards (`d4ir synthesize`).

Roles, in data-flow order: :func:`plan_shards` turns the web-clean manifest into a fixed
list of shards (a pure function of the manifest and config, the same on every rank);
ranks own the shards with ``index % world_size == rank``; a worker loads the SD pipeline
once and turns one shard's items into one tar's samples; the shard-set writer
(:class:`~d4ir_pipeline.shardset.writer.ShardSetWriter`) writes them as
``synth-r{rank:03d}-{index:06d}.tar`` (``.tar.tmp`` -> fsync -> rename), then records it in
the rank's listing ``shardset.r{rank:03d}.json`` (the commit point, rewritten atomically
after every shard). :func:`merge_shardset` unions the rank listings into ``shardset.json``;
a set is complete only when every planned shard is listed. Rerunning the same command
resumes: recorded shards whose sha256 verifies are kept, everything else is redone; a
different config hash in the same folder is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.dist import dist_env, init_barrier_group, pick_rank_device
from d4ir_pipeline.common.images import IMAGE_FORMATS, encode_image
from d4ir_pipeline.common.io import atomic_write_bytes, read_json, sha256_file
from d4ir_pipeline.common.runtime import DTYPES, package_versions, pick_dtype
from d4ir_pipeline.common.train import MetricsLog
from d4ir_pipeline.config import config_hash, config_to_dict, opt
from d4ir_pipeline.data.manifests import load_manifest, open_rgb
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.shardset.format import SHARDSET_KIND, SHARDSET_NAME, check_output_dir, shard_name
from d4ir_pipeline.shardset.writer import ShardSetWriter, all_ranks_done, merge_shardset
from d4ir_pipeline.stage1.ccd import (
    CCD,
    CROPS,
    CCDInput,
    SampleDecision,
    configure_pipeline,
    decide_sample,
    normalise_mix,
    prepare_image,
    sample_key,
    sample_seed,
)
from d4ir_pipeline.stage1.prompt_bank import PromptBank
from d4ir_pipeline.stage1.sd import (
    ATTENTION_BACKENDS,
    check_sd_source,
    load_img2img_pipeline,
    model_id,
    text_hidden_size,
    unconditional_embeds,
)

logger = logging.getLogger(__name__)

SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
)
# Fields marked affects_output=False change speed or memory but not which samples are drawn:
# a resume may use another batch size, GPU or attention kernel. The input paths among them are
# replaced in the identity by the hashes of what they hold (manifest bytes, bank tokens, UNet weights).


# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class SDSection:
    """The Stable Diffusion model and sampler."""

    model: str = opt(
        "{work}/tiny-sd", help="diffusers SD folder or hub id (the Makefile passes SD_MODEL here)", affects_output=False
    )
    scheduler: str = opt(
        "DDIMScheduler", choices=SCHEDULERS, help="DDIM: deterministic for a seed, good at 20-50 steps"
    )
    text_encoder: bool = opt(
        True, help="CFG's unconditional branch = the empty prompt's embedding (needs text_encoder/); false = zeros"
    )


@dataclass(frozen=True)
class DataSection:
    """The clean web images and how they are cut to the SD resolution."""

    manifest: str = opt(
        "{data}/manifests/web-clean.jsonl",
        help="image manifest (JSON Lines) of clean images",
        affects_output=False,
    )
    root: str = opt("{data}", help="folder the manifest's paths are relative to", affects_output=False)
    resolution: int = opt(512, min=8, max=4096, help="SD 1.x works at 512; multiple of 8; square crops")
    crop: str = opt("center", choices=CROPS, help="'random': a seeded random square crop (from the sample seed)")
    min_side: int = opt(64, min=1, help="skip images whose short side is below this (too_small): upscaled mush")
    max_pixels: int = opt(
        89_478_485, min=1, help="decompression-bomb limit (Pillow's default); bigger images are skipped"
    )
    check_hash: bool = opt(False, help="re-hash every image against the manifest (skips changed files)")
    limit: int = opt(0, min=0, help="use only the first N images (sorted by id); 0 = all")


@dataclass(frozen=True)
class BankSection:
    """Where the prompts come from."""

    dir: str = opt("{bank}", help="prompt-bank folder written by `d4ir prompt-bank`", affects_output=False)
    use: str = opt("entry", choices=("entry", "centroid"), help="one bank entry of the weather, or its centroid")
    mix: dict[str, float] = opt(
        default_factory=dict, min=0.0, help="weather -> ratio, e.g. {rain = 1, haze = 1, snow = 2}; empty = uniform"
    )


@dataclass(frozen=True)
class CCDSection:
    """Content-driven conditional diffusion (img2img) settings."""

    strength: float | tuple[float, float] = opt(
        0.5, min=0.0, max=1.0, help="noise level s: one value, or [lo, hi] sampled per image; rounded to whole steps"
    )
    guidance: float = opt(7.5, min=0.0, help="classifier-free guidance scale g (SD 1.x's usual 7.5); <= 1 disables CFG")
    steps: int = opt(30, min=1, max=1000, help="scheduler steps for strength 1; img2img runs round(s * steps)")
    seed: int = opt(0, min=0, help="global seed; each sample's seed = hash(seed, sample key)")
    samples_per_image: int = opt(1, min=1, max=64, help="degraded variants drawn per clean image")


@dataclass(frozen=True)
class OutputSection:
    """The shard set."""

    dir: str = opt(
        "{shards}", help="shard-set folder (local path; URLs such as pipe: are refused)", affects_output=False
    )
    shard_size: int = opt(256, min=1, help="samples per shard: ~100 MB tars at 512 px PNG")
    format: str = opt("png", choices=tuple(IMAGE_FORMATS), help="degraded image format (png: lossless)")
    quality: int = opt(95, min=1, max=100, help="jpg / webp quality")
    keep_clean: bool = opt(False, help="also store the cropped clean image as {key}.clean.png")


@dataclass(frozen=True)
class RuntimeSection:
    """Speed and memory (left out of the config hash unless they change the samples)."""

    device: str = opt(
        "auto", help="'auto' = cuda when available (cuda:LOCAL_RANK under torchrun), else cpu", affects_output=False
    )
    dtype: str = opt("float16", choices=DTYPES, help="half on CUDA; the CPU uses float32")
    attention: str = opt(
        "sdpa", choices=ATTENTION_BACKENDS, help="PyTorch SDPA; xformers when installed", affects_output=False
    )
    batch_size: int = opt(8, min=1, help="images per UNet call (the UNet sees 2x with CFG)", affects_output=False)
    compile: bool = opt(
        False, help="torch.compile the UNet (slow first batches; for long GPU runs)", affects_output=False
    )
    channels_last: bool = opt(
        False, help="channels_last memory format for UNet and VAE (often faster on GPUs)", affects_output=False
    )
    vae_slicing: bool = opt(
        False, help="VAE one image at a time: less memory at large batch sizes", affects_output=False
    )
    vae_tiling: bool = opt(False, help="VAE in tiles: less memory at large resolutions", affects_output=False)
    vae_fp32: bool = opt(False, help="keep the VAE in float32 (fp16 SD VAEs can overflow to NaN)")
    workers: int = opt(
        4, min=1, max=64, help="threads decoding clean images and encoding outputs", affects_output=False
    )
    barrier_timeout_min: int = opt(
        240, min=1, help="how long ranks wait for each other at the end (torchrun)", affects_output=False
    )


@dataclass(frozen=True)
class SynthesizeConfig:
    """`d4ir synthesize`: stages/<profile>/synthesize.toml."""

    sd: SDSection = field(default_factory=SDSection)
    data: DataSection = field(default_factory=DataSection)
    bank: BankSection = field(default_factory=BankSection)
    ccd: CCDSection = field(default_factory=CCDSection)
    output: OutputSection = field(default_factory=OutputSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


# ---------------------------------------------------------------------------------------
# plan: records -> shards -> ranks (pure functions)


@dataclass(frozen=True)
class WorkItem:
    """One sample to make: variant ``variant`` of manifest record ``record`` (an index)."""

    key: str
    record: int
    variant: int


@dataclass(frozen=True)
class ShardPlan:
    """A planned shard: its global index and the items it holds, in order."""

    index: int
    items: tuple[WorkItem, ...]

    def name(self, rank: int) -> str:
        """File name when written by ``rank``."""
        return shard_name(rank, self.index)


def plan_shards(record_ids: Sequence[str], *, shard_size: int, samples_per_image: int = 1) -> list[ShardPlan]:
    """Cut records (already in their final order) into shards of whole records.

    All variants of a record go in one shard, so a bad image is skipped (and counted)
    once; a shard holds ``max(1, shard_size // samples_per_image)`` records.
    """
    items, keys = [], set()
    for r, record_id in enumerate(record_ids):
        for v in range(samples_per_image):
            key = sample_key(record_id, v)
            if key in keys:  # only possible for duplicate ids, which load_manifest refuses
                raise D4IRError(f"sample key {key!r} occurs twice (record id {record_id!r})")
            keys.add(key)
            items.append(WorkItem(key, r, v))
    per = max(1, shard_size // samples_per_image) * samples_per_image  # items per shard
    return [
        ShardPlan(index, tuple(items[start : start + per])) for index, start in enumerate(range(0, len(items), per))
    ]


def shards_for_rank(plans: Sequence[ShardPlan], rank: int, world_size: int) -> list[ShardPlan]:
    """The shards ``rank`` owns: every ``world_size``-th one, starting at ``rank``."""
    return [p for p in plans if p.index % world_size == rank]


# ---------------------------------------------------------------------------------------
# the synthesize


@dataclass(frozen=True)
class SynthesizeResult:
    """What one process of `d4ir synthesize` did."""

    out_dir: Path
    manifest: Path | None  # shardset.json when this process wrote / merged it
    rank: int
    world_size: int
    shards_planned: int  # shards this rank owns
    shards_written: int
    shards_reused: int  # recorded earlier and verified
    samples_written: int
    skipped: dict[str, int]  # bad clean images, by reason (this process)
    dropped: dict[str, int]  # samples that failed twice, by reason (this process)
    complete: bool | None  # the merged set's state (None when this rank did not merge)
    seconds: float
    images_per_s: float
    only: tuple[Path, ...] = ()  # files written by --only


@dataclass
class _Bank:
    """The prompt bank, as CCD needs it (tokens stay on the CPU; rows are looked up)."""

    tokens: Any  # torch (N, K, D) float32
    centroids: Any  # torch (W, K, D) float32
    weathers: tuple[str, ...]
    row_ids: list[str]
    rows_for: dict[str, list[int]]
    sha256: str
    k: int
    d: int


def _load_bank(bank_dir: str) -> _Bank:
    import torch

    path = Path(bank_dir)
    if not (path / "tokens.safetensors").is_file():
        raise D4IRError(
            f"`bank.dir` = {bank_dir!r}: no tokens.safetensors; run `d4ir prompt-bank` first (make prompt-bank)"
        )
    bank = PromptBank.load(path)
    tokens = torch.as_tensor(bank.tokens, dtype=torch.float32)  # (N, K, D)
    centroids = torch.as_tensor(bank.centroids, dtype=torch.float32)  # (W, K, D)
    if tokens.ndim != 3 or centroids.ndim != 3 or tokens.shape[1:] != centroids.shape[1:]:
        raise D4IRError(
            f"`bank.dir` = {bank_dir!r}: tokens {tuple(tokens.shape)} and centroids {tuple(centroids.shape)} "
            "must be (N, K, D) and (W, K, D)"
        )
    weathers = tuple(bank.weathers)
    row_ids = [r["id"] if isinstance(r, Mapping) else r.id for r in bank.records]
    rows_for = {w: [int(r) for r in bank.rows_for(w)] for w in weathers}
    return _Bank(
        tokens=tokens,
        centroids=centroids,
        weathers=weathers,
        row_ids=row_ids,
        rows_for=rows_for,
        sha256=sha256_file(path / "tokens.safetensors"),
        k=int(tokens.shape[1]),
        d=int(tokens.shape[2]),
    )


@dataclass
class _Context:
    """Everything a worker needs, built once per process before any work."""

    cfg: SynthesizeConfig
    out: Path
    records: list  # list[ImageRecord], sorted by id
    bank: _Bank
    weathers: tuple[str, ...]
    probs: np.ndarray
    plans: list[ShardPlan]
    config_hash: str
    header: dict  # config, inputs, models, versions (copied into every manifest)

    def decide(self, key: str) -> SampleDecision:
        c = self.cfg.ccd
        return decide_sample(
            key,
            global_seed=c.seed,
            weathers=self.weathers,
            probs=self.probs,
            rows_for=self.bank.rows_for,
            row_ids=self.bank.row_ids,
            use=self.cfg.bank.use,
            strength=c.strength,
            steps=c.steps,
        )

    def prompt(self, dec: SampleDecision):
        if dec.row is None:
            return self.bank.centroids[self.bank.weathers.index(dec.weather)]  # (K, D)
        return self.bank.tokens[dec.row]  # (K, D)


def _prepare(cfg: SynthesizeConfig) -> _Context:
    """Check every input and build the plan, before loading a model or touching the output."""
    out = check_output_dir(cfg.output.dir)
    # 1. SD folder and prompt bank: widths must match before any work
    check_sd_source(cfg.sd.model)
    width = text_hidden_size(cfg.sd.model)
    bank = _load_bank(cfg.bank.dir)
    if bank.d != width:
        raise D4IRError(
            f"prompt bank `bank.dir` = {cfg.bank.dir!r} has token width D = {bank.d}, but the UNet of "
            f"`sd.model` = {cfg.sd.model!r} cross-attends to width {width}; build the bank (and DPA) with this SD model"
        )
    if cfg.sd.text_encoder and bank.k > 77:
        raise D4IRError(f"prompt bank has K = {bank.k} tokens; the empty-prompt unconditional has only 77")
    if cfg.bank.use == "entry":
        have = tuple(w for w in bank.weathers if bank.rows_for[w])
        if cfg.bank.mix and (empty := sorted(w for w, v in cfg.bank.mix.items() if v > 0 and w not in have)):
            raise D4IRError(f"`bank.mix` asks for {empty}, but the prompt bank holds no entry of those weathers")
    else:
        have = bank.weathers
    weathers, probs = normalise_mix(cfg.bank.mix, have)
    # 2. sampler settings
    s = cfg.ccd.strength
    if isinstance(s, tuple) and not 0 < s[0] <= s[1] <= 1:
        raise D4IRError(f"`ccd.strength` = {list(s)}: expected [lo, hi] with 0 < lo <= hi <= 1")
    if isinstance(s, float) and s <= 0:
        raise D4IRError(f"`ccd.strength` = {s}: must be > 0 (0 would return the clean image)")
    if cfg.data.resolution % 8:
        raise D4IRError(f"`data.resolution` = {cfg.data.resolution}: must be a multiple of 8")
    # 3. the manifest, sorted by id so the plan does not depend on line order
    records = sorted(load_manifest(cfg.data.manifest), key=lambda r: r.id)
    if cfg.data.limit:
        records = records[: cfg.data.limit]
    if not records:
        raise D4IRError(f"`data.manifest` = {cfg.data.manifest!r} lists no images")
    plans = plan_shards(
        [r.id for r in records], shard_size=cfg.output.shard_size, samples_per_image=cfg.ccd.samples_per_image
    )
    inputs = {
        "manifest": str(cfg.data.manifest),
        "manifest_sha256": sha256_file(cfg.data.manifest),
        "bank": str(cfg.bank.dir),
        "bank_sha256": bank.sha256,
        "num_images": len(records),
    }
    models = {"sd": model_id(cfg.sd.model), "sd_source": cfg.sd.model, "scheduler": cfg.sd.scheduler}
    ident = {"config": config_hash(cfg), "inputs": inputs, "sd": models["sd"]}
    ident["inputs"] = {k: v for k, v in inputs.items() if k.endswith("sha256") or k == "num_images"}
    chash = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    header = {
        "config": config_to_dict(cfg),
        "config_hash": chash,
        "inputs": inputs,
        "models": models,
        "versions": package_versions(),
    }
    return _Context(cfg, out, records, bank, weathers, probs, plans, chash, header)


def _append_metrics(out: Path, rank: int, shard: str, samples: int, seconds: float) -> None:
    """One shard's JSON line in metrics.jsonl; a single O_APPEND write, safe with several ranks."""
    row = {
        "rank": rank,
        "shard": shard,
        "samples": samples,
        "seconds": round(seconds, 3),
        "images_per_s": round(samples / seconds, 3) if seconds > 0 else None,
    }
    with MetricsLog(out / "metrics.jsonl") as log:
        log.write(row)


class _Worker:
    """Loads SD once; turns one shard plan into one tar's samples."""

    def __init__(self, ctx: _Context, device, pool: ThreadPoolExecutor):
        cfg, rt = ctx.cfg, ctx.cfg.runtime
        self.ctx, self.pool = ctx, pool
        dtype = pick_dtype(rt.dtype, device)
        pipe = load_img2img_pipeline(
            cfg.sd.model,
            device=device,
            dtype=dtype,
            attention=rt.attention,
            scheduler=cfg.sd.scheduler,
            with_text_encoder=cfg.sd.text_encoder,
        )
        configure_pipeline(
            pipe,
            channels_last=rt.channels_last,
            compile_unet=rt.compile,
            vae_slicing=rt.vae_slicing,
            vae_tiling=rt.vae_tiling,
            vae_fp32=rt.vae_fp32,
        )
        uncond = unconditional_embeds(pipe, ctx.bank.k, ctx.bank.d)  # (1, K, D)
        self.ccd = CCD(pipe, steps=cfg.ccd.steps, guidance=cfg.ccd.guidance, uncond=uncond)
        self.runtime = {"device": str(device), "dtype": str(dtype).replace("torch.", "")}

    def load(self, plan: ShardPlan) -> list:
        """Submit the shard's image loads to the pool (called one shard ahead: prefetch)."""
        return [self.pool.submit(self._load_one, plan.items[i]) for i in range(len(plan.items))]

    def _load_one(self, item: WorkItem):
        ctx, d = self.ctx, self.ctx.cfg.data
        rec = ctx.records[item.record]
        dec = ctx.decide(item.key)
        try:
            img = open_rgb(d.root, rec, min_side=d.min_side, check_hash=d.check_hash)
        except BadImageError as e:
            logger.warning("skipping %s: %s", rec.id, e)
            return dec, None, e.reason
        crop, box = prepare_image(img, d.resolution, d.crop, dec.crop_u, dec.crop_v)
        return dec, (np.asarray(crop, dtype=np.uint8), box, img.size), None

    def make(self, plan: ShardPlan, loads: list) -> tuple[list, Counter, Counter]:
        """Synthesise the shard's samples: [(key, [(ext, bytes)])] in plan order, skipped, dropped."""
        cfg = self.ctx.cfg
        skipped: Counter = Counter()
        dropped: Counter = Counter()
        ready = []  # (item, decision, clean array, box, source size)
        bad_records: set[int] = set()
        for item, fut in zip(plan.items, loads, strict=True):
            dec, got, reason = fut.result()
            if got is None:
                if item.record not in bad_records:  # once per image, not per variant (variants share a shard)
                    bad_records.add(item.record)
                    skipped[reason] += 1
                continue
            ready.append((item, dec, *got))
        samples: dict[str, list[tuple[str, bytes]]] = {}
        bs = cfg.runtime.batch_size
        for start in range(0, len(ready), bs):
            chunk = ready[start : start + bs]
            inputs = [
                CCDInput(
                    key=item.key,
                    image=arr,
                    prompt=self.ctx.prompt(dec),
                    denoise=dec.denoise,
                    seeds=(dec.seed, sample_seed(cfg.ccd.seed, item.key, attempt=1)),
                )
                for item, dec, arr, _, _ in chunk
            ]
            outs = self.ccd(inputs)
            encoded = self.pool.map(self._encode, chunk, outs)
            for (item, *_), out, files in zip(chunk, outs, encoded, strict=True):
                if out.failure is not None:
                    dropped[out.failure] += 1
                else:
                    samples[item.key] = files
        ordered = [(item.key, samples[item.key]) for item in plan.items if item.key in samples]
        return ordered, skipped, dropped

    def _encode(self, row, out) -> list[tuple[str, bytes]] | None:
        if out.failure is not None:
            return None
        item, dec, clean, box, src_size = row
        cfg, rec = self.ctx.cfg, self.ctx.records[item.record]
        fmt = cfg.output.format
        meta = {
            "key": item.key,
            "source_id": rec.id,
            "source_sha256": rec.sha256,
            "source_size": list(src_size),
            "crop_box": list(box),
            "variant": item.variant,
            "weather": dec.weather,
            "prompt_id": dec.prompt_id,
            "prompt_row": dec.row,
            "strength": dec.strength,
            "denoise_steps": dec.denoise,
            "guidance": cfg.ccd.guidance,
            "steps": cfg.ccd.steps,
            "scheduler": cfg.sd.scheduler,
            "seed": out.seed,
            "attempt": out.attempt,
            "width": int(out.image.shape[1]),
            "height": int(out.image.shape[0]),
            "format": fmt,
            "model": self.ctx.header["models"]["sd"],
            "config_hash": self.ctx.config_hash,
        }
        files = [
            ("json", json.dumps(meta, sort_keys=True).encode()),
            (f"degraded.{fmt}", encode_image(out.image, fmt, quality=cfg.output.quality)),
        ]
        if cfg.output.keep_clean:
            files.append(("clean.png", encode_image(clean, "png")))
        return files


@contextlib.contextmanager
def _max_pixels(limit: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit for the synthesize, restore it afterwards."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def synthesize(
    cfg: SynthesizeConfig,
    *,
    overwrite: bool = False,
    only: Sequence[str] = (),
    only_out: str | os.PathLike | None = None,
) -> SynthesizeResult:
    """Synthesise this rank's shards (resuming), then merge the manifest when every rank is done.

    ``only``: regenerate just these sample keys into ``only_out`` (default
    ``{output.dir}/only``), leaving the shard set untouched.
    """
    t0 = time.perf_counter()
    rank, world, local_rank = dist_env()
    # 1. check every input (SD folder, bank width, manifest) before any work
    ctx = _prepare(cfg)
    if only:
        return _only(ctx, list(only), only_out, t0, rank, world, local_rank)
    dist, own_group = init_barrier_group(world, cfg.runtime.barrier_timeout_min)
    owned = shards_for_rank(ctx.plans, rank, world)
    # 2. the output folder: refuse another config; what is recorded and still verifies is kept
    writer, todo = _open_writer(ctx, owned, rank, world, overwrite=overwrite, dist=dist)
    # 3. synthesise: one shard at a time, the next shard's images load meanwhile
    t_work = time.perf_counter()
    with ThreadPoolExecutor(cfg.runtime.workers) as pool:
        n_samples, skipped, dropped = _make_shards(ctx, writer, todo, pool, rank, world, local_rank)
        work_s = time.perf_counter() - t_work
    # 4. merge: rank 0 after a barrier under torchrun; otherwise whichever rank sees all done
    manifest_path, complete = _merge(ctx, dist, own_group, rank, world)
    if complete is False:
        logger.warning("the shard set in %s is not complete yet: rerun the same command to finish it", ctx.out)
    return SynthesizeResult(
        out_dir=ctx.out,
        manifest=manifest_path,
        rank=rank,
        world_size=world,
        shards_planned=len(owned),
        shards_written=len(todo),  # every shard to make was made, or this raised
        shards_reused=len(owned) - len(todo),
        samples_written=n_samples,
        skipped=dict(sorted(skipped.items())),
        dropped=dict(sorted(dropped.items())),
        complete=complete,
        seconds=time.perf_counter() - t0,
        images_per_s=n_samples / work_s if work_s > 0 and n_samples else 0.0,
    )


def _open_writer(
    ctx: _Context, owned: list[ShardPlan], rank: int, world: int, *, overwrite: bool, dist
) -> tuple[ShardSetWriter, list[ShardPlan]]:
    """Open (or resume) this rank's part of the shard set: the writer and the owned shards still to make."""
    writer = ShardSetWriter(
        out=ctx.out,
        kind=SHARDSET_KIND,
        header=ctx.header,
        num_shards=len(ctx.plans),
        rank=rank,
        world_size=world,
        where=f"`output.dir` = {str(ctx.out)!r}",
        hint="use a new output.dir, or --overwrite to replace it",
    )
    # the barrier: every rank has read the old listings before any rank rewrites its own
    to_write = set(
        writer.open(overwrite=overwrite, barrier=dist.barrier if dist else None, workers=ctx.cfg.runtime.workers)
    )
    todo = [p for p in owned if p.index in to_write]
    logger.info(
        "rank %d/%d: %d shards owned, %d already done, %d to make in %s",
        rank,
        world,
        len(owned),
        len(owned) - len(todo),
        len(todo),
        ctx.out,
    )
    return writer, todo


def _make_shards(
    ctx: _Context, writer: ShardSetWriter, todo: list[ShardPlan], pool, rank: int, world: int, local_rank: int
) -> tuple[int, Counter, Counter]:
    """Make and record the ``todo`` shards (SD is loaded only if there are any): samples, skipped, dropped."""
    from tqdm import tqdm

    n_samples, skipped, dropped = 0, Counter(), Counter()
    if not todo:
        return n_samples, skipped, dropped
    with _max_pixels(ctx.cfg.data.max_pixels):
        worker = _Worker(ctx, pick_rank_device(ctx.cfg.runtime.device, world, local_rank), pool)
        writer.header["runtime"] = worker.runtime
        nxt = worker.load(todo[0])
        for i, plan in enumerate(tqdm(todo, desc=f"synthesize r{rank}", unit="shard", position=rank)):
            loads, nxt = nxt, (worker.load(todo[i + 1]) if i + 1 < len(todo) else None)
            ts = time.perf_counter()
            samples, sk, dr = worker.make(plan, loads)
            for key, files in samples:
                writer.write(key, files)
            entry = writer.flush_shard(plan.index, skipped=dict(sorted(sk.items())), dropped=dict(sorted(dr.items())))
            _append_metrics(ctx.out, rank, entry["name"], len(samples), time.perf_counter() - ts)
            n_samples += len(samples)
            skipped.update(sk)
            dropped.update(dr)
    return n_samples, skipped, dropped


def _merge(ctx: _Context, dist, own_group: bool, rank: int, world: int) -> tuple[Path | None, bool | None]:
    """Merge the rank listings into shardset.json where this rank may: ``(its path, complete)``, else Nones."""
    if dist is not None:
        dist.barrier()
        if rank == 0:
            merge_shardset(ctx.out)
        dist.barrier()
        complete = bool(read_json(ctx.out / SHARDSET_NAME).get("complete"))
        if own_group:
            dist.destroy_process_group()
        return ctx.out / SHARDSET_NAME, complete
    if world == 1 or all_ranks_done(ctx.out, world, ctx.config_hash):
        return ctx.out / SHARDSET_NAME, merge_shardset(ctx.out)["complete"]
    logger.info("rank %d done; after every rank finishes run `d4ir shards merge %s`", rank, ctx.out)
    return None, None


def _only(ctx: _Context, keys: list[str], only_out, t0: float, rank: int, world: int, local_rank: int):
    """Regenerate single samples by key, exactly as in the shard set, into ``only_out``."""
    by_key = {it.key: it for plan in ctx.plans for it in plan.items}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        sample = sorted(by_key)[:3]
        raise D4IRError(f"--only: unknown sample key(s) {unknown}; keys look like {sample}")
    dest = Path(only_out) if only_out is not None else ctx.out / "only"
    dest.mkdir(parents=True, exist_ok=True)
    written, skipped, dropped = [], Counter(), Counter()
    with ThreadPoolExecutor(1) as pool, _max_pixels(ctx.cfg.data.max_pixels):
        worker = _Worker(ctx, pick_rank_device(ctx.cfg.runtime.device, 1, local_rank), pool)
        for key in keys:
            single = ShardPlan(-1, (by_key[key],))
            samples, sk, dr = worker.make(single, worker.load(single))
            if not samples:
                logger.warning("sample %s was not produced: skipped %s, dropped %s", key, dict(sk), dict(dr))
            skipped.update(sk)
            dropped.update(dr)
            written += [atomic_write_bytes(dest / f"{k}.{ext}", data) for k, files in samples for ext, data in files]
    n = len({p.name.split(".", 1)[0] for p in written})
    return SynthesizeResult(
        out_dir=ctx.out,
        manifest=None,
        rank=rank,
        world_size=world,
        shards_planned=0,
        shards_written=0,
        shards_reused=0,
        samples_written=n,
        skipped=dict(skipped),
        dropped=dict(dropped),
        complete=None,
        seconds=time.perf_counter() - t0,
        images_per_s=0.0,
        only=tuple(written),
    )


# ---------------------------------------------------------------------------------------
# CLI


@stage_command("synthesize", SynthesizeConfig)
@click.option("--overwrite", is_flag=True, help="Replace a shard set made with another config in output.dir.")
@click.option("--only", "only", multiple=True, metavar="KEY", help="Regenerate just this sample (repeatable).")
@click.option(
    "--only-out", type=click.Path(file_okay=False), default=None, help="Folder for --only (default {output.dir}/only)."
)
def synthesize_command(cfg: SynthesizeConfig, overwrite: bool, only: tuple[str, ...], only_out: str | None) -> None:
    """Stage one: CCD synthesis of degraded images into webdataset shards (resumable; torchrun-aware)."""
    res = synthesize(cfg, overwrite=overwrite, only=only, only_out=only_out)
    if only:
        click.echo(f"regenerated {res.samples_written} sample(s): " + ", ".join(str(p) for p in res.only))
        return
    state = {True: "complete", False: "INCOMPLETE", None: "rank done (merge pending)"}[res.complete]
    click.echo(
        f"rank {res.rank}/{res.world_size}: {res.shards_written} shards written, {res.shards_reused} reused, "
        f"{res.samples_written} samples ({res.images_per_s:.2f} images/s); skipped {res.skipped or 0}, "
        f"dropped {res.dropped or 0}; shard set {state}: {res.out_dir}"
    )
