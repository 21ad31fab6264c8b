"""The Python API: ``import neighborlt`` stays light, re-exports the stages and registries, and ``neighborlt.load``
predicts like ``neighborlt predict`` on paths, PIL images and uint8 arrays without writing any cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import neighborlt
from neighborlt.errors import ConfigError, DataError, NeighborLTError
from neighborlt.export import export_direct, predict_images
from neighborlt.rundir import atomic_write_json

TARGETS = ["cat", "automobile", "deer"]
AUX = ["dog", "truck"]


def _write_model(folder: Path, model: torch.nn.Module, meta: dict) -> None:
    """A model folder in the engine's format (``model.safetensors`` + ``model.json``)."""
    from neighborlt.train.models import classifier_keys

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    w, b = classifier_keys(model)
    atomic_write_json(folder / "model.json", {
        "schema": 1, "init": "random", "num_classes": len(TARGETS + AUX), "num_target_classes": len(TARGETS),
        "class_names": TARGETS + AUX, "class_ids": TARGETS + AUX, "classifier": {"weight": w, "bias": b},
        "frozen": None, "weights": "model.safetensors", **meta})


@pytest.fixture(scope="module")
def cifar_files(data_dir: Path) -> list[Path]:
    """Two real CIFAR-10 test JPEGs of each target class."""
    from neighborlt.data import load_dataset

    test = load_dataset("cifar10", "test", data_dir=data_dir)
    idx = np.concatenate([np.flatnonzero(test.labels == test.class_names.index(n))[:2] for n in TARGETS])
    return [Path(test.paths[i]) for i in idx]


@pytest.fixture()
def resnet_run(tmp_path: Path) -> Path:
    """A run directory with an untrained resnet8_cifar over 3 targets + 2 auxiliary classes, exported."""
    from neighborlt.train.models import create_model

    torch.manual_seed(3)
    _write_model(tmp_path / "run" / "train", create_model("resnet8_cifar", num_classes=5),
                 {"architecture": "resnet8_cifar", "image_size": 32})
    export_direct(tmp_path / "run")
    return tmp_path / "run"


def test_import_is_light_and_reexports_everything() -> None:
    code = ("import sys, neighborlt; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(n for n in neighborlt.__all__ if not hasattr(neighborlt, n)))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # every public name resolves (lazily)
    for name in ("run_classes", "run_neighbors", "run_retrieve", "run_filter", "run_train", "run_eval",
                 "run_report", "run_pipeline", "run_ablation", "export_direct", "load"):
        assert callable(getattr(neighborlt, name)), name
    from neighborlt.train import run_train

    assert neighborlt.run_train is run_train
    assert "neighbor_silencing" in neighborlt.LOSSES.names() and "local" in neighborlt.SOURCES.names()
    assert "wordnet" in neighborlt.BACKENDS.names()
    assert neighborlt.list_models("*cifar") == ["resnet32_cifar", "resnet8_cifar"]
    assert neighborlt.list_models(pretrained=True) == ["efficientnet_lite0"]
    assert "vit_base_patch16_224" in neighborlt.list_models("vit_base*", timm=True)
    m = neighborlt.create_model("resnet8_cifar", num_classes=7)
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(AttributeError):
        neighborlt.no_such_name  # noqa: B018


def test_load_predicts_like_the_cli_on_paths_pil_and_arrays(resnet_run: Path, cifar_files: list[Path]) -> None:
    from neighborlt.data.base import ImageSet
    from neighborlt.train import predict_logits

    p = neighborlt.load(resnet_run, device="cpu")
    assert p.model_dir == resnet_run / "export" and p.class_names == TARGETS and p.image_size == 32
    rows = p.predict([str(f) for f in cifar_files], top_k=10)
    assert rows == predict_images(resnet_run, cifar_files, top_k=10, device="cpu")  # what `neighborlt predict` shows
    want = predict_logits(resnet_run / "export", ImageSet(class_names=TARGETS, labels=np.zeros(len(cifar_files)),
                                                          paths=cifar_files), device="cpu")
    np.testing.assert_allclose(p.logits(cifar_files), want, rtol=0, atol=1e-5)  # the same pixels as eval decodes
    for r, lg in zip(rows, want):
        assert len(r["top"]) == 3  # capped at L: auxiliary classes are never ranked
        assert [t["index"] for t in r["top"]] == np.argsort(-lg, kind="stable").tolist()
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)
    assert [r["path"] for r in rows] == [str(f) for f in cifar_files]

    # one image in, one dict out; PIL images and uint8 arrays (any size, grayscale too) give the same ranking
    one = p.predict(cifar_files[0], top_k=2)
    assert isinstance(one, dict) and one["path"] == str(cifar_files[0]) and len(one["top"]) == 2
    pil = Image.open(cifar_files[0])
    arr = np.asarray(pil.convert("RGB"))
    for x in (pil, arr, arr[None]):
        got = p.predict(x, top_k=2)
        got = got[0] if isinstance(got, list) else got
        assert got["path"] is None and [t["index"] for t in got["top"]] == [t["index"] for t in one["top"]]
        assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in one["top"]],
                                                                       abs=1e-5)
    assert len(p.predict([pil, arr, str(cifar_files[1])])) == 3
    big = np.asarray(pil.convert("L").resize((100, 80)))  # grayscale, other size: resized like the training data
    assert len(p.predict(big)["top"]) == 3

    # the train/ folder (L + K rows): the auxiliary rows are masked, as the exported direct classifier does
    full = neighborlt.load(resnet_run / "train", device="cpu")
    assert full.class_names == TARGETS and full.num_target_classes == 3
    np.testing.assert_allclose(full.logits(cifar_files), want, rtol=0, atol=1e-5)
    assert [t["name"] for t in full.predict(cifar_files[2])["top"]] == [t["name"] for t in rows[2]["top"]]


