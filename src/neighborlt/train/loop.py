"""The parts of a training loop that training (:mod:`neighborlt.train.engine`) and MAE pre-training
(:mod:`neighborlt.pretrain.stage`) share: seeding, deterministic kernels, a clean stop on SIGTERM, an epoch's
micro-batches and the inputs of those batches.

Exact resume rests on these: every epoch's RNGs are re-seeded from ``derive_seed(seed, epoch, rank)``, the
micro-batches of an epoch are cut from the sampler's list by :func:`split_batches`, and :func:`iterate_batches`
seeds a cache-mode loader from ``(seed, epoch, rank)`` (stream mode seeds each sample from its position).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import ddp

log = logging.getLogger(__name__)

__all__ = ["StopFlag", "catch_signals", "derive_seed", "determinism", "iterate_batches", "micro_batches_per_epoch",
           "seed_all", "split_batches"]


# ----------------------------------------------------------------------------------------------------------
# Seeding, determinism, signals
# ----------------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from integer parts (``(seed, epoch, rank)``), via numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _use_deterministic_algorithms(mode: bool, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms``, without the import of ``torch._inductor.config`` that its first call
    makes (about 2 s of CPU per process) while inductor is not loaded: neighborlt never compiles a model, so only
    the eager flag matters; once inductor is loaded (by the user's code) its flag is kept in step too."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training; the previous global setting is restored afterwards."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        _use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        _use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


class StopFlag:
    """Set by SIGTERM (and SIGINT when asked); training stops after the current optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def catch_signals(flag: StopFlag) -> Iterator[None]:
    """Record SIGTERM in ``flag`` while the block runs (main thread only; elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        flag.signum = signum
        log.warning("received signal %d: saving a checkpoint after this step", signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------------------------------------
# An epoch's batches
# ----------------------------------------------------------------------------------------------------------


def split_batches(indices: np.ndarray, batch: int, n_micro: int) -> list[list[int]]:
    """The first ``n_micro`` micro-batches of ``batch`` samples of a rank's epoch list (empty ones dropped)."""
    out = [indices[i * batch:(i + 1) * batch].tolist() for i in range(n_micro)]
    return [b for b in out if b]


def micro_batches_per_epoch(n: int, batch: int, info: ddp.DistInfo) -> int:
    """Micro-batches per epoch on every rank (full batches; one partial batch when there is less than one); under
    DDP the minimum over the ranks, so every rank takes the same number of steps."""
    k = n // batch if n >= batch else 1
    if info.distributed:
        t = torch.tensor([k], dtype=torch.int64, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        k = int(t.item())
    return k


def iterate_batches(batches: list[list[int]], dataset: Any, feats: torch.Tensor | None, labels: np.ndarray, *,
                    seed: int, num_workers: int | None, epoch: int, info: ddp.DistInfo, start: int = 0,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` for the given index batches (images through a DataLoader, or features); ``start``
    is the position of the first sample in this rank's list (stream mode seeds each sample's augmentation with
    it). Stream mode: one persistent loader per run, uint8 batches; cache mode: a loader per epoch, as always."""
    if feats is not None:
        lab = torch.from_numpy(labels)
        for b in batches:
            t = torch.as_tensor(b, dtype=torch.int64)
            yield feats[t], lab[t]
        return
    from .data import resolve_workers

    workers = resolve_workers(num_workers, dataset.mode, info.world_size)
    if dataset.mode == "stream":
        firsts = (start + np.cumsum([0] + [len(b) for b in batches[:-1]])).tolist()
        yield from dataset.train_batches(batches, epoch, firsts, rank=info.rank, world_size=info.world_size,
                                         num_workers=workers, pin_memory=info.device.type == "cuda")
        return
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, epoch, info.rank, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         generator=g, worker_init_fn=_worker_init,
                                         persistent_workers=False, pin_memory=info.device.type == "cuda")
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.int64)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() & 0xFFFFFFFF
    np.random.seed(s)
    random.seed(s)
