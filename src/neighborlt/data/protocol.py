"""Split-neighbour protocols: some classes of a labeled dataset become long-tailed *target* classes, the others an
*auxiliary pool* of images captioned by class name (the offline stand-in for web-crawled neighbours).

Presets (``PRESETS``):

* ``tiny-imagenet-lt-neighbours``: 100 of Tiny-ImageNet's 200 classes are targets. Classes are paired greedily by
  WordNet 3.0 taxonomy distance (closest pairs first, ties broken by the seed; classes sharing a direct hypernym
  are at distance 2 and pair first), and one class of each pair (by the seed) becomes the target, the other goes
  to the pool, so every target has a close relative in the pool. Targets are long-tailed with n_max 500, ratio
  100 (500 ... 5) in a seeded head -> tail order; test = the 50 val images of each target; pool = all 500 train
  images of each pool class. ``siblings``: pool classes sharing a direct hypernym with the target, else its 3
  nearest pool classes by taxonomy distance.
* ``cifar10-neighbours``: targets cat, automobile, deer, airplane, bird (head -> tail: 500/158/50/15/5); pool dog,
  truck, horse, ship, frog; siblings cat->dog, automobile->truck, deer->horse, airplane->ship, bird->frog (the
  pairing of the issue: the first four are the visually closest CIFAR classes; bird->frog is the remaining pair).
  Test = the 1,000 test images of each target.
* ``omniglot-neighbours``: in each alphabet, half the characters (seeded, rounded down) are targets, the rest
  pool; train = drawers 1-15, test = drawers 16-20 (5 per target). Targets are long-tailed with n_max 15, ratio
  15 (15 ... 1); shot thresholds are scaled to these counts: many > 5, few < 3, which puts about the same share of
  classes in each group as 100 / 20 do for n_max 500, ratio 100 (roughly 34% / 26% / 40% vs 35% / 35% / 30%).
  Siblings: the pool characters of the same alphabet.
* ``cifar10-lt`` / ``cifar100-lt``: every class is a target (n_max 5000 / 500, ratio 100), no pool; balanced test.

The resolved split is saved with the run as ``RUN/split.json`` (see :func:`split_record`) and its images as
``RUN/targets.parquet`` (:mod:`neighborlt.data.targets`); later stages read both back with
:func:`neighborlt.data.load_targets` instead of building the protocol again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..defaults import FEW_SHOT, MANY_SHOT
from ..errors import ConfigError, DataError
from .base import ImageSet
from .longtail import long_tailed_indices
from .readers import load_dataset
from .shots import shot_groups

logger = logging.getLogger(__name__)

SPLIT_SCHEMA = 1


class ProtocolConfig(BaseModel):
    """A long-tailed target / auxiliary-pool split of one dataset (all fields are saved in ``split.json``)."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None  # name in PRESETS, or None for a custom / plain dataset
    dataset: str  # load_dataset name or path
    targets: list[str] | None = None  # target class ids, head -> tail; None: the preset's seeded choice
    pool: list[str] | None = None  # pool class ids; None: the preset's choice ([] = no pool)
    num_targets: int | None = None  # tiny-imagenet: how many targets (default 100)
    imbalance_ratio: float | None = 100.0  # n_max / n_min of the targets; None: keep every training image
    n_max: int | None = 500  # images of the head target class
    seed: int = 0  # choice of targets, head -> tail order, long-tail sampling
    data_dir: str | None = None  # overrides the data directory (not part of the split's identity)
    many: int = MANY_SHOT  # shot thresholds: many-shot > many, few-shot < few
    few: int = FEW_SHOT
    sibling_k: int = Field(3, ge=0)  # nearest pool classes used as siblings when none shares a hypernym
    test_split: str = "test"
    test_dataset: str | None = None  # test images from another dataset path (a test split file such as
    #   ImageNet_LT_test.txt); None: the test split of ``dataset``
    skip_corrupt: bool = False
    download: bool = False  # fetch CIFAR-10/100 through torchvision when no local copy exists

    def identity(self) -> dict[str, Any]:
        """The fields that define the split (data_dir and download say where the data is, not what it is)."""
        out = self.model_dump(mode="json", exclude={"data_dir", "download"})
        if out.get("test_dataset") is None:  # unset: runs made before the field existed keep their key
            out.pop("test_dataset", None)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "tiny-imagenet-lt-neighbours": {"dataset": "tiny-imagenet", "num_targets": 100, "imbalance_ratio": 100.0,
                                    "n_max": 500},
    "cifar10-neighbours": {
        "dataset": "cifar10", "targets": ["cat", "automobile", "deer", "airplane", "bird"],
        "pool": ["dog", "truck", "horse", "ship", "frog"], "imbalance_ratio": 100.0, "n_max": 500,
    },
    "omniglot-neighbours": {"dataset": "omniglot", "imbalance_ratio": 15.0, "n_max": 15, "many": 5, "few": 3},
    "cifar10-lt": {"dataset": "cifar10", "pool": [], "imbalance_ratio": 100.0, "n_max": 5000},
    "cifar100-lt": {"dataset": "cifar100", "pool": [], "imbalance_ratio": 100.0, "n_max": 500},
}
CIFAR10_SIBLINGS = {"cat": ["dog"], "automobile": ["truck"], "deer": ["horse"], "airplane": ["ship"], "bird": ["frog"]}
PRESET_ALIASES = {"tiny-imagenet-lt-neighbors": "tiny-imagenet-lt-neighbours", "cifar10-neighbors": "cifar10-neighbours",
                  "omniglot-neighbors": "omniglot-neighbours"}


