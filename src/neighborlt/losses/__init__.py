"""Long-tail losses behind one registry: ``LOSSES.create(name, class_counts=..., **params)``.

Every loss is an ``nn.Module`` called as ``loss(logits[B, C], target)`` -> scalar mean, with ``target`` int64 [B]
or a soft Mixup/CutMix target float [B, C]. Class counts live in buffers (``.to(device)`` moves them).
``needs_features`` tells the engine to pass ``features=`` [B, D] (DRO-LT); ``epoch_start(epoch)``, when present,
is called at the start of every epoch. ``LOSSES.meta(name)`` holds the paper link and the formula.

Names: ``ce``, ``balanced_softmax``, ``logit_adjusted``, ``balanced_bce``, ``dro``, ``neighbor_silencing``.
``neighbor_silencing`` takes ``lambda_s``, ``num_targets`` and ``aux_weight``; :data:`SILENCING_PRESETS` names the
paper's setting (``paper``) and the authors' hard mask (``official``), :func:`resolve_silencing` expands a
``silencing=`` preset in loss keyword arguments (``TrainConfig.loss_params``).
"""

from ._common import LOSSES, as_counts
from .bce import BalancedBCE
from .dro import DROLoss
from .neighbor import SILENCING_PRESETS, NeighborSilencingCE, padded_neighbors, resolve_silencing, symmetric_pairs
from .softmax import BalancedSoftmaxCE, CrossEntropy, LogitAdjustedCE

__all__ = [
    "LOSSES",
    "SILENCING_PRESETS",
    "BalancedBCE",
    "BalancedSoftmaxCE",
    "CrossEntropy",
    "DROLoss",
    "LogitAdjustedCE",
    "NeighborSilencingCE",
    "as_counts",
    "padded_neighbors",
    "resolve_silencing",
    "symmetric_pairs",
]
