"""Auxiliary training sets on split-neighbour protocols: the pool classes whose names the neighbour search proposed
(or the protocol's WordNet siblings) join the L targets as classes L..L+K-1, with their pool images.

Names are matched after normalisation (case, whitespace, underscores, hyphens, simple English plurals) against
each pool class's name, id and synonyms (Tiny-ImageNet ``words.txt``). Names from ``neighbors.json`` are LLM text:
they are only compared, never used as paths.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .base import ImageSet
from .protocol import Protocol

logger = logging.getLogger(__name__)

RELATIONS = ("neighbors", "wordnet", "none")
PAIRINGS = ("relation", "visual", "random")
_SPACE = re.compile(r"[\s_\-]+")


def normalize_name(name: str) -> str:
    """Lower-case, ``_``/``-``/runs of whitespace -> one space, trimmed, non-printable characters dropped."""
    clean = "".join(ch for ch in str(name) if ch.isprintable())
    return _SPACE.sub(" ", clean.strip().lower()).strip(" .")


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def name_keys(name: str) -> set[str]:
    """Match keys of a name: the normalised form and its singular (last word de-pluralised).

    Example:
        >>> sorted(name_keys("Golden_Retrievers"))
        ['golden retriever', 'golden retrievers']
    """
    n = normalize_name(name)
    if not n:
        return set()
    head, _, last = n.rpartition(" ")
    sing = (head + " " if head else "") + _singular(last)
    return {n, sing}


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
    thresholds: tuple[int, int] = (100, 20)  # the protocol's shot thresholds (many-shot > [0], few-shot < [1])

    @property
    def num_auxiliary(self) -> int:
        return self.train.num_classes - self.num_target


def _proposals(neighbors: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(auxiliary name, parent target names) from a parsed neighbors.json, in file order."""
    if not isinstance(neighbors, dict):
        raise DataError("neighbors.json: expected a JSON object with 'auxiliary' and 'targets'")
    out: dict[str, list[str]] = {}
    for k, entry in enumerate(neighbors.get("auxiliary") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"neighbors.json: auxiliary[{k}] needs a string 'name'")
        parents = entry.get("parents") or []
        if not isinstance(parents, list):
            raise DataError(f"neighbors.json: auxiliary[{k}].parents must be a list of target names")
        out.setdefault(entry["name"], [])
        out[entry["name"]] += [str(p) for p in parents if str(p) not in out[entry["name"]]]
    for k, t in enumerate(neighbors.get("targets") or []):
        if not isinstance(t, dict):
            raise DataError(f"neighbors.json: targets[{k}] must be an object")
        for name in t.get("found") or []:
            parent = str(t.get("name", ""))
            lst = out.setdefault(str(name), [])
            if parent and parent not in lst:
                lst.append(parent)
    return list(out.items())


def _concat(a: ImageSet, b: ImageSet, labels_b: np.ndarray, names: list[str], ids: list[str]) -> ImageSet:
    if (a.paths is None) != (b.paths is None):
        raise DataError(f"{a.source}: targets and pool are stored differently (files vs array); cannot combine")
    labels = np.concatenate([a.labels, labels_b])
    syn = {**b.synonyms, **a.synonyms}
    if a.paths is not None:
        return ImageSet(class_names=names, labels=labels, paths=list(a.paths) + list(b.paths or []),
                        class_ids=ids, source=a.source, synonyms=syn)
    arr_b = b.array
    if arr_b is None or a.array is None or arr_b.shape[1:] != a.array.shape[1:]:
        raise DataError(f"{a.source}: target and pool arrays have different image shapes; cannot combine")
    return ImageSet(class_names=names, labels=labels, array=np.concatenate([a.array, arr_b]), class_ids=ids,
                    source=a.source, synonyms=syn)


