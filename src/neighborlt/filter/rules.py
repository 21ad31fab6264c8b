"""The filter's rules, one function each, in funnel order; each narrows the one
:class:`~neighborlt.filter.candidates.Candidates` table (a rejected row keeps the first rule that rejected it) and
annotates it.

1. :func:`downloaded_rule`: the retrieve manifest says ``ok``.
2. :func:`caption_rule`: the caption names the image's class (the name or a synonym, whole words).
3. :func:`band_rule`: γ1 < cos(feature, prototype of a parent target) < γ2, the best parent when there are several
   (prototype = the mean L2-normalised feature of the target's training images), or per-class quantiles.
4. :func:`leak_rule`: not an exact (SHA-256) or near duplicate (feature cosine ≥ threshold) of a target test image.
5. :func:`dedup_rule`: not an exact duplicate of an earlier kept image, nor a near duplicate of one of its class.
6. :func:`cap_rule`: at most ``max_per_class`` images per class (most similar to the parent first).
7. :func:`min_class_rule` (funnel stage ``kept``): classes with fewer than ``min_per_class`` images go whole.

The feature rules (3 to 6) read :class:`Features`, computed once by :func:`compute_features` for the rows still in
after rules 1 and 2.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .candidates import Candidates
from .caption import caption_names_class, name_forms
from .config import FilterConfig

BLOCK = 4096  # candidate rows per block when reading the (memory-mapped) features


def unit(f: np.ndarray) -> np.ndarray:
    """Rows of ``f`` scaled to unit L2 norm (float32)."""
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def center_features(candidates: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the mean feature of the target training images from both sets (``FilterConfig.center``).

    Pooled CNN features (post-ReLU) share one large common direction, so raw cosines of unrelated images are
    high and barely below those of true neighbours; centering removes it (measured in ``bench/filter_band.py``).
    """
    mu = np.asarray(targets, dtype=np.float32).mean(axis=0, keepdims=True)
    return np.asarray(candidates, dtype=np.float32) - mu, np.asarray(targets, dtype=np.float32) - mu


