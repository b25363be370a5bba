"""Image manifests: records, JSON-lines I/O, safe image loading, build (scan a tree) and verify.

A manifest is JSON Lines, one :class:`ImageRecord` per line (keys sorted). Paths are
relative to an image root that is *not* stored in the manifest (see docs/ARCHITECTURE.md),
so one committed manifest serves any checkout. Every image the pipeline reads goes
through :func:`load_rgb_checked` / :func:`open_rgb`, which turn every way a file can be
bad into a :class:`~d4ir_pipeline.errors.BadImageError` with a short ``reason`` tag
instead of a crash, and convert every usable mode to 8-bit RGB.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
from PIL import Image
from tqdm import tqdm

from d4ir_pipeline.common.images import IMAGE_EXTENSIONS, decode_rgb, load_rgb_file, read_bytes
from d4ir_pipeline.common.io import atomic_write_jsonl, resolve_under, sha256_bytes, sha256_file
from d4ir_pipeline.errors import BadImageError, D4IRError

logger = logging.getLogger(__name__)

# Canonical weather labels; ``None`` (JSON null) means unknown.
WEATHERS: tuple[str, ...] = ("rain", "haze", "snow", "clean")

# Folder names (lower-cased) that give a weather label. The canonical names, the usual
# adjectives and the folder names of the public benchmark sets (Rain100L/H, Rain800,
# Rain1400, SOTS / RESIDE, Snow100K) so a downloaded set is labelled without renaming.
WEATHER_SYNONYMS: dict[str, str] = {
    **dict.fromkeys(("rain", "rainy", "rainfall", "raindrop", "rainstreak", "rain_streak", "derain"), "rain"),
    **dict.fromkeys(("haze", "hazy", "fog", "foggy", "mist", "misty", "smog", "dehaze"), "haze"),
    **dict.fromkeys(("sots", "reside", "o-haze", "i-haze", "nh-haze", "dense-haze", "ohaze", "ihaze"), "haze"),
    **dict.fromkeys(("snow", "snowy", "snowfall", "desnow"), "snow"),
    **dict.fromkeys(("clean", "clear", "norain", "nohaze", "nosnow", "gt", "groundtruth", "ground_truth"), "clean"),
}
# Benchmark folder names with a size suffix: Rain100L, Rain1400, Snow100K-L, ...
_WEATHER_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^rain\d+[a-z]?(?:[-_].*)?$"), "rain"),
    (re.compile(r"^snow\d+k?(?:[-_].*)?$"), "snow"),
)

# Paired layouts: (input folder, target folder), lower-cased, first match wins. A folder
# holding both names is a paired set; files in the target folder are not recorded on
# their own but become the ``target`` of the input with the matching name.
PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("input", "target"),  # Restormer / MPRNet style, and this project's demo test sets
    ("input", "gt"),
    ("lq", "gt"),  # BasicSR style
    ("rain", "norain"),  # Rain100L / Rain100H
    ("rainy", "norain"),
    ("hazy", "clear"),  # SOTS / RESIDE
    ("hazy", "gt"),  # SOTS outdoor as shipped in RESIDE
    ("synthetic", "gt"),  # Snow100K
    ("degraded", "clean"),
)
# Sibling folders of a paired layout that hold no images to record (Snow100K's masks).
_IGNORED_PAIR_SIBLINGS = frozenset({"mask", "masks"})

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RECORD_FIELDS = (
    "id",
    "path",
    "url",
    "sha256",
    "width",
    "height",
    "weather",
    "split",
    "source",
    "target",
    "target_sha256",
)


class ManifestError(D4IRError):
    """A manifest that cannot be read or written; the message names the file and line."""


class StrictBuildError(ManifestError):
    """``build_manifest(strict=True)`` skipped files; ``result`` holds the counts."""

    def __init__(self, message: str, result: BuildResult):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- records


def _check_relpath(value: str, key: str, where: str) -> None:
    p = PurePosixPath(value)
    if not value or "\\" in value or p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", value):
        raise ManifestError(
            f"{where}: `{key}` = {value!r} must be a relative POSIX path inside the image root "
            "(no leading '/', no '..', no backslashes)"
        )


@dataclass(frozen=True)
class ImageRecord:
    """One image of a manifest (see the table in docs/ARCHITECTURE.md)."""

    id: str
    path: str | None
    url: str | None
    sha256: str
    width: int
    height: int
    weather: str | None
    split: str
    source: str | None = None
    target: str | None = None
    target_sha256: str | None = None

    def __post_init__(self) -> None:
        self._validate("ImageRecord")

    def _validate(self, where: str) -> None:
        def want(key: str, ok: bool, expected: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise ManifestError(
                    f"{where}: `{key}` = {value!r} ({type(value).__name__}); expected {expected}"
                    + (f" (record {self.id!r})" if key != "id" and isinstance(self.id, str) else "")
                )

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        want("id", isinstance(self.id, str) and bool(self.id), "a non-empty string")
        want("path", self.path is None or isinstance(self.path, str), "a string or null")
        want("url", self.url is None or isinstance(self.url, str), "a string or null")
        if self.path is None and self.url is None:
            raise ManifestError(f"{where}: record {self.id!r} has neither `path` nor `url`; give one")
        if self.path is not None:
            _check_relpath(self.path, "path", where)
        want("sha256", isinstance(self.sha256, str) and bool(_SHA256_RE.match(self.sha256)), "64 lower-case hex digits")
        want("width", is_int(self.width) and self.width > 0, "a positive integer")
        want("height", is_int(self.height) and self.height > 0, "a positive integer")
        want("weather", self.weather is None or self.weather in WEATHERS, f"one of {list(WEATHERS)} or null")
        want("split", isinstance(self.split, str) and bool(self.split), "a non-empty string")
        want("source", self.source is None or isinstance(self.source, str), "a string or null")
        want("target", self.target is None or isinstance(self.target, str), "a string or null")
        want(
            "target_sha256",
            self.target_sha256 is None
            or (isinstance(self.target_sha256, str) and bool(_SHA256_RE.match(self.target_sha256))),
            "64 lower-case hex digits or null",
        )
        if (self.target is None) != (self.target_sha256 is None):
            raise ManifestError(f"{where}: record {self.id!r}: `target` and `target_sha256` go together; give both")
        if self.target is not None:
            _check_relpath(self.target, "target", where)

    @property
    def paired(self) -> bool:
        """True when the record carries a clean target."""
        return self.target is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON; ``target`` keys appear only on paired records."""
        d = dataclasses.asdict(self)
        if self.target is None:
            del d["target"], d["target_sha256"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "record") -> ImageRecord:
        """Validate and build a record; errors name ``where`` (e.g. ``file.jsonl:12``)."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_RECORD_FIELDS))
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, _RECORD_FIELDS, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ManifestError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {list(_RECORD_FIELDS)}")
        required = ("id", "sha256", "width", "height", "split")
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing key(s) {missing}; every record needs {list(required)}")
        rec = object.__new__(cls)
        for k in _RECORD_FIELDS:
            object.__setattr__(rec, k, d.get(k))
        rec._validate(where)
        return rec


def load_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """Read a manifest; bad JSON, a bad field or a duplicate id is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist (or is not a file)")
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {str(path)!r} cannot be read: {e}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from e
        rec = ImageRecord.from_dict(obj, where=where)
        if rec.id in seen:
            raise ManifestError(f"{where}: duplicate id {rec.id!r} (first on line {seen[rec.id]}); ids must be unique")
        seen[rec.id] = lineno
        records.append(rec)
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[ImageRecord]) -> Path:
    """Write records atomically, sorted by id (stable bytes for equal sets), keys sorted."""
    recs = sorted(records, key=lambda r: r.id)
    for a, b in zip(recs, recs[1:], strict=False):
        if a.id == b.id:
            raise ManifestError(f"cannot write {str(path)!r}: duplicate id {a.id!r}")
    return atomic_write_jsonl(path, (r.to_dict() for r in recs))


