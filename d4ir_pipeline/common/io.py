"""Small, durable file I/O: atomic writes, hashing and JSON-lines.

Every file this project produces goes through :func:`atomic_write_bytes` (tmp + fsync +
rename), so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the rename still happened
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: ``path.tmp`` -> fsync -> rename -> fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a hidden staging folder beside ``path``; swap it into place only on success.

    A crash (or an exception in the block) leaves the old ``path`` untouched and removes the
    staging folder; the old folder is replaced by two renames, then deleted. Staging folders
    of ``path`` that a killed process of this host left behind are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(path)
    stage = path.parent / f"{_stage_prefix(path)}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        fsync_tree(stage)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(stage, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _stage_prefix(path: Path) -> str:
    """``.NAME.tmp-HOST-``: the host keeps processes of other machines (a shared file system) apart."""
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _remove_stale_stages(path: Path) -> None:
    """Remove the staging folders of ``path`` whose process (on this host) no longer runs."""
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe on POSIX only
        return
    prefix = _stage_prefix(path)
    for stage in path.parent.glob(glob.escape(prefix) + "*"):
        pid = stage.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it runs, as another user
        return True
    return True


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder``, then ``folder`` itself (before renaming it into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (keys sorted, so equal objects give equal bytes)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write one JSON object per line (keys sorted)."""
    lines = [json.dumps(r, sort_keys=True, default=_json_default) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the JSON objects of a JSON-lines file; blank lines are skipped."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def trim_jsonl(path: str | os.PathLike, max_step: int, *, drop: Callable[[dict], bool] | None = None) -> None:
    """Keep the rows of a metrics-style JSON-lines file up to ``max_step`` (rewritten atomically).

    A resumed run calls this before appending again: rows after its checkpoint are
    written anew, and a torn last line (the process was killed mid-write) is dropped
    rather than failing the resume. Rows without a ``step`` are kept unless ``drop``
    says otherwise. A missing file is left missing.
    """
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= max_step and not (drop and drop(row)):
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def resolve_under(root: str | os.PathLike, rel: str, *, what: str = "path") -> Path:
    """Resolve ``rel`` under ``root`` and refuse anything that escapes it.

    Absolute paths are accepted only when they already lie under ``root``; ``..`` that
    climbs out, and symlinks pointing outside, are refused with a ``ValueError``.
    """
    root_p = Path(root).resolve()
    p = Path(rel)
    full = (p if p.is_absolute() else root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise ValueError(f"{what} {rel!r} escapes its root {str(root_p)!r}; refusing it")
    return full
