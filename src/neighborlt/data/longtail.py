"""Long-tailed subsets: the standard exponential profile (Cui et al. 2019, CIFAR-10/100-LT) and seeded sampling."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .base import ImageSet

logger = logging.getLogger(__name__)


def long_tail_counts(num_classes: int, max_per_class: int, imbalance_ratio: float) -> list[int]:
    """Images per class rank: ``int(max_per_class * (1 / imbalance_ratio) ** (i / (num_classes - 1)))``.

    Args:
        num_classes: C, number of classes (rank 0 is the head).
        max_per_class: n_max, images of the head class.
        imbalance_ratio: n_max / n_min (>= 1).

    Returns:
        C counts, non-increasing.

    Example:
        >>> sum(long_tail_counts(100, 500, 100)), sum(long_tail_counts(10, 5000, 100))
        (10847, 12406)
    """
    if num_classes < 1 or max_per_class < 1:
        raise ConfigError(f"long-tail profile needs num_classes >= 1 and max_per_class >= 1, got "
                          f"{num_classes}, {max_per_class}")
    if imbalance_ratio < 1:
        raise ConfigError(f"imbalance ratio must be >= 1 (n_max / n_min), got {imbalance_ratio}")
    if num_classes == 1:
        return [int(max_per_class)]
    return [int(max_per_class * (1.0 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def make_long_tailed(image_set: ImageSet, imbalance_ratio: float, n_max: int, seed: int = 0,
                     class_order: Sequence[int] | None = None) -> ImageSet:
    """A seeded long-tailed subset: the class at rank ``i`` of ``class_order`` keeps ``long_tail_counts(...)[i]``
    images drawn without replacement (labels unchanged); the images of :func:`long_tailed_indices`."""
    out = image_set.subset(long_tailed_indices(image_set, imbalance_ratio, n_max, seed, class_order))
    logger.debug("long-tailed subset: %d of %d images (ratio %s, n_max %d)", len(out), len(image_set),
                 imbalance_ratio, n_max)
    return out


def long_tailed_indices(image_set: ImageSet, imbalance_ratio: float, n_max: int, seed: int = 0,
                        class_order: Sequence[int] | None = None) -> np.ndarray:
    """The sorted indices into ``image_set`` of the seeded long-tailed subset (see :func:`make_long_tailed`).

    Args:
        image_set: a (balanced) training set.
        imbalance_ratio: n_max / n_min.
        n_max: images kept for the head class.
        seed: sampling seed; the same seed gives the same subset.
        class_order: class indices head -> tail (default ``0..C-1``, the CIFAR-LT convention).

    Raises:
        DataError: a class has fewer images than its long-tail count.
        ConfigError: ``class_order`` is not a permutation of the classes.
    """
    num = image_set.num_classes
    order = list(range(num)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num)):
        raise ConfigError(f"class_order must list each of the {num} class indices once, got {len(order)} entries")
    counts = long_tail_counts(num, n_max, imbalance_ratio)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for rank, c in enumerate(order):
        idx = np.flatnonzero(image_set.labels == c)
        if len(idx) < counts[rank]:
            raise DataError(
                f"{image_set.source}: class {image_set.class_names[c]!r} has {len(idx)} images but the long-tail "
                f"profile needs {counts[rank]} at rank {rank}; lower n_max"
            )
        keep.append(np.sort(rng.choice(idx, size=counts[rank], replace=False)))
    return np.sort(np.concatenate(keep))
