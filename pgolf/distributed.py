"""Processes of one training run: torchrun's environment, the process group, the launch.

A run is one process or N processes started by ``torchrun`` (which sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``). The process group uses NCCL on
GPUs and gloo on the CPU. ``launch_torchrun`` starts a module under torchrun
from a single process (``pgolf.pipeline.stage`` relaunches stages with it, so ``pgolf
train`` and ``pgolf evaluate`` honour ``nproc_per_node`` themselves).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgolf.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun(environ: Mapping[str, str]) -> bool:
    return "RANK" in environ and "WORLD_SIZE" in environ


def init_distributed(device_name: str, environ: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group that torchrun set up (if any) and pick this process's device."""
    environ = os.environ if environ is None else environ
    rank = int(environ.get("RANK", "0"))
    world_size = int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a spent time budget)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def launch_torchrun(module: str, args: list[str], nproc: int, env: Mapping[str, str] | None = None) -> int:
    """Run ``python -m module args`` in ``nproc`` processes under torchrun (with ``env``, default this
    process's environment); its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, *args]
    return subprocess.run(command, check=False, env=None if env is None else dict(env)).returncode
