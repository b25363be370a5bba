"""Writing shard sets: the one writer of synthesis, the baselines, the label cache and the test builders.

Modelled on mosaicml-streaming's ``Writer.write(sample) -> flush_shard -> finish``:
:meth:`ShardSetWriter.write` adds a sample to the open shard, :meth:`~ShardSetWriter.flush_shard`
writes it as a reproducible tar (``name.tar.tmp`` -> fsync -> rename) and then records it in
the rank's listing, the commit point (rewritten atomically): readers see a shard only once it
is listed. A shard set's rank listings ``shardset.rNNN.json`` are merged into ``shardset.json``
(:func:`merge_shardset`); a label cache is one rank whose listing is ``labels.json``.
Reopening a folder resumes: recorded shards that verify are kept, the rest are redone.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from d4ir_pipeline.common.io import atomic_write_json, fsync_dir, read_json, sha256_file
from d4ir_pipeline.errors import D4IRError
from d4ir_pipeline.shardset.format import (
    LABELS_KIND,
    LABELS_NAME,
    RANK_KIND,
    RANK_MANIFEST,
    RANK_MANIFEST_RE,
    SHARD_RE,
    SHARDSET_KIND,
    SHARDSET_NAME,
    ShardInfo,
    ShardSetError,
    check_shard_file,
    rank_files,
    read_listing,
    shard_name,
)

logger = logging.getLogger(__name__)

Sample = tuple[str, list[tuple[str, bytes]]]  # (key, [(ext, bytes), ...])
# header keys left out of the "differing:" list of a refusal: they never make two sets differ
_NOT_COMPARED = ("versions", "runtime")
# shardset.json keys that say where and with what a set was made, not what it holds. A merge
# that would change only these keeps the file on disk: its sha256 is the set's identity for
# label caches, distillation runs and model cards, and a rerun that reuses every shard from
# another install path (``models.sd_source``), package versions or device must not orphan
# them. ``config`` differs only in keys outside the config hash when ``config_hash`` agrees.
PROVENANCE_KEYS = (*_NOT_COMPARED, "config", "models.sd_source")


# ---------------------------------------------------------------------------------------
# one tar


def _write_tar(path: Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write a reproducible tar (PAX, mtime 0, uid/gid 0, no owner names) via ``.tmp`` -> fsync -> rename.

    A sample's files stay adjacent, in the given order, as webdataset requires. Returns
    (byte size, sha256) of the file on disk.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _write_members(f, samples)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size, sha256_file(path)


def _write_members(f: BinaryIO, samples: Iterable[Sample]) -> None:
    """The samples as a PAX tar into ``f``, each sample's files adjacent and in the given order."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files:
                tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A reproducible member header: mtime 0, mode 0644, uid/gid 0, no owner names."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _check_sample(key: str, files: list[tuple[str, bytes]]) -> None:
    """A sample the readers get back unchanged: key without '.' or '/', unique lower-case extensions."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: expected a non-empty key without '.' or '/' (readers split at the dot)")
    exts = [ext for ext, _ in files]
    if not exts or len(set(exts)) != len(exts) or any(not e or "/" in e or e != e.lower() for e in exts):
        raise ValueError(f"sample {key!r}: extensions {exts} must be unique, non-empty, lower-case and without '/'")


# ---------------------------------------------------------------------------------------
# the writer


def _get(doc: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc


def _differing(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [prefix.rstrip(".")] if old != new else []
    keys = []
    for k in sorted(set(old) | set(new)):
        keys += _differing(old.get(k), new.get(k), f"{prefix}{k}.")
    return keys


def _short(value: Any) -> str:
    s = str(value)
    return s if len(s) <= 12 else s[:12] + "..."


class ShardSetWriter:
    """One rank's writer of a shard set (``kind`` :data:`SHARDSET_KIND`) or a label cache (:data:`LABELS_KIND`).

    Rank ``rank`` of ``world_size`` owns the shards ``index % world_size == rank`` of the
    ``num_shards`` planned. ``header`` (config, config hash, inputs, models, versions ...) is
    copied into every listing; its ``identity`` keys must match for a reopen to resume, and
    its ``carry`` keys (running totals) are taken over from the recorded listing. ``names``
    are the shards' file names by index (default ``synth-r{rank}-{index}.tar``; a label
    cache uses its shard set's names). ``where`` and ``hint`` word the refusal of another
    config's folder.

    Call :meth:`open` first; then per shard :meth:`write` its samples and :meth:`flush_shard`;
    then :meth:`finish`.
    """

    def __init__(
        self,
        *,
        out: str | os.PathLike,
        kind: str,
        header: Mapping[str, Any],
        num_shards: int,
        rank: int = 0,
        world_size: int = 1,
        names: Sequence[str] | None = None,
        identity: Sequence[str] = ("config_hash",),
        carry: Sequence[str] = (),
        where: str | None = None,
        hint: str = "use another output folder, or overwrite it",
    ) -> None:
        if kind not in (SHARDSET_KIND, LABELS_KIND):
            raise ValueError(f"`kind` = {kind!r}: expected {SHARDSET_KIND!r} or {LABELS_KIND!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` = {rank}: expected 0 <= rank < `world_size` = {world_size}")
        if kind == LABELS_KIND and (world_size != 1 or names is None):
            raise ValueError("a label cache is written by one rank and names its shards after its shard set's")
        if names is not None and len(names) != num_shards:
            raise ValueError(f"`names` has {len(names)} entries for `num_shards` = {num_shards}")
        if missing := [k for k in identity if _get(header, k) is None]:
            raise ValueError(f"`header` lacks the identity key(s) {missing}")
        self.out = Path(out)
        self.kind, self.rank, self.world_size, self.num_shards = kind, rank, world_size, num_shards
        self.header = dict(header)
        self.names = list(names) if names is not None else [shard_name(rank, i) for i in range(num_shards)]
        self.owned = list(range(rank, num_shards, world_size))
        self.identity, self.carry = tuple(identity), tuple(carry)
        self.where, self.hint = where or str(self.out), hint
        self.listing = self.out / (LABELS_NAME if kind == LABELS_KIND else RANK_MANIFEST.format(rank=rank))
        self.entries: dict[int, dict] = {}  # index -> listing entry of every recorded shard
        self._index_of_name = {n: i for i, n in enumerate(self.names)}
        self._samples: list[Sample] = []
        self._keys: set[str] = set()
        self._opened = False

    # -- open / resume ------------------------------------------------------------------

    def open(
        self, *, overwrite: bool = False, barrier: Callable[[], None] | None = None, workers: int = 1
    ) -> list[int]:
        """Start or resume writing; returns the owned shard indices still to write, in order.

        Recorded shards whose files verify (size and sha256, on ``workers`` threads) are kept,
        whichever rank's listing recorded them; damaged ones are removed and redone. A folder
        holding another identity's listing is refused unless ``overwrite``, which first
        removes this rank's earlier files. ``barrier`` (torchrun) runs after every rank read
        the old listings and before any rank rewrites its own.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        recorded: dict[int, list[tuple[dict, ShardInfo]]] = {}
        if overwrite:
            self._remove_earlier()
        else:
            recorded = self._recorded()
        if barrier is not None:
            barrier()
        for p in self.out.glob("*.tar.tmp"):
            if self._mine(p.name[: -len(".tmp")]):
                p.unlink()  # a write interrupted by a crash: never listed
        self.entries = self._verified(recorded, workers)
        todo = [i for i in self.owned if i not in self.entries]
        for i in todo:  # damaged recorded files of shards about to be redone: no stale tar lingers
            for _, info in recorded.get(i, []):
                info.path.unlink(missing_ok=True)
        self._opened = True
        self._write_listing()  # shardset.json is not merged yet: it appears with the first new shard
        return todo

    def _mine(self, name: str) -> bool:
        """Whether ``name`` is a tar file this rank writes."""
        if self.kind == LABELS_KIND:
            return name in self._index_of_name
        m = SHARD_RE.match(name)
        return m is not None and int(m.group(1)) == self.rank

    def _remove_earlier(self) -> None:
        """Overwrite: this rank's tars and listing; rank 0 also removes ranks beyond the world size and the merge."""

        def stale(name: str) -> bool:  # a file of a rank that no longer exists, or the merged listing
            if self.rank != 0 or self.kind == LABELS_KIND:
                return False
            m = RANK_MANIFEST_RE.match(name) or SHARD_RE.match(name.removesuffix(".tmp"))
            return name == SHARDSET_NAME or (m is not None and int(m.group(1)) >= self.world_size)

        for p in self.out.iterdir():
            if self._mine(p.name.removesuffix(".tmp")) or p == self.listing or stale(p.name):
                p.unlink()
        logger.info("overwrite: removed rank %d's earlier shards and listings in %s", self.rank, self.out)

    def _listings(self) -> list[tuple[Path, str]]:
        if self.kind == LABELS_KIND:
            return [(self.listing, LABELS_KIND)] if self.listing.is_file() else []
        merged = self.out / SHARDSET_NAME
        ranks = [(p, RANK_KIND) for p in rank_files(self.out).values()]
        return ranks + ([(merged, SHARDSET_KIND)] if merged.is_file() else [])

    def _recorded(self) -> dict[int, list[tuple[dict, ShardInfo]]]:
        """Every shard any listing in the folder records, by index; refuses another identity's listing."""
        by_index: dict[int, list[tuple[dict, ShardInfo]]] = {}
        for path, kind in self._listings():
            doc, listed = read_listing(path, kind)
            if any(_get(doc, k) != _get(self.header, k) for k in self.identity):
                self._refuse(doc)
            if path == self.listing:
                self.header.update({k: doc[k] for k in self.carry if k in doc})
            for raw, info in zip(doc["shards"], listed, strict=True):
                index = self._index_of(raw, path)
                if index is None:
                    continue
                cands = by_index.setdefault(index, [])
                # a merged shardset.json repeats the rank listings' entries: one candidate each, hashed once
                if all((i.name, i.bytes, i.sha256) != (info.name, info.bytes, info.sha256) for _, i in cands):
                    cands.append((raw, info))
        return by_index

    def _index_of(self, raw: dict, path: Path) -> int | None:
        if self.kind == LABELS_KIND:
            return self._index_of_name.get(raw["name"])
        try:
            index = int(raw["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardSetError(f"{path}: entry {raw['name']} has no shard `index`; refusing to guess it") from e
        return index if 0 <= index < self.num_shards else None

    def _refuse(self, doc: dict) -> NoReturn:
        ident = ", ".join(
            f"{k} {_short(_get(doc, k))}, this run {_short(_get(self.header, k))}"
            for k in self.identity
            if _get(doc, k) != _get(self.header, k)
        )
        skip = {*_NOT_COMPARED, *self.carry, *self.identity}
        keys = [k for k in self.header if k not in skip]
        diff = _differing({k: doc.get(k) for k in keys}, {k: self.header[k] for k in keys})
        what = "a label cache" if self.kind == LABELS_KIND else "a shard set"
        raise ShardSetError(
            f"{self.where} holds {what} made with another config ({ident}; differing: "
            f"{', '.join(diff[:8]) or 'nothing else recorded'}). Mixing them is refused: {self.hint}"
        )

    def _verified(self, recorded: dict[int, list[tuple[dict, ShardInfo]]], workers: int) -> dict[int, dict]:
        """Per owned index, the first recorded candidate whose file matches its size and sha256."""
        entries: dict[int, dict] = {}
        with ThreadPoolExecutor(max(1, workers)) as pool:
            checks = {
                i: [(raw, info, pool.submit(check_shard_file, info)) for raw, info in recorded[i]]
                for i in self.owned
                if i in recorded
            }
            for i, cands in checks.items():
                if (raw := _first_verified(cands)) is not None:
                    entries[i] = raw
        return entries

    # -- write --------------------------------------------------------------------------

    def write(self, key: str, files: Iterable[tuple[str, bytes]]) -> None:
        """Add one sample to the open shard: ``files`` are ``(ext, bytes)``, stored as ``{key}.{ext}`` in order."""
        if not self._opened:
            raise RuntimeError("ShardSetWriter.open() must be called before write()")
        files = list(files)
        _check_sample(key, files)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} occurs twice in the open shard")
        self._keys.add(key)
        self._samples.append((key, files))

    def flush_shard(self, index: int, **extra: Any) -> dict:
        """Write the open shard as shard ``index``, then record it (the commit point); returns its entry.

        ``extra`` goes into the entry (synthesis: its ``skipped`` / ``dropped`` counts). The
        shard may be empty. A single-rank shard set's ``shardset.json`` follows every shard.
        """
        if not self._opened:
            raise RuntimeError("ShardSetWriter.open() must be called before flush_shard()")
        if index not in self.owned:
            raise ValueError(
                f"shard {index} is not rank {self.rank}'s: it owns index % {self.world_size} == {self.rank} "
                f"of {self.num_shards}"
            )
        name = self.names[index]
        size, sha = _write_tar(self.out / name, self._samples)
        entry: dict[str, Any] = {"name": name}
        if self.kind == SHARDSET_KIND:
            entry |= {"index": index, "rank": self.rank}
        entry |= {"samples": len(self._samples), "bytes": size, "sha256": sha, **extra}
        self.entries[index] = entry
        self._samples, self._keys = [], set()
        self._write_listing()
        if self.kind == SHARDSET_KIND and self.world_size == 1:
            merge_shardset(self.out)
        return entry

    def finish(self) -> dict:
        """Check that every owned shard is recorded; returns a single-rank set's ``shardset.json``, else the listing."""
        if self._samples:
            raise RuntimeError(f"{len(self._samples)} samples were written but never flushed into a shard")
        if missing := [i for i in self.owned if i not in self.entries]:
            raise ShardSetError(
                f"{self.listing}: rank {self.rank} never wrote its shard(s) {missing[:10]}; rerun to finish the set"
            )
        if self.kind == SHARDSET_KIND and self.world_size == 1:
            return merge_shardset(self.out)
        return self._doc()

    def _doc(self) -> dict:
        """The listing: the header, then the listing's own keys (which a header key cannot override)."""
        done = all(i in self.entries for i in self.owned)
        shards = [self.entries[i] for i in sorted(self.entries)]
        if self.kind == LABELS_KIND:
            return {**self.header, "kind": LABELS_KIND, "version": 1, "complete": done, "shards": shards}
        return {
            **self.header,
            "kind": RANK_KIND,
            "version": 1,
            "rank": self.rank,
            "world_size": self.world_size,
            "done": done,
            "num_shards_planned": self.num_shards,
            "owned": len(self.owned),
            "shards": shards,
        }

    def _write_listing(self) -> None:
        """Rewrite the listing atomically: the commit point."""
        atomic_write_json(self.listing, self._doc(), indent=2 if self.kind == LABELS_KIND else None)


# ---------------------------------------------------------------------------------------
# merging rank listings


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
    head, _ = read_listing(files[0], RANK_KIND)
    world = int(head["world_size"])
    docs, missing, unfinished = [head], [], []
    for r in range(1, world):
        if r not in files:
            missing.append(r)
            continue
        doc, _ = read_listing(files[r], RANK_KIND)
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
        "kind": SHARDSET_KIND,
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
    kept = _unchanged_manifest(out / SHARDSET_NAME, manifest)
    if kept is None:
        atomic_write_json(out / SHARDSET_NAME, manifest, indent=None)
    if complete and cleanup:
        for r, p in files.items():
            if r >= world:
                p.unlink(missing_ok=True)
    return manifest if kept is None else kept


def _unchanged_manifest(path: Path, manifest: dict) -> dict | None:
    """The ``shardset.json`` at ``path`` when ``manifest`` differs from it only in :data:`PROVENANCE_KEYS`."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return None  # unreadable: rewritten
    if not isinstance(old, dict):
        return None
    changed = _differing(old, manifest)
    if not all(any(k == p or k.startswith(p + ".") for p in PROVENANCE_KEYS) for k in changed):
        return None
    if changed:
        logger.info("%s kept as it was (the same shards; this run differs only in %s)", path, ", ".join(changed[:6]))
    return old


def all_ranks_done(out: Path, world: int, chash: str) -> bool:
    """Whether every rank of a ``world``-rank run with config hash ``chash`` has recorded all its shards."""
    files = rank_files(out)
    for r in range(world):
        if r not in files:
            return False
        doc = read_json(files[r])
        if not doc.get("done") or doc.get("config_hash") != chash or doc.get("world_size") != world:
            return False
    return True


def _first_verified(cands: list[tuple[dict, ShardInfo, Future]]) -> dict | None:
    """The first candidate whose file check found no problem; a warning for each one before it."""
    for raw, info, fut in cands:
        if (problem := fut.result()) is None:
            return raw
        logger.warning("recorded shard %s fails verification (%s): redoing it", info.name, problem)
    return None