def max_cos(a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of unit ``a``: the largest cosine to a row of unit ``b`` and its index (chunked matmul)."""
    best = np.full(len(a), -np.inf, dtype=np.float32)
    arg = np.zeros(len(a), dtype=np.int64)
    for s in range(0, len(b), chunk):
        sim = a @ b[s:s + chunk].T
        j = sim.argmax(axis=1)
        v = sim[np.arange(len(a)), j]
        better = v > best
        best[better], arg[better] = v[better], j[better] + s
    return best, arg


def image_sha256(image_set: Any, i: int) -> str:
    """SHA-256 of what a sample is stored as: the file bytes, or the array row (as the retrieve stage hashes)."""
    if image_set.array is not None:
        return hashlib.sha256(np.ascontiguousarray(image_set.array[i]).tobytes()).hexdigest()
    from ..data.base import ShardMember

    p = image_set.paths[i]
    return hashlib.sha256(p.read_bytes() if isinstance(p, ShardMember) else Path(p).read_bytes()).hexdigest()


@dataclass
class Features:
    """The feature model's features (memory-mapped: read them a block of rows at a time)."""

    rows: list[int]  # the candidate rows they cover (those still in after the downloaded and caption rules)
    candidates: np.ndarray  # [len(rows), D]
    target_train: np.ndarray | None  # [N_train, D] (the band's prototypes), when the band is on
    target_test: np.ndarray | None  # [N_test, D] (the leak guard), when the leak rule is on


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def compute_features(cfg: FilterConfig, c: Candidates, protocol: Any, root: Path) -> Features:
    """Features of the rows still in, of the target training images (prototypes) and of the target test images
    (leaks), extracted in resumable chunks and cached by content (:func:`neighborlt.train.features.extract_features`);
    under torchrun each rank computes its own chunks and one merge follows."""
    from ..data.auxiliary import rows_image_set
    from ..train.features import extract_features

    dev = _device(cfg.device)

    def ext(image_set: Any) -> np.ndarray:
        try:
            return extract_features(cfg.feature_model, cfg.feature_init, image_set, cfg.feature_image_size,
                                    batch_size=cfg.batch_size, device=dev, distributed=True)
        except ConfigError as e:
            raise ConfigError(f"filter --feature-model {cfg.feature_model}: {e}") from None

    rows = c.live()
    cand = ext(rows_image_set(c.rows(rows), protocol.pool, root, size=cfg.feature_image_size))
    return Features(rows=rows, candidates=cand, target_train=ext(protocol.target_train) if cfg.band else None,
                    target_test=ext(protocol.target_test) if cfg.leak else None)


def downloaded_rule(c: Candidates) -> None:
    """Rule ``downloaded``: rows whose retrieve status is not ``ok`` have no image."""
    for i, status in enumerate(c.status):
        if status != "ok":
            c.reject(i, "downloaded")


def caption_rule(c: Candidates, root: Path) -> None:
    """Rule ``caption``: the caption names the row's class, by its name or a synonym recorded by the retrieve stage
    (:mod:`neighborlt.filter.caption`, once per distinct caption)."""
    live = c.live()
    keep = caption_names_class([c.name[i] for i in live], [c.caption[i] or "" for i in live], name_forms(root))
    for i, k in zip(live, keep):
        if not k:
            c.reject(i, "caption")


def band_similarity(c: Candidates, feats: Features, target_train: Any, *, center: bool) -> None:
    """Annotate each featured row with its best parent (``parent``) and its cosine to that parent's prototype
    (``similarity``; NaN when no parent is a target). With ``center`` the mean target-training feature is
    subtracted first (:func:`center_features`, one block of candidates at a time)."""
    from ..data.auxiliary import class_prototypes

    fc, ft = feats.candidates, feats.target_train
    mu = None
    if center:
        mu = np.asarray(ft, dtype=np.float32).mean(axis=0, keepdims=True)
        ft = np.asarray(ft, dtype=np.float32) - mu
    proto = unit(class_prototypes(ft, target_train.labels, target_train.num_classes))
    by_name = {n: k for k, n in enumerate(target_train.class_names)}
    rows = feats.rows
    for start in range(0, len(rows), BLOCK):
        block = np.asarray(fc[start:start + BLOCK], dtype=np.float32)
        s_blk = unit(block - mu if mu is not None else block) @ proto.T  # [block, L]
        for n in range(start, start + len(block)):
            i = rows[n]
            ps = [by_name[p] for p in c.parents[i] if p in by_name]
            if not ps:
                c.similarity[i] = np.nan
                continue
            j = max(ps, key=lambda k: s_blk[n - start, k])
            c.similarity[i], c.parent[i] = s_blk[n - start, j], target_train.class_names[j]


def band_rule(c: Candidates, feats: Features, target_train: Any, cfg: FilterConfig) -> None:
    """Rule ``band``: :func:`band_similarity`, then γ1 < similarity < γ2 (``absolute``), or per class the
    similarities in (q_low, q_high] (``quantile``: ``quantile_low = 0.1`` drops the least similar tenth). A row
    without a known parent (NaN) is rejected."""
    band_similarity(c, feats, target_train, center=cfg.center)
    sim = c.similarity
    if cfg.band_mode == "absolute":
        for i in feats.rows:
            if not (cfg.gamma_low < sim[i] < cfg.gamma_high):  # NaN is rejected too
                c.reject(i, "band")
        return
    for idx in c.by_class(feats.rows).values():
        v = sim[idx]
        lo, hi = np.nanquantile(v, cfg.quantile_low), np.nanquantile(v, cfg.quantile_high)
        for i in idx:
            above = sim[i] > lo if cfg.quantile_low > 0 else sim[i] >= lo
            if np.isnan(sim[i]) or not (above and sim[i] <= hi):
                c.reject(i, "band")


def leak_rule(c: Candidates, feats: Features, target_test: Any, threshold: float) -> None:
    """Rule ``leak``: annotate each featured row with its largest cosine to a target test image
    (``leak_similarity``) and reject exact (SHA-256) copies and near copies (cosine ≥ ``threshold``)."""
    test_sha = {image_sha256(target_test, i) for i in range(len(target_test))}
    fc, tt_unit = feats.candidates, unit(feats.target_test)
    best = np.concatenate([max_cos(unit(fc[s:s + BLOCK]), tt_unit)[0] for s in range(0, len(feats.rows), BLOCK)])
    for n, i in enumerate(feats.rows):
        c.leak_similarity[i] = best[n]
        if c.sha256[i] in test_sha or best[n] >= threshold:
            c.reject(i, "leak")


def dedup_rule(c: Candidates, feats: Features | None, threshold: float) -> None:
    """Rule ``dedup``: in manifest order, reject an exact (SHA-256) copy of an earlier kept image of any class, and
    a near copy (cosine ≥ ``threshold``) of an earlier kept image of its own class.

    Per class the unit features of its kept images live in a growing buffer, so each candidate costs one mat-vec
    against its class's kept images (no re-gathering or re-normalising of the kept set per candidate)."""
    rows = feats.rows if feats is not None else c.live()
    seen_sha: set[str] = set()
    kept_unit: dict[str, list[Any]] = {}  # class -> [buffer [cap, D], number kept]
    for n, i in enumerate(rows):
        if c.decision[i]:
            continue
        sha = c.sha256[i]
        if sha and sha in seen_sha:
            c.reject(i, "dedup")
            continue
        if feats is not None:
            u = unit(feats.candidates[n:n + 1])[0]
            slot = kept_unit.get(c.name[i])
            if slot is not None and float((slot[0][:slot[1]] @ u).max()) >= threshold:
                c.reject(i, "dedup")
                continue
            if slot is None:
                slot = kept_unit[c.name[i]] = [np.empty((16, u.shape[0]), np.float32), 0]
            elif slot[1] == len(slot[0]):
                slot[0] = np.concatenate([slot[0], np.empty_like(slot[0])])
            slot[0][slot[1]] = u
            slot[1] += 1
        seen_sha.add(sha)


def cap_rule(c: Candidates, max_per_class: int, *, by_similarity: bool) -> None:
    """Rule ``cap``: at most ``max_per_class`` rows per class, the most similar to their parent first when
    ``by_similarity`` (rows without a similarity last), else the first in manifest order."""
    for idx in c.by_class(c.live()).values():
        order = sorted(idx, key=lambda i: -np.nan_to_num(c.similarity[i], nan=-2.0)) if by_similarity else idx
        for i in order[max_per_class:]:
            c.reject(i, "cap")


def min_class_rule(c: Candidates, min_per_class: int) -> list[str]:
    """Funnel stage ``kept``: a class with fewer than ``min_per_class`` rows left goes whole. Returns the dropped
    classes (those that still had rows), in manifest order."""
    counts = Counter(c.name[i] for i in c.live())
    dropped = [n for n in dict.fromkeys(c.name) if 0 < counts.get(n, 0) < min_per_class]
    gone = set(dropped)
    for i in c.live():
        if c.name[i] in gone:
            c.reject(i, "kept")
    return dropped


__all__ = ["BLOCK", "Features", "band_rule", "band_similarity", "cap_rule", "caption_rule", "center_features",
           "compute_features", "dedup_rule", "downloaded_rule", "image_sha256", "leak_rule", "max_cos",
           "min_class_rule", "unit"]
