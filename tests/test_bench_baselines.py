"""Smoke test of bench/baselines.py's grid plumbing: one loss, one seed, one epoch, a tiny CIFAR-10-LT subset,
frozen efficientnet_lite0 features; the re-run must skip the finished run and give the same table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import load_bench


@pytest.fixture()
def one_thread():
    """The script sets torch's thread count (1: no OpenMP barrier stalls on a shared 2-core machine); restore it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baselines():
    return load_bench("baselines")


def test_frozen_grid_runs_resumes_and_writes_table(baselines, data_dir: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "bench"
    argv = ["--regime", "frozen", "--datasets", "cifar10-lt-r100", "--losses", "balanced_softmax", "--seeds", "0",
            "--epochs", "1", "--max-train-per-class", "8", "--max-test-per-class", "4", "--out", str(out),
            "--threads", "1", "--data-dir", str(data_dir), "--no-progress"]
    doc = baselines.main(argv)

    run = out / "cifar10-lt-r100" / "frozen-e1-sub8x4" / "balanced_softmax" / "seed0"
    assert (run / "records" / "train.done.json").exists()
    assert (run / "train" / "model.json").exists()
    saved = json.loads((out / "baselines.json").read_text())
    assert len(saved["rows"]) == 1
    row = saved["rows"][0]
    assert (row["dataset"], row["loss"], row["regime"], row["label"]) == ("cifar10-lt-r100", "balanced_softmax",
                                                                          "frozen", "Balanced-CE")
    first = row["seeds"]["0"]
    assert first["skipped"] is False
    assert 0.0 <= first["overall"] <= 100.0
    assert len(first["per_class"]) == 10 and first["worst"] == min(first["per_class"])
    # 8 images per class (< 20): every class is few-shot, so overall == few and many/medium are empty
    assert first["few"] == pytest.approx(first["overall"]) and first["many"] is None and first["medium"] is None
    assert saved["datasets"]["cifar10-lt-r100"]["train_images"] == 80
    assert saved["datasets"]["cifar10-lt-r100"]["test_images"] == 40
    md = (out / "baselines.md").read_text()
    assert "| CIFAR-10-LT ρ=100 | frozen (1 ep) | Balanced-CE |" in md
    assert "NOT comparable" in md and "70.4" in md
    assert md == doc["markdown"]

    again = baselines.main(argv)  # finished run: skipped, same numbers
    second = again["rows"][0]["seeds"][0]
    assert second["skipped"] is True
    assert second["overall"] == first["overall"] and second["per_class"] == first["per_class"]


def test_arguments_and_regime_configs(baselines) -> None:
    args = baselines.parse_args(["--regime", "scratch"])
    assert args.epochs == 200 and args.out == Path("runs/bench_scratch")
    from neighborlt.train import TrainConfig

    cfg = TrainConfig(**baselines.train_config("scratch", "dro", "cifar10-lt-r100", 30, 1, "cpu", 0))
    assert (cfg.model, cfg.optimizer, cfg.warmup_epochs, cfg.classifier, cfg.image_size) == (
        "resnet32_cifar", "sgd", 3.0, "retrain", 32)
    cfg = TrainConfig(**baselines.train_config("frozen", "logit_adjusted", "tiny-imagenet-lt", 30, 0, "cpu", 0))
    assert cfg.frozen and cfg.head == "mlp" and cfg.loss_params == {"tau": 1.0}
    with pytest.raises(SystemExit):
        baselines.parse_args(["--losses", "focal"])
    with pytest.raises(SystemExit):
        baselines.parse_args(["--epochs", "0"])


def test_dro_finetune_starts_from_the_ce_run(baselines, data_dir: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "bench"
    argv = ["--regime", "scratch", "--datasets", "cifar10-lt-r100", "--seeds", "0", "--epochs", "3",
            "--max-train-per-class", "4", "--max-test-per-class", "2", "--out", str(out), "--threads", "1",
            "--data-dir", str(data_dir), "--no-progress"]
    with pytest.raises(SystemExit, match="list ce before dro_ft"):
        baselines.main([*argv, "--losses", "dro_ft"])
    doc = baselines.main([*argv, "--losses", "ce", "dro_ft"])
    tag = out / "cifar10-lt-r100" / "scratch-e3-sub4x2"
    cfg = json.loads((tag / "dro_ft" / "seed0" / "records" / "train.config.json").read_text())
    assert cfg["init"] == str(tag / "ce" / "seed0" / "train" / "model.safetensors")
    assert (cfg["loss"], cfg["epochs"], cfg["lr"], cfg["classifier"]) == ("dro", 1, pytest.approx(0.01), "retrain")
    assert cfg["loss_params"]["temperature"] == 0.07
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["CE", "DRO-LT (from the CE run) (direct)", "DRO-LT (from the CE run) + cRT"]
