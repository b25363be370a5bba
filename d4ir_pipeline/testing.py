"""Builders of small, valid stage artefacts for the tests and the benchmarks.

Each builder writes the documented on-disk layout, so a test or a benchmark exercises the
same loading code a real run does; nothing here is used by the pipeline itself:

- :func:`write_bank`: a prompt bank (``tokens.safetensors``, ``index.jsonl``, ``bank.json``)
  with random tokens, as ``d4ir prompt-bank`` writes it.
- :func:`make_shardset`: a stage-one shard set (``synth-r000-*.tar`` + ``shardset.json``)
  of smooth random images, as ``d4ir synthesize`` writes it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from d4ir_pipeline.common.io import atomic_write_json, atomic_write_jsonl, sha256_file
from d4ir_pipeline.stage1.prompt_bank import BANK_KIND


def png_bytes(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_bank(
    path: Path,
    *,
    k: int = 4,
    d: int = 32,
    per: int = 3,
    weathers: Sequence[str] = ("rain", "haze", "snow"),
    seed: int = 0,
) -> Path:
    """A prompt bank of ``per`` random (k, d) entries per weather under ``path``."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(per * len(weathers), k, d, generator=g)  # (N, K, D)
    rows = [
        {"row": i, "id": f"web-degraded/{w}/p{j}", "sha256": f"{i:064x}", "weather": w}
        for i, (w, j) in enumerate((w, j) for w in weathers for j in range(per))
    ]
    centroids = torch.stack([tokens[i * per : (i + 1) * per].mean(0) for i in range(len(weathers))])  # (W, K, D)
    save_file({"tokens": tokens.contiguous(), "centroids": centroids.contiguous()}, str(path / "tokens.safetensors"))
    atomic_write_jsonl(path / "index.jsonl", rows)
    meta = {
        "kind": BANK_KIND,
        "version": 1,
        "weathers": list(weathers),
        "K": k,
        "D": d,
        "adapter_sha256": "0" * 64,
        "sd_model": "tiny",
        "created": "2024-01-01T00:00:00",
    }
    atomic_write_json(path / "bank.json", meta)
    return path


def write_shardset_manifest(
    root: Path, names: Sequence[str], counts: Sequence[int], *, complete: bool = True, config_hash: str = "test"
) -> Path:
    """``shardset.json`` listing the tars ``names`` under ``root`` (sizes and hashes read from disk)."""

    shards = [
        {"name": n, "samples": int(c), "bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)}
        for n, c in zip(names, counts, strict=True)
    ]
    manifest = {
        "kind": "d4ir-shardset",
        "version": 1,
        "complete": complete,
        "shards": shards,
        "num_samples": int(sum(counts)),
        "config_hash": config_hash,
    }
    atomic_write_json(root / "shardset.json", manifest)
    return root / "shardset.json"


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
    config_hash: str = "test",
) -> Path:
    """A complete shard set like stage one writes: ``{key}.degraded.png`` + ``{key}.json``
    (+ ``{key}.clean.png``), keys ``k{shard:03d}-{j:04d}``.

    Images are (size // smooth)-pixel random images upsampled to ``size`` plus Gaussian
    ``noise``; keys in ``bad_keys`` get bytes that are not an image.
    """
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n_shards):
        name = f"synth-r000-{i:06d}.tar"
        with wds.TarWriter(str(root / name), mtime=0) as w:
            for j in range(per):
                key = f"k{i:03d}-{j:04d}"
                small = rng.integers(0, 256, (max(1, size // smooth), max(1, size // smooth), 3), dtype=np.uint8)
                arr = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
                if noise:
                    arr = np.clip(arr + rng.normal(0, noise, arr.shape), 0, 255).astype(np.uint8)
                meta = {"key": key, "weather": "rain", "width": size, "height": size}
                sample = {
                    "__key__": key,
                    "degraded.png": b"not a png at all" if key in bad_keys else png_bytes(arr, compress_level),
                    "json": json.dumps(meta).encode(),
                }
                if clean:
                    sample["clean.png"] = png_bytes(arr, compress_level)
                w.write(sample)
        names.append(name)
    write_shardset_manifest(root, names, [per] * n_shards, config_hash=config_hash)
    return root
