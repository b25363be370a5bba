"""Baseline input sources for the comparison table: packed image sets, noise, and a DFMC-style GAN.

Every baseline that has inputs on disk becomes a shard set in the same contract format
as CCD synthesis (``shardset.json`` + ``synth-r000-*.tar``), so ``distill`` streams it
unchanged:

* :func:`pack_manifest_to_shards` - an image manifest (the teacher's paired training
  inputs for the "data-based KD" row, or the web-degraded photos for the "web data" row);
* :func:`write_noise_shards` - seeded random inputs (the naive data-free lower bound);
* :func:`train_dfmc` - the GAN-based data-free baseline (DFMC-style, [design]): a small
  generator G(z) trained jointly with the student. G maximises the student-teacher L1
  discrepancy on its images; the student minimises it on the teacher's pseudo-labels of
  G's images; an InfoNCE term on G's samples (anchor G(z), positive G(z + s*eps),
  negatives the other z of the batch, in the feature space of a fixed random conv
  encoder) keeps G's samples apart to fight mode collapse. Its inputs exist only inside
  training, so it writes a student folder directly instead of a shard set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d4ir_pipeline.common.images import png_bytes
from d4ir_pipeline.common.io import sha256_bytes, sha256_file
from d4ir_pipeline.common.runtime import package_versions
from d4ir_pipeline.data.manifests import load_manifest, open_rgb
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.shardset.format import SHARDSET_KIND
from d4ir_pipeline.shardset.writer import ShardSetWriter
from d4ir_pipeline.stage1.ccd import prepare_image, sample_key

logger = logging.getLogger(__name__)

NOISE_KINDS = ("uniform", "smooth", "mixed")


# ---------------------------------------------------------------------------------------
# noise inputs


def noise_image(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One random RGB image (H, W, 3) uint8: ``uniform`` i.i.d. pixels, ``smooth`` low-frequency noise.

    ``smooth`` draws Gaussian noise on a coarse grid (4-16 cells a side), upsamples it
    bicubically and adds a random global colour, so it has the image-like spectrum that
    i.i.d. noise lacks; ``mixed`` picks one of the two per image.
    """
    from PIL import Image

    if kind not in NOISE_KINDS:
        raise ValueError(f"`kind` = {kind!r}: expected one of {list(NOISE_KINDS)}")
    h, w = size
    if kind == "mixed":
        kind = "uniform" if rng.random() < 0.5 else "smooth"
    if kind == "uniform":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cells = int(rng.integers(4, 17))
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    coarse = rng.normal(0.0, 0.25, size=(ch, cw, 3)) + rng.uniform(0.2, 0.8, size=(1, 1, 3))  # (ch, cw, 3)
    chans = [
        np.asarray(
            Image.fromarray(coarse[..., i].astype(np.float32), mode="F").resize((w, h), Image.Resampling.BICUBIC)
        )
        for i in range(3)
    ]
    img = np.stack(chans, -1)  # (H, W, 3) float
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# shard sets in the synthesis contract format (through shardset.writer)


@dataclass(frozen=True)
class _PackedSample:
    """One sample to write: its key, the JSON metadata and a function giving its image."""

    key: str
    meta: dict
    image: Any  # () -> (H, W, 3) uint8, or raises BadImageError


def _write_shardset(
    out: Path,
    samples: list[_PackedSample],
    *,
    shard_size: int,
    min_shards: int,
    config: dict,
    inputs: dict,
    models: dict,
    desc: str,
) -> dict:
    """Write ``samples`` as a one-rank shard set through the shard-set writer; returns ``shardset.json``.

    A rerun with the same config keeps the recorded shards that verify and redoes the
    rest; another config in the same folder is refused.
    """
    from tqdm.auto import tqdm

    if not samples:
        raise D4IRError(f"{out}: nothing to pack (no samples)")
    # 1. plan: at least `min_shards` shards (distill needs one per data-loader worker)
    per = max(1, min(shard_size, math.ceil(len(samples) / max(1, min_shards))))
    plans = [samples[i : i + per] for i in range(0, len(samples), per)]
    ident = {"config": config, "inputs": {k: v for k, v in inputs.items() if k != "root"}, "models": models}
    chash = sha256_bytes(json.dumps({**ident, "per_shard": per}, sort_keys=True).encode())
    header = {
        "config": config,
        "config_hash": chash,
        "inputs": inputs,
        "models": models,
        "versions": package_versions(),
    }
    writer = ShardSetWriter(
        out=out,
        kind=SHARDSET_KIND,
        header=header,
        num_shards=len(plans),
        hint="delete the folder or pick another output",
    )
    # 2. resume: recorded shards of this config that still verify are kept
    todo = writer.open()
    # 3. write the missing shards, each recorded as it is done
    for i in tqdm(todo, desc=desc, unit="shard", leave=False):
        skipped: Counter = Counter()
        for smp in plans[i]:
            try:
                arr = smp.image()
            except BadImageError as e:
                logger.warning("skipping %s: %s", smp.meta.get("source_id", smp.key), e)
                skipped[e.reason] += 1
                continue
            meta = {**smp.meta, "key": smp.key, "width": int(arr.shape[1]), "height": int(arr.shape[0])}
            meta["config_hash"] = chash
            writer.write(
                smp.key, [("json", json.dumps(meta, sort_keys=True).encode()), ("degraded.png", png_bytes(arr))]
            )
        writer.flush_shard(i, skipped=dict(sorted(skipped.items())), dropped={})
    return writer.finish()