@dataclass
class Protocol:
    """A resolved split.

    Attributes:
        config: the resolved config (``targets`` and ``pool`` filled in).
        target_train: long-tailed training images of the L targets, labels 0..L-1 in head -> tail order.
        target_test: test images of the targets (same class indices).
        pool: training images of the pool classes (class ids = pool ids), or None.
        siblings: target class id -> pool class ids (WordNet siblings / preset pairing); may be empty.
        stats: sibling coverage and other figures recorded in ``split.json``.
        rows: ``"train"`` / ``"test"`` / ``"pool"`` -> the row of each image of that set in the dataset split it was
            read from (:func:`build_protocol` fills it; ``RUN/targets.parquet`` references the images of
            array-backed datasets by these rows).
    """

    config: ProtocolConfig
    target_train: ImageSet
    target_test: ImageSet
    pool: ImageSet | None
    siblings: dict[str, list[str]]
    stats: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return self.target_train.num_classes


def resolve_config(preset_or_cfg: str | ProtocolConfig, data_dir: str | os.PathLike[str] | None = None,
                   **overrides: Any) -> ProtocolConfig:
    """Turn a preset name (or a dataset name/path) plus overrides into a :class:`ProtocolConfig`.

    A string that is not a preset is a plain dataset: every class is a target, no pool, no long tail unless
    ``imbalance_ratio``/``n_max`` are given.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if isinstance(preset_or_cfg, ProtocolConfig):
        base = preset_or_cfg.model_dump()
    else:
        name = PRESET_ALIASES.get(preset_or_cfg, preset_or_cfg)
        if name in PRESETS:
            base = {"preset": name, **PRESETS[name]}
        else:
            base = {"preset": None, "dataset": name, "pool": [], "imbalance_ratio": None, "n_max": None}
    base.update(overrides)
    try:
        return ProtocolConfig(**base)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"invalid protocol config: {loc}: {err['msg']} (got {err.get('input')!r})") from None


def known_classes(image_set: ImageSet, limit: int = 60) -> str:
    """The class names of a set for an error message (``name (id)`` where they differ), at most ``limit``."""
    items = [n if n == c else f"{n} ({c})" for c, n in zip(image_set.class_ids, image_set.class_names)]
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _index_by_id(image_set: ImageSet, ids: list[str], what: str) -> list[int]:
    lookup = {c: i for i, c in enumerate(image_set.class_ids)}
    lookup.update({n: i for i, n in enumerate(image_set.class_names) if n not in lookup})
    unknown = [c for c in ids if c not in lookup]
    if unknown:  # every unknown name at once, not one per run
        listed = ", ".join(repr(c) for c in unknown)
        raise ConfigError(f"{what} class{'es' if len(unknown) > 1 else ''} {listed} "
                          f"{'are' if len(unknown) > 1 else 'is'} not in {image_set.source}; known classes: "
                          f"{known_classes(image_set)}")
    out = [lookup[c] for c in ids]
    if len(set(out)) != len(out):
        dup = next(c for c in ids if sum(lookup[x] == lookup[c] for x in ids) > 1)
        raise ConfigError(f"{what} classes list {dup!r} twice")
    return out


def _rows(image_set: ImageSet, classes: list[int]) -> np.ndarray:
    """The rows of ``image_set`` whose class is one of ``classes`` (the samples :func:`_relabel` keeps, in order)."""
    return np.flatnonzero(np.isin(image_set.labels, classes))


def _relabel(image_set: ImageSet, classes: list[int]) -> ImageSet:
    """Samples of ``classes`` with labels renumbered 0..len(classes)-1 in that order."""
    remap = {c: i for i, c in enumerate(classes)}
    return image_set.subset(_rows(image_set, classes), relabel=remap,
                            class_names=[image_set.class_names[c] for c in classes],
                            class_ids=[image_set.class_ids[c] for c in classes])


def _tiny_split(ids: list[str], num_targets: int, seed: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """Pair classes greedily by WordNet distance; one class of each pair is a target (seeded)."""
    from .wordnet import distance_matrix

    n = len(ids)
    if not 0 < num_targets <= n // 2:
        raise ConfigError(f"num_targets must be in 1..{n // 2} so that each target can have a pool partner")
    dist = distance_matrix(ids)
    rng = np.random.default_rng(seed)
    iu, ju = np.triu_indices(n, 1)
    tie = rng.random(len(iu))
    order = np.lexsort((tie, dist[iu, ju]))
    used = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for k in order:
        i, j = int(iu[k]), int(ju[k])
        if not used[i] and not used[j]:
            used[i] = used[j] = True
            pairs.append((i, j))
    chosen = rng.permutation(len(pairs))[:num_targets]
    targets, partner_dist = [], []
    for p in chosen:
        i, j = pairs[p]
        t = i if rng.random() < 0.5 else j
        targets.append(t)
        partner_dist.append(int(dist[i, j]))
    tset = set(targets)
    pool = [ids[i] for i in range(n) if i not in tset]
    stats = {"pair_distance_median": float(np.median(partner_dist)),
             "pair_distance_max": int(max(partner_dist)),
             "pairs_at_distance_2": int(sum(d == 2 for d in partner_dist))}
    return [ids[t] for t in targets], pool, stats


def _omniglot_split(image_set: ImageSet, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    by_alpha: dict[str, list[str]] = {}
    for cid in image_set.class_ids:
        by_alpha.setdefault(cid.split("/")[0], []).append(cid)
    targets, pool = [], []
    for alpha in sorted(by_alpha):
        chars = [by_alpha[alpha][i] for i in rng.permutation(len(by_alpha[alpha]))]
        k = len(chars) // 2
        targets += chars[:k]
        pool += chars[k:]
    return [targets[i] for i in rng.permutation(len(targets))], sorted(pool)


def build_protocol(preset_or_cfg: str | ProtocolConfig, data_dir: str | os.PathLike[str] | None = None,
                   **overrides: Any) -> Protocol:
    """Build a split-neighbour protocol (or a plain / long-tailed dataset) from a preset or a config.

    Args:
        preset_or_cfg: a preset name (``PRESETS``), a dataset name/path, or a :class:`ProtocolConfig`.
        data_dir: overrides the data directory.
        **overrides: any :class:`ProtocolConfig` field (``seed``, ``imbalance_ratio``, ``n_max``, ...).

    Returns:
        The :class:`Protocol`; deterministic given the config.

    Raises:
        ConfigError: unknown class ids, overlapping target/pool classes, bad thresholds.
        DataError: the dataset is missing or malformed.

    Example:
        >>> p = build_protocol("cifar10-neighbours")  # doctest: +SKIP
        >>> p.target_train.counts().tolist()  # doctest: +SKIP
        [500, 158, 50, 15, 5]
    """
    cfg = resolve_config(preset_or_cfg, data_dir, **overrides)
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, skip_corrupt=cfg.skip_corrupt, download=cfg.download)
    test = load_dataset(cfg.test_dataset or cfg.dataset, cfg.test_split, cfg.data_dir, skip_corrupt=cfg.skip_corrupt,
                        download=cfg.download)
    same_classes = train.class_ids == test.class_ids
    if not same_classes and cfg.targets is None:
        raise DataError(f"{cfg.dataset}: train ({train.source}) and test ({test.source}) list different classes")
    stats: dict[str, Any] = {}
    targets, pool = cfg.targets, cfg.pool
    if targets is None:
        if cfg.preset == "tiny-imagenet-lt-neighbours" or (pool is None and all(
                c.startswith("n") and len(c) == 9 for c in train.class_ids)):
            targets, pool_default, stats = _tiny_split(list(train.class_ids), cfg.num_targets or 100, cfg.seed)
        elif cfg.preset == "omniglot-neighbours":
            targets, pool_default = _omniglot_split(train, cfg.seed)
        else:
            rest = set(pool or [])
            targets = [c for c in train.class_ids if c not in rest]
            pool_default = []
        pool = pool if pool is not None else pool_default
    if pool is None:
        pool = [c for c in train.class_ids if c not in set(targets)]
    t_idx = _index_by_id(train, targets, "target")
    p_idx = _index_by_id(train, pool, "pool")
    overlap = set(t_idx) & set(p_idx)
    if overlap:
        raise ConfigError(f"class {train.class_ids[min(overlap)]!r} is both a target and in the pool")
    targets = [train.class_ids[i] for i in t_idx]
    pool = [train.class_ids[i] for i in p_idx]
    cfg = cfg.model_copy(update={"targets": targets, "pool": pool})

    target_train, train_rows = _relabel(train, t_idx), _rows(train, t_idx)
    if cfg.imbalance_ratio is not None or cfg.n_max is not None:
        n_max = cfg.n_max if cfg.n_max is not None else int(target_train.counts().max())
        keep = long_tailed_indices(target_train, cfg.imbalance_ratio or 1.0, n_max, seed=cfg.seed)
        target_train, train_rows = target_train.subset(keep), train_rows[keep]
    if same_classes:
        target_test, test_rows = _relabel(test, t_idx), _rows(test, t_idx)
    else:  # the test set need only hold the targets (pool classes are never tested)
        test_ids = {c: i for i, c in enumerate(test.class_ids)}
        missing = [c for c in targets if c not in test_ids]
        if missing:
            raise DataError(f"{test.source}: target class {missing[0]!r} has no test images (test classes: "
                            f"{known_classes(test)})")
        target_test, test_rows = (_relabel(test, [test_ids[c] for c in targets]),
                                  _rows(test, [test_ids[c] for c in targets]))
    pool_set = _relabel(train, p_idx) if p_idx else None
    rows = {"train": train_rows, "test": test_rows, "pool": _rows(train, p_idx)}

    siblings: dict[str, list[str]] = {}
    if pool:
        if cfg.preset == "cifar10-neighbours" and set(targets) == set(CIFAR10_SIBLINGS):
            siblings = {t: [p for p in CIFAR10_SIBLINGS[t] if p in pool] for t in targets}
        elif cfg.dataset == "omniglot" or cfg.preset == "omniglot-neighbours":
            siblings = {t: [p for p in pool if p.split("/")[0] == t.split("/")[0]] for t in targets}
        elif all(c.startswith("n") and c[1:].isdigit() and len(c) == 9 for c in targets + pool):
            from .wordnet import direct_hypernyms, sibling_relation

            siblings = sibling_relation(targets, pool, cfg.sibling_k)
            hyp = {c: set(direct_hypernyms(c)) for c in targets + pool}
            stats["targets_with_direct_sibling"] = int(sum(
                any(hyp[t] & hyp[p] for p in pool) for t in targets))
    stats["targets_with_siblings"] = int(sum(bool(siblings.get(t)) for t in targets))
    stats["num_targets"], stats["num_pool"] = len(targets), len(pool)
    logger.info("protocol %s: %d targets (%d images), %d pool classes (%d images), %d targets with siblings",
                cfg.preset or cfg.dataset, len(targets), len(target_train), len(pool),
                len(pool_set) if pool_set is not None else 0, stats["targets_with_siblings"])
    return Protocol(config=cfg, target_train=target_train, target_test=target_test, pool=pool_set,
                    siblings=siblings, stats=stats, rows=rows)


def _class_rows(image_set: ImageSet, counts: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, (cid, name) in enumerate(zip(image_set.class_ids, image_set.class_names)):
        row = {"index": i, "id": cid, "name": name, "synonyms": image_set.synonyms.get(cid, [name]),
               "train_count": int(counts[i])}
        rows.append(row)
    return rows


def split_record(protocol: Protocol) -> dict[str, Any]:
    """The ``split.json`` document of a protocol (schema 1)."""
    cfg = protocol.config
    tr_counts = protocol.target_train.counts()
    te_counts = protocol.target_test.counts()
    targets = _class_rows(protocol.target_train, tr_counts)
    shots = shot_groups(tr_counts, cfg.many, cfg.few)
    for row in targets:
        row["test_count"] = int(te_counts[row["index"]])
        row["shot"] = str(shots[row["index"]])
    pool = _class_rows(protocol.pool, protocol.pool.counts()) if protocol.pool is not None else []
    for row in pool:
        row["count"] = row.pop("train_count")
    return {
        "schema": SPLIT_SCHEMA,
        "protocol": cfg.model_dump(mode="json"),
        "targets": targets,
        "pool": pool,
        "siblings": protocol.siblings,
        "stats": protocol.stats,
        "skipped_corrupt": sorted(set(protocol.target_train.skipped) | set(protocol.target_test.skipped)),
    }


__all__ = ["CIFAR10_SIBLINGS", "PRESETS", "SPLIT_SCHEMA", "Protocol", "ProtocolConfig", "build_protocol",
           "resolve_config", "split_record"]
