"""``neighborlt pilot`` (issue 12, the granularity study): the WordNet superclass partition, the controlled class
sample, the head-tail gap, and the study end to end on a generated Tiny-ImageNet layout (real WordNet ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data.make_fixtures import tiny_imagenet

from neighborlt.cli import main
from neighborlt.data.longtail import long_tail_counts
from neighborlt.data.wordnet import root_path, superclass_partition
from neighborlt.errors import ConfigError
from neighborlt.pilot import PilotConfig, head_tail, run_pilot, sample_classes, superclass_groups

DOGS = ["n02085620", "n02094433", "n02099601", "n02106662"]  # Chihuahua, Yorkshire terrier, golden retriever, GSD
VEHICLES = ["n03100240", "n03670208", "n04285008", "n03796401"]  # convertible, limousine, sports car, moving van
TRAIN = {"model": "resnet8_cifar", "image_size": 16, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "lr": 0.05,
         "threads": 1, "eval_every": 0}


def test_partition_is_a_partition_into_subtrees() -> None:
    ids = DOGS + VEHICLES + ["n01443537", "n01774750", "n02123045"]  # goldfish, tarantula, tabby
    groups = superclass_partition(ids, 4)
    assert set(groups) == set(ids)
    assert len(set(groups.values())) >= 4
    for cid, g in groups.items():  # each superclass is an ancestor (or the class itself) on the class's path
        assert g in root_path(cid)
    assert groups == superclass_partition(list(reversed(ids)), 4)  # order-independent
    # the dogs stay together longer than dogs and cars
    assert len({groups[d] for d in DOGS}) <= len({groups[c] for c in DOGS + VEHICLES}) - 1


def test_groups_of_group_slash_class_ids_and_flat_ids() -> None:
    assert superclass_groups(["Latin/c01", "Latin/c02", "Greek/c01"], 48) == {
        "Latin/c01": "Latin", "Latin/c02": "Latin", "Greek/c01": "Greek"}
    with pytest.raises(ConfigError, match="no hierarchy"):
        superclass_groups(["cat", "dog"], 48)


def test_sample_is_controlled_interleaved_and_seeded() -> None:
    groups = {f"g{g}/c{c}": f"g{g}" for g in range(6) for c in range(6)}
    for s in (1, 2, 3, 6):
        picked = sample_classes(groups, 6, s, seed=0)
        assert len(picked) == len(set(picked)) == 6
        assert len({groups[c] for c in picked}) == s  # exactly S superclasses, equal shares
        assert len({groups[c] for c in picked[:s]}) == s  # round robin: the first S ranks are S superclasses
    assert sample_classes(groups, 6, 2, seed=0) == sample_classes(groups, 6, 2, seed=0)
    assert len({tuple(sample_classes(groups, 6, 2, seed=k)) for k in range(5)}) > 1
    with pytest.raises(ConfigError, match="hold >= 7 classes"):
        sample_classes(groups, 14, 2, seed=0)  # only 6 classes per superclass
    with pytest.raises(ConfigError, match="cannot hold"):
        sample_classes(groups, 3, 4, seed=0)


def test_head_tail_by_rank() -> None:
    rows = [{"index": i, "accuracy": a} for i, a in enumerate([90.0, 80.0, 50.0, 40.0, 20.0, 10.0])]
    assert head_tail(list(reversed(rows)), 1 / 3) == {"head": 85.0, "tail": 15.0, "gap": 70.0}
    with pytest.raises(ConfigError, match="fewer than 2"):
        head_tail(rows[:1], 1 / 3)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return tiny_imagenet(tmp_path / "tiny", DOGS + VEHICLES, n_train=6, n_val=2)


def test_pilot_end_to_end_and_resume(tmp_path: Path, tiny: Path) -> None:
    cfg = PilotConfig(dataset=str(tiny), num_classes=4, superclasses=[1, 2], ratios=[1, 3], n_max=6, seeds=[0, 1],
                      partition_groups=2, train=TRAIN)
    out = tmp_path / "pilot"
    doc = run_pilot(cfg, out, progress=False)
    assert [(r["superclasses"], r["ratio"]) for r in doc["rows"]] == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    for row in doc["rows"]:
        assert set(row["seeds"]) == {0, 1}
        for v in row["seeds"].values():
            assert v["gap"] == pytest.approx(v["head"] - v["tail"])
        assert len(row["gap"]) == 2
        for sd, v in row["seeds"].items():  # paired with the same classes at ratio 1
            base = next(r for r in doc["rows"] if r["superclasses"] == row["superclasses"] and r["ratio"] == 1)
            assert v["gap_vs_balanced"] == pytest.approx(v["gap"] - base["seeds"][sd]["gap"])
    # the ratio is what changes within a row: 6 images per class at ratio 1, the long-tail profile at ratio 3
    assert doc["rows"][0]["seeds"][0]["train_images"] == 24
    assert doc["rows"][1]["seeds"][0]["train_images"] == sum(long_tail_counts(4, 6, 3)) < 24
    split = json.loads((out / "runs" / "s2_r3" / "seed0" / "split.json").read_text())
    sample = json.loads((out / "superclasses.json").read_text())["samples"]
    s2 = next(s for s in sample if s["superclasses"] == 2 and s["seed"] == 0)
    assert split["protocol"]["targets"] == s2["classes"] and len(set(s2["superclass_of"])) == 2
    s1 = next(s for s in sample if s["superclasses"] == 1 and s["seed"] == 0)
    assert len(set(s1["superclass_of"])) == 1
    assert (out / "pilot.png").stat().st_size > 0 and "head − tail gap" in (out / "pilot.md").read_text()
    page = (out / "index.html").read_text()
    assert "Head-tail gap by granularity" in page and "<script" not in page
    # re-running trains nothing: the weights stay as they are
    weights = sorted(out.glob("runs/*/seed*/train/model.safetensors"))
    assert len(weights) == 8
    before = [w.stat().st_mtime_ns for w in weights]
    run_pilot(cfg, out, progress=False)
    assert [w.stat().st_mtime_ns for w in weights] == before
    # another study on the same folder is refused up front; more seeds extend it
    with pytest.raises(ConfigError, match="made by a pilot with n_max = 6, not 5"):
        run_pilot(cfg.model_copy(update={"n_max": 5}), out, progress=False)
    with pytest.raises(ConfigError, match="train.epochs = 1, not 2"):
        run_pilot(cfg.model_copy(update={"train": {**TRAIN, "epochs": 2}}), out, progress=False)
    # another head / tail share only re-reads the finished runs
    half = run_pilot(cfg.model_copy(update={"head_tail_fraction": 0.5}), out, progress=False)
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert half["config"]["head_tail_fraction"] == 0.5 and "head 50 %" in (out / "pilot.md").read_text()


def test_pilot_cli_errors(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def err(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["pilot", str(tmp_path / "p"), "--dataset", str(tiny), *args])
        assert e.value.code != 0
        return capsys.readouterr().err.strip()

    assert "ratio 10 leaves the tail class no image" in err("--num-classes", "4", "--superclasses", "2",
                                                            "--n-max", "6", "--ratios", "1,10")
    assert "--n-max 50: 8 classes have fewer training images" in err("--num-classes", "4", "--superclasses", "2",
                                                           "--n-max", "50", "--ratios", "1")
    assert err("--ratios", "1,x").startswith("error: --ratios '1,x': expected comma-separated numbers")
    assert "--ratios" in err("--ratios", "0.5")
    line = err("--num-classes", "4", "--superclasses", "2", "--n-max", "6", "--ratios", "1",
               "--train", '{"epoch": 3}')
    assert "epoch" in line and len(line.splitlines()) == 1
    assert "nope" in err("--dataset", str(tmp_path / "nope"))  # the later --dataset wins


def test_pilot_workers_share_the_runs(tmp_path: Path, tiny: Path) -> None:
    """``workers=2``: two spawned processes train the runs (each once, under its run lock); one seed (two runs, one
    per worker) proves it (seeds are the end-to-end test's)."""
    cfg = PilotConfig(dataset=str(tiny), num_classes=4, superclasses=[2], ratios=[1, 3], n_max=6, seeds=[0],
                      partition_groups=2, train=TRAIN)
    doc = run_pilot(cfg, tmp_path / "p", workers=2, progress=False)
    assert len(doc["rows"]) == 2
    for log in sorted((tmp_path / "p" / "runs").glob("*/seed*/train/log.jsonl")):
        epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines() if '"epoch"' in x]
        assert epochs == [1], log  # trained once, not twice over each other
    assert len(list((tmp_path / "p" / "runs").glob("*/seed*/eval/metrics.json"))) == 2
