"""The direct-classifier export (only the L target rows), loading it, ``predict`` and ``eval`` on a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neighborlt.cli import main
from neighborlt.errors import DataError, NeighborLTError
from neighborlt.export import export_direct, model_dir_for, predict_images
from neighborlt.rundir import atomic_write_json

TARGETS = ["cat", "automobile", "deer"]
AUX = ["dog", "truck"]


class Tiny(nn.Module):
    """A tiny conv net whose classifier is ``head`` (no neighborlt model factory involved)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _write_train(run: Path, model: nn.Module, arch: str, names: list[str], num_target: int,
                 keys: list[str | None], image_size: int = 32) -> None:
    """RUN/train in the engine's format (neighborlt.train.engine._model_meta)."""
    (run / "train").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "train" / "model.safetensors"))
    atomic_write_json(run / "train" / "model.json", {
        "schema": 1, "architecture": arch, "init": "random", "image_size": image_size, "num_classes": len(names),
        "num_target_classes": num_target, "class_names": names, "class_ids": [f"id-{n}" for n in names],
        "classifier": {"weight": keys[0], "bias": keys[1]}, "frozen": None, "weights": "model.safetensors",
    })


def test_export_keeps_first_l_rows_and_logits(tmp_path) -> None:
    torch.manual_seed(0)
    full = Tiny(5).eval()
    _write_train(tmp_path, full, "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    out = export_direct(tmp_path)
    assert out == tmp_path / "export"
    state = load_file(str(out / "model.safetensors"))
    assert state["head.weight"].shape == (3, 4) and state["head.bias"].shape == (3,)
    for k, v in full.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v)
    info = json.loads((out / "model.json").read_text())
    assert info["num_classes"] == 3 and info["num_target_classes"] == 3 and info["class_names"] == TARGETS
    assert info["class_ids"] == [f"id-{n}" for n in TARGETS] and info["classifier"]["weight"] == "head.weight"
    assert info["direct_classifier"]["dropped_classes"] == AUX
    assert info["direct_classifier"]["source_num_classes"] == 5 and info["architecture"] == "tiny"
    direct = Tiny(3).eval()
    direct.load_state_dict(state, strict=True)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), full(x)[:, :3], atol=1e-6, rtol=0)  # GEMM blocking: not bitwise
    assert (tmp_path / "records" / "export.config.json").exists()


def test_export_without_bias_and_no_aux(tmp_path) -> None:
    model = Tiny(3)
    model.head = nn.Linear(4, 3, bias=False)
    _write_train(tmp_path, model, "tiny", TARGETS, 3, ["head.weight", None])
    state = load_file(str(export_direct(tmp_path) / "model.safetensors"))
    assert torch.equal(state["head.weight"], model.head.weight.detach())


