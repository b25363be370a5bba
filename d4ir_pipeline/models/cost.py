"""Model cost: parameters, multiply-accumulates and latency.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on a
copy of the model moved to the ``meta`` device, so no arithmetic runs and even the
official-size teachers are counted instantly on a CPU. It counts convolutions
(including transposed and depthwise), matmuls / linear layers and attention products;
element-wise ops, norms, softmax, pooling and interpolation are not counted (the usual
convention of restoration papers' MAC tables).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "measure_latency", "format_count"]

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, size: tuple[int, int] = (256, 256), *, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a (1, in_channels, H, W) input."""
    h, w = size
    was_training = model.training
    try:
        meta = model if _on_meta(model) else copy.deepcopy(model).to("meta")
        meta.eval()
        return _flops(meta, torch.empty(1, in_channels, h, w, device="meta")) // 2
    except (NotImplementedError, RuntimeError) as e:  # an op without a meta kernel: count on the real device
        logger.info("meta-device MAC count failed for %s (%s); running a real forward", type(model).__name__, e)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.eval()
        try:
            return _flops(model, torch.zeros(1, in_channels, h, w, device=device)) // 2
        finally:
            model.train(was_training)


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def measure_latency(
    model: nn.Module,
    size: tuple[int, int] = (256, 256),
    device: str | torch.device = "cpu",
    repeats: int = 10,
    *,
    warmup: int = 2,
    in_channels: int = 3,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Median / mean / min milliseconds of a no-grad forward on a (1, C, H, W) input; model in eval mode."""
    if repeats < 1:
        raise ValueError(f"`repeats` = {repeats}: expected >= 1")
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.rand(1, in_channels, *size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "device": str(device),
        "size": list(size),
        "repeats": repeats,
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def format_count(n: int) -> str:
    """1234567 -> '1.23M'; 5.6e9 -> '5.60G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
