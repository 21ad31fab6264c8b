"""Split-neighbour protocols (CIFAR-10, Omniglot, generated Tiny-ImageNet layout), the split.json + targets.parquet
round trip and the auxiliary training set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data.make_fixtures import omniglot_npz, tiny_imagenet

from neighborlt.classes import ClassesConfig, run_classes
from neighborlt.data import build_protocol, load_targets, shot_groups
from neighborlt.data.auxiliary import load_aux_training_set
from neighborlt.errors import ConfigError, DataError
from neighborlt.filter import FilterConfig, run_filter
from neighborlt.retrieve import RetrieveConfig, run_retrieve
from neighborlt.rundir import RunDir, read_json


def test_cifar10_neighbours(data_dir: Path) -> None:
    p = build_protocol("cifar10-neighbours", data_dir)
    assert p.target_train.class_names == ["cat", "automobile", "deer", "airplane", "bird"]
    assert p.target_train.counts().tolist() == [500, 158, 50, 15, 5]
    assert p.target_test.counts().tolist() == [1000] * 5
    assert p.pool.class_names == ["dog", "truck", "horse", "ship", "frog"]
    assert p.pool.counts().tolist() == [5000] * 5
    assert not set(map(str, p.target_train.paths)) & set(map(str, p.pool.paths))
    assert p.siblings == {"cat": ["dog"], "automobile": ["truck"], "deer": ["horse"], "airplane": ["ship"],
                          "bird": ["frog"]}
    # seeded: another seed draws other images with the same counts
    q = build_protocol("cifar10-neighbours", data_dir, seed=1)
    assert q.target_train.counts().tolist() == [500, 158, 50, 15, 5] and q.target_train.paths != p.target_train.paths
    assert build_protocol("cifar10-neighbours", data_dir).target_train.paths == p.target_train.paths


def test_cifar10_lt_and_plain(data_dir: Path) -> None:
    p = build_protocol("cifar10-lt", data_dir)
    assert sum(p.target_train.counts()) == 12406 and p.pool is None and len(p.target_test) == 10000
    plain = build_protocol("cifar10", data_dir)
    assert plain.target_train.counts().tolist() == [5000] * 10 and plain.config.preset is None


def test_protocol_config_errors(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="both a target and in the pool"):
        build_protocol("cifar10-neighbours", data_dir, pool=["dog", "cat"])
    with pytest.raises(ConfigError, match="target class 'lion' is not in"):
        build_protocol("cifar10-neighbours", data_dir, targets=["lion"])
    with pytest.raises(ConfigError, match="target classes 'lion', 'tiger' are not in"):  # all of them, at once
        build_protocol("cifar10-neighbours", data_dir, targets=["cat", "lion", "tiger"])
    with pytest.raises(ConfigError, match="invalid protocol config"):
        build_protocol("cifar10-neighbours", data_dir, sibling_k=-1)


def test_omniglot_neighbours(data_dir: Path) -> None:
    p = build_protocol("omniglot-neighbours", data_dir)
    tr = p.target_train
    alphabets = {c.split("/")[0] for c in tr.class_ids}
    assert len(alphabets) == 8 and not set(tr.class_ids) & set(p.pool.class_ids)
    assert tr.num_classes + p.pool.num_classes == 242
    assert tr.counts().max() == 15 and tr.counts().min() == 1
    assert p.target_test.counts().tolist() == [5] * tr.num_classes
    assert all(s.split("/")[0] == t.split("/")[0] for t, sib in p.siblings.items() for s in sib)
    groups = shot_groups(tr.counts(), p.config.many, p.config.few)
    print("omniglot shot groups:", {g: int((groups == g).sum()) for g in ("many", "medium", "few")})
    assert {"many", "medium", "few"} <= set(groups.tolist())


def test_omniglot_generated(tmp_path: Path) -> None:
    path = omniglot_npz(tmp_path / "o.npz", alphabets=2, chars=4)
    p = build_protocol("omniglot-neighbours", dataset=str(path))
    assert p.num_targets == 4 and p.pool.num_classes == 4
    assert p.target_train.counts().tolist() == [15, 6, 2, 1]


def test_wordnet_protocol_on_generated_tiny_layout(tmp_path: Path) -> None:
    # 3 dogs (toy dogs + terriers) and 3 fish/birds: pairing must put relatives on both sides
    wnids = ["n02085620", "n02085782", "n02094433", "n02096294", "n01443537", "n01530575"]
    root = tiny_imagenet(tmp_path / "tiny", wnids, n_train=6, n_val=2)
    p = build_protocol("tiny-imagenet-lt-neighbours", dataset=str(root), num_targets=3, n_max=6, imbalance_ratio=3)
    assert p.num_targets == 3 and p.pool.num_classes == 3
    assert p.target_train.counts().tolist() == [6, 3, 2]
    assert all(p.siblings[t] for t in p.config.targets)
    assert p.stats["pairs_at_distance_2"] >= 2  # toy-dog pair and terrier pair share a direct hypernym


def test_split_json_round_trip_and_aux(tmp_path: Path, data_dir: Path) -> None:
    run = RunDir(tmp_path / "run")
    # three pool classes (retrieve and filter read every pool image: 15,000 here, not 25,000); the names below use them
    pool = ["dog", "truck", "ship"]
    res = run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), seed=3, pool=pool), run)
    assert res.train_counts == [500, 158, 50, 15, 5]
    split = read_json(run.path("split.json"))
    assert split["protocol"]["seed"] == 3 and [t["id"] for t in split["targets"]][:2] == ["cat", "automobile"]
    p = load_targets(run)
    ref = build_protocol("cifar10-neighbours", data_dir, seed=3, pool=pool)
    assert p.target_train.paths == ref.target_train.paths and p.config == ref.config
    assert p.target_test.paths == ref.target_test.paths and p.pool.paths == ref.pool.paths

    aux = _acquired(run, "wordnet")
    assert aux.num_target == 5 and aux.train.num_classes == 8
    assert aux.pairs.tolist() == [[0, 5], [1, 6], [3, 7]]  # cat - dog, automobile - truck, airplane - ship (WordNet)
    assert aux.train.counts().tolist() == [500, 158, 50, 15, 5] + [5000] * 3
    assert aux.test.num_classes == 5

    neighbors = {"targets": [{"index": 0, "name": "cat", "found": ["Dogs", "lynx"]}],
                 "auxiliary": [{"name": "TRUCK", "parents": ["Automobile", "cat"]},
                               {"name": "lynx", "parents": ["cat"]}, {"name": "ship", "parents": ["unicorn"]}]}
    run.path("neighbors.json").write_text(json.dumps(neighbors))
    aux = _acquired(run, "names")
    assert aux.train.class_names == ["cat", "automobile", "deer", "airplane", "bird", "truck", "dog"]
    assert aux.pairs.tolist() == [[0, 5], [0, 6], [1, 5]]
    assert aux.aux_parents == {"truck": ["automobile", "cat"], "dog": ["cat"]}
    assert read_json(run.path("retrieve", "stats.json"))["source"]["unmatched_names"] == ["lynx"]
    assert load_aux_training_set(p, None, run.root).train.num_classes == 5
    run.path("neighbors.json").write_text(json.dumps({"auxiliary": [{"name": 3}]}))
    with pytest.raises(DataError, match="auxiliary\\[0\\] needs a string 'name'"):
        run_retrieve(RetrieveConfig(), run)

    # a split.json that disagrees with targets.parquet is detected instead of silently giving another split
    doc = read_json(run.path("split.json"))
    doc["targets"][0]["train_count"] = 499
    run.path("split.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="train images per class differ from the counts in split.json"):
        load_targets(run)


def _acquired(run: RunDir, match: str):
    """retrieve (the protocol's local pool) -> filter (every rule off) -> the auxiliary training set."""
    run_retrieve(RetrieveConfig(source="local", match=match, force=True), run)
    run_filter(FilterConfig.keep_all(force=True), run)
    return load_aux_training_set(load_targets(run), run.path("filter", "aux_manifest.parquet"), run.root)


def test_pool_matching_uses_the_one_normaliser() -> None:
    from neighborlt.neighbors.parse import name_key

    assert name_key("  Golden_Retrievers ") == "golden retriever"
    assert name_key("shih-tzu") == "shih tzu"
    assert name_key("Butterflies") == "butterfly" and name_key("boxes") == "box"
    assert name_key("bus") == "bus" and name_key("") is None


@pytest.mark.slow
def test_tiny_imagenet_lt_neighbours_real(data_dir: Path) -> None:
    p = build_protocol("tiny-imagenet-lt-neighbours", data_dir)
    tr = p.target_train
    assert tr.num_classes == 100 and p.pool.num_classes == 100
    assert not set(tr.class_ids) & set(p.pool.class_ids)
    assert tr.counts().tolist()[0] == 500 and tr.counts().tolist()[-1] == 5 and len(tr) == 10847
    assert p.target_test.counts().tolist() == [50] * 100
    assert p.pool.counts().tolist() == [500] * 100
    with_sib = sum(bool(v) for v in p.siblings.values())
    print(f"tiny-imagenet siblings coverage: {with_sib}/100 targets with siblings, "
          f"{p.stats['targets_with_direct_sibling']}/100 sharing a direct hypernym, pair distance median "
          f"{p.stats['pair_distance_median']}, max {p.stats['pair_distance_max']}")
    assert with_sib == 100 and p.stats["targets_with_direct_sibling"] >= 25
    assert p.stats["pair_distance_median"] <= 4
    q = build_protocol("tiny-imagenet-lt-neighbours", data_dir, seed=1)
    assert q.config.targets != p.config.targets
    assert build_protocol("tiny-imagenet-lt-neighbours", data_dir).config.targets == p.config.targets
    syn = {n for c in p.pool.class_ids for n in p.pool.synonyms[c]}
    assert len(syn) > p.pool.num_classes  # words.txt synonyms are carried for name matching
    sib_names = {p.pool.class_names[p.pool.class_ids.index(s)] for s in p.siblings[p.config.targets[0]]}
    from neighborlt.retrieve.sources import AuxName, SourceContext, local_source

    ctx = SourceContext(names=[AuxName(n, [tr.class_names[0]]) for n in sib_names], root=Path("."),
                        load_protocol=lambda: p)
    rows = list(local_source(RetrieveConfig(), ctx))
    assert {r["name"] for r in rows} == sib_names and not ctx.stats["unmatched_names"]
    x_val = np.asarray(p.target_test.load(0))
    assert x_val.shape == (64, 64, 3)
