"""Reading shard sets: the one tar reader and the verified, complete shard set stage two opens."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from d4ir_pipeline.common.io import sha256_file
from d4ir_pipeline.shardset.format import (
    SHARD_RE,
    SHARDSET_KIND,
    SHARDSET_NAME,
    ShardInfo,
    ShardSetError,
    check_shard_file,
    read_listing,
)

# ---------------------------------------------------------------------------------------
# the one tar reader

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def split_key(name: str) -> tuple[str | None, str]:
    """webdataset's key convention: key = the member path up to the first dot of its basename, ext = the rest
    (lower-cased); ``(None, "")`` for a name without an extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


class ShardReadError(ShardSetError):
    """A shard tar that cannot be read to its end (corrupt, truncated, a file twice in one sample).

    ``key`` is the sample being read when it broke (None: before the first sample); ``why`` the cause.
    """

    def __init__(self, path: str | os.PathLike, key: str | None, why: str):
        self.path, self.key, self.why = Path(path), key, why
        super().__init__(f"{path}: corrupt or truncated tar {self.where} ({why})")

    @property
    def where(self) -> str:
        return f"while reading key {self.key}" if self.key else "before the first sample"


def iter_tar(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample, streaming, in tar order; raises :class:`ShardReadError`.

    As webdataset reads a tar: a sample is a run of adjacent files with one key; members
    that are not regular files or have no extension are skipped; a file repeated within a
    sample is an error. A sample is yielded as soon as the next key's first member header
    is read, before that member's data, so a sample followed by a truncated one comes out.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    with open(path, "rb") as f, _tar_errors(path, lambda: key), tarfile.open(fileobj=f, mode="r|") as tf:
        for k, ext, member in _keyed_files(tf):
            if k != key and key is not None:
                yield key, parts
            if k != key:
                key, parts = k, {}
            if ext in parts:
                raise ShardReadError(path, key, f"{member.name!r} occurs twice in the sample")
            fobj = tf.extractfile(member)
            assert fobj is not None, member.name
            parts[ext] = fobj.read()
    if key is not None:
        yield key, parts


def _keyed_files(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, ext, member)`` for the regular files of a streamed tar that have an extension."""
    for member in tf:
        k, ext = split_key(member.name) if member.isreg() else (None, "")
        if k is not None:
            yield k, ext, member


@contextmanager
def _tar_errors(path: str | os.PathLike, current_key: Callable[[], str | None]) -> Iterator[None]:
    """What a damaged tar raises, as :class:`ShardReadError` naming the sample being read."""
    try:
        yield
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardReadError(path, current_key(), str(e) or type(e).__name__) from e


def read_shard(path: str | os.PathLike) -> dict[str, dict[str, bytes]]:
    """A whole shard as key -> {ext: bytes} (tests, small shards), through :func:`iter_tar`; a key seen twice is an error."""
    out: dict[str, dict[str, bytes]] = {}
    for key, files in iter_tar(path):
        if key in out:
            raise ShardReadError(path, key, f"key {key!r} occurs twice in the shard")
        out[key] = files
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
    doc, listed = read_listing(root / SHARDSET_NAME, SHARDSET_KIND)
    report = VerifyReport(root=root, complete=bool(doc.get("complete")), shards=len(listed))
    seen_keys: dict[str, str] = {}
    for s in tqdm(listed, desc="verify", unit="shard", disable=len(listed) < 8):
        problem = check_shard_file(s)
        if problem:
            report.damaged.append(problem)
            continue
        if deep:
            try:
                report.damaged += _sample_problems(s, seen_keys)
            except ShardReadError as e:
                report.damaged.append(f"{s.name}: unreadable tar ({e.why} {e.where})")
                continue
        report.samples += s.samples
    names = {s.name for s in listed}
    for p in sorted(root.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in names:
            report.unlisted.append(p.name)
        elif p.name.endswith(".tar.tmp"):
            report.leftovers.append(p.name)
    return report


def _sample_problems(shard: ShardInfo, seen_keys: dict[str, str]) -> list[str]:
    """What reading a shard finds wrong: its sample count, a key seen before, a sample without json or image."""
    problems, n = [], 0
    for key, files in iter_tar(shard.path):
        n += 1
        if "json" not in files or not any(ext.startswith("degraded.") for ext in files):
            problems.append(f"{shard.name}: sample {key!r} lacks .json or .degraded.*")
        if key in seen_keys:
            problems.append(f"{shard.name}: key {key!r} also in {seen_keys[key]}")
        seen_keys[key] = shard.name
    if n != shard.samples:
        problems.append(f"{shard.name}: {n} samples, listed {shard.samples}")
    return problems


# ---------------------------------------------------------------------------------------
# shard set


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
    doc, shards = read_listing(manifest, SHARDSET_KIND)
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
