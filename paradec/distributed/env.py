"""torchrun environment: rank, device binding, process group, rank-0 printing."""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None in a single process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


_SINGLE = ContextVar("paradec_single_process", default=False)


@contextmanager
def single_process():
    """Inside this block, this rank decodes on its own even in a process group: ``generate``
    treats it as a single process on its own device (an eval that spreads examples, not canvases,
    over ranks)."""
    token = _SINGLE.set(True)
    try:
        yield
    finally:
        _SINGLE.reset(token)


def current_env() -> DistEnv:
    """The environment of an already initialised process group (or a single process)."""
    if _SINGLE.get() or not (dist.is_available() and dist.is_initialized()):
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistEnv(0, 0, 1, device, None)
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def torchrun_without_group() -> bool:
    """True in a process that torchrun started as one of several ranks (WORLD_SIZE > 1) whose
    process group nobody has started, outside ``single_process()``."""
    if _SINGLE.get() or (dist.is_available() and dist.is_initialized()):
        return False
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: str | None = None, timeout_s: float = 120.0) -> DistEnv:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), binds this rank's device before
    the process group starts, and starts it: NCCL for CUDA, gloo for CPU. Without a torchrun
    environment (or with WORLD_SIZE=1) nothing starts and the run is one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return current_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank, local_rank, world_size, device, backend)


def teardown() -> None:
    """Ends the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
