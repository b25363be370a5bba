"""The shard-set contract between the stages: names, kinds, the listing reader, file checks, verify."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d4ir_pipeline.common.io import read_json, resolve_under, sha256_file
from d4ir_pipeline.errors import D4IRError

SHARDSET_NAME = "shardset.json"
RANK_MANIFEST = "shardset.r{rank:03d}.json"
LABELS_NAME = "labels.json"
# the `kind` of each listing: the merged set, one rank's commit point, a label cache
SHARDSET_KIND = "d4ir-shardset"
RANK_KIND = "d4ir-shardset-rank"
LABELS_KIND = "d4ir-labels"
SHARD_RE = re.compile(r"^synth-r(\d{3})-(\d{6})\.tar$")
RANK_MANIFEST_RE = re.compile(r"^shardset\.r(\d{3})\.json$")


def shard_name(rank: int, index: int) -> str:
    """``synth-r{rank:03d}-{index:06d}.tar``."""
    return f"synth-r{rank:03d}-{index:06d}.tar"


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
    _, listed = read_listing(Path(root) / SHARDSET_NAME, SHARDSET_KIND)
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

    ``kind`` is :data:`SHARDSET_KIND` (shardset.json), :data:`RANK_KIND` (a rank's commit
    point) or :data:`LABELS_KIND` (distill's label cache). Every ``shards`` entry must be an
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


def rank_files(out: Path) -> dict[int, Path]:
    """The rank listings ``shardset.rNNN.json`` in ``out``, by rank."""
    found = {}
    if out.is_dir():
        for p in out.iterdir():
            m = RANK_MANIFEST_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))
