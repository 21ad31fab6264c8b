"""Coverage warnings: a run whose pool has images for one target's neighbours and none for the other's warns once
after retrieve and once after the filter (console), and says so in ``summary.md`` and in the report's coverage
section (per target: proposed, matched with image counts, unmatched)."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from neighborlt.coverage import coverage
from neighborlt.pipeline import PipelineConfig, run_pipeline
from neighborlt.rundir import read_json


def _dataset(root: Path) -> Path:
    for split, counts in (("train", {"sandal": 8, "teapot": 4}), ("test", {"sandal": 2, "teapot": 2})):
        for c, (name, n) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (120 * c, 9 * i, 60)).save(root / split / name / f"{i}.png")
    return root


def _pool(root: Path) -> Path:
    """Sneakers (a synonym of WordNet's *gym shoe*, a neighbour of *sandal*) and bicycles (nobody's neighbour)."""
    root.mkdir()
    with open(root / "pool.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(6):
            Image.new("RGB", (32, 32), (30 * i, 200, 10)).save(root / f"{i}.png")
            w.writerow([f"{i}.png", "white sneakers" if i < 4 else "a red bicycle"])
    return root / "pool.csv"


def test_an_uncovered_target_is_named_on_the_console_in_the_summary_and_in_the_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = PipelineConfig(
        classes={"dataset": str(_dataset(tmp_path / "data")), "many": 6, "few": 3},
        neighbors={"backend": "wordnet", "per_class": 3, "split_ratio": "1:1:1"},
        retrieve={"source": "local", "pool": str(_pool(tmp_path / "pool"))},
        filter={"band": False, "leak": False, "dedup": False, "sheets": 0},
        train={"model": "resnet8_cifar", "image_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
               "threads": 1, "eval_every": 0},
        baseline=False)
    with caplog.at_level(logging.INFO, logger="neighborlt"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    epoch = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1")]
    assert epoch and re.fullmatch(r"epoch 1/1 loss \d+\.\d{4} test overall \d+\.\d, .*", epoch[0]) \
        and not re.search(r"\d\.\d{5}", epoch[0])  # rounded, not 92.94999999999999
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("coverage after")]
    assert len(warnings) == 2  # once after retrieve, once after the filter
    assert warnings[0].startswith("coverage after retrieve: 1 of 2 targets have no auxiliary class") \
        and warnings[0].count("teapot") == 1 and "sandal" not in warnings[0]
    assert "no silenced pair: teapot" in warnings[1] and "lower band" in warnings[1]
    for w in warnings:
        assert "pool's vocabulary" in w and "another neighbour backend" in w and "bigger pool" in w

    doc = read_json(run / "filter" / "coverage.json")
    rows = {r["name"]: r for r in doc["targets"]}
    assert doc["uncovered"] == ["teapot"] and rows["sandal"]["matched"] == {"gym shoe": 4}
    assert "gym shoe" in rows["sandal"]["proposed"] and "gym shoe" not in rows["sandal"]["unmatched"]
    assert rows["teapot"]["proposed"] and rows["teapot"]["unmatched"] == rows["teapot"]["proposed"]

    summary = (run / "summary.md").read_text()
    assert "## Coverage" in summary and warnings[0] in summary and warnings[1] in summary
    html = (run / "report" / "index.html").read_text()
    assert 'id="coverage"' in html and "no silenced pair: teapot" in html
    assert "gym shoe (4 → 4)" in html  # matched, with images after retrieve → kept


def test_coverage_without_uncovered_targets_has_no_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "retrieve").mkdir(parents=True)
    (run / "classes.json").write_text('{"classes": [{"name": "cat"}, {"name": "dog"}]}')
    (run / "neighbors.json").write_text('{"targets": [{"name": "cat", "asked": 2, "found": ["lynx", "puma"]}, '
                                        '{"name": "dog", "asked": 0, "found": []}]}')
    from neighborlt.data import manifest as mf

    mf.write_table(mf.to_table([{"uid": "1", "name": "lynx", "parents": ["cat"], "url": "x", "status": "ok"},
                                {"uid": "2", "name": "lynx", "parents": ["cat"], "url": "y", "status": "not_image"}]),
                   run / "retrieve" / "manifest.parquet")
    doc = coverage(run, "retrieve")
    assert doc["warning"] is None and doc["uncovered"] == []  # dog was asked for no names (split ratio 0)
    assert doc["targets"][0] == {"name": "cat", "proposed": ["lynx", "puma"], "matched": {"lynx": 1},
                                 "unmatched": ["puma"]}
