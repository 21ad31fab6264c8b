"""The method's default values and the one rule for M, defined once.

Every stage, config and CLI option that needs one of these values imports it from here (the pydantic fields of
:class:`~neighborlt.train.config.TrainConfig` use them as their defaults), so a default cannot drift between
``train``, ``run``, ``ablate`` and ``evaluate``. This module imports nothing heavy: the CLI can read it at start-up.

Example:
    >>> parse_aux_cap("all") is None, parse_aux_cap("50")
    (True, 50)
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any

from pydantic import BeforeValidator

from .errors import ConfigError

__all__ = ["AUX_CAP", "AUX_CAP_ALL", "FEW_SHOT", "LAMBDA_S", "MANY_SHOT", "SHOT_THRESHOLDS", "AuxCap",
           "parse_aux_cap"]

LAMBDA_S: float = 0.1
"""λs: the neighbor_silencing weight of a (target, auxiliary) neighbour pair's term (1.0 = Balanced Softmax)."""

AUX_CAP: int = 50
"""M: images drawn per auxiliary class per epoch (redrawn every epoch)."""

AUX_CAP_ALL = "all"
"""The spelling of "no cap" (every auxiliary image, every epoch) on the command line and in config files; the
configs store it as ``None``."""

MANY_SHOT: int = 100
"""Many-shot classes have more than this many training images."""

FEW_SHOT: int = 20
"""Few-shot classes have fewer than this many training images (the rest are medium-shot)."""

SHOT_THRESHOLDS: tuple[int, int] = (MANY_SHOT, FEW_SHOT)
"""``(many, few)``, the order the engine and the protocols pass them in."""


def parse_aux_cap(value: Any) -> int | None:
    """The one rule for M: a positive number of images, or ``None`` / ``"all"`` for every image.

    Args:
        value: an int, a decimal string (CLI), ``"all"`` (any case) or ``None``.

    Returns:
        The cap, or ``None`` for no cap.

    Raises:
        ConfigError: 0, a negative number, a fraction or anything else; one line saying to use ``all``.

    Example:
        >>> parse_aux_cap(None) is None, parse_aux_cap(8)
        (True, 8)
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in (AUX_CAP_ALL, "none", "null"):
            return None
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"--aux-cap {value!r}: expected a number of images >= 1 or {AUX_CAP_ALL!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or int(value) != value:
        raise ConfigError(f"--aux-cap {value!r}: expected a number of images >= 1 or {AUX_CAP_ALL!r}")
    value = int(value)
    if value < 1:
        raise ConfigError(f"--aux-cap {value}: M must be >= 1 images per auxiliary class; use --aux-cap "
                          f"{AUX_CAP_ALL} (aux_cap=None) for every image")
    return value


AuxCap = Annotated[int | None, BeforeValidator(parse_aux_cap)]
"""The pydantic type of every config field holding M: ``aux_cap: AuxCap = AUX_CAP`` accepts an int >= 1, ``None``
or ``"all"`` and refuses 0 with :func:`parse_aux_cap`'s one-line error."""