def test_load_and_predict_errors(resnet_run: Path, cifar_files: list[Path], tmp_path: Path) -> None:
    p = neighborlt.load(resnet_run / "export", device="cpu")
    with pytest.raises(DataError, match="missing.png: image file not found"):
        p.predict(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg: cannot decode image"):
        p.predict([cifar_files[0], bad])
    with pytest.raises(ConfigError, match="pass uint8 pixels"):
        p.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="must be at least 1"):
        p.predict(cifar_files[0], top_k=0)
    with pytest.raises(ConfigError, match="no images given"):
        p.predict([])
    with pytest.raises(ConfigError, match="expected a path, a PIL image"):
        p.predict(3)
    with pytest.raises(NeighborLTError, match="no model.json"):
        neighborlt.load(tmp_path)
    with pytest.raises(NeighborLTError, match="not found"):
        neighborlt.load(tmp_path / "nope")


def test_frozen_feature_model_predicts_like_predict_logits(tmp_path: Path, cifar_files: list[Path]) -> None:
    """A head on frozen efficientnet_lite0 features: the backbone runs in memory, equal to the feature-cache path."""
    from neighborlt.data.base import ImageSet
    from neighborlt.train import FeatureHead, predict_logits

    torch.manual_seed(0)
    run = tmp_path / "frozen"
    _write_model(run / "train", FeatureHead(1280, 5), {
        "architecture": "feature_head", "image_size": 32,
        "frozen": {"backbone": "efficientnet_lite0", "init": "pretrained", "image_size": 32, "in_features": 1280,
                   "head": "linear", "hidden": None}})
    p = neighborlt.load(run, device="cpu")
    assert p.model_dir == run / "train"
    want = predict_logits(run / "train", ImageSet(class_names=TARGETS + AUX, labels=np.zeros(len(cifar_files)),
                                                  paths=cifar_files), device="cpu")[:, :3]
    np.testing.assert_allclose(p.logits(cifar_files), want, rtol=0, atol=1e-4)


def test_prediction_writes_nothing(resnet_run: Path, cifar_files: list[Path], tmp_path: Path) -> None:
    """`neighborlt predict` and `neighborlt.load(...).predict` with HOME, the cache and TMPDIR pointed at empty
    folders leave them empty (no decoded-array or feature cache for a handful of images), and the run untouched."""
    dirs = {name: tmp_path / name for name in ("home", "cache", "tmp", "xdg", "cwd")}
    for d in dirs.values():
        d.mkdir()
    env = {**os.environ, "HOME": str(dirs["home"]), "NEIGHBORLT_CACHE": str(dirs["cache"]),
           "TMPDIR": str(dirs["tmp"]), "XDG_CACHE_HOME": str(dirs["xdg"]), "HF_HUB_OFFLINE": "1"}
    env.pop("NEIGHBORLT_DATA", None)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in resnet_run.rglob("*"))
    files = [str(f) for f in cifar_files[:3]]
    # one process (one torch import): the console entry point `neighborlt predict`, then the API on the same images
    code = ("import json, sys, neighborlt; from neighborlt.cli import main; run, files = sys.argv[1], sys.argv[2:]; "
            "main(['predict', run, *files, '-k', '2', '--device', 'cpu']); print('--- api', flush=True); "
            "p = neighborlt.load(run, device='cpu'); print(json.dumps(p.predict(files, top_k=2)))")
    proc = subprocess.run([sys.executable, "-c", code, str(resnet_run), *files], check=False, capture_output=True,
                          text=True, env=env, cwd=dirs["cwd"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli, api = proc.stdout.split("--- api\n")
    printed = cli.strip().splitlines()
    assert len(printed) == 3 and printed[0].startswith(files[0] + "\t") and printed[0].count("%") == 2
    rows = json.loads(api)
    assert len(rows) == 3
    for line, r in zip(printed, rows):  # the API returns what the CLI prints
        assert line == r["path"] + "\t" + ", ".join(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top"])
    for name, d in dirs.items():
        assert list(d.rglob("*")) == [], (name, list(d.rglob("*")))
    assert sorted((str(p), p.stat().st_mtime_ns) for p in resnet_run.rglob("*")) == before
