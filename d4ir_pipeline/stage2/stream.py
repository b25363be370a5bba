"""The training stream of stage two: shards -> (rank, worker) split -> shuffle -> crops -> batches."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4ir_pipeline.common.images import decode_rgb
from d4ir_pipeline.common.seeds import tuple_seed
from d4ir_pipeline.errors import BadImageError, D4IRError
from d4ir_pipeline.shardset.format import ShardInfo
from d4ir_pipeline.shardset.reader import ShardReadError, iter_tar

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("degraded.png", "degraded.jpg", "degraded.jpeg", "degraded.webp")


# ---------------------------------------------------------------------------------------
# reading shards (raw bytes; no decoding)


def is_holdout(key: str, fraction: float) -> bool:
    """Deterministic hold-out by key hash (independent of the shard layout)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


@dataclass
class Stats:
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


def _label_lookup(label_path: Path, label_ext: str) -> Callable[[str], bytes | None]:
    """The cached label of each sample key in turn (None: the key has none): label tars hold the shard's
    decodable samples in the shard's order, so one pass over both tars pairs them."""
    labels = iter_tar(label_path)
    pending: tuple[str, dict[str, bytes]] | None = None

    def label(key: str) -> bytes | None:
        nonlocal pending
        if pending is None:
            pending = next(labels, None)
        if pending is None or pending[0] != key:
            return None
        files, pending = pending[1], None
        return files.get(label_ext)

    return label


def shard_samples(shard: ShardInfo, label_path: Path | None, label_ext: str, stats: Stats) -> Iterator[dict]:
    """Raw samples of one shard (+ the cached label of each); damage is counted, never fatal."""
    got = 0
    last: str | None = None
    label = _label_lookup(label_path, label_ext) if label_path is not None else None
    try:
        for key, parts in iter_tar(shard.path):
            got += 1
            last = key
            sample = {"__key__": key, "__shard__": shard.name, **parts}
            if label is not None and (data := label(key)) is not None:
                sample["__label__"] = data
            yield sample
    except ShardReadError as e:
        stats.bad_sample(shard.name, e.key, f"corrupt or truncated tar {e.where} ({e.why})")
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
    random.Random(tuple_seed(spec.seed, epoch)).shuffle(order)
    node = islice(order, spec.rank, None, spec.world)  # split_by_node
    return list(islice(node, worker, None, spec.workers))  # split_by_worker


def _decode(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode + crop + flip one sample: uint8 (3, P, P) input and its cached target (or None)."""

    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
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
        t = decode_label(sample["__label__"], spec.label_ext, key)
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


def decode_label(data: bytes, ext: str, key: str) -> np.ndarray:
    if ext.endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadImageError("corrupt", f"{key}.{ext}: not a readable .npy ({e})") from e
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise BadImageError("corrupt", f"{key}.{ext}: shape {arr.shape}, expected (H, W, 3)")
        return arr

    img, _ = decode_rgb(data, name=f"{key}.{ext}")
    return np.asarray(img)


def sample_weather(sample: dict) -> str | None:
    """The ``weather`` recorded in a sample's ``json`` (stage one writes it), or None."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return None
    w = meta.get("weather") if isinstance(meta, dict) else None
    return w if isinstance(w, str) and w else None


def worker_batches(spec: StreamSpec, worker: int, epoch: int, index: int, stats: Stats) -> Iterator[dict]:
    """Infinite batches of one logical worker, starting at its cursor (epoch, index into the shuffled stream)."""
    import webdataset as wds

    label_dir = Path(spec.label_dir) if spec.label_dir else None
    xs: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    keys: list[str] = []
    weathers: list[str | None] = []
    while True:
        shards = epoch_shards(spec, epoch, worker)

        def raw(shards: list[ShardInfo] = shards) -> Iterator[dict]:
            for s in shards:
                lp = label_dir / s.name if label_dir is not None else None
                for sample in shard_samples(s, lp, spec.label_ext, stats):
                    if not is_holdout(sample["__key__"], spec.holdout):
                        yield sample

        rng_buf = random.Random(tuple_seed(spec.seed, epoch, spec.rank, worker, 1))
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
            weathers.append(sample_weather(sample))
            if t is not None:
                ts.append(t)
            if len(xs) == spec.batch_size:
                yield {
                    "x": torch.from_numpy(np.stack(xs)),  # (B, 3, P, P) uint8
                    "t": torch.from_numpy(np.stack(ts)) if ts else None,  # (B, 3, P, P) uint8 / float16
                    "keys": keys,
                    "weathers": weathers,  # from each sample's json (None: unknown); picks its teacher
                    "cursor": (worker, epoch, i + 1),
                    "stats": (worker, stats.good, stats.bad),
                }
                xs, ts, keys, weathers = [], [], [], []
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
        yield from worker_batches(self.spec, lw, epoch, index, Stats(good=good, bad=bad))


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
