"""The teacher-target cache (`d4ir label`): the teacher runs once over a shard set, later students reuse it."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from d4ir_pipeline.cli import stage_command
from d4ir_pipeline.common.images import decode_rgb, encode_png
from d4ir_pipeline.common.runtime import package_versions, pick_device
from d4ir_pipeline.errors import BadImageError
from d4ir_pipeline.shardset.format import LABELS_KIND, LABELS_NAME, ShardInfo, ShardSetError, read_listing
from d4ir_pipeline.shardset.reader import ShardSet, open_shardset, verify_files
from d4ir_pipeline.shardset.writer import ShardSetWriter
from d4ir_pipeline.stage2.config import DistillConfig
from d4ir_pipeline.stage2.stream import IMAGE_EXTS, Stats, sample_weather, shard_samples
from d4ir_pipeline.stage2.teacher import Teachers, teacher_identity

logger = logging.getLogger(__name__)

LABEL_EXT = {"png": "teacher.png", "npy": "teacher.npy"}


@dataclass
class LabelResult:
    """What `d4ir label` produced."""

    labels_dir: Path
    teacher_id: str
    shards: int
    samples: int
    skipped: int
    seconds: float


# ---------------------------------------------------------------------------------------
# label cache


def labels_folder(cfg: DistillConfig, shardset: ShardSet, tid: str) -> Path:
    return Path(cfg.labels.dir) if cfg.labels.dir else shardset.root / "labels" / tid


def find_labels(cfg: DistillConfig, shardset: ShardSet, ident: dict) -> Path | None:
    """A complete label cache for this teacher and shard set, verified per `data.verify`, or None."""
    d = labels_folder(cfg, shardset, ident["id"])
    doc_path = d / LABELS_NAME
    if not doc_path.is_file():
        return None
    doc, shards = read_listing(doc_path, LABELS_KIND)
    why = None
    if doc.get("complete") is not True:
        why = "incomplete (rerun `d4ir label` to finish it)"
    elif doc.get("teacher", {}).get("id") != ident["id"]:
        why = f"made by teacher {doc.get('teacher', {}).get('id')}, not {ident['id']}"
    elif doc.get("shardset_sha256") != shardset.manifest_sha256:
        why = "made for another version of the shard set"
    elif doc.get("format") != cfg.labels.format:
        why = f"format {doc.get('format')!r}, config asks {cfg.labels.format!r}"
    if why:
        logger.info("label cache %s not used: %s", d, why)
        return None
    if cfg.data.verify != "off":
        verify_files(shards, cfg.data.verify, str(doc_path))
    if sorted(s.name for s in shards) != sorted(s.name for s in shardset.shards):
        raise ShardSetError(f"{doc_path}: its shards differ from the shard set's; rebuild it with `d4ir label`")
    return d


def _encode_label(t: Any, fmt: str) -> bytes:
    """float (3, H, W) in [0, 1] -> PNG (8-bit) or .npy (float16 HWC) bytes."""
    hwc = t.permute(1, 2, 0).cpu()
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, hwc.numpy().astype(np.float16), allow_pickle=False)
        return buf.getvalue()
    arr = (hwc * 255.0).round_().clamp_(0, 255).to(dtype=torch.uint8).numpy()
    return encode_png(arr, compress_level=1)  # labels are read once per epoch: fast over small


def _label_shard(cfg: DistillConfig, shard: ShardInfo, teachers: Teachers, writer: ShardSetWriter, ext: str) -> int:
    """The teacher's output of every decodable sample of ``shard`` into the writer; returns the skipped count.

    Neighbouring samples of one size go through the teacher together (up to ``labels.batch_size``).
    """
    stats = Stats()
    group: list[tuple[str, np.ndarray, str | None]] = []  # (key, (H, W, 3) uint8, weather)

    def flush() -> None:
        if not group:
            return
        x = torch.from_numpy(np.stack([a for _, a, _ in group])).to(teachers.device).permute(0, 3, 1, 2)
        y = teachers(x.float() / 255.0, [w for _, _, w in group])  # (B, 3, H, W)
        for (key, _, _), yi in zip(group, y, strict=True):
            writer.write(key, [(ext, _encode_label(yi, cfg.labels.format))])
        group.clear()

    for sample in shard_samples(shard, None, ext, stats):
        key = sample["__key__"]
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            if img_ext is None:
                raise BadImageError("missing", "no degraded image in the sample")
            arr = np.asarray(decode_rgb(sample[img_ext], name=f"{key}.{img_ext}")[0])  # (H, W, 3)
        except BadImageError as e:
            stats.bad_sample(shard.name, key, f"{e.reason}: {e}")
            continue
        if group and (group[0][1].shape != arr.shape or len(group) >= cfg.labels.batch_size):
            flush()
        group.append((key, arr, sample_weather(sample)))
    flush()
    return stats.bad


def label(cfg: DistillConfig) -> LabelResult:
    """Run the teacher once over every sample of the shard set and cache its outputs next to the shards."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    # 1. inputs: verified shard set, teacher identity, cache folder
    shardset = open_shardset(cfg.data.shards, verify=cfg.data.verify)
    ident = teacher_identity(cfg.teacher)
    out = labels_folder(cfg, shardset, ident["id"])
    ext = LABEL_EXT[cfg.labels.format]
    header = {
        "teacher": ident,
        "shardset": str(shardset.root),
        "shardset_sha256": shardset.manifest_sha256,
        "format": cfg.labels.format,
        "skipped": 0,
        "versions": package_versions(),
    }
    writer = ShardSetWriter(
        out=out,
        kind=LABELS_KIND,
        header=header,
        num_shards=len(shardset.shards),
        names=[s.name for s in shardset.shards],
        identity=("teacher.id", "shardset_sha256", "format"),
        carry=("skipped",),
        where=str(out / LABELS_NAME),
        hint="remove the folder to label again (a shardset_sha256 that differs means the shard set was re-made "
        "or re-merged since), or set `labels.dir`",
    )
    # 2. resume: shards already written for the same teacher, shard set and format that verify are kept
    todo = writer.open()
    if not todo:
        doc = writer.finish()
        logger.info("label cache %s is complete", out)
        return LabelResult(
            out, ident["id"], len(doc["shards"]), sum(s["samples"] for s in doc["shards"]), doc["skipped"], 0.0
        )
    # 3. teacher(s): each sample's weather picks its teacher
    teachers = Teachers(cfg.teacher, pick_device(cfg.runtime.device))
    total = 0
    for index in tqdm(todo, desc="label", unit="shard", disable=not cfg.log.progress):
        skipped = _label_shard(cfg, shardset.shards[index], teachers, writer, ext)
        writer.header["skipped"] = int(writer.header["skipped"]) + skipped
        total += writer.flush_shard(index)["samples"]  # progress: finished shards survive an interrupt
    doc = writer.finish()
    secs = time.perf_counter() - t0
    logger.info("labelled %d samples in %d shards -> %s (%.1fs)", total, len(todo), out, secs)
    return LabelResult(
        out, ident["id"], len(doc["shards"]), sum(s["samples"] for s in doc["shards"]), int(doc["skipped"]), secs
    )


@stage_command("label", DistillConfig, "distill")
def label_command(cfg: DistillConfig) -> None:
    """Cache the teacher's outputs next to a shard set (reads the distill config)."""
    r = label(cfg)
    click.echo(
        f"labels: {r.labels_dir}  teacher {r.teacher_id}  {r.samples} samples in {r.shards} shards  skipped {r.skipped}"
    )
