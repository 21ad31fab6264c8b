"""The shipped configs (configs/*.yaml, examples/own_dataset/config.yaml) validate, and the "Bring your own
dataset" example of the README runs end to end (shrunk: fewer images, 2 epochs at 16 px)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import run_cli

from neighborlt.pipeline import load_config, read_config_file, run_pipeline, stage_configs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "examples" / "own_dataset" / "config.yaml",
                                                       ROOT / "bench" / "data_scale_run.yaml"]
PAPER = ("imagenet_lt", "places_lt", "inat18", "imagenet_lt_clip", "imagenet_lt_dinov2")


def test_every_shipped_config_validates() -> None:
    names = {p.stem for p in SHIPPED}
    assert set(PAPER) <= names and len(SHIPPED) >= 4
    for path in SHIPPED:
        cfg = load_config(path)
        stages = stage_configs(cfg)  # every stage's own pydantic config, built without running anything
        assert set(stages) >= {"classes", "neighbors", "retrieve", "filter", "train", "baseline", "eval", "report"}
        assert stages["baseline"].loss == "balanced_softmax" and stages["baseline"].aux_manifest is None
        assert cfg.run_dir, path


# (config, paradigm, lr, epochs, warm-up): Sec. 4.2 and Appendix B.1 of the paper
PAPER_RECIPES = [
    ("imagenet_lt", "scratch-mae", 1e-3, 100, 10), ("inat18", "scratch-mae", 1e-3, 100, 10),
    ("places_lt", "scratch-mae", 1e-3, 30, 5),
    ("imagenet_lt_clip", "clip", 1e-5, 100, 10), ("imagenet_lt_dinov2", "dinov2", 3.5e-5, 100, 10),
]


@pytest.mark.parametrize(("name", "recipe", "lr", "epochs", "warmup"), PAPER_RECIPES)
def test_paper_configs_carry_the_papers_recipe(name: str, recipe: str, lr: float, epochs: int, warmup: int) -> None:
    s = stage_configs(load_config(ROOT / "configs" / f"{name}.yaml"))
    for t in (s["train"], s["baseline"]):  # the baseline trains with the same recipe
        assert t.recipe == recipe and t.image_size == 224 and t.data_mode == "stream"
        assert t.model == {"scratch-mae": "vit_base_patch16_224", "clip": "vit_base_patch16_clip_224.openai",
                           "dinov2": "vit_base_patch14_dinov2.lvd142m"}[recipe]
        assert (t.optimizer, t.betas, t.layer_decay, t.weight_decay) == ("adamw", (0.9, 0.95), 0.75, 0.05)
        assert t.batch_size * t.grad_accum == 512
        assert (t.randaugment, t.mixup, t.cutmix) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0)
        assert (t.lr, t.min_lr, t.epochs, t.warmup_epochs) == (lr, 1e-6, epochs, warmup)
        assert t.init == (f"runs/{name}/pretrain/encoder.safetensors" if recipe == "scratch-mae" else "pretrained")
    t = s["train"]
    assert (t.loss, t.lambda_s, t.aux_cap) == ("neighbor_silencing", 0.1, 50)
    assert s["classes"].dataset and s["classes"].test_dataset and s["neighbors"].backend == "openai"
    assert s["neighbors"].split_ratio == "auto"  # 1 : ceil(Nh/Nm) : ceil(Nh/Nt)
    assert (s["filter"].feature_model, s["filter"].band_mode) == ("vit_base_patch14_dinov2", "quantile")
    # every value the recipe fills is one the user did not set; the config sets none of them
    assert set(t.recipe_values()) >= {"lr", "epochs", "warmup_epochs", "optimizer", "betas", "layer_decay"}


def test_paper_configs_mark_every_assumption_with_its_source() -> None:
    """Each ASSUMED in a paper config says where the value comes from (a section, LiVT, a bench script)."""
    for name, *_ in PAPER_RECIPES:
        lines = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()
        assumed = [i for i, line in enumerate(lines) if "ASSUMED" in line]
        assert assumed, name
        for i in assumed:
            text = " ".join(lines[i:i + 3])
            assert any(w in text for w in ("B.2", "LiVT", "Sec.", "paper is silent")), (name, lines[i])


def _example_module() -> object:
    spec = importlib.util.spec_from_file_location("make_example", ROOT / "examples" / "own_dataset" / "make_example.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_own_dataset_example_end_to_end(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """make_example.py + config.yaml as the README runs them, shrunk to seconds: the WordNet neighbours of the
    targets find pool captions, the method and the baseline are trained and compared, a re-run does nothing."""
    info = _example_module().build(tmp_path / "data", data_dir=str(data_dir), n_max=40, ratio=10, test=8,
                                   pool_per_class=12)
    raw = read_config_file(ROOT / "examples" / "own_dataset" / "config.yaml")
    raw["run_dir"] = str(tmp_path / "run")
    raw["classes"]["dataset"] = info["dataset"]
    raw["retrieve"]["pool"] = info["pool"]
    raw["train"].update(epochs=2, image_size=16, batch_size=32, warmup_epochs=0)
    raw["filter"] = {"sheets": 0, "feature_image_size": 16}  # the rules on, at the smallest feature input
    raw["report"] = False
    # the baseline trains after the method in this process: a spawned one would import torch again (~8 s of CPU);
    # training both at once is test_pipeline's test_method_and_baseline_train_at_once
    raw["parallel_baseline"] = False
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert run_cli(["run", str(config)]) == 0, capsys.readouterr().err[-3000:]  # the CLI in-process (no 2nd torch import)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    counts = {t["name"]: t["train_count"] for t in split["targets"]}  # ImageFolder: classes in folder order
    assert counts == dict(zip(info["train_counts"], [40, 25, 16, 10, 6, 4])) and split["pool"] == []
    stats = json.loads((run / "retrieve" / "stats.json").read_text())
    assert stats["names_with_images"] >= 6, stats  # WordNet neighbour names match the pool captions
    funnel = json.loads((run / "filter" / "funnel.json").read_text())
    assert funnel["classes"] >= 4 and funnel["total"]["kept"] > 0
    model = json.loads((run / "train" / "model.json").read_text())
    assert model["num_target_classes"] == 6 and model["num_classes"] == 6 + funnel["classes"]
    summary = (run / "summary.md").read_text()
    assert "Balanced-CE, no auxiliary data" in summary and "neighbor_silencing" in summary
    assert (run / "baseline" / "eval" / "metrics.json").is_file()
    # the resolved config is saved and re-runs to the same stage configs: every stage is skipped
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["classes"]["dataset"] == info["dataset"]
    record = json.loads((run / "records" / "pipeline.config.json").read_text())
    assert record["config"] == resolved
    mtime = (run / "train" / "model.safetensors").stat().st_mtime_ns
    out = run_pipeline(load_config(run / "config.yaml"), progress=False)
    assert (run / "train" / "model.safetensors").stat().st_mtime_ns == mtime
    assert out["method"]["overall"] == json.loads((run / "eval" / "metrics.json").read_text())["overall"]


@pytest.mark.parametrize("text, message", [
    ("train:\n  lambda_s: -1\n", "train.lambda_s: must be >= 0.0, got -1"),
    ("trian: {}\n", "trian: unknown key (did you mean 'train'?); allowed: aux_cap, baseline, classes"),
    ("train:\n  epoch: 3\n", "train.epoch: unknown key (did you mean 'epochs'?); allowed: amp, aux_cap"),
    ("filter:\n  band_mode: median\n", "filter.band_mode: must be one of 'absolute' or 'quantile', got 'median'"),
    ("retrieve: [1]\n", "retrieve: Input should be a valid dictionary"),
    ("classes:\n  dataset: x\n  protocol: cifar10-lt\n", "classes: give exactly one of protocol"),
    ("train:\n  lr: [\n", "config.yaml:3:1: not valid YAML"),
    ("- 1\n", "expected a mapping of keys"),
])
def test_bad_configs_are_one_line(tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process through the CLI's entry point (the console-script case is test_bad_config_in_a_console below)."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code = run_cli(["run", str(config)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_bad_config_in_a_console_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: [\n")
    proc = subprocess.run([sys.executable, "-m", "neighborlt", "run", str(config)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "config.yaml:3:1: not valid YAML" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
