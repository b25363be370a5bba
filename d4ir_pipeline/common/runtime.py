"""Run-time helpers shared by every stage: device and dtype choice, seeding, versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import random
import sys
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")  # config `dtype` choices


def pick_device(name: str = "auto"):
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"`device` = {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def pick_dtype(name: str, device) -> torch.dtype:  # noqa: F821
    """Map a dtype name to torch; half precision on the CPU falls back to float32 (logged)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"`dtype` = {name!r}: expected one of {list(DTYPES)}")
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype != torch.float32:
        logger.info("dtype %s requested on the CPU: using float32", name)
        return torch.float32
    return dtype


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm or container limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cap_cpu_threads(busy_processes: int) -> tuple[int, int]:
    """Lower torch's intra-op threads so they and ``busy_processes`` other processes fit the CPUs.

    Returns (threads before, threads now); never raises the count. Oversubscribed OpenMP
    threads spin-wait on each other: on a 2-core machine, 2 training threads plus one
    data-loading worker made steps several times slower than 1 thread.
    """
    import torch

    before = torch.get_num_threads()
    limit = max(1, usable_cpus() - max(0, busy_processes))
    if before > limit:
        torch.set_num_threads(limit)
    return before, torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (0 / None: left as it is), restored after."""
    import torch

    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions(
    names=("torch", "torchvision", "diffusers", "transformers", "webdataset", "pyiqa", "numpy", "pillow"),
) -> dict:
    """Installed versions of the packages a result depends on (recorded in manifests)."""
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def setup_logging(level: str | int | None = None) -> None:
    """One logging format for every command; ``D4IR_LOG_LEVEL`` overrides the level."""
    level = level or os.environ.get("D4IR_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # pyiqa pulls in bitsandbytes, which warns about optional CPU kernels on import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
