"""Many / medium / few-shot groups by training-image count (>many, many..few, <few; by default
``neighborlt.defaults.MANY_SHOT`` = 100 and ``FEW_SHOT`` = 20)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..defaults import FEW_SHOT, MANY_SHOT
from ..errors import ConfigError

SHOT_NAMES = ("many", "medium", "few")


def shot_groups(counts: Sequence[int] | np.ndarray, many: int = MANY_SHOT, few: int = FEW_SHOT) -> np.ndarray:
    """Label each class ``many`` (count > many), ``few`` (count < few) or ``medium`` (otherwise).

    Args:
        counts: training images per class.
        many: classes with more than this many images are many-shot.
        few: classes with fewer than this many images are few-shot.

    Returns:
        A string array [C] of ``"many"``/``"medium"``/``"few"``.

    Example:
        >>> shot_groups([500, 100, 20, 19]).tolist()
        ['many', 'medium', 'medium', 'few']
    """
    if few > many:
        raise ConfigError(f"shot thresholds need few <= many, got few={few}, many={many}")
    c = np.asarray(counts)
    out = np.full(c.shape, "medium", dtype=object)
    out[c > many] = "many"
    out[c < few] = "few"
    return out.astype("<U6")


def shot_totals(counts: Sequence[int] | np.ndarray, many: int = MANY_SHOT,
                few: int = FEW_SHOT) -> dict[str, dict[str, int]]:
    """Number of classes and images in each group: ``{"many": {"classes": n, "images": n}, ...}``."""
    c = np.asarray(counts)
    g = shot_groups(c, many, few)
    return {s: {"classes": int((g == s).sum()), "images": int(c[g == s].sum())} for s in SHOT_NAMES}