def pack_manifest_to_shards(
    manifest: str | os.PathLike,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    origin: str,
    shard_size: int = 64,
    min_shards: int = 2,
    limit: int = 0,
    size: int = 0,
    min_side: int = 1,
) -> dict:
    """Pack the (input) images of an image manifest into a shard set; returns ``shardset.json``.

    ``origin`` names the row (e.g. ``data-kd`` / ``web``) in every sample's JSON. Records
    are sorted by id; ``limit`` keeps the first N (0 = all); ``size`` > 0 resizes the
    short side to ``size`` and centre-crops a square (as synthesis does), 0 keeps the
    images as they are. Bad images are skipped and counted per reason.
    """

    records = sorted(load_manifest(manifest), key=lambda r: r.id)
    if limit:
        records = records[:limit]
    if not records:
        raise D4IRError(f"manifest {str(manifest)!r} lists no images")

    def loader(rec) -> Any:
        def load() -> np.ndarray:
            img = open_rgb(root, rec, min_side=min_side)
            if size:
                img = prepare_image(img, size, "center")[0]
            return np.asarray(img, dtype=np.uint8)

        return load

    samples = [
        _PackedSample(
            key=sample_key(rec.id),
            meta={
                "origin": origin,
                "source_id": rec.id,
                "source_sha256": rec.sha256,
                "weather": rec.weather,
                "prompt_id": None,
                "strength": None,
                "guidance": None,
                "steps": None,
                "scheduler": None,
                "seed": None,
            },
            image=loader(rec),
        )
        for rec in records
    ]
    config = {"kind": "pack", "origin": origin, "limit": limit, "size": size, "min_side": min_side}
    inputs = {
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
        "root": str(root),
        "num_images": len(records),
    }
    return _write_shardset(
        Path(out),
        samples,
        shard_size=shard_size,
        min_shards=min_shards,
        config=config,
        inputs={k: v for k, v in inputs.items()},
        models={},
        desc=f"pack {origin}",
    )


def write_noise_shards(
    out: str | os.PathLike,
    *,
    num: int,
    size: tuple[int, int],
    kind: str = "mixed",
    seed: int = 0,
    shard_size: int = 64,
    min_shards: int = 2,
) -> dict:
    """A shard set of ``num`` seeded random images of ``size`` (H, W); returns ``shardset.json``.

    Each image's generator is seeded by (seed, index), so any sample can be remade alone.
    """
    if kind not in NOISE_KINDS:
        raise D4IRError(f"`noise.kind` = {kind!r}: expected one of {list(NOISE_KINDS)}")
    if num < 1:
        raise D4IRError(f"`noise.samples` = {num}: expected >= 1")

    def loader(i: int) -> Any:
        return lambda: noise_image(kind, size, np.random.default_rng([seed, i]))

    samples = [
        _PackedSample(
            key=f"noise-{kind}-{i:06d}",
            meta={
                "origin": "noise",
                "source_id": None,
                "source_sha256": None,
                "weather": None,
                "noise": kind,
                "prompt_id": None,
                "strength": None,
                "guidance": None,
                "steps": None,
                "scheduler": None,
                "seed": [seed, i],
            },
            image=loader(i),
        )
        for i in range(num)
    ]
    config = {"kind": "noise", "noise": kind, "num": num, "size": list(size), "seed": seed}
    return _write_shardset(
        Path(out),
        samples,
        shard_size=shard_size,
        min_shards=min_shards,
        config=config,
        inputs={},
        models={},
        desc="noise",
    )
