"""Writing shard sets: reproducible tars (tmp -> fsync -> rename), rank listings and their merge."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from d4ir_pipeline.common.io import atomic_write_json, fsync_dir, read_json, sha256_file
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.shardset.format import RANK_MANIFEST, SHARDSET_NAME, ShardInfo, rank_files, read_listing

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
    files = rank_files(out)
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


def recorded_entries(out: Path) -> tuple[dict[int, list[tuple[dict, ShardInfo]]], set[str]]:
    """Every shard any manifest in ``out`` records, by index, as (raw entry, checked entry),
    and the config hashes seen."""
    by_index: dict[int, list[tuple[dict, ShardInfo]]] = {}
    hashes: set[str] = set()
    paths = list(rank_files(out).values()) + ([out / SHARDSET_NAME] if (out / SHARDSET_NAME).is_file() else [])
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


def all_ranks_done(out: Path, world: int, chash: str) -> bool:
    files = rank_files(out)
    for r in range(world):
        if r not in files:
            return False
        doc = read_json(files[r])
        if not doc.get("done") or doc.get("config_hash") != chash or doc.get("world_size") != world:
            return False
    return True
