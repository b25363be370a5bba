"""Run-time helpers shared by every stage: device and dtype choice, seeding, versions."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import random
import sys

import numpy as np

__all__ = ["pick_device", "pick_dtype", "seed_everything", "package_versions", "setup_logging"]

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


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

    if name not in _DTYPES:
        raise ValueError(f"`dtype` = {name!r}: expected one of {list(_DTYPES)}")
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype != torch.float32:
        logger.info("dtype %s requested on the CPU: using float32", name)
        return torch.float32
    return dtype


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