def skipped_path(out: str | os.PathLike) -> Path:
    """Sidecar report of a manifest: ``x.jsonl`` -> ``x.skipped.jsonl``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".skipped.jsonl")


def _resolve(root: str | os.PathLike, rel: str, what: str) -> Path:
    try:
        return resolve_under(root, rel, what=what)
    except ValueError as e:
        raise BadImageError("escapes_root", str(e)) from e


def load_rgb_checked(
    root: str | os.PathLike,
    record_or_relpath: ImageRecord | str,
    *,
    min_side: int = 1,
    check_hash: bool = False,
) -> tuple[Image.Image, str | None]:
    """Open an image under ``root``: ``(8-bit RGB image, converted_from or None)``.

    Refuses paths that escape ``root`` (``..``, absolute paths elsewhere, symlinks out).
    With ``check_hash`` and a record, bytes that differ from ``record.sha256`` raise
    ``BadImageError("changed")``.
    """
    if isinstance(record_or_relpath, ImageRecord):
        rec = record_or_relpath
        if rec.path is None:
            raise BadImageError("no_path", f"record {rec.id!r} has only a url ({rec.url!r}); nothing local to open")
        rel, want_sha = rec.path, rec.sha256
    else:
        rel, want_sha = str(record_or_relpath), None
    full = _resolve(root, rel, "image path")
    data = read_bytes(full, rel)
    if check_hash and want_sha is not None:
        got = sha256_bytes(data)
        if got != want_sha:
            raise BadImageError(
                "changed", f"{rel}: sha256 {got[:12]}... differs from the manifest's {want_sha[:12]}..."
            )
    return decode_rgb(data, name=rel, min_side=min_side)


def open_rgb(
    root: str | os.PathLike, record_or_relpath: ImageRecord | str, *, min_side: int = 1, check_hash: bool = False
) -> Image.Image:
    """Open an image under ``root`` as 8-bit RGB or raise ``BadImageError(reason)``."""
    return load_rgb_checked(root, record_or_relpath, min_side=min_side, check_hash=check_hash)[0]


def open_pair(
    root: str | os.PathLike, record: ImageRecord, *, check_hash: bool = False
) -> tuple[Image.Image, Image.Image]:
    """Open a paired record: ``(input_rgb, target_rgb)``, both 8-bit RGB of the same size."""
    if record.target is None:
        raise D4IRError(f"record {record.id!r} is not paired (no `target`); a paired manifest is needed here")
    inp = open_rgb(root, record, check_hash=check_hash)
    full = _resolve(root, record.target, "target path")
    data = read_bytes(full, record.target)
    if check_hash and sha256_bytes(data) != record.target_sha256:
        raise BadImageError("changed", f"{record.target}: sha256 differs from the manifest's target_sha256")
    tgt, _ = decode_rgb(data, name=record.target)
    if tgt.size != inp.size:
        raise BadImageError(
            "size_mismatch", f"record {record.id!r}: input {inp.size} and target {tgt.size} differ in size"
        )
    return inp, tgt


# --------------------------------------------------------------------------- build


def weather_from_path(rel_dir_parts: Iterable[str]) -> str | None:
    """Weather of a file from its folder names; the innermost folder that names one wins."""
    for part in reversed(list(rel_dir_parts)):
        low = part.lower()
        if low in WEATHER_SYNONYMS:
            return WEATHER_SYNONYMS[low]
        for pat, weather in _WEATHER_PATTERNS:
            if pat.match(low):
                return weather
    return None


@dataclass
class BuildResult:
    """Outcome of :func:`build_manifest`."""

    out: Path | None  # None when strict mode refused to write it
    skipped_out: Path
    recorded: int
    paired: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    converted: dict[str, int] = field(default_factory=dict)  # original mode -> count (inputs and targets)
    ignored: int = 0  # files without an image extension (not opened)
    by_weather: dict[str, int] = field(default_factory=dict)  # "rain" / ... / "null" -> recorded count

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def converted_total(self) -> int:
        return sum(self.converted.values())

    def summary_line(self) -> str:
        """One line for the CLI: recorded, skipped by reason, converted by mode."""

        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))

        parts = [f"recorded {self.recorded}" + (f" ({self.paired} paired)" if self.paired else "")]
        parts.append(f"skipped {self.skipped_total}" + (f" ({fmt(self.skipped)})" if self.skipped else ""))
        parts.append(f"converted {self.converted_total}" + (f" ({fmt(self.converted)})" if self.converted else ""))
        if self.ignored:
            parts.append(f"ignored {self.ignored} non-image files")
        return "; ".join(parts)


@dataclass
class _Tree:
    files: list[str]  # relative POSIX paths of image-extension files outside target/mask folders
    targets: list[str]  # image files in target folders (relative to root)
    index: dict[tuple[str, str], list[str]]  # (folder, lower-case stem) -> target files: pairs by name
    pairs: dict[str, str]  # input folder -> target folder (relative to root)
    ignored: int


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(root: Path) -> _Tree:
    """Walk ``root`` in sorted order; find paired layouts, image files and ignored files."""
    files: list[str] = []
    targets: list[str] = []
    index: dict[tuple[str, str], list[str]] = {}
    pairs: dict[str, str] = {}
    target_dirs: set[str] = set()
    skip_dirs: set[str] = set()
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        by_low = {d.lower(): d for d in dirnames}
        for inp, tgt in PAIR_LAYOUTS:
            if inp in by_low and tgt in by_low:
                in_rel = f"{rel_dir}/{by_low[inp]}".lstrip("/")
                tg_rel = f"{rel_dir}/{by_low[tgt]}".lstrip("/")
                pairs[in_rel] = tg_rel
                target_dirs.add(tg_rel)
                skip_dirs.update(f"{rel_dir}/{by_low[m]}".lstrip("/") for m in _IGNORED_PAIR_SIBLINGS if m in by_low)
                break
        if any(rel_dir == s or rel_dir.startswith(s + "/") for s in skip_dirs):
            continue
        owner = next((t for t in target_dirs if rel_dir == t or rel_dir.startswith(t + "/")), None)
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            rel = f"{rel_dir}/{name}".lstrip("/")
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            if owner is not None:
                targets.append(rel)
                index.setdefault((rel_dir, Path(name).stem.lower()), []).append(rel)
            else:
                files.append(rel)
    return _Tree(files=files, targets=targets, index=index, pairs=pairs, ignored=ignored)


_SOTS_RE = re.compile(r"^([^_]+)_.+$")


def _target_stems(stem: str) -> list[str]:
    """Candidate target stems for an input stem, most specific first.

    Same name (input/target, Snow100K synthetic/gt); SOTS / ITS / Rain1400 style
    ``0001_0.8_0.2`` -> ``0001``; Rain100L style ``rain-001`` -> ``norain-001``.
    """
    out = [stem]
    m = _SOTS_RE.match(stem)
    if m:
        out.append(m.group(1))
    low = stem.lower()
    if low.startswith("rain-") or low.startswith("rain_"):
        out.append("no" + stem)
    return out


def _find_target(rel: str, in_dir: str, tg_dir: str, index: dict[tuple[str, str], list[str]]) -> str | None:
    sub = PurePosixPath(rel).relative_to(in_dir)
    sub_dir = sub.parent.as_posix()
    ext = sub.suffix.lower()
    for stem in _target_stems(sub.stem):
        cands = index.get((f"{tg_dir}/{sub_dir}" if sub_dir != "." else tg_dir, stem.lower()), [])
        if cands:
            same_ext = [c for c in cands if PurePosixPath(c).suffix.lower() == ext]
            return (same_ext or cands)[0]
    return None


def _enclosing(rel: str, dirs: Iterable[str]) -> str | None:
    """The innermost of ``dirs`` that holds ``rel``, or None."""
    return max((d for d in dirs if rel.startswith(d + "/")), key=len, default=None)


def _record_ids(files: list[str]) -> dict[str, str]:
    """Id = relative path without extension, or with it where two files would collide."""
    stem_of = {f: str(PurePosixPath(f).with_suffix("")) for f in files}
    counts = Counter(stem_of.values())
    return {f: (stem if counts[stem] == 1 else f) for f, stem in stem_of.items()}


class _Skip(Exception):
    """A file left out of the manifest; ``entry`` is its line of the sidecar."""

    def __init__(self, path: str, reason: str, message: str, target: str | None = None):
        super().__init__(message)
        self.entry = {"path": path, "reason": reason, "message": message} | ({"target": target} if target else {})


@dataclass
class _Build:
    """One build's state: opens each image once, pairs inputs with their targets, makes records."""

    root: Path
    tree: _Tree
    ids: dict[str, str]  # file -> record id
    min_side: int
    split: str | None
    weather_from_folders: bool
    converted: Counter[str] = field(default_factory=Counter)  # original mode -> count
    target_cache: dict[str, tuple[str, int, int] | BadImageError] = field(default_factory=dict)  # paired targets

    def load(self, rel: str) -> tuple[str, int, int]:
        """``(sha256, width, height)`` of an image under the root; counts its mode conversion."""
        img, conv, sha = load_rgb_file(_resolve(self.root, rel, "image path"), min_side=self.min_side)
        if conv is not None:
            self.converted[conv] += 1
        return sha, img.width, img.height

    def pair(self, rel: str, w: int, h: int) -> tuple[str | None, str | None]:
        """``(target, target_sha256)`` of an input; ``(None, None)`` outside a paired layout."""
        in_dir = _enclosing(rel, self.tree.pairs)
        if in_dir is None:
            return None, None
        target = _find_target(rel, in_dir, self.tree.pairs[in_dir], self.tree.index)
        if target is None:
            raise _Skip(
                rel,
                "no_target",
                f"{rel}: no file in {self.tree.pairs[in_dir]!r} pairs with it "
                "(same name, SOTS 'id_A_beta' -> 'id', or 'rain-N' -> 'norain-N')",
            )
        if target not in self.target_cache:  # opened once, however many inputs share it
            try:
                self.target_cache[target] = self.load(target)
            except BadImageError as e:
                self.target_cache[target] = e
        t = self.target_cache[target]
        if isinstance(t, BadImageError):
            raise _Skip(rel, "bad_target", f"target {target}: {t.reason}: {t}", target)
        target_sha, tw, th = t
        if (tw, th) != (w, h):
            raise _Skip(rel, "size_mismatch", f"{rel} is {w}x{h} but its target {target} is {tw}x{th}", target)
        return target, target_sha

    def record(self, rel: str) -> ImageRecord:
        """The record of one input file; raises :class:`_Skip` when it cannot be used."""
        try:
            sha, w, h = self.load(rel)
        except BadImageError as e:
            raise _Skip(rel, e.reason, str(e)) from None
        target, target_sha = self.pair(rel, w, h)
        parts = PurePosixPath(rel).parts
        return ImageRecord(
            id=self.ids[rel],
            path=rel,
            url=None,
            sha256=sha,
            width=w,
            height=h,
            weather=weather_from_path(parts[:-1]) if self.weather_from_folders else None,
            split=self.split if self.split is not None else (parts[0] if len(parts) > 1 else self.root.name),
            source=None,
            target=target,
            target_sha256=target_sha,
        )

    def unpaired_targets(self) -> list[dict[str, str]]:
        """Sidecar lines for the target files no input paired with."""
        return [
            {"path": t, "reason": "unpaired_target", "message": f"{t}: no input pairs with it"}
            for t in self.tree.targets
            if t not in self.target_cache
        ]


