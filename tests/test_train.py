"""The training engine end to end on the CIFAR-10 split-neighbour protocol (tiny subsets, 32 px): CLI outputs,
auxiliary classes + cRT, the frozen-feature protocol and its cache, and configuration errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import run_cli

from neighborlt.errors import ConfigError
from neighborlt.rundir import read_json
from neighborlt.train.config import TrainConfig
from neighborlt.train.engine import predict_logits, run_train

torch.set_num_threads(2)

CLASSES = ["--protocol", "cifar10-neighbours", "--n-max", "20", "--imbalance-ratio", "10"]  # stage 1 of the runs
TINY = ["--max-test-per-class", "20", "--image-size", "32", "--batch-size", "16", "--lr", "0.05",
        "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def small_aux(data_dir: Path):
    """CIFAR-10 protocol shrunk: 5 long-tailed targets (20..2 images), 12 images of each of the 5 pool classes,
    10 test images per target, WordNet sibling pairs."""
    from aux_helpers import sibling_aux_set

    from neighborlt.data import build_protocol

    proto = build_protocol("cifar10-neighbours", data_dir=data_dir, n_max=20, imbalance_ratio=10)
    keep = np.concatenate([np.flatnonzero(proto.pool.labels == c)[:12] for c in range(proto.pool.num_classes)])
    proto.pool = proto.pool.subset(np.sort(keep))
    keep = np.concatenate([np.flatnonzero(proto.target_test.labels == c)[:10] for c in range(5)])
    proto.target_test = proto.target_test.subset(np.sort(keep))
    return sibling_aux_set(proto)


def test_cli_train_resnet8_writes_run_files(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert run_cli(["classes", str(run), *CLASSES, "--data-dir", str(data_dir)]) == 0
    args = ["train", str(run), *TINY, "--model", "resnet8_cifar", "--epochs", "2", "--no-aux",
            "--data-dir", str(data_dir), "--seed", "3"]
    assert run_cli(args) == 0
    t = run / "train"
    meta = read_json(t / "model.json")
    assert meta["architecture"] == "resnet8_cifar" and meta["num_classes"] == meta["num_target_classes"] == 5
    assert meta["class_names"] == ["cat", "automobile", "deer", "airplane", "bird"]
    assert meta["classifier"] == {"weight": "fc.weight", "bias": "fc.bias"} and meta["frozen"] is None
    assert (t / "checkpoint" / "last.pt").is_file()
    rows = [json.loads(x) for x in (t / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["target"] == 20 + 11 + 6 + 3 + 2 and rows[0]["auxiliary"] == 0
    assert set(rows[-1]["test"]) >= {"overall", "many", "medium", "few"} and np.isfinite(rows[-1]["loss"])
    cfg = read_json(run / "records" / "train.config.json")
    env = read_json(run / "records" / "train.env.json")
    assert cfg["model"] == "resnet8_cifar" and cfg["seed"] == 3 and env["seed"] == 3 and "git_commit" in env
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]  # "+cpu" local tags differ
    # predictions of the saved model reproduce the logged test accuracy
    from neighborlt.data import build_protocol

    proto = build_protocol("cifar10-neighbours", data_dir=data_dir, n_max=20, imbalance_ratio=10)
    test = proto.target_test.subset(np.sort(np.concatenate(
        [np.flatnonzero(proto.target_test.labels == c)[:20] for c in range(5)])))
    logits = predict_logits(run, test)
    assert logits.shape == (100, 5)
    assert (logits.argmax(1) == test.labels).mean() * 100 == pytest.approx(rows[-1]["test"]["overall"])
    # the same command again is skipped; a changed one trains again (the one key rule), replacing the model
    capsys.readouterr()
    assert run_cli(args) == 0 and "skipped" in capsys.readouterr().out
    before = (t / "model.safetensors").stat().st_mtime_ns
    assert run_cli([*args, "--lr", "0.01", "--epochs", "1"]) == 0
    assert "skipped" not in capsys.readouterr().out and (t / "model.safetensors").stat().st_mtime_ns != before
    assert read_json(run / "records" / "train.config.json")["lr"] == 0.01
    assert [json.loads(x)["epoch"] for x in (t / "log.jsonl").read_text().splitlines()] == [1]  # no old rows


def test_aux_training_neighbor_silencing_and_crt(tmp_path: Path, small_aux) -> None:
    cfg = TrainConfig(model="resnet8_cifar", epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, aux_cap=8,
                      loss="neighbor_silencing", lambda_s=0.1, classifier="retrain", crt_epochs=3)
    res = run_train(cfg, tmp_path, data=small_aux, progress=False)
    assert (res.num_classes, res.num_target_classes) == (10, 5) and not res.interrupted
    meta = read_json(tmp_path / "train" / "model.json")
    assert meta["num_classes"] == 10 and meta["num_target_classes"] == 5
    assert meta["class_names"][5:] == ["dog", "truck", "horse", "ship", "frog"]
    rows = [json.loads(x) for x in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    assert all(r["auxiliary"] == 5 * 8 and r["target"] == 42 for r in rows)
    crt = read_json(tmp_path / "train" / "crt" / "model.json")
    assert crt["num_classes"] == 5 and crt["classifier_mode"] == "retrain"
    full = predict_logits(tmp_path / "train", small_aux.test)
    retrained = predict_logits(tmp_path / "train" / "crt", small_aux.test)
    assert full.shape == (50, 10) and retrained.shape == (50, 5)
    assert (retrained.argmax(1) == small_aux.test.labels).mean() * 100 == pytest.approx(res.crt_metrics["overall"])
    # cRT keeps the backbone: every non-classifier tensor is identical
    from neighborlt.train.checkpoint import load_weights

    a, b = load_weights(tmp_path / "train" / "model.safetensors"), load_weights(tmp_path / "train" / "crt" /
                                                                               "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("fc."))
    assert b["fc.weight"].shape == (5, a["fc.weight"].shape[1])


def test_frozen_features_reuse_cache(tmp_path: Path, small_aux) -> None:
    from neighborlt.paths import cache_dir

    cfg = TrainConfig(model="efficientnet_lite0", init="pretrained", frozen=True, head="mlp", head_hidden=32,
                      image_size=32, epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, loss="balanced_softmax")
    r1 = run_train(cfg, tmp_path / "a", data=small_aux, progress=False)
    files = {p: p.stat().st_mtime_ns for p in (cache_dir() / "features").rglob("*.npy")}
    assert len(files) >= 2  # train and test features
    r2 = run_train(cfg.model_copy(update={"seed": 1}), tmp_path / "b", data=small_aux, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (cache_dir() / "features").rglob("*.npy")} == files
    meta = read_json(tmp_path / "a" / "train" / "model.json")
    assert meta["architecture"] == "feature_head" and meta["frozen"]["backbone"] == "efficientnet_lite0"
    logits = predict_logits(tmp_path / "a" / "train", small_aux.test)
    assert logits.shape == (50, 10)
    assert (logits[:, :5].argmax(1) == small_aux.test.labels).mean() * 100 == pytest.approx(r1.metrics["overall"])
    assert r1.model_path and r2.model_path


def test_config_errors(tmp_path: Path, small_aux, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        TrainConfig(frozen=True, init="random")
    with pytest.raises(ConfigError, match="choose one of"):
        run_train(TrainConfig(model="resnet8_cifar", loss="no_such_loss", epochs=1), tmp_path / "x", data=small_aux,
                  progress=False)
    with pytest.raises(ConfigError, match="split.json"):
        run_train(TrainConfig(model="resnet8_cifar", epochs=1), tmp_path / "empty", progress=False)
    assert run_cli(["train", str(tmp_path / "y"), "--lr", "-1"]) == 2
    assert "error: --lr" in capsys.readouterr().err
    assert run_cli(["train", str(tmp_path / "y"), "--loss-param", "tau"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_grad_accumulation_matches_larger_batch(tmp_path: Path, small_aux) -> None:
    from neighborlt.train.checkpoint import load_weights

    base = {"model": "efficientnet_lite0", "init": "pretrained", "frozen": True, "image_size": 32, "epochs": 2, "lr": 0.05,
                "warmup_epochs": 0, "loss": "balanced_softmax", "eval_every": 0}
    run_train(TrainConfig(**base, batch_size=16), tmp_path / "big", data=small_aux, progress=False)
    run_train(TrainConfig(**base, batch_size=8, grad_accum=2), tmp_path / "acc", data=small_aux, progress=False)
    a = load_weights(tmp_path / "big" / "train" / "model.safetensors")
    b = load_weights(tmp_path / "acc" / "train" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_cli_trains_from_split_json_and_config_file(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(["classes", str(run), "--protocol", "cifar10-neighbours", "--n-max", "20", "--imbalance-ratio", "10",
                 "--data-dir", str(data_dir)]) == 0
    common = ["--data-dir", str(data_dir), "--max-test-per-class", "5", "--no-progress"]
    assert run_cli(["train", str(run), "--model", "resnet8_cifar", "--epochs", "1", "--batch-size", "16",
                 "--no-aux", "--loss", "logit_adjusted", "--loss-param", "tau=1.0", *common]) == 0
    cfg = read_json(run / "records" / "train.config.json")
    assert "protocol" not in cfg and cfg["loss_params"] == {"tau": 1.0} and cfg["world_size"] == 1
    assert read_json(run / "train" / "model.json")["num_classes"] == 5
    # the recorded config re-creates the same run (skipped), and overrides on top of it start a new one
    other = tmp_path / "other"
    assert run_cli(["classes", str(other), "--protocol", "cifar10-neighbours", "--n-max", "20", "--imbalance-ratio",
                 "10", "--data-dir", str(data_dir)]) == 0
    assert run_cli(["train", str(other), "--config", str(run / "records" / "train.config.json"), "--seed", "5",
                 "--no-progress"]) == 0
    again = read_json(other / "records" / "train.config.json")
    assert again["seed"] == 5 and {k: v for k, v in again.items() if k not in ("seed", "config_key")} == \
        {k: v for k, v in cfg.items() if k not in ("seed", "config_key")}


def test_lambda_s_reaches_the_loss(tmp_path: Path, small_aux) -> None:
    """One optimizer step (the whole epoch in one batch) on the same data and seed: the logged loss and the weights
    depend on λs, silencing lowers the loss, and λs = 1 is Balanced Softmax."""
    from neighborlt.train.checkpoint import load_weights

    assert len(small_aux.pairs) > 0
    base = {"model": "resnet8_cifar", "epochs": 1, "batch_size": 128, "lr": 0.05, "warmup_epochs": 0, "aux_cap": 8,
            "max_test_per_class": 2, "seed": 5}
    runs = {"ns0.1": {"loss": "neighbor_silencing", "lambda_s": 0.1},
            "ns0.5": {"loss": "neighbor_silencing", "lambda_s": 0.5},
            "ns1": {"loss": "neighbor_silencing", "lambda_s": 1.0},
            "bs": {"loss": "balanced_softmax"}}
    loss, weights = {}, {}
    for name, opts in runs.items():
        steps: list[tuple[int, int]] = []
        run_train(TrainConfig(**base, **opts), tmp_path / name, data=small_aux, progress=False,
                  on_step=lambda e, s, steps=steps: steps.append((e, s)))
        assert steps == [(0, 1)]
        loss[name] = json.loads((tmp_path / name / "train" / "log.jsonl").read_text().splitlines()[0])["loss"]
        weights[name] = load_weights(tmp_path / name / "train" / "model.safetensors")
    assert loss["ns0.1"] < loss["ns0.5"] < loss["ns1"]
    assert loss["ns1"] == pytest.approx(loss["bs"], rel=1e-6)
    assert not torch.allclose(weights["ns0.1"]["fc.weight"], weights["ns0.5"]["fc.weight"])
    for k in weights["bs"]:
        torch.testing.assert_close(weights["ns1"][k], weights["bs"][k], rtol=1e-5, atol=1e-6)


def _import_graph(src: Path) -> dict[str, set[str]]:
    """Modules of ``src/neighborlt`` -> the package modules they import (top-level and inside functions; importing
    ``a.b.c`` also runs the packages ``a`` and ``a.b``)."""
    import ast

    files = {}
    for p in (src / "neighborlt").rglob("*.py"):
        parts = list(p.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, (p, is_pkg) in files.items():
        base = m.split(".") if is_pkg else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in files and dep != m and not m.startswith(dep + "."):
                        graph[m].add(dep)
    return graph


def _reaches(graph: dict[str, set[str]], start: str, target: str) -> bool:
    """Whether a module in package/module ``start`` imports (transitively) one in ``target``."""
    def inside(m: str, pkg: str) -> bool:
        return m == pkg or m.startswith(pkg + ".")

    todo = [m for m in graph if inside(m, start)]
    seen = set(todo)
    while todo:
        for dep in graph[todo.pop()]:
            if inside(dep, target):
                return True
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False


def test_no_import_cycles_between_engine_crt_train_and_evaluate() -> None:
    import subprocess
    import sys

    graph = _import_graph(Path(__file__).resolve().parents[1] / "src")
    assert _reaches(graph, "neighborlt.train.engine", "neighborlt.train.crt")
    assert not _reaches(graph, "neighborlt.train.crt", "neighborlt.train.engine")
    assert _reaches(graph, "neighborlt.evaluate", "neighborlt.train")
    assert not _reaches(graph, "neighborlt.train", "neighborlt.evaluate")  # train scores with neighborlt.metrics
    assert not _reaches(graph, "neighborlt.metrics", "neighborlt.train")
    for order in ("neighborlt.train, neighborlt.evaluate", "neighborlt.evaluate, neighborlt.train",
                  "neighborlt.train.crt, neighborlt.train.engine", "neighborlt.train.engine, neighborlt.evaluate"):
        subprocess.run([sys.executable, "-c", f"import {order}"], check=True)


def test_channels_last_is_execution_only(tmp_path: Path, small_aux) -> None:
    """--channels-last trains the same function (other float rounding), keeps the run key, and writes ordinary
    contiguous weights that load into an NCHW model."""
    base = {"model": "efficientnet_lite0", "init": "pretrained", "image_size": 32, "epochs": 1, "batch_size": 16,
            "lr": 1e-4, "optimizer": "adamw", "warmup_epochs": 0, "aux_cap": 4, "loss": "neighbor_silencing",
            "threads": 1}
    a = run_train(TrainConfig(**base), tmp_path / "nchw", data=small_aux, progress=False)
    b = run_train(TrainConfig(**base, channels_last=True), tmp_path / "nhwc", data=small_aux, progress=False)
    ka = read_json(tmp_path / "nchw" / "records" / "train.done.json")["key"]
    assert read_json(tmp_path / "nhwc" / "records" / "train.done.json")["key"] == ka
    from neighborlt.train.checkpoint import load_weights

    wa = load_weights(tmp_path / "nchw" / "train" / "model.safetensors")
    wb = load_weights(tmp_path / "nhwc" / "train" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(w.is_contiguous() for w in wb.values())
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-3)  # AdamW amplifies rounding of tiny grads
    la = predict_logits(tmp_path / "nchw" / "train", small_aux.test)
    lb = predict_logits(tmp_path / "nhwc" / "train", small_aux.test)
    np.testing.assert_allclose(lb, la, rtol=1e-3, atol=1e-3)
    assert a.metrics["overall"] == pytest.approx(b.metrics["overall"], abs=100 / 50 + 1e-9)  # at most one image


def test_a_mistyped_run_folder_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A run folder without stage 1 is named with the command that makes it, and no empty folder is left behind."""
    missing = tmp_path / "typo"
    with pytest.raises(ConfigError, match=r"typo/split\.json: not found; run `neighborlt classes"):
        run_train(TrainConfig(model="resnet8_cifar", aux_manifest=None), missing)
    assert not missing.exists()
