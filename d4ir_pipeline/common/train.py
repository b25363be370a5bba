"""Training plumbing shared by every loop: LR schedule, checkpoint folders with exact resume, RNG state, metrics.

One implementation each, used by DPA, distillation, the demo teacher, the demo SD and DFMC:

- :func:`warmup_cosine`: linear warm-up, then cosine decay to a floor;
- :class:`CheckpointDir`: ``step-NNNNNNNN/`` folders (tmp folder + rename), ``latest.json`` written last,
  keep-N pruning; weights as safetensors, the rest as a plain-data ``state.pt`` read with ``weights_only=True``;
- :func:`rng_state` / :func:`set_rng_state`: torch, numpy, python and CUDA generators as plain data;
- :class:`MetricsLog`: ``metrics.jsonl`` trimmed back to the resume step, optionally TensorBoard too.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4ir_pipeline.common.io import atomic_write_json, fsync_dir, fsync_tree, read_json, trim_jsonl
from d4ir_pipeline.errors import D4IRError

# ---------------------------------------------------------------------------------------
# 1. learning-rate schedule


def warmup_cosine(
    step: int,
    *,
    total: int,
    warmup: int = 0,
    min_ratio: float = 0.0,
    peak: float = 1.0,
    angle_first: bool = False,
) -> float:
    """Learning rate at 0-based ``step``: linear warm-up to ``peak``, then cosine to ``peak * min_ratio`` at ``total``.

    Bit-exact with each loop's former formula, which fixes the order of the float operations:
    ``peak`` multiplies first (``peak * (step + 1) / warmup``), so ``peak=1.0`` gives the LambdaLR
    factor and ``peak=lr`` the rate itself; the cosine's angle is ``pi * (t / span)``, or with
    ``angle_first`` (DFMC's schedule) ``pi * t / span``.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    if angle_first:
        angle = math.pi * min(step - warmup, span) / span
    else:
        angle = math.pi * min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(angle)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (loops that schedule by hand rather than with LambdaLR)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def due(step: int, every: int, last: int) -> bool:
    """Whether 1-based ``step`` is a multiple of ``every`` or the run's ``last`` step (logging, checkpoints)."""
    return step % every == 0 or step == last


# ---------------------------------------------------------------------------------------
# 2. RNG state (plain data: loadable with weights_only=True)


def rng_state() -> dict:
    """The global torch, numpy, python (and CUDA) generator states."""
    st = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": st[0],
            "keys": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached": float(st[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when saved and available)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------
# 3. checkpoints

STATE_NAME = "state.pt"
POINTER_NAME = "latest.json"
_STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class Checkpoint:
    """One saved step: its folder, step and ``state.pt`` contents; weights are read on demand."""

    path: Path
    step: int
    state: dict

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``<name>.safetensors`` in this checkpoint."""
        from safetensors.torch import load_file

        return load_file(str(self.path / f"{name}.safetensors"))


class CheckpointDir:
    """``root/step-NNNNNNNN/`` folders plus ``root/latest.json``, the pointer to the newest one.

    A folder is written as ``.step-N.tmp``, fsynced, then renamed; the pointer is written last,
    so a crash at any point leaves the previous checkpoint current. Only ``keep`` folders stay.
    """

    def __init__(self, root: str | os.PathLike, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"`keep` = {keep}: at least one checkpoint must be kept")
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        """The folder ``latest.json`` names, or None when nothing was saved; a dangling pointer is an error."""
        pointer = self.root / POINTER_NAME
        if not pointer.is_file():
            return None
        path = self.root / str(read_json(pointer).get("dir", ""))
        if not (path / STATE_NAME).is_file():
            raise D4IRError(
                f"{pointer} names {path}, which is missing or has no {STATE_NAME} (deleted by hand?); "
                f"delete {self.root} to start over"
            )
        return path

    def load(self) -> Checkpoint | None:
        """The newest checkpoint (``state.pt`` read with ``weights_only=True``), or None."""
        path = self.latest()
        if path is None:
            return None
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        return Checkpoint(path, int(state["step"]), state)

    def save(
        self,
        step: int,
        *,
        state: dict,
        weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        write: Callable[[Path], Any] | None = None,
    ) -> Path:
        """Write ``step-N/``: ``<name>.safetensors`` per entry of ``weights``, what ``write(folder)`` adds, and
        ``state.pt`` (``state`` plus the step); then point ``latest.json`` at it and prune old folders."""
        from safetensors.torch import save_file

        name = f"step-{step:08d}"
        tmp, final = self.root / f".{name}.tmp", self.root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key, tensors in (weights or {}).items():
            save_file(
                {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp / f"{key}.safetensors")
            )
        if write is not None:
            write(tmp)
        torch.save({**state, "step": step}, tmp / STATE_NAME)
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_json(self.root / POINTER_NAME, {"dir": name, "step": step})
        self._prune(step)
        return final

    def _prune(self, current: int) -> None:
        """Keep the newest ``keep`` folders up to ``current``; later ones are left from a run that was cut."""
        steps = sorted(
            int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))
        )
        kept = [s for s in steps if s <= current][-self.keep :]
        for s in steps:
            if s not in kept:
                shutil.rmtree(self.root / f"step-{s:08d}", ignore_errors=True)

    def clear(self) -> None:
        """Delete every checkpoint (a finished run keeps its final outputs instead)."""
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# 4. metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON line per row, each one ``O_APPEND`` write (several ranks may share the file).

    ``resume_step``: rows after it (written by a run killed past its last checkpoint) are removed on
    opening, with those ``drop`` selects; None leaves the file as it is. ``owns`` limits the trimming to
    this log's rows when several logs share one file. ``tensorboard``: a folder for TensorBoard event
    files mirroring the numeric values of rows that carry a ``step`` (global step = ``step``).
    ``enabled=False`` (other ranks) writes nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        drop: Callable[[dict], bool] | None = None,
        owns: Callable[[dict], bool] | None = None,
        tensorboard: str | os.PathLike | None = None,
        enabled: bool = True,
    ):
        self.path = Path(path)
        self._fd: int | None = None
        self._tb = None
        if not enabled:
            return
        if resume_step is not None or drop is not None:
            _trim(self.path, resume_step, drop, owns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard is not None:
            self._tb = _summary_writer(Path(tensorboard), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict) -> None:
        """Append ``row`` (keys sorted) and mirror its numbers to TensorBoard."""
        if self._fd is None:
            return
        os.write(self._fd, (json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))
        if self._tb is not None and "step" in row:
            for tag, value in _scalars(row):
                self._tb.add_scalar(tag, value, global_step=int(row["step"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _trim(path: Path, resume_step: int | None, drop: Callable[[dict], bool] | None, owns) -> None:
    """Remove this log's rows after ``resume_step`` and those ``drop`` selects (through io.trim_jsonl)."""

    def stale(row: dict) -> bool:
        if owns is not None and not owns(row):
            return False
        late = resume_step is not None and int(row.get("step", 0)) > resume_step
        return late or (drop is not None and drop(row))

    trim_jsonl(path, sys.maxsize, drop=stale)


def _scalars(row: Mapping, prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) for every number in ``row`` except ``step``; nested dicts give ``a/b`` tags."""
    out: list[tuple[str, float]] = []
    for key, value in row.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _scalars(value, f"{tag}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and tag != "step":
            out.append((tag, float(value)))
    return out


def _summary_writer(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch ships the writer; the event-file code is the tensorboard package
        raise ImportError(
            "`log.tensorboard = true` needs the tensorboard package: pip install 'd4ir-pipeline[tensorboard]'"
        ) from e
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)
