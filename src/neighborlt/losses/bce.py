"""Balanced binary cross-entropy (Bal-BCE) of LiVT (Xu et al., CVPR 2023)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import LOSSES, CountsLike, as_counts, check_target, register_counts, work_dtype

logger = logging.getLogger(__name__)


@LOSSES.register(
    "balanced_bce",
    paper="https://arxiv.org/abs/2212.02015",
    formula="L = sum_c BCE(z_c + log pi_c - log(1 - pi_c), t_c), mean over the batch; pi_c = n_c / sum_j n_j",
    description="Bal-BCE of LiVT (Xu et al., CVPR 2023): sigmoid BCE on prior-shifted logits",
)
class BalancedBCE(nn.Module):
    """Balanced binary cross-entropy of LiVT ("Learning Imbalanced Data with Vision Transformers", CVPR 2023).

    Each logit is shifted by the log prior odds of its class, ``z'_c = z_c + log pi_c - log(1 - pi_c)`` with
    ``pi_c = n_c / sum_j n_j``, and a per-class sigmoid BCE is taken against the one-hot (or soft Mixup/CutMix)
    target ``t``::

        L = 1/B sum_b sum_c -[ t_bc log sigma(z'_bc) + (1 - t_bc) log(1 - sigma(z'_bc)) ]

    Reduction as in LiVT's code (``util/loss.py``, ``BCE_loss``): ``C * binary_cross_entropy_with_logits(...,
    reduction="mean")``, i.e. the sum over classes and the mean over the batch. LiVT builds the one-hot target
    with label smoothing (``off = s / C``, ``on = 1 - s + s / C``); ``smoothing`` does the same for hard labels
    (soft targets are used as given). At test time the raw logits ``z`` are used.

    Args:
        class_counts: per-class training counts [C].
        smoothing: label smoothing ``s`` applied to hard labels (LiVT's ``--smoothing``; 0 disables).
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike, smoothing: float = 0.0) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = len(counts)
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"balanced_bce smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        register_counts(self, counts)
        prior = (counts / counts.sum()).clamp(max=1.0 - 1e-12)
        self.register_buffer("bias", prior.log() - torch.log1p(-prior))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-class BCE sum; ``target`` is int64 [B] or float [B, C]."""
        soft = check_target(logits, target, self.num_classes)
        dt = work_dtype(logits)
        z = logits.to(dt) + self.bias.to(dt)
        if soft:
            t = target.to(dt)
        else:
            c = z.shape[1]
            off = self.smoothing / c
            t = torch.full_like(z, off).scatter_(1, target.view(-1, 1), 1.0 - self.smoothing + off)
        return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, smoothing={self.smoothing}"
