"""Reading shard sets: the one tar reader and the verified, complete shard set stage two opens."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.shardset.format import (
    SHARD_RE,
    SHARDSET_NAME,
    ShardInfo,
    ShardSetError,
    check_shard_file,
    read_listing,
)


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
# shard set


# ShardSetError, ShardInfo and the listing / file checks live in shards.py (stage one
# writes what stage two reads; one reader for both); they are re-exported here.


@dataclass(frozen=True)
class ShardSet:
    """A verified shard set: its shards in manifest order and the manifest's own hash."""

    root: Path
    shards: tuple[ShardInfo, ...]
    manifest_sha256: str
    config_hash: str | None
    num_samples: int


def verify_files(shards: list[ShardInfo], mode: str, where: str) -> None:
    """Refuse missing files, wrong sizes and (mode 'full') wrong hashes, listing every bad shard."""
    from tqdm import tqdm

    full = mode == "full"
    it = tqdm(shards, desc=f"verify {Path(where).parent.name}", unit="shard", disable=not full or len(shards) < 8)
    bad = [problem for s in it if (problem := check_shard_file(s, full=full))]
    if bad:
        more = f" ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ShardSetError(
            f"{where}: {len(bad)} of {len(shards)} shards fail verification ({mode}): "
            + "; ".join(bad[:10])
            + more
            + ". The set changed after it was written: rerun the command that wrote it (it resumes and "
            "rewrites bad shards), or restore the files."
        )


def open_shardset(root: str | os.PathLike, *, verify: str = "full") -> ShardSet:
    """Read ``root/shardset.json``; refuse incomplete sets and (per ``verify``) changed shards."""
    root = Path(root)
    manifest = root / SHARDSET_NAME
    if not manifest.is_file():
        hint = "" if root.is_dir() else " (the folder does not exist)"
        raise ShardSetError(
            f"`data.shards` = {str(root)!r}: no {SHARDSET_NAME}{hint}; run `d4ir synthesize` (make synthesize) "
            "first, or point `data.shards` at a finished shard-set folder"
        )
    doc, shards = read_listing(manifest, "d4ir-shardset")
    if doc.get("complete") is not True:
        raise ShardSetError(
            f"{manifest}: the shard set is incomplete (`complete` is not true): synthesis has not finished. "
            "Rerun `d4ir synthesize` with the same config to resume it."
        )
    if not shards:
        raise ShardSetError(f"{manifest}: lists no shards; point `data.shards` at a shard set with samples")
    if verify != "off":
        verify_files(shards, verify, str(manifest))
    return ShardSet(
        root=root,
        shards=tuple(shards),
        manifest_sha256=sha256_file(manifest),
        config_hash=doc.get("config_hash"),
        num_samples=sum(s.samples for s in shards),
    )


def _split_name(fname: str) -> tuple[str | None, str]:
    """webdataset's key convention: key = path up to the first dot of the basename; ext = the rest."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(fname)
    return key, (ext or "").lower()


class TarTruncated(Exception):
    def __init__(self, key: str | None, cause: BaseException):
        super().__init__(str(cause))
        self.key, self.cause = key, cause


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, streaming; a corrupt / truncated tar raises TarTruncated."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isreg():
                        continue
                    k, ext = _split_name(member.name)
                    if k is None:
                        continue
                    if k != key:
                        if key is not None and parts:
                            yield key, parts
                        key, parts = k, {}
                    fobj = tf.extractfile(member)
                    assert fobj is not None
                    parts[ext] = fobj.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise TarTruncated(key, e) from e
    if key is not None and parts:
        yield key, parts
