"""Auxiliary training sets: the L targets of a run plus the K auxiliary classes of its filter manifest
(``RUN/filter/aux_manifest.parquet``) as classes L..L+K-1, and their neighbour pairs.

Which images are auxiliary is decided by the retrieve and filter stages; this module only reads their manifest.
:func:`repair` chooses other silenced pairs for the same classes (the ablation's ``pairs`` grid).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import SHOT_THRESHOLDS
from ..errors import ConfigError, DataError
from .base import ImageSet
from .protocol import Protocol

logger = logging.getLogger(__name__)

PAIRINGS = ("relation", "visual", "random")


@dataclass
class AuxTrainingSet:
    """Targets plus auxiliary classes for training with the neighbour-silencing loss.

    Attributes:
        train: L + K classes, targets first (indices 0..L-1 as in the protocol), then auxiliary pool classes.
        test: the targets' test set (L classes).
        num_target: L.
        pairs: int64 [P, 2] (target index, auxiliary index in L..L+K-1).
        aux_parents: auxiliary class name -> target class names that proposed it.
        unmatched: proposed auxiliary names that match no pool class.
        thresholds: the protocol's (many, few) shot thresholds, for reporting.
    """

    train: ImageSet
    test: ImageSet
    num_target: int
    pairs: np.ndarray
    aux_parents: dict[str, list[str]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    thresholds: tuple[int, int] = SHOT_THRESHOLDS  # the protocol's shot thresholds (many-shot > [0], few-shot < [1])

    @property
    def num_auxiliary(self) -> int:
        return self.train.num_classes - self.num_target


def rows_image_set(rows: list[dict[str, Any]], pool: ImageSet | None, root: Path, *, labels: list[int] | None = None,
                   class_names: list[str] | None = None, size: int | None = None) -> ImageSet:
    """The images of manifest rows as one :class:`ImageSet` of references (nothing is decoded or copied).

    Pool rows refer to the protocol's ``pool`` by ``pool_index`` (a row of its array, or its file); file rows are
    paths; shard rows are :class:`~neighborlt.data.base.ShardMember` references. Sets of mixed origin stay mixed:
    the pixels are read at use, through :func:`neighborlt.data.pixels.decode`.

    Args:
        rows: manifest rows (``location``, ``path``, ``pool_index``, ``offset``, ``size``).
        pool: the protocol's pool (needed for ``pool`` rows).
        root: the run directory (shard paths are relative to it).
        labels: label per row (default 0); class_names: the label names (default ``["auxiliary"]``).
        size: unused (kept for callers of the array-building version; the side is chosen by the reader).

    Raises:
        DataError: a pool row without a pool in ``split.json``.
    """
    from .manifest import image_ref

    del size
    lab = np.asarray(labels if labels is not None else [0] * len(rows), dtype=np.int64)
    names = class_names or ["auxiliary"]
    refs: list[Any] = []
    shards: dict[str, Path] = {}  # one Path per shard, shared by its members
    for r in rows:
        if r.get("location") == "pool":
            if pool is None:
                raise DataError(f"{root}: manifest row {r.get('uid')} refers to the protocol pool, but split.json "
                                "has none; re-run `neighborlt retrieve`")
            refs.append(pool.ref(int(r["pool_index"])))
        else:
            ref = image_ref(r, root, shards)
            if ref is None:
                raise DataError(f"{root}: manifest row {r.get('uid')} has no image location; re-run retrieve")
            refs.append(ref)
    return ImageSet(class_names=list(names), labels=lab, paths=refs, source=str(root))


def _concat(a: ImageSet, b: ImageSet, labels_b: np.ndarray, names: list[str], ids: list[str]) -> ImageSet:
    """Targets ``a`` followed by auxiliary images ``b``: one list of references (rows of in-memory arrays, files
    and shard members side by side), no pixels copied."""
    labels = np.concatenate([a.labels, labels_b])
    syn = {**b.synonyms, **a.synonyms}
    return ImageSet(class_names=names, labels=labels, paths=a.refs() + b.refs(), class_ids=ids, source=a.source,
                    synonyms=syn)


#: a run silences "most of the auxiliary set for most targets" when this share of targets is paired with at least this
#: share of the auxiliary classes; the README's K / ratio grid shows silencing then loses the tail gain
DENSE_SHARE = 0.5


def pair_density(pairs: np.ndarray, num_target: int, num_auxiliary: int) -> dict[str, Any]:
    """How densely the silenced pairs cover the auxiliary set: pairs per target (mean / max), the mean share of the
    auxiliary classes a target is paired with, and the share of targets paired with at least :data:`DENSE_SHARE` of
    them (``dense_targets``). ``dense`` is True when that share is at least :data:`DENSE_SHARE` too."""
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    deg = np.bincount(p[:, 0], minlength=num_target)[:num_target] if len(p) else np.zeros(num_target, np.int64)
    share = deg / num_auxiliary if num_auxiliary else np.zeros(num_target)
    dense_targets = float((share >= DENSE_SHARE).mean()) if num_target else 0.0
    return {"pairs": len(p), "targets": int(num_target), "auxiliary": int(num_auxiliary),
            "pairs_per_target_mean": float(deg.mean()) if num_target else 0.0,
            "pairs_per_target_max": int(deg.max()) if num_target else 0,
            "paired_share_mean": float(share.mean()) if num_target else 0.0,
            "targets_without_pair": int((deg == 0).sum()), "dense_targets": dense_targets,
            "dense": bool(num_auxiliary > 1 and dense_targets >= DENSE_SHARE)}


#: columns the training set needs from ``RUN/filter/aux_manifest.parquet``
AUX_MANIFEST_COLUMNS = ("uid", "name", "parents", "class_index", "location", "path", "pool_index", "offset", "size")


def load_aux_training_set(protocol: Protocol, manifest: str | os.PathLike[str] | None, root: str | os.PathLike[str],
                          ) -> AuxTrainingSet:
    """The L targets of ``protocol`` plus the auxiliary classes of a filter manifest (``RUN/filter/
    aux_manifest.parquet``), the only way auxiliary images reach training.

    Auxiliary class ``k`` of the manifest (``class_index``) becomes class ``L + k``; its images are the manifest's
    rows (pool rows in pool order, then the others in manifest order); the neighbour pairs are (parent target,
    auxiliary class) for every parent name of a row that is a target class.

    Args:
        protocol: the run's split (targets, test set and, for pool rows, the pool).
        manifest: the filter manifest, or None for the targets only (K = 0).
        root: the run directory (shard paths in the manifest are relative to it).

    Raises:
        DataError: a malformed manifest (missing columns, class indices not 0..K-1).
    """
    tt, test = protocol.target_train, protocol.target_test
    L = tt.num_classes
    thresholds = (int(protocol.config.many), int(protocol.config.few))
    if manifest is None:
        return AuxTrainingSet(train=tt, test=test, num_target=L, pairs=np.zeros((0, 2), dtype=np.int64),
                              thresholds=thresholds)
    from .manifest import read_table

    path = Path(manifest)
    rows = read_table(path, AUX_MANIFEST_COLUMNS, "auxiliary manifest").to_pylist()
    if not rows:
        raise DataError(f"{path}: the auxiliary manifest is empty (the filter kept no image); loosen the filter "
                        "or train without auxiliary data (--no-aux)")
    return aux_training_set(protocol, rows, Path(root), source=str(path))


def aux_training_set(protocol: Protocol, rows: list[dict[str, Any]], root: Path, *, source: str = "manifest"
                     ) -> AuxTrainingSet:
    """:func:`load_aux_training_set` on manifest rows already in memory (``class_index`` 0..K-1 per row)."""
    tt, test = protocol.target_train, protocol.target_test
    L = tt.num_classes
    thresholds = (int(protocol.config.many), int(protocol.config.few))
    path = source
    names: dict[int, str] = {}
    parents: dict[int, list[str]] = {}
    for r in rows:
        k = int(r["class_index"])
        if names.setdefault(k, r["name"]) != r["name"]:
            raise DataError(f"{path}: class_index {k} is used by {names[k]!r} and {r['name']!r}; re-run filter")
        lst = parents.setdefault(k, [])
        lst += [p for p in r["parents"] or [] if p not in lst]
    K = len(names)
    if sorted(names) != list(range(K)):
        raise DataError(f"{path}: class_index must be 0..{K - 1}; re-run `neighborlt filter`")
    pool_rows = sorted((r for r in rows if r["location"] == "pool"), key=lambda r: int(r["pool_index"]))
    rows = pool_rows + [r for r in rows if r["location"] != "pool"]
    aux = rows_image_set(rows, protocol.pool, Path(root), labels=[L + int(r["class_index"]) for r in rows],
                         class_names=list(tt.class_names) + [names[k] for k in range(K)])
    target_index = {n: i for i, n in enumerate(tt.class_names)}
    pairs = sorted({(target_index[p], L + k) for k, ps in parents.items() for p in ps if p in target_index})
    unknown = sorted({p for ps in parents.values() for p in ps if p not in target_index})
    if unknown:
        logger.warning("%s: %d parent names are not target classes (e.g. %r); they get no neighbour pair", path,
                       len(unknown), unknown[0])
    ids = list(tt.class_ids) + [names[k] for k in range(K)]
    train = _concat(tt, aux, aux.labels, list(tt.class_names) + [names[k] for k in range(K)], ids)
    logger.info("auxiliary set: %d targets + %d auxiliary classes (%d images), %d pairs (%s)", L, K, len(rows),
                len(pairs), path)
    density = pair_density(np.array(pairs, dtype=np.int64), L, K)
    if density["dense"]:
        logger.warning("%s: %.0f%% of the targets are paired with at least half of the %d auxiliary classes (mean "
                       "%.0f%%): neighbor silencing then removes most of the competition the auxiliary classes are for "
                       "(README: K and split ratio); fewer names per target (--per-class) or a sparser relation may "
                       "help", source, 100 * density["dense_targets"], K, 100 * density["paired_share_mean"])
    return AuxTrainingSet(train=train, test=test, num_target=L, pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2),
                          aux_parents={names[k]: parents[k] for k in range(K)}, thresholds=thresholds)


def class_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Unit-norm class prototypes: the mean of each class's L2-normalised features, normalised again.

    Args:
        features: float [N, D].
        labels: int [N] in ``0..num_classes-1``.
        num_classes: C.

    Returns:
        float64 [C, D]; a class without samples gets a zero row (cosine 0 to everything).
    """
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((num_classes, f.shape[1]))
    np.add.at(sums, np.asarray(labels, dtype=np.int64), f)
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def pairing_sample(aux: AuxTrainingSet, max_per_class: int = 100, seed: int = 0) -> np.ndarray:
    """Indices into ``aux.train`` of at most ``max_per_class`` images per class (seeded): what the prototypes of
    :func:`repair` are computed from."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(aux.train.labels)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in range(aux.train.num_classes)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def repair(aux: AuxTrainingSet, pairing: str, *, features: np.ndarray | None = None,
           feature_labels: np.ndarray | None = None, seed: int = 0) -> AuxTrainingSet:
    """The same classes and images with other silenced pairs: each target keeps its number of pairs under the
    relation (its degree), but its partners are chosen again among the auxiliary classes.

    ``"visual"``: the auxiliary classes whose prototypes (:func:`class_prototypes` of ``features``, e.g. frozen
    pretrained features, the filter stage's similarity) have the highest cosine to the target's prototype.
    ``"random"``: drawn uniformly without replacement (``seed``), the control for "any pairs at all".
    ``"relation"`` returns ``aux`` unchanged.

    Args:
        aux: an auxiliary training set with its relation pairs.
        pairing: one of :data:`PAIRINGS`.
        features: float [N, D] of some images of ``aux.train`` (``"visual"`` only).
        feature_labels: their labels in ``aux.train``'s class indices.
        seed: random pairing seed.

    Raises:
        ConfigError: unknown pairing, or ``"visual"`` without features covering every class.
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; choose one of: {', '.join(PAIRINGS)}")
    if pairing == "relation":
        return aux
    L, K = aux.num_target, aux.num_auxiliary
    degree = np.bincount(np.asarray(aux.pairs[:, 0], dtype=np.int64), minlength=L) if len(aux.pairs) else \
        np.zeros(L, dtype=np.int64)
    if pairing == "visual":
        if features is None or feature_labels is None or len(features) != len(feature_labels):
            raise ConfigError("pairing 'visual' needs features and their labels (one label per feature row)")
        present = np.bincount(np.asarray(feature_labels, dtype=np.int64), minlength=L + K)
        if (present == 0).any():
            missing = aux.train.class_names[int(np.flatnonzero(present == 0)[0])]
            raise ConfigError(f"pairing 'visual': no features of class {missing!r}; pass features of every class")
        proto = class_prototypes(features, feature_labels, L + K)
        sim = proto[:L] @ proto[L:].T  # [L, K] cosine of target and auxiliary prototypes
        order = np.argsort(-sim, axis=1, kind="stable")
    else:
        rng = np.random.default_rng(seed)
        order = np.stack([rng.permutation(K) for _ in range(L)]) if K else np.zeros((L, 0), dtype=np.int64)
    pairs = [(i, L + int(j)) for i in range(L) for j in order[i, :degree[i]]]
    new_pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    parents: dict[str, list[str]] = {}
    for i, a in new_pairs.tolist():
        parents.setdefault(aux.train.class_names[a], []).append(aux.train.class_names[i])
    logger.info("pairing %s: %d pairs (%d shared with the relation's %d)", pairing, len(new_pairs),
                len({tuple(p) for p in new_pairs.tolist()} & {tuple(p) for p in aux.pairs.tolist()}), len(aux.pairs))
    return AuxTrainingSet(train=aux.train, test=aux.test, num_target=L, pairs=new_pairs, aux_parents=parents,
                          unmatched=list(aux.unmatched), thresholds=aux.thresholds)


__all__ = [
    "AUX_MANIFEST_COLUMNS",
    "PAIRINGS",
    "AuxTrainingSet",
    "aux_training_set",
    "class_prototypes",
    "load_aux_training_set",
    "pairing_sample",
    "repair",
    "rows_image_set",
]
