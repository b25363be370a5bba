"""torchrun environment, process groups and barriers, shared by every multi-process stage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from d4ir_pipeline.common.runtime import pick_device
from d4ir_pipeline.errors import D4IRError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise D4IRError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from e
    if world < 1 or not 0 <= rank < world:
        raise D4IRError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def init_barrier_group(world: int, timeout_min: int):
    """A gloo process group for the barriers (torchrun sets MASTER_ADDR): (module, created here) or (None, False)."""
    if world <= 1 or not os.environ.get("MASTER_ADDR"):
        return None, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist, False
    # gloo even on GPUs: only barriers cross ranks, and NCCL's watchdog would kill a long wait
    dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    return dist, True


def pick_rank_device(name: str, world: int, local_rank: int):
    import torch

    device = pick_device(name)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False
    device: str = "cpu"  # where collectives' tensors live (nccl needs CUDA tensors)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_process_group(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(
        rank=rank, world=world, local_rank=local, initialised=True, device=f"cuda:{local}" if use_cuda else "cpu"
    )
