"""Stage 4 (``filter``) on real CIFAR-10 images with the offline EfficientNet-Lite0 features: planted copies of
target test images (exact, re-encoded, resized) are all caught by the leak guard, the caption rule, the band,
de-duplication, caps, the funnel and the contact sheets; then training reads the manifest."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from neighborlt.classes import ClassesConfig, run_classes
from neighborlt.data import load_targets
from neighborlt.errors import ConfigError
from neighborlt.filter import FilterConfig, run_filter
from neighborlt.retrieve import RetrieveConfig, run_retrieve
from neighborlt.rundir import RunDir, read_json

# two targets (the parents of dog and truck): the leak rule embeds every target test image (2,000 here, not 5,000);
# the two pool classes the run uses (10,000 pool rows, not 25,000: every stage that loads the split lists them)
SMALL = {"n_max": 20, "imbalance_ratio": 10, "targets": ["cat", "automobile"], "pool": ["dog", "truck"]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """A run on the shrunk CIFAR-10 protocol whose auxiliary class "dog" comes from a local folder: 30 real dog
    images, 2 of them twice (exact duplicates) and one resized, plus 9 planted copies of target test images."""
    root = tmp_path_factory.mktemp("filter")
    rd = RunDir(root / "run")
    run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), **SMALL), rd)
    (rd.root / "neighbors.json").write_text(json.dumps({"auxiliary": [{"name": "dog", "parents": ["cat"]},
                                                                      {"name": "truck", "parents": ["automobile"]}]}))
    p = load_targets(rd.root)
    pool = root / "pool"
    dog, truck = pool / "dog", pool / "truck"
    dog.mkdir(parents=True)
    truck.mkdir()
    dog_idx = np.flatnonzero(p.pool.labels == p.pool.class_names.index("dog"))[:30]
    for k, i in enumerate(dog_idx):
        shutil.copyfile(p.pool.paths[i], dog / f"real_{k:02d}.png")
    shutil.copyfile(p.pool.paths[dog_idx[0]], dog / "dup_exact.png")
    with Image.open(p.pool.paths[dog_idx[1]]) as im:
        im.convert("RGB").resize((40, 40), Image.BICUBIC).save(dog / "dup_resized.jpg", quality=92)
    truck_idx = np.flatnonzero(p.pool.labels == p.pool.class_names.index("truck"))[:3]
    for k, i in enumerate(truck_idx):
        shutil.copyfile(p.pool.paths[i], truck / f"real_{k}.png")
    test = p.target_test
    leaks = []
    firsts = [int(np.flatnonzero(test.labels == c)[0]) for c in range(2)]
    for k, i in enumerate([firsts[0], firsts[1], len(test) - 1]):  # cat, automobile, automobile test images
        src = Path(test.paths[i])
        shutil.copyfile(src, dog / f"leak_exact_{k}.png")
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.save(dog / f"leak_jpeg_{k}.jpg", quality=85)
            im.resize((48, 48), Image.BICUBIC).save(dog / f"leak_resized_{k}.jpg", quality=90)
        leaks += [f"leak_exact_{k}.png", f"leak_jpeg_{k}.jpg", f"leak_resized_{k}.jpg"]
    run_retrieve(RetrieveConfig(source="local", pool=str(pool)), rd)
    return {"rd": rd, "leaks": leaks, "pool": pool}


def _decisions(rd: RunDir) -> dict[str, str]:
    return {Path(r["path"]).name: r["decision"] for r in pq.read_table(rd.path("filter", "decisions.parquet")).to_pylist()}


def test_planted_leaks_are_all_caught(planted: dict, caplog: pytest.LogCaptureFixture) -> None:
    rd = planted["rd"]
    with caplog.at_level(logging.INFO, logger="neighborlt"):
        res = run_filter(FilterConfig(caption=False, band=False, dedup=False), rd)
    # feature extraction needs no classifier: building the feature model says nothing about one
    assert not [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    dec = _decisions(rd)
    assert {n: dec[n] for n in planted["leaks"]} == {n: "leak" for n in planted["leaks"]}
    real = [n for n in dec if n.startswith("real_")]
    assert all(dec[n] == "kept" for n in real), {n: dec[n] for n in real if dec[n] != "kept"}
    assert res.funnel["leak"] == res.funnel["candidates"] - len(planted["leaks"])
    leak_sim = {Path(r["path"]).name: r["leak_similarity"] for r in
                pq.read_table(rd.path("filter", "decisions.parquet")).to_pylist()}
    assert max(leak_sim[n] for n in real) < 0.94 <= min(leak_sim[n] for n in planted["leaks"] if "exact" not in n)


def test_dedup_cap_min_and_funnel(planted: dict) -> None:
    rd = planted["rd"]
    res = run_filter(FilterConfig(caption=False, band=False, max_per_class=20, min_per_class=4, sheets=2), rd)
    dec = _decisions(rd)
    # one image of each duplicate pair is kept (the folder is read in name order, so the copy comes first)
    assert {dec["dup_exact.png"], dec["real_00.png"]} == {"dedup", "kept"}
    assert {dec["dup_resized.jpg"], dec["real_01.png"]} == {"dedup", "kept"}
    assert sum(v == "dedup" for v in dec.values()) == 2
    kept = [r for r in pq.read_table(rd.path("filter", "aux_manifest.parquet")).to_pylist()]
    assert {r["name"] for r in kept} == {"dog"} and len(kept) == 20  # truck (3 images) is below min_per_class
    assert res.dropped_classes == ["truck"] and res.classes == 1
    assert [r["class_index"] for r in kept] == [0] * 20 and kept[0]["parents"] == ["cat"]
    funnel = read_json(rd.path("filter", "funnel.json"))
    assert funnel["stages"] == ["candidates", "downloaded", "caption", "band", "leak", "dedup", "cap", "kept"]
    per = {c["name"]: c for c in funnel["per_class"]}
    assert per["dog"]["candidates"] == 41 and per["dog"]["leak"] == 32 and per["dog"]["dedup"] == 30
    assert per["dog"]["cap"] == per["dog"]["kept"] == 20 and per["truck"]["cap"] == 3 and per["truck"]["kept"] == 0
    assert funnel["total"]["kept"] == 20
    assert funnel["pair_density"]["pairs"] == 1 and not funnel["pair_density"]["dense"]
    for name in ("dog_kept.png", "dog_rejected.png"):
        with Image.open(rd.path("filter", "sheets", name)) as im:
            assert im.size[0] > 100
    # a re-run with the same options is skipped; another option re-runs
    assert run_filter(FilterConfig(caption=False, band=False, max_per_class=20, min_per_class=4, sheets=2), rd).skipped


# rank 1 of a two-rank job (RANK=1 WORLD_SIZE=2, no process group): runs the filter and writes its result as JSON
_RANK1 = """
import logging, sys
from neighborlt.filter import FilterConfig, run_filter
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
res = run_filter(FilterConfig.model_validate_json(sys.argv[2]), sys.argv[1])
open(sys.argv[3], "w").write(res.model_dump_json())
"""


def test_two_ranks_rank_0_alone_applies_the_rules_and_writes(planted: dict, tmp_path: Path, data_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Under torchrun's RANK / WORLD_SIZE both ranks take their share of the features, then rank 1 leaves the rules
    and the outputs to rank 0 and returns rank 0's result. Rank 0 starts only once rank 1 is in its features (past
    the skip check), so a rank 1 that ran the rules itself would log them and add a second "done" event."""
    rd = planted["rd"]
    cfg = FilterConfig(caption=False, band=False, leak=False, max_per_class=18, min_per_class=4, sheets=1,
                       data_dir=str(data_dir))
    events = sum(e.get("event") == "done" for e in rd.read_log("filter"))
    script, out1 = tmp_path / "rank1.py", tmp_path / "rank1.json"
    script.write_text(_RANK1)
    child = subprocess.Popen([sys.executable, str(script), str(rd.root), cfg.model_dump_json(), str(out1)],
                             env={**os.environ, "RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    in_features = threading.Event()

    def read() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append(line)
            if line.startswith("neighborlt.train.features:"):
                in_features.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not in_features.wait(0.1) and child.poll() is None and time.monotonic() < deadline:
        pass
    assert in_features.is_set(), "rank 1 never reached its features: " + "".join(lines)[-1000:]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="neighborlt"):
        res0 = run_filter(cfg, rd)
    outputs = {p: p.stat().st_mtime_ns for p in rd.path("filter").rglob("*") if p.is_file()}
    child.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert child.returncode == 0, err[-2000:]
    assert "filter: rank 1/2 leaves the rules and the outputs to rank 0" in err, err[-2000:]
    assert not re.search(r"filter: candidates \d+ ->", err), err[-2000:]  # rank 1 applied no rule
    assert re.search(r"filter: candidates 44 -> .* kept 18", caplog.text), caplog.text
    assert sum(e.get("event") == "done" for e in rd.read_log("filter")) == events + 1  # written once, by rank 0
    assert {p: p.stat().st_mtime_ns for p in rd.path("filter").rglob("*") if p.is_file()} == outputs
    res1 = type(res0).model_validate_json(out1.read_text())
    assert res1 == res0 and not res0.skipped and res0.funnel["kept"] == 18 and res0.dropped_classes == ["truck"]


def test_caption_rule_and_band(planted: dict, tmp_path: Path) -> None:
    rd = planted["rd"]
    res = run_filter(FilterConfig(caption=True, band=False, leak=False, dedup=False), rd)
    assert res.funnel["caption"] == res.funnel["candidates"]  # folder names are the captions
    # a path,caption table: captions that do not name the class are dropped
    pool = planted["pool"]
    table = tmp_path / "pool.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerow([str(pool / "dog" / "real_00.png"), "my dogs in the garden"])
        w.writerow([str(pool / "truck" / "real_0.png"), "a red truck"])
    rd2 = RunDir(tmp_path / "run2")
    for name in ("classes.json", "split.json", "neighbors.json"):
        shutil.copyfile(rd.path(name), rd2.path(name))
    run_retrieve(RetrieveConfig(source="local", pool=str(table)), rd2)
    res = run_filter(FilterConfig(band=False, leak=False, dedup=False, sheets=0), rd2)
    assert res.funnel["caption"] == 2
    # the band: similarities are recorded against the parent's prototype; a band nothing fits rejects all
    res = run_filter(FilterConfig(caption=False, leak=False, dedup=False, gamma_low=0.99, gamma_high=1.0, sheets=0), rd)
    assert res.funnel["band"] == 0 and res.funnel["kept"] == 0
    rows = pq.read_table(rd.path("filter", "decisions.parquet")).to_pylist()
    assert all(r["parent"] in ("cat", "automobile") and -1 <= r["band_similarity"] <= 1 for r in rows)
    res = run_filter(FilterConfig(caption=False, leak=False, dedup=False, gamma_low=-1.0, gamma_high=1.0, sheets=0), rd)
    assert res.funnel["band"] == res.funnel["candidates"]
    # per-class quantiles: the least similar half of each class goes
    res = run_filter(FilterConfig(caption=False, leak=False, dedup=False, band_mode="quantile", quantile_low=0.5,
                                  sheets=0), rd)
    per = {c["name"]: c for c in read_json(rd.path("filter", "funnel.json"))["per_class"]}
    assert per["dog"]["band"] == 20 and per["truck"]["band"] == 1  # 41 -> above the median; 3 -> 1
    with pytest.raises(ConfigError, match="gamma_low .* must be below gamma_high"):
        FilterConfig(gamma_low=0.5, gamma_high=0.2)


def test_training_reads_the_manifest(planted: dict) -> None:
    from neighborlt.train import TrainConfig, run_train

    rd = planted["rd"]
    run_filter(FilterConfig(caption=False, band=False, min_per_class=1), rd)
    cfg = TrainConfig(model="resnet8_cifar", image_size=16, epochs=1, batch_size=16, warmup_epochs=0, lr=0.05,
                      loss="neighbor_silencing", aux_cap=8, max_test_per_class=5, threads=1, eval_every=0)
    res = run_train(cfg, rd, progress=False)
    meta = read_json(rd.path("train", "model.json"))
    assert res.num_classes == 4 and res.num_target_classes == 2
    assert meta["class_names"][2:] == ["dog", "truck"] and meta["neighbor_pairs"] == [[0, 2], [1, 3]]
    assert run_train(cfg, rd, progress=False).skipped  # same options, same manifest
    # another manifest (the filter re-run with other options) is another run: training runs again (the key rule)
    before = rd.path("train", "model.safetensors").stat().st_mtime_ns
    run_filter(FilterConfig(caption=False, band=False, min_per_class=1, max_per_class=10), rd)
    assert not run_train(cfg, rd, progress=False).skipped
    assert rd.path("train", "model.safetensors").stat().st_mtime_ns != before
    assert read_json(rd.path("records", "train.done.json"))["inputs"]["filter/aux_manifest.parquet"] is not None
    with pytest.raises(ConfigError, match="missing.parquet: not found; make it with `neighborlt retrieve"):
        run_train(cfg.model_copy(update={"aux_manifest": "filter/missing.parquet"}), rd, progress=False)


def test_filter_needs_the_retrieve_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retrieve/manifest.parquet: not found; run `neighborlt retrieve"):
        run_filter(FilterConfig(), RunDir(tmp_path))



def test_pair_density_flags_runs_that_silence_most_of_the_auxiliary_set(caplog: pytest.LogCaptureFixture) -> None:
    from neighborlt.data.auxiliary import pair_density

    sparse = pair_density(np.array([[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]), 5, 5)  # CIFAR-10 WordNet: one each
    assert sparse["pairs_per_target_mean"] == 1.0 and sparse["paired_share_mean"] == 0.2 and not sparse["dense"]
    every = pair_density(np.array([[i, 5 + j] for i in range(5) for j in range(5)]), 5, 5)  # K = 5, 5-class pool
    assert every["dense"] and every["dense_targets"] == 1.0 and every["pairs_per_target_max"] == 5
    half = pair_density(np.array([[0, 4], [0, 5], [1, 4], [1, 5], [2, 4]]), 4, 2)
    assert half["dense_targets"] == 0.75 and half["dense"] and half["targets_without_pair"] == 1
