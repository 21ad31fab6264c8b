"""The ``silencing`` grid of ``neighborlt ablate`` (issue 12): † / paper / hard pairs / aux-exclusive / official on
one auxiliary set, paired deltas to †, ECE and the pair density under the table; tiny CIFAR-10 protocol, 1 epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import train_mtimes

from neighborlt.ablate import AblationConfig, grid_rows, run_ablation, train_config
from neighborlt.errors import ConfigError
from neighborlt.pipeline import DEMO_TRAIN
from neighborlt.train import TrainConfig

# 40/22/12/7/4 target images; one pool class (dog: cat's WordNet neighbour), so every run reads 5,000 pool images,
# not 25,000: the grid's claims need one target/auxiliary pair
SMALL = {"n_max": 40, "imbalance_ratio": 10, "pool": ["dog"]}
TRAIN = {**DEMO_TRAIN, "image_size": 16, "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "max_test_per_class": 10,
         "threads": 1}


def _cfg(data_dir: Path | None = None) -> AblationConfig:
    return AblationConfig(grids=["silencing"], protocol="cifar10-neighbours", protocol_overrides=SMALL,
                          data_dir=None if data_dir is None else str(data_dir), seeds=[0, 1], relation="wordnet",
                          aux_cap=8, train=TRAIN)


def test_rows_and_resolved_loss_settings() -> None:
    cfg = _cfg()
    rows = grid_rows(cfg, "silencing")
    assert [r.run.name for r in rows] == ["balce_aux", "ns0.1_aux", "ns0_aux", "ns1_aux_auxw0", "ns_official_aux"]
    assert all(r.run.aux and r.source == "metrics" for r in rows)  # same auxiliary set, direct classifier
    tcfgs = [train_config(cfg, r.run, 0) for r in rows]
    assert tcfgs[0].loss == "balanced_softmax"
    assert [(t.lambda_s, t.loss_params) for t in tcfgs[1:]] == [
        (0.1, {}), (0.0, {}), (1.0, {"aux_weight": 0.0}), (0.0, {"silencing": "official"})]
    # the loss_params survive a JSON round trip (the run folders' train.json)
    assert TrainConfig(**json.loads(tcfgs[4].model_dump_json())) == tcfgs[4]


def test_preset_validation() -> None:
    with pytest.raises(ConfigError, match="neighbor_silencing preset"):
        TrainConfig(loss="balanced_softmax", loss_params={"silencing": "official"})
    with pytest.raises(ConfigError, match="choose one of custom, paper, official"):
        TrainConfig(loss="neighbor_silencing", loss_params={"silencing": "hard"})
    with pytest.raises(ConfigError, match="sets aux_weight=0"):
        TrainConfig(loss="neighbor_silencing", loss_params={"silencing": "official", "aux_weight": 1})
    TrainConfig(loss="neighbor_silencing", loss_params={"silencing": "paper"})


def test_silencing_grid_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    cfg = _cfg(data_dir)
    trained: list[tuple[str, int]] = []
    (res,) = run_ablation(cfg, tmp_path, progress=False, on_run=lambda n, s: trained.append((n, s)))
    names = ("balce_aux", "ns0.1_aux", "ns0_aux", "ns1_aux_auxw0", "ns_official_aux")
    assert sorted(trained) == sorted((n, s) for n in names for s in (0, 1))
    assert res.rows[0]["delta_overall"] == (0.0, 0.0)
    for row in res.rows:
        assert set(row["seeds"]) == {0, 1} and row["seeds"][0]["overall"] is not None
        assert 0.0 <= row["seeds"][0]["ece"] <= 100.0
    # the official preset reached the loss: its recorded config and a finite training loss
    rec = json.loads((tmp_path / "runs" / "ns_official_aux" / "seed0" / "records" / "train.config.json").read_text())
    assert rec["loss_params"] == {"silencing": "official"}
    def losses(run: str) -> list[float]:
        log = (tmp_path / "runs" / run / "seed0" / "train" / "log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in log if '"epoch"' in x]

    dag = losses("balce_aux")
    assert all(0 < v < 100 for n in names for v in losses(n))  # finite, also under the hard masks
    # aux_weight and lambda_s reached the loss (same data, seeds and init: only the loss differs)
    assert all(losses(n) != dag for n in names[1:])
    md = (tmp_path / "silencing.md").read_text()
    assert md.count("\n| ") == 6  # header + 5 rows
    assert md.count("Neighbor silencing − †") == 1 and md.count("\n* ") >= 5  # 4 deltas + the density line
    assert "official (λs 0, aux_weight 0): overall" in md
    assert "Pair density of the training set" in md  # WordNet: cat - dog, the other four targets have no pair
    assert "1 pairs over 5 targets and 1 auxiliary classes; pairs per target 0.20 (max 1)" in md
    assert "targets without a pair 4" in md
    assert "Expected calibration error" in md
    # where each row's joint model sends the test images: the four shares add up, cached under the weights' hash
    assert "Where the target test images go" in md and md.count("paired auxiliary ") == 5
    where = json.loads((tmp_path / "runs" / "ns_official_aux" / "seed0" / "train" / "where.json").read_text())
    share = where["share"]
    assert sum(share[k] for k in ("correct", "other_target", "paired_aux", "unpaired_aux")) == pytest.approx(100)
    assert share["aux"] == pytest.approx(share["paired_aux"] + share["unpaired_aux"])
    assert where["n_test"] == 5 * TRAIN["max_test_per_class"]
    # re-running only re-reads the finished runs: no training output is written again
    before = train_mtimes(tmp_path)
    assert len(before) == 5 * 2 * 3  # 5 runs x 2 seeds x (weights, model.json, done marker)
    run_ablation(cfg, tmp_path, progress=False)
    assert train_mtimes(tmp_path) == before


def test_variants_subset_and_runs_shared_with_table6(tmp_path: Path, data_dir: Path) -> None:
    """`--silencing-variant official` with Table 6: † and the paper's λs are Table 6's runs (the classifier option
    does not make a run distinct), so four runs train, and the silencing rows read the direct classifier."""
    cfg = AblationConfig(**{**_cfg(data_dir).model_dump(), "grids": ["table6", "silencing"], "seeds": [0],
                            "silencing_variants": ["official"]})
    assert [r.run.name for r in grid_rows(cfg, "silencing")] == ["balce_aux", "ns_official_aux"]
    trained: list[tuple[str, int]] = []
    t6, sil = run_ablation(cfg, tmp_path, progress=False, on_run=lambda n, s: trained.append((n, s)))
    assert sorted(n for n, _ in trained) == ["balce", "balce_aux_crt", "ns0.1_aux_crt", "ns_official_aux"]
    assert [r["run"] for r in sil.rows] == ["balce_aux_crt", "ns_official_aux"]
    dag_direct = next(r for r in t6.rows if r["label"] == "+ auxiliary data, Bal-CE (†), direct classifier")
    assert sil.rows[0]["seeds"][0]["overall"] == dag_direct["seeds"][0]["overall"]
    with pytest.raises(ValueError, match="silencing_variants"):
        AblationConfig(silencing_variants=["hard"])
