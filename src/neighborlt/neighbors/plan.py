"""How many neighbours to ask for per target class: the head : medium : tail split ratio.

The rule (also in ``neighborlt neighbors --help``):

* ``--split-ratio auto`` gives ``1 : ceil(Nh/Nm) : ceil(Nh/Nt)``, where ``Nh``, ``Nm``, ``Nt`` are the total
  training images of the many-, medium- and few-shot classes (``classes.json`` totals). A group with no images
  gets ratio 1 (it has no classes, so it asks nothing).
* An explicit ratio ``a:b:c`` (non-negative numbers, e.g. ``1:1:3``; ``0:1:3`` skips head classes) is used as is.
* A class of shot group ``g`` with ratio part ``r_g`` is asked for ``n_g = min(max_per_class, round(K * r_g))``
  neighbours, where ``K`` is ``--per-class`` (default 5) and ``max_per_class`` (default 20) is the cap.
  ``r_g = 0`` means the class is not asked at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..errors import ConfigError

SHOTS = ("many", "medium", "few")


def parse_split_ratio(spec: str) -> tuple[float, float, float] | None:
    """Parse ``"auto"`` (returns None) or ``"a:b:c"`` into three non-negative numbers.

    Raises:
        ConfigError: malformed ratio, a negative part or all parts zero.
    """
    s = str(spec).strip().lower()
    if s == "auto":
        return None
    parts = s.split(":")
    if len(parts) != 3 or not all(re.fullmatch(r"\d+(\.\d+)?", p.strip()) for p in parts):
        raise ConfigError(
            f"--split-ratio {spec!r}: expected 'auto' or three non-negative numbers head:medium:tail, e.g. 1:1:3"
        )
    vals = tuple(float(p) for p in parts)
    if not any(vals):
        raise ConfigError(f"--split-ratio {spec!r}: all parts are zero, so no class would get neighbours")
    return vals  # type: ignore[return-value]


def resolve_ratio(spec: str, totals: Mapping[str, int]) -> tuple[float, float, float]:
    """The ratio for ``spec`` given the per-shot training-image totals (``{"many": Nh, "medium": Nm, "few": Nt}``)."""
    explicit = parse_split_ratio(spec)
    if explicit is not None:
        return explicit
    nh = int(totals.get("many", 0))
    out = [1.0]
    for g in ("medium", "few"):
        n = int(totals.get(g, 0))
        out.append(float(math.ceil(nh / n)) if n > 0 and nh > 0 else 1.0)
    return out[0], out[1], out[2]


def neighbours_per_shot(spec: str, totals: Mapping[str, int], per_class: int = 5,
                        max_per_class: int = 20) -> dict[str, int]:
    """Number of neighbours to ask for a class of each shot group (see the module docstring for the rule).

    Example:
        >>> neighbours_per_shot("auto", {"many": 5000, "medium": 1000, "few": 100}, per_class=5, max_per_class=20)
        {'many': 5, 'medium': 20, 'few': 20}
        >>> neighbours_per_shot("0:1:3", {}, per_class=2)
        {'many': 0, 'medium': 2, 'few': 6}
    """
    if per_class < 0 or max_per_class < 1:
        raise ConfigError(f"--per-class {per_class} / --max-per-class {max_per_class}: need per-class >= 0, cap >= 1")
    ratio = resolve_ratio(spec, totals)
    return {g: int(min(max_per_class, round(per_class * r))) for g, r in zip(SHOTS, ratio)}
