"""Builders of small, valid stage artefacts for the tests and the benchmarks.

Each builder writes the documented on-disk layout, so a test or a benchmark exercises the
same loading code a real run does; nothing here is used by the pipeline itself:

- :func:`write_bank`: a prompt bank (``tokens.safetensors``, ``index.jsonl``, ``bank.json``)
  with random tokens, as ``d4ir prompt-bank`` writes it.
- :func:`randomised`: a registered model with every parameter random, for exports and benchmarks.
- :func:`make_shardset`: a stage-one shard set (``synth-r000-*.tar`` + ``shardset.json``)
  of smooth random images, through the same :class:`ShardSetWriter` as ``d4ir synthesize``;
  :func:`relist_shardset` makes its listing vouch for shards damaged afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d4ir_pipeline.common.images import encode_png
from d4ir_pipeline.common.io import atomic_write_json, sha256_bytes, sha256_file
from d4ir_pipeline.shardset.format import SHARDSET_KIND, SHARDSET_NAME, read_listing
from d4ir_pipeline.shardset.writer import ShardSetWriter
from d4ir_pipeline.stage1.prompt_bank import PromptBank


def write_bank(
    path: Path,
    *,
    k: int = 4,
    d: int = 32,
    per: int = 3,
    weathers: Sequence[str] = ("rain", "haze", "snow"),
    seed: int = 0,
) -> Path:
    """A prompt bank of ``per`` random (k, d) entries per weather under ``path`` (through PromptBank.write)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(per * len(weathers), k, d, generator=g)  # (N, K, D)
    rows = [
        {"id": f"web-degraded/{w}/p{j}", "sha256": f"{i:064x}", "weather": w}
        for i, (w, j) in enumerate((w, j) for w in weathers for j in range(per))
    ]
    meta = {"adapter_sha256": "0" * 64, "sd_model": "tiny", "created": "2024-01-01T00:00:00"}
    PromptBank.write(path, tokens, rows, meta=meta, weathers=list(weathers))
    return path


def randomised(name: str, seed: int = 0, *, residual_std: float = 0.1, norm_std: float = 0.0, **kwargs: Any):
    """Registered model ``name`` (eval mode, built with ``kwargs``) with every parameter random.

    A freshly built NAFNet has zero residual scales (``beta``, ``gamma``): each block is the
    identity, so a check or a timing on it would not see its norms or gates at all. Those
    scales are drawn from N(0, ``residual_std``); with ``norm_std`` > 0 the norms' weights and
    biases get N(0, ``norm_std``) noise added, in parameter order (so the draws, and the
    weights, depend only on ``name``, ``seed`` and the two spreads).
    """
    import torch

    from d4ir_pipeline.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("beta", "gamma")):
                p.normal_(0.0, residual_std)
            elif norm_std > 0 and "." in pname and pname.split(".")[-2].startswith("norm"):
                p.add_(torch.randn_like(p) * norm_std)
    return model


def relist_shardset(root: Path, *, complete: bool = True) -> Path:
    """Rewrite ``root/shardset.json`` with every listed shard's size and sha256 read from disk, and ``complete``.

    For reader tests: a listing that vouches for shards damaged after they were written
    (so verification passes and reading must cope), or that claims the set is unfinished.
    """
    path = root / SHARDSET_NAME
    doc, listed = read_listing(path, SHARDSET_KIND)
    for entry, info in zip(doc["shards"], listed, strict=True):
        entry["bytes"], entry["sha256"] = info.path.stat().st_size, sha256_file(info.path)
    atomic_write_json(path, {**doc, "complete": complete}, indent=None)
    return path


def make_shardset(
    root: Path,
    n_shards: int = 4,
    per: int = 8,
    size: int = 40,
    *,
    seed: int = 0,
    smooth: int = 4,
    noise: float = 0.0,
    compress_level: int = 6,
    clean: bool = True,
    bad_keys: Sequence[str] = (),
    weathers: Sequence[str] = ("rain",),
) -> Path:
    """A complete one-rank shard set written by the real shard-set writer (replacing what ``root`` held):
    ``{key}.json`` + ``{key}.degraded.png`` (+ ``{key}.clean.png``), keys ``k{shard:03d}-{j:04d}``.

    Images are (size // smooth)-pixel random images upsampled to ``size`` plus Gaussian
    ``noise``; keys in ``bad_keys`` get bytes that are not an image; sample ``j`` of a shard
    has weather ``weathers[j % len(weathers)]`` in its json. The config hash is
    that of the arguments, so two calls with other arguments make two different sets.
    """
    from PIL import Image

    args = dict(n_shards=n_shards, per=per, size=size, seed=seed, smooth=smooth, noise=noise)
    args |= {"compress_level": compress_level, "clean": clean, "bad_keys": sorted(bad_keys)}
    if tuple(weathers) != ("rain",):
        args["weathers"] = list(weathers)
    header = {"config": args, "config_hash": sha256_bytes(json.dumps(args, sort_keys=True).encode())}
    writer = ShardSetWriter(out=root, kind=SHARDSET_KIND, header=header, num_shards=n_shards)
    writer.open(overwrite=True)
    rng = np.random.default_rng(seed)
    for i in range(n_shards):
        for j in range(per):
            key = f"k{i:03d}-{j:04d}"
            small = rng.integers(0, 256, (max(1, size // smooth), max(1, size // smooth), 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
            if noise:
                arr = np.clip(arr + rng.normal(0, noise, arr.shape), 0, 255).astype(np.uint8)
            meta = {"key": key, "weather": weathers[j % len(weathers)], "width": size, "height": size}
            files = [
                ("json", json.dumps(meta).encode()),
                (
                    "degraded.png",
                    b"not a png at all" if key in bad_keys else encode_png(arr, compress_level=compress_level),
                ),
            ]
            if clean:
                files.append(("clean.png", encode_png(arr, compress_level=compress_level)))
            writer.write(key, files)
        writer.flush_shard(i)
    writer.finish()
    return root
