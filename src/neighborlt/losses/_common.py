"""Shared plumbing of the loss modules: the LOSSES registry, class-count buffers and target checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

logger = logging.getLogger(__name__)

#: Name -> loss class. ``LOSSES.create(name, class_counts=..., **params)`` returns an ``nn.Module``
#: called as ``loss(logits[B, C], target)``; ``LOSSES.meta(name)`` gives the paper and the formula.
LOSSES: Registry[nn.Module] = Registry("loss")

CountsLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[int]


def as_counts(class_counts: CountsLike | None, name: str = "class_counts") -> torch.Tensor:
    """Validate per-class training counts and return them as a float64 CPU tensor [C].

    Zero counts (a class without training images) are raised to 1 with a warning so that
    ``log n_c`` stays finite; negative, non-finite or non-1-D counts raise :class:`ConfigError`.

    Args:
        class_counts: number of training images per class (index order of the classifier).
        name: argument name used in error messages.

    Returns:
        float64 tensor [C] of counts, every entry >= 1.

    Raises:
        ConfigError: when the counts are missing, empty, not 1-D, negative or not finite.
    """
    if class_counts is None:
        raise ConfigError(f"{name} is required for this loss; pass the per-class training image counts")
    counts = torch.as_tensor(np.asarray(class_counts.detach().cpu() if isinstance(class_counts, torch.Tensor)
                                        else class_counts, dtype=np.float64))
    if counts.ndim != 1 or counts.numel() == 0:
        raise ConfigError(f"{name} must be a non-empty 1-D list of per-class counts, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        bad = int(torch.nonzero(~torch.isfinite(counts) | (counts < 0))[0])
        raise ConfigError(f"{name}[{bad}] = {counts[bad].item()} is not a count >= 0; fix the class counts")
    zeros = int((counts == 0).sum())
    if zeros:
        logger.warning("%d classes have 0 training images; their count is taken as 1 so log n stays finite", zeros)
        counts = counts.clamp(min=1.0)
    return counts


def work_dtype(logits: torch.Tensor) -> torch.dtype:
    """Losses are computed in float32 at least (bf16/fp16 logits under autocast are upcast)."""
    return torch.promote_types(logits.dtype, torch.float32)


def check_target(logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> bool:
    """Check shapes of ``logits`` [B, C] and ``target`` ([B] int64 or [B, C] float).

    Returns:
        True when ``target`` is a soft (Mixup/CutMix/label-smoothed) target [B, C], False for hard labels.

    Raises:
        ValueError: on mismatched shapes or dtypes (a programming error in the caller, not user input).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes but the loss was built for {num_classes}")
    if target.ndim == 1:
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} labels for {logits.shape[0]} logit rows")
        if target.dtype.is_floating_point:
            raise ValueError("hard targets must be integer class indices (int64 [B])")
        return False
    if target.shape != logits.shape:
        raise ValueError(f"soft target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if not target.dtype.is_floating_point:
        raise ValueError("soft targets [B, C] must be floating point")
    return True


def register_counts(module: nn.Module, counts: torch.Tensor) -> None:
    """Store ``class_counts`` [C] and ``log_counts`` [C] as float64 buffers (they follow ``.to(device)``)."""
    module.register_buffer("class_counts", counts.clone())
    module.register_buffer("log_counts", counts.log())