def build_aux_training_set(protocol: Protocol, neighbors: dict[str, Any] | None = None,
                           relation: str = "neighbors") -> AuxTrainingSet:
    """Combine the long-tailed targets with auxiliary pool classes.

    Args:
        protocol: a split-neighbour protocol (with a pool unless ``relation="none"``).
        neighbors: parsed ``neighbors.json`` (needed for ``relation="neighbors"``).
        relation: ``"neighbors"``: pool classes whose normalised name, id or synonym matches an auxiliary name of
            ``neighbors.json`` (parents matched to targets the same way); ``"wordnet"``: the protocol's sibling
            relation; ``"none"``: targets only (K = 0).

    Returns:
        The :class:`AuxTrainingSet` (auxiliary classes in order of first proposal).

    Raises:
        ConfigError: unknown relation, or a relation that needs a pool / neighbours without one.
        DataError: malformed ``neighbors``.

    Example:
        >>> aux = build_aux_training_set(build_protocol("cifar10-neighbours"), relation="wordnet")  # doctest: +SKIP
        >>> aux.num_target, aux.train.num_classes, aux.pairs.tolist()[:2]  # doctest: +SKIP
        (5, 10, [[0, 5], [1, 6]])
    """
    if relation not in RELATIONS:
        raise ConfigError(f"unknown auxiliary relation {relation!r}; choose one of: {', '.join(RELATIONS)}")
    tt, test = protocol.target_train, protocol.target_test
    L = tt.num_classes
    thresholds = (int(protocol.config.many), int(protocol.config.few))
    empty_pairs = np.zeros((0, 2), dtype=np.int64)
    if relation == "none":
        return AuxTrainingSet(train=tt, test=test, num_target=L, pairs=empty_pairs, thresholds=thresholds)
    pool = protocol.pool
    if pool is None or pool.num_classes == 0:
        raise ConfigError(f"relation {relation!r} needs a protocol with an auxiliary pool; "
                          f"{protocol.config.preset or protocol.config.dataset} has none (use relation 'none')")

    target_by_key: dict[str, int] = {}
    for i, (cid, name) in enumerate(zip(tt.class_ids, tt.class_names)):
        for n in [name, cid, *tt.synonyms.get(cid, [])]:
            for k in name_keys(n):
                target_by_key.setdefault(k, i)
    pool_by_key: dict[str, int] = {}
    for j, (cid, name) in enumerate(zip(pool.class_ids, pool.class_names)):
        for n in [name, cid, *pool.synonyms.get(cid, [])]:
            for k in name_keys(n):
                pool_by_key.setdefault(k, j)

    links: list[tuple[int, int]] = []  # (target index, pool index)
    unmatched: list[str] = []
    if relation == "wordnet":
        pool_index = {cid: j for j, cid in enumerate(pool.class_ids)}
        for i, cid in enumerate(tt.class_ids):
            links += [(i, pool_index[p]) for p in protocol.siblings.get(cid, []) if p in pool_index]
    else:
        if neighbors is None:
            raise ConfigError("relation 'neighbors' needs the parsed neighbors.json (run `neighborlt neighbors`)")
        for name, parents in _proposals(neighbors):
            j = next((pool_by_key[k] for k in sorted(name_keys(name)) if k in pool_by_key), None)
            if j is None:
                unmatched.append(name)
                continue
            for parent in parents:
                i = next((target_by_key[k] for k in sorted(name_keys(parent)) if k in target_by_key), None)
                if i is None:
                    logger.warning("neighbors.json: parent %r of %r is not a target class; ignored", parent, name)
                    continue
                links.append((i, j))

    aux_pool: list[int] = []
    for _, j in links:
        if j not in aux_pool:
            aux_pool.append(j)
    aux_of = {j: L + k for k, j in enumerate(aux_pool)}
    pairs = np.array(sorted({(i, aux_of[j]) for i, j in links}), dtype=np.int64).reshape(-1, 2)
    aux_parents: dict[str, list[str]] = {}
    for i, j in links:
        lst = aux_parents.setdefault(pool.class_names[j], [])
        if tt.class_names[i] not in lst:
            lst.append(tt.class_names[i])

    mask = np.isin(pool.labels, aux_pool)
    idx = np.flatnonzero(mask)
    remap = np.full(pool.num_classes, -1, dtype=np.int64)
    for j, a in aux_of.items():
        remap[j] = a
    sub = pool.subset(idx)
    names = list(tt.class_names) + [pool.class_names[j] for j in aux_pool]
    ids = list(tt.class_ids) + [pool.class_ids[j] for j in aux_pool]
    train = _concat(tt, sub, remap[sub.labels], names, ids) if len(idx) else tt
    logger.info("auxiliary set (%s): %d targets + %d auxiliary classes (%d images), %d pairs, %d unmatched names",
                relation, L, len(aux_pool), len(idx), len(pairs), len(unmatched))
    return AuxTrainingSet(train=train, test=test, num_target=L, pairs=pairs, aux_parents=aux_parents,
                          thresholds=thresholds,
                          unmatched=unmatched)


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


__all__ = ["PAIRINGS", "RELATIONS", "AuxTrainingSet", "build_aux_training_set", "class_prototypes", "name_keys",
           "normalize_name", "pairing_sample", "repair"]
