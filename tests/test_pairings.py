"""Re-pairing an auxiliary set (which target/auxiliary pairs the neighbor-silencing loss silences): visual pairs from
class prototypes, random pairs as the control, and the ``pairs`` grid of ``neighborlt ablate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aux_helpers import sibling_aux_set

from neighborlt.ablate import AblationConfig, grid_rows, run_ablation
from neighborlt.data import build_protocol
from neighborlt.data.auxiliary import AuxTrainingSet, class_prototypes, pairing_sample, repair
from neighborlt.data.base import ImageSet
from neighborlt.errors import ConfigError
from neighborlt.pipeline import DEMO_TRAIN


def _toy_set() -> tuple[AuxTrainingSet, np.ndarray, np.ndarray]:
    """3 targets + 4 auxiliary classes (3..6), two images each; relation degrees 2, 1, 0."""
    labels = np.repeat(np.arange(7), 2)
    train = ImageSet(class_names=[f"c{i}" for i in range(7)], labels=labels,
                     array=np.zeros((14, 4, 4, 3), dtype=np.uint8))
    test = ImageSet(class_names=["c0", "c1", "c2"], labels=np.arange(3), array=np.zeros((3, 4, 4, 3), np.uint8))
    aux = AuxTrainingSet(train=train, test=test, num_target=3, pairs=np.array([[0, 3], [0, 4], [1, 5]]))
    # class c -> direction: targets 0 and 1 point at auxiliary classes 6/5 and 3 respectively
    direction = {0: [1, 0, 0], 1: [0, 1, 0], 2: [0, 0, 1], 3: [0, 1, 0.1], 4: [0, 0, 1], 5: [1, 0.5, 0],
                 6: [1, 0.1, 0]}
    rng = np.random.default_rng(0)
    feats = np.array([direction[int(y)] for y in labels]) * rng.uniform(1, 3, (14, 1))  # norms must not matter
    return aux, feats, labels


def test_visual_pairs_are_the_nearest_prototypes_with_the_relation_degrees() -> None:
    aux, feats, labels = _toy_set()
    vis = repair(aux, "visual", features=feats, feature_labels=labels)
    assert vis.pairs.tolist() == [[0, 5], [0, 6], [1, 3]]  # target 0 keeps 2 pairs, target 1 one, target 2 none
    assert vis.train is aux.train and vis.num_target == 3
    assert vis.aux_parents == {"c5": ["c0"], "c6": ["c0"], "c3": ["c1"]}
    proto = class_prototypes(feats, labels, 7)
    assert np.allclose(np.linalg.norm(proto, axis=1), 1.0)
    assert repair(aux, "relation") is aux


def test_random_pairs_keep_the_degrees_and_are_seeded() -> None:
    aux, _, _ = _toy_set()
    draws = [repair(aux, "random", seed=s).pairs for s in range(6)]
    for pairs in draws:
        assert np.bincount(pairs[:, 0], minlength=3).tolist() == [2, 1, 0]
        assert set(pairs[:, 1].tolist()) <= {3, 4, 5, 6} and len({tuple(p) for p in pairs.tolist()}) == 3
    assert np.array_equal(repair(aux, "random", seed=0).pairs, draws[0])
    assert len({tuple(map(tuple, d.tolist())) for d in draws}) > 1


def test_repair_errors() -> None:
    aux, feats, labels = _toy_set()
    with pytest.raises(ConfigError, match="unknown pairing 'nearest'"):
        repair(aux, "nearest")
    with pytest.raises(ConfigError, match="needs features"):
        repair(aux, "visual")
    keep = labels != 4
    with pytest.raises(ConfigError, match="no features of class 'c4'"):
        repair(aux, "visual", features=feats[keep], feature_labels=labels[keep])


def test_visual_pairs_on_cifar10_from_pretrained_features(data_dir: Path) -> None:
    """Real images, the offline ImageNet EfficientNet-Lite0: each target keeps one pair (its WordNet degree), and the
    nearest pool prototypes of cat, automobile and airplane are dog, truck and ship."""
    from neighborlt.train.features import extract_features

    aux = sibling_aux_set(build_protocol("cifar10-neighbours", data_dir))
    idx = pairing_sample(aux, 20)  # 20 images per class (fewer where a class has fewer): 180 feature passes
    assert np.bincount(aux.train.labels[idx]).tolist() == [20] * 3 + [15, 5] + [20] * 5  # airplane 15, bird 5 images
    sample = aux.train.subset(idx)
    vis = repair(aux, "visual", features=extract_features("efficientnet_lite0", "pretrained", sample, 64),
                 feature_labels=sample.labels)
    names = aux.train.class_names
    got = {names[i]: names[j] for i, j in vis.pairs.tolist()}
    assert len(got) == 5 and len(vis.pairs) == 5
    assert got["cat"] == "dog" and got["automobile"] == "truck" and got["airplane"] == "ship"


POOL = ["dog", "truck"]  # two pool classes (cat's and automobile's WordNet neighbours): 10,000 pool images, not 25,000


def test_pairs_grid(tmp_path: Path, data_dir: Path) -> None:
    train = {**DEMO_TRAIN, "image_size": 16, "epochs": 1, "batch_size": 16, "warmup_epochs": 0,
             "max_test_per_class": 10, "crt_epochs": 1}
    cfg = AblationConfig(grids=["pairs"], protocol="cifar10-neighbours",
                         protocol_overrides={"n_max": 40, "imbalance_ratio": 10, "pool": POOL}, data_dir=str(data_dir),
                         seeds=[0],
                         relation="wordnet", aux_cap=8, pairings=["random"], train=train)
    rows = grid_rows(cfg, "pairs")
    assert [r.label for r in rows] == ["† (λs = 1), direct classifier", "NS, wordnet pairs, direct classifier",
                                       "NS, random pairs, direct classifier", "† (λs = 1), cRT classifier",
                                       "NS, wordnet pairs, cRT classifier", "NS, random pairs, cRT classifier"]
    trained: list[tuple[str, int]] = []
    (res,) = run_ablation(cfg, tmp_path, progress=False, on_run=lambda n, s: trained.append((n, s)))
    assert sorted(trained) == [("balce_aux_crt", 0), ("ns0.1_aux_crt", 0), ("ns0.1_aux_crt_random", 0)]
    assert [r["run"] for r in res.rows] == ["balce_aux_crt", "ns0.1_aux_crt", "ns0.1_aux_crt_random"] * 2
    assert [r["classifier"] for r in res.rows] == ["metrics"] * 3 + ["crt_metrics"] * 3
    record = json.loads((tmp_path / "pairs" / "random_k5_rauto.json").read_text())
    assert record["pairs"] == record["relation_pairs"] == 2 and len(record["pair_names"]) == 2
    assert {t for t, _ in record["pair_names"]} == {"cat", "automobile"}  # the relation's degrees: one pair each
    assert record["shared_with_relation"] < 2  # other pairs than WordNet's cat - dog, automobile - truck
    model = json.loads((tmp_path / "runs" / "ns0.1_aux_crt_random" / "seed0" / "train" / "model.json").read_text())
    assert model["num_classes"] == 5 + len(POOL)
    md = (tmp_path / "pairs.md").read_text()
    assert md.count("\n| ") == 7 and "* NS, random pairs, cRT classifier: overall" in md
