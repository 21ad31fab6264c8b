"""Distributed data parallel helpers: process-group setup from torchrun's environment, model wrapping and
the small collectives the engine needs (stop flag, barrier, metric averaging).

Under ``torchrun --nproc_per_node N -m neighborlt train ...`` the variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set; :func:`setup` then initialises the default
process group (``gloo`` on CPU, ``nccl`` on CUDA). Without them everything runs in one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False  # True when setup() created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device; under DDP ``cuda`` means ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        if device == "cuda":
            device = f"cuda:{local_rank}"
    elif device != "cpu":
        raise ConfigError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return torch.device(device)


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun, else describe a single process.

    Args:
        device: the configured device (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Returns:
        The rank, world size, local rank and the device this process should use.
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local_rank)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        created = True
        log.debug("rank %d/%d: process group (%s) initialised on %s", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it.

    All ranks meet at a barrier first: a rank that tears gloo down while its peer is still finishing a collective
    makes the peer abort ("terminate called without an active exception", seen once in CI here)."""
    if info.initialized_here and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when running with several processes.

    Args:
        model: the model, already on ``info.device``.
        info: from :func:`setup`.
        sync_bn: convert BatchNorm to SyncBatchNorm (CUDA only).
    """
    if not info.distributed:
        return model
    if sync_bn:
        if info.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (PyTorch has no SyncBatchNorm on CPU); drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_scalar(value: float, info: DistInfo) -> float:
    """Average a Python float over ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], device=info.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op in one process)."""
    if info.distributed:
        dist.barrier()
