"""Stage one, part 2: CCD synthesis into webdataset shards (`d4ir synthesize`), plus
`d4ir shards verify` and `d4ir shards merge`.

Roles, in data-flow order: :func:`plan_shards` turns the web-clean manifest into a fixed
list of shards (a pure function of the manifest and config, the same on every rank);
ranks own the shards with ``index % world_size == rank``; a worker loads the SD pipeline
once and turns one shard's items into one tar (``synth-r{rank:03d}-{index:06d}.tar``),
written ``.tar.tmp`` -> fsync -> rename, then recorded in the rank's manifest
``shardset.r{rank:03d}.json`` (the commit point, rewritten atomically after every
shard). :func:`merge_shardset` unions the rank manifests into ``shardset.json``; a set is
complete only when every planned shard is listed. Rerunning the same command resumes:
recorded shards whose sha256 verifies are kept, everything else is redone; a different
config hash in the same folder is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np

from .ccd import CROPS, IMAGE_FORMATS, SampleDecision, decide_sample, encode_image, normalise_mix, prepare_image
from .cliutil import config_from_options, stage_options
from .config import config_hash, config_to_dict, opt
from .errors import BadImageError, D4IRError
from .io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json, resolve_under, sha256_file
from .runtime import DTYPES
from .sd import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)

__all__ = [
    "SynthesizeConfig",
    "SynthesizeResult",
    "ShardPlan",
    "WorkItem",
    "VerifyReport",
    "ShardSetError",
    "ShardInfo",
    "read_listing",
    "check_shard_file",
    "plan_shards",
    "shards_for_rank",
    "shard_name",
    "write_shard",
    "read_shard",
    "merge_shardset",
    "verify_shardset",
    "shard_urls",
    "dist_env",
    "stage",
    "synthesize_command",
    "shards_group",
]

SHARDSET_NAME = "shardset.json"
RANK_MANIFEST = "shardset.r{rank:03d}.json"
SHARD_RE = re.compile(r"^synth-r(\d{3})-(\d{6})\.tar$")
RANK_MANIFEST_RE = re.compile(r"^shardset\.r(\d{3})\.json$")
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
# Keys that change speed or memory but not which samples are drawn: left out of the config
# hash so a resume may use another batch size, GPU or attention kernel. The input paths are
# replaced by the hashes of what they hold (manifest bytes, bank tokens, UNet weights).
HASH_EXCLUDE = (
    "sd.model",
    "data.manifest",
    "data.root",
    "bank.dir",
    "output.dir",
    "runtime.device",
    "runtime.attention",
    "runtime.batch_size",
    "runtime.compile",
    "runtime.channels_last",
    "runtime.vae_slicing",
    "runtime.vae_tiling",
    "runtime.workers",
    "runtime.barrier_timeout_min",
)


# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class SDSection:
    """The Stable Diffusion model and sampler."""

    model: str = opt("{work}/tiny-sd", help="diffusers SD folder or hub id (the Makefile passes SD_MODEL here)")
    scheduler: str = opt(
        "DDIMScheduler", choices=SCHEDULERS, help="DDIM: deterministic for a seed, good at 20-50 steps"
    )
    text_encoder: bool = opt(
        True, help="CFG's unconditional branch = the empty prompt's embedding (needs text_encoder/); false = zeros"
    )


@dataclass(frozen=True)
class DataSection:
    """The clean web images and how they are cut to the SD resolution."""

    manifest: str = opt("{work}/data/manifests/web-clean.jsonl", help="image manifest (JSON Lines) of clean images")
    root: str = opt("{work}/data", help="folder the manifest's paths are relative to")
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

    dir: str = opt("{work}/bank", help="prompt-bank folder written by `d4ir prompt-bank`")
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

    dir: str = opt("{work}/shards", help="shard-set folder (local path; URLs such as pipe: are refused)")
    shard_size: int = opt(256, min=1, help="samples per shard: ~100 MB tars at 512 px PNG")
    format: str = opt("png", choices=tuple(IMAGE_FORMATS), help="degraded image format (png: lossless)")
    quality: int = opt(95, min=1, max=100, help="jpg / webp quality")
    keep_clean: bool = opt(False, help="also store the cropped clean image as {key}.clean.png")


@dataclass(frozen=True)
class RuntimeSection:
    """Speed and memory (left out of the config hash unless they change the samples)."""

    device: str = opt("auto", help="'auto' = cuda when available (cuda:LOCAL_RANK under torchrun), else cpu")
    dtype: str = opt("float16", choices=DTYPES, help="half on CUDA; the CPU uses float32")
    attention: str = opt("sdpa", choices=ATTENTION_BACKENDS, help="PyTorch SDPA; xformers when installed")
    batch_size: int = opt(8, min=1, help="images per UNet call (the UNet sees 2x with CFG)")
    compile: bool = opt(False, help="torch.compile the UNet (slow first batches; for long GPU runs)")
    channels_last: bool = opt(False, help="channels_last memory format for UNet and VAE (often faster on GPUs)")
    vae_slicing: bool = opt(False, help="VAE one image at a time: less memory at large batch sizes")
    vae_tiling: bool = opt(False, help="VAE in tiles: less memory at large resolutions")
    vae_fp32: bool = opt(False, help="keep the VAE in float32 (fp16 SD VAEs can overflow to NaN)")
    workers: int = opt(4, min=1, max=64, help="threads decoding clean images and encoding outputs")
    barrier_timeout_min: int = opt(240, min=1, help="how long ranks wait for each other at the end (torchrun)")


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


def shard_name(rank: int, index: int) -> str:
    """``synth-r{rank:03d}-{index:06d}.tar``."""
    return f"synth-r{rank:03d}-{index:06d}.tar"


def plan_shards(record_ids: Sequence[str], *, shard_size: int, samples_per_image: int = 1) -> list[ShardPlan]:
    """Cut records (already in their final order) into shards of whole records.

    All variants of a record go in one shard, so a bad image is skipped (and counted)
    once; a shard holds ``max(1, shard_size // samples_per_image)`` records.
    """
    from .ccd import sample_key

    per = max(1, shard_size // samples_per_image)
    plans, keys = [], set()
    for index, start in enumerate(range(0, len(record_ids), per)):
        items = []
        for r in range(start, min(start + per, len(record_ids))):
            for v in range(samples_per_image):
                key = sample_key(record_ids[r], v)
                if key in keys:  # only possible for duplicate ids, which load_manifest refuses
                    raise D4IRError(f"sample key {key!r} occurs twice (record id {record_ids[r]!r})")
                keys.add(key)
                items.append(WorkItem(key, r, v))
        plans.append(ShardPlan(index, tuple(items)))
    return plans


def shards_for_rank(plans: Sequence[ShardPlan], rank: int, world_size: int) -> list[ShardPlan]:
    """The shards ``rank`` owns: every ``world_size``-th one, starting at ``rank``."""
    return [p for p in plans if p.index % world_size == rank]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise D4IRError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from e
    if world < 1 or not 0 <= rank < world:
        raise D4IRError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


# ---------------------------------------------------------------------------------------
# writing and reading tars


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Sequence[tuple[str, bytes]]]]) -> tuple[int, str]:
    """Write a reproducible tar (mtime 0, uid/gid 0, no owner names) via ``.tmp`` -> fsync -> rename.

    ``samples`` yields ``(key, [(ext, bytes), ...])``; a sample's files stay adjacent, as
    webdataset requires. Returns (byte size, sha256) of the file on disk.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for key, files in samples:
                    for ext, data in files:
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size, sha256_file(path)


def read_shard(path: str | os.PathLike) -> dict[str, dict[str, bytes]]:
    """Read a shard with plain ``tarfile``: key -> {ext: bytes}; a repeated file is an error."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                raise D4IRError(f"{path}: member {m.name!r} is not a regular file")
            name = m.name
            if "/" in name or "." not in name:
                raise D4IRError(f"{path}: member {name!r} is not `key.ext`")
            key, ext = name.split(".", 1)
            f = tar.extractfile(m)
            assert f is not None, m.name
            if ext in out.setdefault(key, {}):
                raise D4IRError(f"{path}: {name!r} occurs twice")
            out[key][ext] = f.read()
    return out


class ShardSetError(D4IRError):
    """A shard set (or label cache) that is missing, incomplete, malformed or fails verification."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as a listing (shardset.json, a rank manifest, a label cache's labels.json) records it."""

    name: str
    path: Path  # the file, resolved under the listing's folder
    samples: int
    bytes: int
    sha256: str


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not SHARD_RE.match(name):
        raise ShardSetError(f"{where}: shard name {name!r} is not synth-rNNN-NNNNNN.tar; refusing it")
    return name


def check_output_dir(path: str) -> Path:
    """The shard-set folder: a local path; URLs (``pipe:``, ``s3://``, ...) are refused."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", path) and not re.match(r"^[A-Za-z]:[\\/]", path):
        raise D4IRError(
            f"`output.dir` = {path!r} is a URL; synthesis writes to a local folder only (pipe: is never run). "
            "Write locally, then copy the folder"
        )
    return Path(path)


def shard_urls(root: str | os.PathLike, *, base: str | None = None, allow_pipe: bool = False) -> list[str]:
    """URLs of the shards listed in ``root/shardset.json``, for a webdataset reader.

    By default local paths under ``root``. ``base`` (e.g. ``'pipe:aws s3 cp s3://b/{name} -'``)
    maps each listed name to a URL; ``pipe:`` runs a shell command, so it is refused
    unless ``allow_pipe``. Names are checked, so none can escape ``root``.
    """
    _, listed = read_listing(Path(root) / SHARDSET_NAME, "d4ir-shardset")
    names = [s.name for s in listed]
    if base is None:
        return [str(s.path) for s in listed]
    if base.startswith("pipe:") and not allow_pipe:
        raise D4IRError(
            f"shard base URL {base!r} starts with 'pipe:' (a shell command); pass allow_pipe=True to run it"
        )
    if "{name}" not in base:
        raise D4IRError(f"shard base URL {base!r} must contain '{{name}}'")
    return [base.replace("{name}", n) for n in names]


# ---------------------------------------------------------------------------------------
# manifests: per-rank commit points, merged into shardset.json


def read_listing(path: str | os.PathLike, kind: str) -> tuple[dict, list[ShardInfo]]:
    """Read a shard listing and check its form; the one reader of every manifest of shards.

    ``kind`` is ``d4ir-shardset`` (shardset.json), ``d4ir-shardset-rank`` (a rank's commit
    point) or ``d4ir-labels`` (distill's label cache). Every ``shards`` entry must be an
    object with a synth-rNNN-NNNNNN.tar name (so none escapes the folder), samples, bytes
    and sha256. Returns the raw document (callers read their own extra keys) and the
    entries resolved under the listing's folder; raises :class:`ShardSetError`. Files are
    not touched: :func:`check_shard_file` checks them.
    """
    path = Path(path)
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise ShardSetError(f"{path}: cannot read the shard-set manifest ({e})") from e
    if not isinstance(doc, dict) or doc.get("kind") != kind or not isinstance(doc.get("shards"), list):
        raise ShardSetError(
            f"{path}: not a {kind} manifest (`kind` = {doc.get('kind') if isinstance(doc, dict) else None!r})"
        )
    listed = []
    for i, s in enumerate(doc["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict):
            raise ShardSetError(f"{where} is not an object")
        name = _check_name(s.get("name"), where)
        try:
            n, size, sha = int(s["samples"]), int(s["bytes"]), str(s["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardSetError(f"{where} = {s!r:.120}: expected name, samples, bytes, sha256") from e
        try:
            file = resolve_under(path.parent, name, what="shard name")
        except ValueError as e:
            raise ShardSetError(f"{where}: {e}") from e
        listed.append(ShardInfo(name=name, path=file, samples=n, bytes=size, sha256=sha))
    return doc, listed


def check_shard_file(shard: ShardInfo, *, full: bool = True) -> str | None:
    """What is wrong with a listed shard's file, as ``'name: why'``, or None when it matches.

    Existence and byte count always (cheap: a stat); with ``full`` also the sha256, which
    reads the whole file.
    """
    if not shard.path.is_file():
        return f"{shard.name}: missing"
    size = shard.path.stat().st_size
    if size != shard.bytes:
        return f"{shard.name}: {size} bytes, listed {shard.bytes}"
    if full and sha256_file(shard.path) != shard.sha256:
        return f"{shard.name}: sha256 differs from the listed {shard.sha256[:12]}..."
    return None


def _rank_files(out: Path) -> dict[int, Path]:
    found = {}
    if out.is_dir():
        for p in out.iterdir():
            m = RANK_MANIFEST_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _sum_counts(entries: Iterable[dict], key: str) -> dict[str, int]:
    total: Counter = Counter()
    for e in entries:
        total.update(e.get(key, {}))
    return dict(sorted(total.items()))


def merge_shardset(out_dir: str | os.PathLike, *, cleanup: bool = True) -> dict:
    """Union the rank manifests of ``out_dir`` into ``shardset.json`` (written atomically).

    The world size is rank 0's; every rank file must carry the same config hash. The set
    is complete when every rank finished and every planned shard is listed. With
    ``cleanup``, a complete merge removes rank files of ranks >= the world size (stale
    files of an earlier, wider run, whose shards rank 0 re-recorded).
    """
    out = Path(out_dir)
    files = _rank_files(out)
    if 0 not in files:
        raise D4IRError(f"{out}: no {RANK_MANIFEST.format(rank=0)}; nothing to merge (has synthesis started here?)")
    head, _ = read_listing(files[0], "d4ir-shardset-rank")
    world = int(head["world_size"])
    docs, missing, unfinished = [head], [], []
    for r in range(1, world):
        if r not in files:
            missing.append(r)
            continue
        doc, _ = read_listing(files[r], "d4ir-shardset-rank")
        if doc.get("config_hash") != head.get("config_hash") or int(doc.get("world_size", -1)) != world:
            missing.append(r)  # a stale file of another run; this rank has not written yet
            continue
        docs.append(doc)
    unfinished = [int(d["rank"]) for d in docs if not d.get("done")]
    shards: dict[int, dict] = {}
    for d in docs:
        for s in d["shards"]:
            if int(s["index"]) in shards:
                raise D4IRError(f"{out}: shard index {s['index']} is listed by two ranks; rerun with --overwrite")
            shards[int(s["index"])] = s
    planned = int(head["num_shards_planned"])
    complete = not missing and not unfinished and len(shards) == planned
    entries = [shards[i] for i in sorted(shards)]
    manifest = {
        "kind": "d4ir-shardset",
        "version": 1,
        "complete": complete,
        "shards": entries,
        "num_samples": sum(int(s["samples"]) for s in entries),
        "num_shards": len(entries),
        "num_shards_planned": planned,
        "world_size": world,
        "skipped": _sum_counts(entries, "skipped"),
        "dropped": _sum_counts(entries, "dropped"),
        **{k: head[k] for k in ("config", "config_hash", "inputs", "models", "versions", "runtime") if k in head},
    }
    if missing or unfinished:
        manifest["pending_ranks"] = sorted(set(missing) | set(unfinished))
    atomic_write_json(out / SHARDSET_NAME, manifest, indent=None)
    if complete and cleanup:
        for r, p in files.items():
            if r >= world:
                p.unlink(missing_ok=True)
    return manifest


def _recorded_entries(out: Path) -> tuple[dict[int, list[tuple[dict, ShardInfo]]], set[str]]:
    """Every shard any manifest in ``out`` records, by index, as (raw entry, checked entry),
    and the config hashes seen."""
    by_index: dict[int, list[tuple[dict, ShardInfo]]] = {}
    hashes: set[str] = set()
    paths = list(_rank_files(out).values()) + ([out / SHARDSET_NAME] if (out / SHARDSET_NAME).is_file() else [])
    for p in paths:
        kind = "d4ir-shardset" if p.name == SHARDSET_NAME else "d4ir-shardset-rank"
        doc, listed = read_listing(p, kind)
        hashes.add(str(doc.get("config_hash")))
        for s, info in zip(doc["shards"], listed, strict=True):
            cands = by_index.setdefault(int(s["index"]), [])
            # a merged shardset.json repeats the rank manifests' entries: one candidate each, hashed once
            if all((i.name, i.bytes, i.sha256) != (info.name, info.bytes, info.sha256) for _, i in cands):
                cands.append((s, info))
    return by_index, hashes


# ---------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    """What ``d4ir shards verify`` found; ``ok`` when nothing is damaged."""

    root: Path
    complete: bool
    shards: int = 0
    samples: int = 0
    damaged: list[str] = field(default_factory=list)  # "name: why"
    unlisted: list[str] = field(default_factory=list)  # synth-*.tar files no manifest lists
    leftovers: list[str] = field(default_factory=list)  # *.tar.tmp of an interrupted write

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_shardset(root: str | os.PathLike, *, deep: bool = True) -> VerifyReport:
    """Re-hash every listed shard; with ``deep`` also read it: sample count, unique keys, files per sample."""
    from tqdm import tqdm

    root = Path(root)
    doc, listed = read_listing(root / SHARDSET_NAME, "d4ir-shardset")
    report = VerifyReport(root=root, complete=bool(doc.get("complete")), shards=len(listed))
    seen_keys: dict[str, str] = {}
    for s in tqdm(listed, desc="verify", unit="shard", disable=len(listed) < 8):
        problem = check_shard_file(s)
        if problem:
            report.damaged.append(problem)
            continue
        if deep:
            try:
                samples = read_shard(s.path)
            except (tarfile.TarError, D4IRError, OSError) as e:
                report.damaged.append(f"{s.name}: unreadable tar ({e})")
                continue
            if len(samples) != s.samples:
                report.damaged.append(f"{s.name}: {len(samples)} samples, listed {s.samples}")
            for key, files in samples.items():
                if "json" not in files or not any(ext.startswith("degraded.") for ext in files):
                    report.damaged.append(f"{s.name}: sample {key!r} lacks .json or .degraded.*")
                if key in seen_keys:
                    report.damaged.append(f"{s.name}: key {key!r} also in {seen_keys[key]}")
                seen_keys[key] = s.name
        report.samples += s.samples
    names = {s.name for s in listed}
    for p in sorted(root.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in names:
            report.unlisted.append(p.name)
        elif p.name.endswith(".tar.tmp"):
            report.leftovers.append(p.name)
    return report


# ---------------------------------------------------------------------------------------
# the stage


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

    from .prompts import PromptBank

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
    from .manifests import load_manifest
    from .runtime import package_versions
    from .sd import check_sd_source, model_id, text_hidden_size

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
    ident = {"config": config_hash(cfg, exclude=HASH_EXCLUDE), "inputs": inputs, "sd": models["sd"]}
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


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _open_output(ctx: _Context, rank: int, world: int, overwrite: bool) -> dict[int, list[tuple[dict, ShardInfo]]]:
    """Refuse another config's shard set (unless ``overwrite``); return recorded (entry, checked entry) by index."""
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        mine = re.compile(rf"^synth-r{rank:03d}-\d{{6}}\.tar(\.tmp)?$")
        for p in out.iterdir():
            m_rank = RANK_MANIFEST_RE.match(p.name)
            m_shard = re.match(r"^synth-r(\d{3})-\d{6}\.tar(\.tmp)?$", p.name)
            if (
                mine.match(p.name)
                or (m_rank and (int(m_rank.group(1)) == rank or (rank == 0 and int(m_rank.group(1)) >= world)))
                or (rank == 0 and m_shard and int(m_shard.group(1)) >= world)
                or (rank == 0 and p.name == SHARDSET_NAME)
            ):
                p.unlink()
        logger.info("--overwrite: removed rank %d's earlier shards and manifests in %s", rank, out)
        return {}
    by_index, hashes = _recorded_entries(out)
    other = hashes - {ctx.config_hash}
    if other:
        old_cfg = {}
        for p in [out / SHARDSET_NAME, *_rank_files(out).values()]:
            if p.is_file():
                old_cfg = read_json(p).get("config", {})
                break
        diff = _config_diff(old_cfg, ctx.header["config"]) or ["(inputs: manifest, bank or SD weights)"]
        raise D4IRError(
            f"`output.dir` = {str(out)!r} holds a shard set made with another config (hash {sorted(other)[0][:12]}..., "
            f"this run {ctx.config_hash[:12]}...; differing: {', '.join(diff[:8])}). Mixing them is refused: use a "
            "new output.dir, or --overwrite to replace it"
        )
    return by_index


def _rank_doc(ctx: _Context, rank: int, world: int, owned: Sequence[ShardPlan], entries: dict[int, dict], done: bool):
    return {
        "kind": "d4ir-shardset-rank",
        "version": 1,
        "rank": rank,
        "world_size": world,
        "done": done,
        "num_shards_planned": len(ctx.plans),
        "owned": len(owned),
        "shards": [entries[i] for i in sorted(entries)],
        **ctx.header,
    }


def _append_metrics(out: Path, row: dict) -> None:
    """One JSON line in metrics.jsonl; a single O_APPEND write, safe with several ranks."""
    fd = os.open(out / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


class _Worker:
    """Loads SD once; turns one shard plan into one tar's samples."""

    def __init__(self, ctx: _Context, device, pool: ThreadPoolExecutor):
        from .ccd import CCD, configure_pipeline
        from .runtime import pick_dtype
        from .sd import load_img2img_pipeline, unconditional_embeds

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
        from .manifests import open_rgb

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
        from .ccd import CCDInput, sample_seed

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
            (f"degraded.{fmt}", encode_image(out.image, fmt, cfg.output.quality)),
        ]
        if cfg.output.keep_clean:
            files.append(("clean.png", encode_image(clean, "png")))
        return files


def _init_dist(world: int, timeout_min: int):
    """A gloo process group for the barriers (torchrun sets MASTER_ADDR): (module, created here) or (None, False)."""
    if world <= 1 or not os.environ.get("MASTER_ADDR"):
        return None, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist, False
    # gloo even on GPUs: only barriers cross ranks, and NCCL's watchdog would kill a long wait
    dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    return dist, True


def _pick_device(name: str, world: int, local_rank: int):
    import torch

    from .runtime import pick_device

    device = pick_device(name)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class _MaxPixels:
    """Set Pillow's decompression-bomb limit for the stage, restore it afterwards."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        from PIL import Image

        self.old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = self.limit

    def __exit__(self, *exc):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self.old


def stage(
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
    from tqdm import tqdm

    t0 = time.perf_counter()
    rank, world, local_rank = dist_env()
    # 1. check every input (SD folder, bank width, manifest) before any work
    ctx = _prepare(cfg)
    if only:
        return _only(ctx, list(only), only_out, t0, rank, world, local_rank)
    dist, own_group = _init_dist(world, cfg.runtime.barrier_timeout_min)
    owned = shards_for_rank(ctx.plans, rank, world)
    # 2. the output folder: refuse another config; what is recorded and still verifies is kept
    recorded = _open_output(ctx, rank, world, overwrite)
    if dist is not None:
        dist.barrier()  # every rank has read the old manifests before any rank rewrites its own
    for p in ctx.out.glob(f"synth-r{rank:03d}-*.tar.tmp"):
        p.unlink()  # a write interrupted by a crash: never recorded
    entries: dict[int, dict] = {}
    with ThreadPoolExecutor(cfg.runtime.workers) as pool:
        checks = {
            p.index: [(e, info, pool.submit(check_shard_file, info)) for e, info in recorded.get(p.index, [])]
            for p in owned
        }
        for index, cands in checks.items():
            for e, _, fut in cands:
                if fut.result() is None:
                    entries[index] = e
                    break
                logger.warning("recorded shard %s fails verification (%s): redoing it", e["name"], fut.result())
        todo = [p for p in owned if p.index not in entries]
        for p in todo:  # damaged recorded files of redone shards: remove, so no stale tar lingers
            for _, info, _ in checks[p.index]:
                info.path.unlink(missing_ok=True)
        reused = len(entries)
        logger.info(
            "rank %d/%d: %d shards owned, %d already done, %d to make in %s",
            rank,
            world,
            len(owned),
            reused,
            len(todo),
            ctx.out,
        )
        rank_path = ctx.out / RANK_MANIFEST.format(rank=rank)
        atomic_write_json(rank_path, _rank_doc(ctx, rank, world, owned, entries, done=not todo), indent=None)
        skipped: Counter = Counter()
        dropped: Counter = Counter()
        written = n_samples = 0
        t_work = time.perf_counter()
        # 3. synthesise: one shard at a time, the next shard's images load meanwhile
        if todo:
            with _MaxPixels(cfg.data.max_pixels):
                device = _pick_device(cfg.runtime.device, world, local_rank)
                worker = _Worker(ctx, device, pool)
                ctx.header["runtime"] = worker.runtime
                nxt = worker.load(todo[0])
                for i, plan in enumerate(tqdm(todo, desc=f"synthesize r{rank}", unit="shard", position=rank)):
                    loads, nxt = nxt, (worker.load(todo[i + 1]) if i + 1 < len(todo) else None)
                    ts = time.perf_counter()
                    samples, sk, dr = worker.make(plan, loads)
                    name = plan.name(rank)
                    size, sha = write_shard(ctx.out / name, samples)
                    entries[plan.index] = {
                        "name": name,
                        "index": plan.index,
                        "rank": rank,
                        "samples": len(samples),
                        "bytes": size,
                        "sha256": sha,
                        "skipped": dict(sorted(sk.items())),
                        "dropped": dict(sorted(dr.items())),
                    }
                    last = i + 1 == len(todo)
                    atomic_write_json(rank_path, _rank_doc(ctx, rank, world, owned, entries, done=last), indent=None)
                    if world == 1:
                        merge_shardset(ctx.out)  # the set's manifest, one shard further
                    dt = time.perf_counter() - ts
                    _append_metrics(
                        ctx.out,
                        {
                            "rank": rank,
                            "shard": name,
                            "samples": len(samples),
                            "seconds": round(dt, 3),
                            "images_per_s": round(len(samples) / dt, 3) if dt > 0 else None,
                        },
                    )
                    written += 1
                    n_samples += len(samples)
                    skipped.update(sk)
                    dropped.update(dr)
        work_s = time.perf_counter() - t_work
    # 4. merge: rank 0 after a barrier under torchrun; otherwise whichever rank sees all done
    manifest_path, complete = None, None
    if dist is not None:
        dist.barrier()
        if rank == 0:
            merge_shardset(ctx.out)
        dist.barrier()
        manifest_path = ctx.out / SHARDSET_NAME
        complete = bool(read_json(manifest_path).get("complete"))
        if own_group:
            dist.destroy_process_group()
    elif world == 1 or _all_ranks_done(ctx.out, world, ctx.config_hash):
        complete = merge_shardset(ctx.out)["complete"]
        manifest_path = ctx.out / SHARDSET_NAME
    else:
        logger.info("rank %d done; after every rank finishes run `d4ir shards merge %s`", rank, ctx.out)
    if complete is False:
        logger.warning("the shard set in %s is not complete yet: rerun the same command to finish it", ctx.out)
    return SynthesizeResult(
        out_dir=ctx.out,
        manifest=manifest_path,
        rank=rank,
        world_size=world,
        shards_planned=len(owned),
        shards_written=written,
        shards_reused=reused,
        samples_written=n_samples,
        skipped=dict(sorted(skipped.items())),
        dropped=dict(sorted(dropped.items())),
        complete=complete,
        seconds=time.perf_counter() - t0,
        images_per_s=n_samples / work_s if work_s > 0 and n_samples else 0.0,
    )


def _all_ranks_done(out: Path, world: int, chash: str) -> bool:
    files = _rank_files(out)
    for r in range(world):
        if r not in files:
            return False
        doc = read_json(files[r])
        if not doc.get("done") or doc.get("config_hash") != chash or doc.get("world_size") != world:
            return False
    return True


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
    with ThreadPoolExecutor(1) as pool, _MaxPixels(ctx.cfg.data.max_pixels):
        worker = _Worker(ctx, _pick_device(ctx.cfg.runtime.device, 1, local_rank), pool)
        for key in keys:
            single = ShardPlan(-1, (by_key[key],))
            samples, sk, dr = worker.make(single, worker.load(single))
            if not samples:
                logger.warning("sample %s was not produced: skipped %s, dropped %s", key, dict(sk), dict(dr))
            skipped.update(sk)
            dropped.update(dr)
            for k, files in samples:
                for ext, data in files:
                    written.append(atomic_write_bytes(dest / f"{k}.{ext}", data))
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


@click.command("synthesize")
@stage_options
@click.option("--overwrite", is_flag=True, help="Replace a shard set made with another config in output.dir.")
@click.option("--only", "only", multiple=True, metavar="KEY", help="Regenerate just this sample (repeatable).")
@click.option(
    "--only-out", type=click.Path(file_okay=False), default=None, help="Folder for --only (default {output.dir}/only)."
)
def synthesize_command(profile, config_path, overrides, work_dir, overwrite, only, only_out) -> None:
    """Stage one: CCD synthesis of degraded images into webdataset shards (resumable; torchrun-aware)."""
    cfg = config_from_options(
        SynthesizeConfig, "synthesize", profile=profile, config_path=config_path, overrides=overrides, work_dir=work_dir
    )
    res = stage(cfg, overwrite=overwrite, only=only, only_out=only_out)
    if only:
        click.echo(f"regenerated {res.samples_written} sample(s): " + ", ".join(str(p) for p in res.only))
        return
    state = {True: "complete", False: "INCOMPLETE", None: "rank done (merge pending)"}[res.complete]
    click.echo(
        f"rank {res.rank}/{res.world_size}: {res.shards_written} shards written, {res.shards_reused} reused, "
        f"{res.samples_written} samples ({res.images_per_s:.2f} images/s); skipped {res.skipped or 0}, "
        f"dropped {res.dropped or 0}; shard set {state}: {res.out_dir}"
    )


@click.group("shards")
def shards_group() -> None:
    """Verify or merge a shard set."""


@shards_group.command("verify")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--quick", is_flag=True, help="Only hash the files; do not open the tars.")
def verify_command(directory: str, quick: bool) -> None:
    """Re-hash every shard listed in DIRECTORY/shardset.json and report damage (exit 1 if any)."""
    rep = verify_shardset(directory, deep=not quick)
    for line in rep.damaged:
        click.echo(f"DAMAGED {line}")
    for name in rep.unlisted:
        click.echo(f"unlisted {name} (not in the manifest; stage two ignores it)")
    for name in rep.leftovers:
        click.echo(f"leftover {name} (an interrupted write; the next run removes it)")
    state = "complete" if rep.complete else "INCOMPLETE"
    click.echo(f"{rep.shards} shards, {rep.samples} samples, {len(rep.damaged)} damaged; set {state}")
    if not rep.ok:
        click.echo("rerun the synthesize command that wrote it: damaged shards are redone", err=True)
        raise SystemExit(1)
    if not rep.complete:
        raise SystemExit(1)


@shards_group.command("merge")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
def merge_command(directory: str) -> None:
    """Merge the per-rank manifests of DIRECTORY into shardset.json (after every rank finished)."""
    doc = merge_shardset(directory)
    click.echo(
        f"{doc['num_shards']}/{doc['num_shards_planned']} shards, {doc['num_samples']} samples; "
        + ("complete" if doc["complete"] else f"INCOMPLETE (pending ranks {doc.get('pending_ranks')})")
    )
    if not doc["complete"]:
        raise SystemExit(1)
