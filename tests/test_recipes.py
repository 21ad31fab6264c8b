"""The paper's recipes (``TrainConfig.recipe``): what they fill, that explicit fields win, the one-line errors, the
CLI flags, and the record of the filled values in a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import run_cli

from neighborlt.errors import ConfigError
from neighborlt.rundir import read_json
from neighborlt.train.config import TrainConfig
from neighborlt.train.recipes import RECIPE_NAMES


@pytest.mark.parametrize(("recipe", "model", "init", "lr"), [
    ("clip", "vit_base_patch16_clip_224.openai", "pretrained", 1e-5),
    ("dinov2", "vit_base_patch14_dinov2.lvd142m", "pretrained", 3.5e-5),
])
@pytest.mark.parametrize(("dataset", "epochs", "warmup"), [("imagenet-lt", 100, 10), ("inat18", 100, 10),
                                                           ("places-lt", 30, 5)])
def test_recipe_fills_the_papers_values(recipe: str, model: str, init: str, lr: float, dataset: str, epochs: int,
                                        warmup: int) -> None:
    c = TrainConfig(recipe=recipe, recipe_dataset=dataset)
    assert (c.model, c.init, c.lr, c.epochs, c.warmup_epochs) == (model, init, lr, epochs, warmup)
    assert (c.optimizer, c.betas, c.weight_decay, c.layer_decay, c.min_lr) == ("adamw", (0.9, 0.95), 0.05, 0.75, 1e-6)
    assert (c.randaugment, c.mixup, c.cutmix, c.batch_size, c.image_size) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 512,
                                                                              224)
    assert c.model_fields_set == {"recipe", "recipe_dataset"}  # the recipe's values do not count as set


def test_explicit_fields_win_and_are_not_listed_as_filled() -> None:
    c = TrainConfig(recipe="dinov2", recipe_dataset="places-lt", lr=1e-4, epochs=3, mixup=0.0, grad_accum=4)
    assert (c.lr, c.epochs, c.mixup, c.warmup_epochs) == (1e-4, 3, 0.0, 5)
    assert c.batch_size == 128 and c.batch_size * c.grad_accum == 512  # effective batch 512
    filled = c.recipe_values()
    assert {"lr", "epochs", "mixup", "grad_accum"}.isdisjoint(filled)
    assert filled["warmup_epochs"] == 5 and filled["cutmix"] == 1.0
    # the resolved config read back (RUN/records/train.config.json) is the same run
    again = TrainConfig(**c.model_dump(mode="json"))
    assert again.key() == c.key() and again.model_dump() == c.model_dump()
    assert TrainConfig(recipe="none").model_dump() == TrainConfig().model_dump() | {"recipe": "none"}


def test_a_recipe_changes_the_run_key() -> None:
    base = {"recipe_dataset": "imagenet-lt"}
    assert TrainConfig(recipe="clip", **base).key() != TrainConfig(recipe="dinov2", **base).key()


@pytest.mark.parametrize(("fields", "message"), [
    ({"recipe": "mae"}, "unknown recipe 'mae'; known recipes: " + ", ".join(RECIPE_NAMES)),
    ({"recipe": "clip"}, "add recipe_dataset"),
    ({"recipe": "clip", "recipe_dataset": "cifar"}, "unknown recipe_dataset 'cifar'"),
    ({"recipe": "none", "recipe_dataset": "inat18"}, "recipe_dataset needs a recipe"),
    ({"recipe": "scratch-mae", "recipe_dataset": "inat18"}, "neighborlt pretrain RUN --method mae"),
    ({"recipe": "clip", "recipe_dataset": "inat18", "grad_accum": 3}, "grad_accum 3 does not divide"),
])
def test_bad_recipes_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_without_a_dataset_both_epochs_and_warmup_must_be_given() -> None:
    c = TrainConfig(recipe="clip", epochs=7, warmup_epochs=1)
    assert (c.epochs, c.warmup_epochs, c.lr) == (7, 1, 1e-5)


def test_scratch_mae_takes_the_encoder_path() -> None:
    c = TrainConfig(recipe="scratch-mae", recipe_dataset="imagenet-lt", init="runs/x/pretrain/encoder.safetensors")
    assert (c.model, c.lr, c.init) == ("vit_base_patch16_224", 1e-3, "runs/x/pretrain/encoder.safetensors")


def test_cli_recipe_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", str(tmp_path / "run"), "--recipe", "dinov2", "--recipe-dataset", "places-lt", "--lr", "0.0001",
            "--print-config"]
    assert run_cli(args) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["recipe"], cfg["lr"], cfg["epochs"], cfg["warmup_epochs"]) == ("dinov2", 1e-4, 30, 5)
    assert cfg["model"] == "vit_base_patch14_dinov2.lvd142m" and cfg["layer_decay"] == 0.75
    assert run_cli(["train", str(tmp_path / "run"), "--recipe", "nope", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown recipe 'nope'; known recipes: none, scratch-mae, clip, dinov2"


def test_a_training_run_records_what_the_recipe_filled(tmp_path: Path, data_dir: Path) -> None:
    """A real (1 epoch, 32 px, ResNet-8) run under the CLIP recipe with the architecture overridden: the resolved
    values reach the records and model.json lists the filled ones."""
    run = tmp_path / "run"
    assert run_cli(["classes", str(run), "--protocol", "cifar10-neighbours", "--n-max", "20", "--imbalance-ratio", "10",
                 "--data-dir", str(data_dir)]) == 0
    args = ["train", str(run), "--max-test-per-class", "5", "--no-aux", "--data-dir",
            str(data_dir), "--no-progress", "--recipe", "clip", "--model", "resnet8_cifar", "--init", "random",
            "--image-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--threads", "1"]
    assert run_cli(args) == 0
    rec = read_json(run / "records" / "train.config.json")
    assert (rec["recipe"], rec["optimizer"], rec["lr"], rec["mixup"], rec["layer_decay"]) == ("clip", "adamw", 1e-5,
                                                                                               0.8, 0.75)
    meta = read_json(run / "train" / "model.json")
    assert meta["recipe"]["name"] == "clip"
    assert set(meta["recipe"]["filled"]) == {"optimizer", "betas", "weight_decay", "layer_decay", "min_lr",
                                             "randaugment", "mixup", "cutmix", "lr"}
