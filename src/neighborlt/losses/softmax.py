"""Softmax cross-entropy family: plain CE, Balanced Softmax (Ren et al. 2020), logit adjustment (Menon et al. 2021).

All three are a cross-entropy on (possibly shifted) logits; a soft target ``T`` [B, C] (Mixup, CutMix, label
smoothing) gives ``-sum_c T_c log softmax(.)_c``, which is the convex combination of the hard-label losses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ._common import LOSSES, CountsLike, as_counts, check_target, register_counts, work_dtype

logger = logging.getLogger(__name__)


def _ce(logits: torch.Tensor, target: torch.Tensor, soft: bool) -> torch.Tensor:
    """Mean cross-entropy for hard labels [B] or soft targets [B, C] (probabilities)."""
    if soft:
        return F.cross_entropy(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target)


@LOSSES.register(
    "ce",
    paper="",
    formula="L = -log softmax(z)_y",
    description="plain softmax cross-entropy",
)
class CrossEntropy(nn.Module):
    """Softmax cross-entropy ``L = -log softmax(z)_y`` (mean over the batch).

    Args:
        class_counts: accepted for a uniform factory signature; stored as a buffer when given, not used.

    Example:
        >>> loss = CrossEntropy()
        >>> loss(torch.zeros(2, 3), torch.tensor([0, 2])).item()  # doctest: +ELLIPSIS
        1.0986...
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike | None = None) -> None:
        super().__init__()
        self.num_classes: int | None = None
        if class_counts is not None:
            counts = as_counts(class_counts)
            self.num_classes = len(counts)
            register_counts(self, counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` [B, C] against ``target`` (int64 [B] or float [B, C])."""
        soft = check_target(logits, target, self.num_classes)
        return _ce(logits.to(work_dtype(logits)), target, soft)


@LOSSES.register(
    "balanced_softmax",
    paper="https://arxiv.org/abs/2007.10740",
    formula="L = -log softmax(z + log n)_y",
    description="Balanced Softmax (Ren et al., NeurIPS 2020): CE on logits shifted by the log class counts",
)
class BalancedSoftmaxCE(nn.Module):
    """Balanced Softmax cross-entropy (Ren et al., "Balanced Meta-Softmax", NeurIPS 2020).

    ``L = -log( n_y e^{z_y} / sum_j n_j e^{z_j} ) = -log softmax(z + log n)_y`` where ``n_j`` is the number of
    training images of class ``j`` (for auxiliary classes under a per-epoch cap: the images used per epoch).
    At test time the raw logits ``z`` are used, which estimates the balanced (uniform-prior) posterior.

    Args:
        class_counts: per-class training counts [C].
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = len(counts)
        register_counts(self, counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` [B, C] against ``target`` (int64 [B] or float [B, C])."""
        soft = check_target(logits, target, self.num_classes)
        dt = work_dtype(logits)
        return _ce(logits.to(dt) + self.log_counts.to(dt), target, soft)


@LOSSES.register(
    "logit_adjusted",
    paper="https://arxiv.org/abs/2007.07314",
    formula="L = -log softmax(z + tau * log pi)_y,  pi_c = n_c / sum_j n_j",
    description="logit-adjusted loss (Menon et al., ICLR 2021); tau = 1 equals Balanced Softmax",
)
class LogitAdjustedCE(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

    ``L = -log softmax(z + tau * log pi)_y`` with the empirical class prior ``pi_c = n_c / sum_j n_j``.
    With ``tau = 1`` it equals :class:`BalancedSoftmaxCE` (the constant ``log sum n`` cancels in the softmax).

    Args:
        class_counts: per-class training counts [C].
        tau: scale of the adjustment (the paper uses 1.0).
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike, tau: float = 1.0) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = len(counts)
        self.tau = float(tau)
        register_counts(self, counts)
        self.register_buffer("log_prior", (counts / counts.sum()).log())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` [B, C] against ``target`` (int64 [B] or float [B, C])."""
        soft = check_target(logits, target, self.num_classes)
        dt = work_dtype(logits)
        return _ce(logits.to(dt) + self.tau * self.log_prior.to(dt), target, soft)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"
