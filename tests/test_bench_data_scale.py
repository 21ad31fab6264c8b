"""Smoke test of bench/data_scale.py on a tiny setting: the ImageNet-shaped folder and the web-sized shards are built
from the offline Tiny-ImageNet archive, and every method is measured at N and 4N, printed and returned."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import load_bench
from PIL import Image

from neighborlt.pipeline import read_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_data_scale_bench_measures_every_method(data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    bench = load_bench("data_scale")
    out = bench.main(["--n", "8", "--classes", "2", "--size", "32", "--workers", "0", "--batch", "4",
                      "--feature-images", "6", "--keep", str(tmp_path / "data"), "--data-dir", str(data_dir),
                      "--min-seconds", "0", "--pool-per-class", "2", "--refs", "5000"])
    rows = out["rows"]
    assert {(r["set"], r["size"], r["method"]) for r in rows} == {
        (k, t, m) for k in ("imagenet", "web") for t in ("N", "4N") for m in ("cache", "stream", "torchvision")}
    by = {(r["set"], r["size"], r["method"]): r for r in rows}
    assert by["imagenet", "4N", "stream"]["images"] > by["imagenet", "N", "stream"]["images"] >= 8
    for r in rows:
        assert r["first_batch_s"] > 0 and r["epoch_img_s"] > 0 and r["peak_pss_mib"] > 0
        assert (r["disk_bytes"] > 0) == (r["method"] == "cache")
    assert by["web", "N", "cache"]["disk_bytes"] == by["web", "N", "cache"]["images"] * 32 * 32 * 3 + 128
    assert {f["method"] for f in out["features"]} == {"cache", "stream"}
    assert out["refs"]["rows"] == 5000 and 0 < out["refs"]["bytes"] <= out["refs"]["peak_bytes"]
    shard = next((tmp_path / "data" / "web-N" / "retrieve" / "shards").glob("*.tar"))
    assert shard.stat().st_size > 0
    # the auxiliary pool that bench/data_scale_run.yaml retrieves from: the own-dataset example's pool classes,
    # ImageNet-shaped, captioned with their names; the bench's first classes are that example's targets
    pool = (tmp_path / "data" / "aux-pool" / "pool.csv").read_text().splitlines()
    example = read_config_file(ROOT / "examples" / "own_dataset" / "config.yaml")
    assert pool[0] == "path,caption" and len(pool) == 1 + 2 * 10 and "a photo of a Labrador retriever" in pool[1]
    with Image.open(tmp_path / "data" / "aux-pool" / pool[1].split(",")[0]) as im:
        assert min(im.size) >= 300
    run = read_config_file(ROOT / "bench" / "data_scale_run.yaml")
    assert run["classes"]["dataset"] == "runs/data_scale_data/imagenet-4N" and example["neighbors"]["backend"] == \
        run["neighbors"]["backend"] == "wordnet"
    assert run["retrieve"]["pool"] == "runs/data_scale_data/aux-pool/pool.csv"
    assert run["train"]["data_mode"] == "stream" and run["train"]["image_size"] == 224
    targets = sorted(p.name for p in (tmp_path / "data" / "imagenet-4N" / "train").iterdir())
    assert len(targets) == 2 and {"n02099601", "n07749582"} == set(targets)  # golden retriever, lemon
    printed = capsys.readouterr().out
    assert "| imagenet |" in printed and "Projection to 4,200,000 images" in printed and "imagenet 4N:" in printed