def test_export_is_idempotent_and_follows_new_weights(tmp_path) -> None:
    _write_train(tmp_path, Tiny(5), "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    out = export_direct(tmp_path)
    t0 = (out / "model.safetensors").stat().st_mtime_ns
    export_direct(tmp_path)
    assert (out / "model.safetensors").stat().st_mtime_ns == t0  # skipped
    retrained = Tiny(5)
    _write_train(tmp_path, retrained, "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    export_direct(tmp_path)
    assert torch.equal(load_file(str(out / "model.safetensors"))["head.weight"], retrained.head.weight[:3].detach())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_target_classes": 7}, "'num_target_classes' must be 1..5, got 7"),
        ({"num_target_classes": 0}, "'num_target_classes' must be 1..5"),
        ({"class_names": TARGETS}, "'class_names' must list 5 names"),
        ({"classifier": {"weight": "fc.weight", "bias": "fc.bias"}}, "classifier weight 'fc.weight' is not in the"),
        ({"classifier": {"weight": "head.weight", "bias": "fc.bias"}}, "classifier bias 'fc.bias' is not in the"),
        ({"classifier": None}, "no 'classifier'"),
        ({"class_ids": ["a"]}, "'class_ids' must list 5 ids"),
        ({"weights": "../../outside.safetensors"}, "'weights' must be a file name in the same folder"),
        ({"num_classes": 6, "class_names": TARGETS + AUX + ["x"], "class_ids": None},
         "has 5 rows but model.json says num_classes=6"),
    ],
)
def test_export_bad_model_json(tmp_path, change, match) -> None:
    _write_train(tmp_path, Tiny(5), "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    info = json.loads((tmp_path / "train" / "model.json").read_text())
    info.update(change)
    atomic_write_json(tmp_path / "train" / "model.json", info)
    with pytest.raises(DataError, match=match) as e:
        export_direct(tmp_path)
    assert "\n" not in str(e.value) and "model" in str(e.value)


def test_export_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(NeighborLTError, match=r"train/model.json: not found; run `neighborlt train`"):
        export_direct(tmp_path)
    _write_train(tmp_path, Tiny(5), "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    (tmp_path / "train" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"model.safetensors: cannot read safetensors"):
        export_direct(tmp_path)
    (tmp_path / "train" / "model.json").write_text("{not json")
    with pytest.raises(NeighborLTError, match=r"model.json:1: invalid JSON"):
        export_direct(tmp_path)
    with pytest.raises(NeighborLTError, match="run directory not found"):
        export_direct(tmp_path / "nope")
    with pytest.raises(NeighborLTError, match=r"export/model.safetensors: not found; run `neighborlt export"):
        model_dir_for(tmp_path, "export")
    with pytest.raises(NeighborLTError, match=r"train/crt/model.safetensors: not found; run `neighborlt train --c"):
        model_dir_for(tmp_path, "crt")


# --------------------------------------------------------------------------------------------- real model + data


@pytest.fixture(scope="module")
def cifar_images(data_dir):
    """Four real CIFAR-10 test JPEGs of each target class (file-backed ImageSet in target order)."""
    from neighborlt.data import load_dataset

    test = load_dataset("cifar10", "test", data_dir=data_dir)
    idx = np.concatenate([np.flatnonzero(test.labels == test.class_names.index(n))[:4] for n in TARGETS])
    relabel = {test.class_names.index(n): i for i, n in enumerate(TARGETS)}
    return test.subset(idx, relabel=relabel, class_names=TARGETS)


@pytest.fixture()
def resnet_run(tmp_path):
    """A run directory with an (untrained) resnet8_cifar over 3 targets + 2 auxiliary classes."""
    from neighborlt.train.models import classifier_keys, create_model

    torch.manual_seed(1)
    full = create_model("resnet8_cifar", num_classes=5)
    _write_train(tmp_path, full, "resnet8_cifar", TARGETS + AUX, 3, list(classifier_keys(full)))
    return tmp_path, full.eval()


def test_exported_resnet_logits_equal_first_l(resnet_run, cifar_images) -> None:
    from neighborlt.train import predict_logits
    from neighborlt.train.models import create_model

    run, _full = resnet_run
    export_direct(run)
    direct = create_model("resnet8_cifar", num_classes=3)
    direct.load_state_dict(load_file(str(run / "export" / "model.safetensors")), strict=True)
    assert direct.get_classifier().out_features == 3
    direct_logits = predict_logits(run / "export", cifar_images, batch_size=5)
    full_logits = predict_logits(run / "train", cifar_images, batch_size=7)
    assert direct_logits.shape == (12, 3) and full_logits.shape == (12, 5)
    np.testing.assert_allclose(direct_logits, full_logits[:, :3], rtol=0, atol=1e-5)


def test_predict_images_and_cli(resnet_run, cifar_images, tmp_path, capsys) -> None:
    run, _ = resnet_run
    export_direct(run)
    files = [str(p) for p in cifar_images.paths[:3]]
    rows = predict_images(run, files, top_k=10)
    from neighborlt.train import predict_logits

    logits = predict_logits(run / "export", cifar_images.subset([0, 1, 2]))
    for r, lg in zip(rows, logits):
        assert len(r["top"]) == 3  # capped at L: auxiliary classes are never predicted
        assert [t["index"] for t in r["top"]] == np.argsort(-lg, kind="stable").tolist()
        assert {t["name"] for t in r["top"]} == set(TARGETS)
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)
    assert [r["path"] for r in rows] == files

    out_csv = tmp_path / "pred.csv"
    main(["predict", str(run), *files, "-k", "2", "-o", str(out_csv)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(files[0] + "\t") and printed[0].count("%") == 2
    table = list(csv.DictReader(out_csv.open()))
    assert len(table) == 6 and table[0]["name"] == rows[0]["top"][0]["name"] and table[1]["rank"] == "2"

    out_json = tmp_path / "pred.json"
    main(["predict", str(run), files[1], "-o", str(out_json)])
    doc = json.loads(out_json.read_text())
    got, want = doc["predictions"][0]["top"], rows[1]["top"]
    assert [t["name"] for t in got] == [t["name"] for t in want]  # batch of 1 vs 3: floats differ in the last bits
    assert [t["probability"] for t in got] == pytest.approx([t["probability"] for t in want], abs=1e-5)
    capsys.readouterr()

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), files[0], str(bad)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {bad}: cannot decode image")
    with pytest.raises(DataError, match="missing.png: image file not found"):
        predict_images(run, [tmp_path / "missing.png"])


def test_cli_export(tmp_path, capsys) -> None:
    _write_train(tmp_path, Tiny(5), "tiny", TARGETS + AUX, 3, ["head.weight", "head.bias"])
    main(["export", str(tmp_path)])
    assert "3 target classes kept, 2 auxiliary classes dropped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "missing")])
    assert e.value.code == 2 and "run directory not found" in capsys.readouterr().err