def build_manifest(
    root: str | os.PathLike,
    *,
    out: str | os.PathLike,
    split: str | None = None,
    min_side: int = 32,
    strict: bool = False,
    weather_from_folders: bool = True,
    progress: bool = True,
) -> BuildResult:
    """Scan ``root``, open every image, write the manifest and ``<out>.skipped.jsonl``.

    Bad files never stop the build: each is listed in the sidecar with its reason.
    ``split`` defaults to the first folder under ``root`` (or ``root``'s own name).
    With ``strict`` any skip raises :class:`StrictBuildError` after the sidecar is
    written, and the manifest is NOT written.
    """
    # 1. check inputs
    root_p = Path(root)
    if not root_p.is_dir():
        raise ManifestError(f"image root {str(root)!r} is not a directory")
    root_p = root_p.resolve()
    if min_side < 1:
        raise ManifestError(f"`min_side` = {min_side!r}; expected an integer >= 1")
    out_p = Path(out)
    side_p = skipped_path(out_p)

    # 2. scan the tree (sorted, so the result is independent of the filesystem's order)
    tree = _scan(root_p)
    build = _Build(root_p, tree, _record_ids(tree.files), min_side, split, weather_from_folders)

    # 3. open every image and pair it with its target; each file left out gets a sidecar line
    records: list[ImageRecord] = []
    skipped: list[dict[str, str]] = []
    for rel in tqdm(tree.files, desc=f"manifest {root_p.name}", unit="img", disable=not progress or None):
        try:
            records.append(build.record(rel))
        except _Skip as e:
            skipped.append(e.entry)
    skipped += build.unpaired_targets()

    # 4. write the sidecar always (a stale one would lie), the manifest unless strict refuses
    skipped.sort(key=lambda s: (s["path"], s["reason"]))
    atomic_write_jsonl(side_p, skipped)
    result = BuildResult(
        out=out_p,
        skipped_out=side_p,
        recorded=len(records),
        paired=sum(r.paired for r in records),
        skipped=dict(sorted(Counter(s["reason"] for s in skipped).items())),
        converted=dict(sorted(build.converted.items())),
        ignored=tree.ignored,
        by_weather=dict(sorted(Counter(r.weather or "null" for r in records).items())),
    )
    if strict and skipped:
        result.out = None
        raise StrictBuildError(
            f"--strict: {len(skipped)} file(s) skipped under {str(root_p)!r} (see {side_p}); "
            f"manifest {str(out_p)!r} was not written",
            result,
        )
    write_manifest(out_p, records)
    logger.debug("manifest %s: %s", out_p, result.summary_line())
    return result


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_manifest`: every local file re-hashed."""

    manifest: Path
    root: Path
    checked: int  # files hashed (inputs and targets)
    missing: list[str] = field(default_factory=list)  # relative paths
    changed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # paths escaping the root
    remote: int = 0  # url-only records (not checked)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.refused)

    def summary_line(self) -> str:
        return (
            f"checked {self.checked} files: {len(self.missing)} missing, {len(self.changed)} changed, "
            f"{len(self.refused)} refused" + (f", {self.remote} url-only not checked" if self.remote else "")
        )


def verify_manifest(path: str | os.PathLike, root: str | os.PathLike, *, progress: bool = True) -> VerifyResult:
    """Re-hash every file of a manifest under ``root`` and report missing / changed files."""
    records = load_manifest(path)
    root_p = Path(root)
    if not root_p.is_dir():
        raise ManifestError(f"image root {str(root)!r} is not a directory")
    res = VerifyResult(manifest=Path(path), root=root_p.resolve(), checked=0)
    files: list[tuple[str, str]] = []
    for r in records:
        if r.path is None:
            res.remote += 1
            continue
        files.append((r.path, r.sha256))
        if r.target is not None and r.target_sha256 is not None:
            files.append((r.target, r.target_sha256))
    for rel, want in tqdm(sorted(set(files)), desc="verify", unit="file", disable=not progress or None):
        try:
            full = resolve_under(root_p, rel, what="manifest path")
        except ValueError:
            res.refused.append(rel)
            continue
        res.checked += 1
        try:
            got = sha256_file(full)
        except OSError:  # gone, or unreadable: missing either way
            res.missing.append(rel)
            continue
        if got != want:
            res.changed.append(rel)
    return res


# --------------------------------------------------------------------------- CLI


@click.group("manifest")
def manifest_group() -> None:
    """Build or verify an image manifest (JSON Lines)."""


@manifest_group.command("build")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Manifest to write (.jsonl).")
@click.option("--split", default=None, help="Split label for every record (default: first folder under DIR).")
@click.option(
    "--min-side",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Skip images whose shorter side is below this (too little content to crop).",
)
@click.option("--strict", is_flag=True, help="Exit non-zero (and write no manifest) if any file is skipped.")
@click.option("--no-weather-from-folders", is_flag=True, help="Leave weather null instead of reading folder names.")
def build_command(
    directory: str, out: str, split: str | None, min_side: int, strict: bool, no_weather_from_folders: bool
) -> None:
    """Scan DIR, open every image and write a manifest plus <out>.skipped.jsonl."""
    try:
        res = build_manifest(
            directory,
            out=out,
            split=split,
            min_side=min_side,
            strict=strict,
            weather_from_folders=not no_weather_from_folders,
        )
    except StrictBuildError as e:
        click.echo(e.result.summary_line())
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    click.echo(res.summary_line())
    click.echo(f"manifest: {res.out}" + (f"  skipped files listed in: {res.skipped_out}" if res.skipped else ""))


@manifest_group.command("verify")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--root",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Image root the manifest's paths are relative to.",
)
def verify_command(manifest: str, root: str) -> None:
    """Re-hash every file of MANIFEST under --root; exit 1 on drift (missing or changed)."""
    res = verify_manifest(manifest, root)
    click.echo(res.summary_line())
    for label, items in (("missing", res.missing), ("changed", res.changed), ("refused", res.refused)):
        for rel in items[:20]:
            click.echo(f"  {label}: {rel}")
        if len(items) > 20:
            click.echo(f"  ... and {len(items) - 20} more {label}")
    if not res.ok:
        raise SystemExit(1)
