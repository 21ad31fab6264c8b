"""The whole pipeline (classes -> neighbors -> train -> export -> eval) and the experiment grids, end to end on a
small CIFAR-10 split-neighbour protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import train_mtimes

from neighborlt.ablate import AblationConfig, grid_rows, run_ablation
from neighborlt.pipeline import DEMO_TRAIN, PipelineConfig, run_pipeline

SMALL = {"n_max": 40, "imbalance_ratio": 10}  # 40/22/12/7/4 target images
POOL2 = {**SMALL, "pool": ["dog", "truck"]}  # two pool classes (10,000 images): the siblings of cat and automobile
TRAIN = {**DEMO_TRAIN, "image_size": 16, "epochs": 2, "batch_size": 16, "warmup_epochs": 0}
KEEP_ALL = {"caption": False, "band": False, "leak": False, "dedup": False}  # no feature extraction: seconds


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[PipelineConfig, Path, dict, str]:
    """One whole pipeline run (the method and the baseline trained at once, in two processes), shared by the tests
    that read it; with the INFO log of neighborlt.pipeline."""
    import io
    import logging

    root = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(data_dir=str(data_dir), protocol_overrides=POOL2, train=TRAIN, retrieve={"match": "wordnet"},
                         filter=KEEP_ALL, aux_cap=8, max_test_per_class=20, report=False, parallel_baseline=True)
    log = io.StringIO()
    logger = logging.getLogger("neighborlt.pipeline")
    handler, level = logging.StreamHandler(log), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = run_pipeline(cfg, root, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return cfg, root, out, log.getvalue()


def test_pipeline_end_to_end(pipeline_run: tuple[PipelineConfig, Path, dict, str],
                             caplog: pytest.LogCaptureFixture) -> None:
    cfg, tmp_path, out, _ = pipeline_run
    for name in ("classes.json", "split.json", "neighbors.json", "retrieve/manifest.parquet",
                 "filter/aux_manifest.parquet", "filter/funnel.json", "summary.md", "summary.json",
                 "export/model.safetensors", "eval/metrics.json", "baseline/eval/metrics.json"):
        assert (tmp_path / name).is_file(), name
    export = json.loads((tmp_path / "export" / "model.json").read_text())
    assert export["num_classes"] == 5 and len(export["direct_classifier"]["dropped_classes"]) == 2
    assert json.loads((tmp_path / "train" / "model.json").read_text())["num_classes"] == 7  # 5 target + 2 pool
    for key in ("method", "baseline"):
        m = out[key]
        assert 0.0 <= m["overall"] <= 100.0 and sum(m["split_test_samples"].values()) == 100
    summary = (tmp_path / "summary.md").read_text()
    assert "Balanced-CE, no auxiliary data" in summary and "neighbor_silencing" in summary
    assert "| candidates | downloaded |" in summary and out["funnel"]["kept"] == 10000  # 2 pool classes of 5000
    # idempotent: a second call trains nothing (weights untouched)
    mtime = (tmp_path / "train" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="neighborlt.pipeline"):
        again = run_pipeline(cfg, tmp_path, progress=False)
    assert "training the baseline in process" not in caplog.text  # both up to date: no second process started
    assert (tmp_path / "train" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again["method"]["overall"] == out["method"]["overall"]


def test_method_and_baseline_train_at_once_with_the_same_weights(
        tmp_path: Path, pipeline_run: tuple[PipelineConfig, Path, dict, str], caplog: pytest.LogCaptureFixture) -> None:
    """threads=1 on a multi-core CPU: the baseline trains in a second process beside the method (auto rule), and
    both models are byte-identical to the ones trained one after the other."""
    import shutil

    from neighborlt.pipeline import parallel_trainings, stage_configs

    cfg, at_once, _, log = pipeline_run
    st = stage_configs(cfg.model_copy(update={"parallel_baseline": None}))
    assert parallel_trainings(st["train"], st["baseline"]) == (len(os.sched_getaffinity(0)) >= 2)
    assert not parallel_trainings(st["train"], st["baseline"].model_copy(update={"threads": 0}))
    assert "training the baseline in process" in log
    # the same run up to the filter, then both trainings one after the other
    in_turn = tmp_path / "in_turn"
    shutil.copytree(at_once, in_turn, ignore=lambda d, names: [n for n in names if Path(d) == at_once and n in (
        "train", "baseline", "export", "eval", "summary.md", "summary.json")])
    with caplog.at_level("INFO", logger="neighborlt.pipeline"):
        out = run_pipeline(cfg.model_copy(update={"parallel_baseline": False}), in_turn, progress=False,
                           until_stage="train")
    assert out["stages"][-1] == "train" and "training the baseline in process" not in caplog.text
    for sub in ("train", "baseline/train"):
        a, b = (d / sub / "model.safetensors" for d in (at_once, in_turn))
        assert a.read_bytes() == b.read_bytes(), sub


def test_table6_grid_shares_runs_and_reports_paired_deltas(tmp_path: Path, data_dir: Path) -> None:
    cfg = AblationConfig(grids=["table6"], protocol="cifar10-neighbours", protocol_overrides=POOL2,
                         data_dir=str(data_dir), seeds=[0, 1], relation="wordnet", aux_cap=8,
                         train={**TRAIN, "epochs": 1, "max_test_per_class": 10, "crt_epochs": 1})
    rows = grid_rows(cfg, "table6")
    assert len(rows) == 6 and len({r.run.name for r in rows}) == 3  # direct and cRT rows share their run
    trained: list[tuple[str, int]] = []
    (res,) = run_ablation(cfg, tmp_path, progress=False, on_run=lambda n, s: trained.append((n, s)))
    assert sorted(trained) == sorted((n, s) for n in ("balce", "balce_aux_crt", "ns0.1_aux_crt") for s in (0, 1))
    first = res.rows[0]
    assert first["delta_overall"] == (0.0, 0.0)  # paired difference of the baseline with itself
    for row in res.rows:
        assert set(row["seeds"]) == {0, 1}
        assert row["seeds"][0]["overall"] is not None and row["seeds"][0]["many"] is None  # no class has >100 images
    crt = next(r for r in res.rows if r["classifier"] == "crt_metrics")
    direct = next(r for r in res.rows if r["run"] == crt["run"] and r["classifier"] == "metrics")
    assert crt["seeds"] != direct["seeds"]  # two classifiers of one run
    # the control row: cRT of the Bal-CE run (trained with the joint classifier), re-trained after the fact
    control = res.rows[-1]
    assert control["run"] == "balce" and control["classifier"] == "crt_metrics"
    assert control["seeds"][0]["overall"] is not None and control["seeds"] != first["seeds"]
    crt_dir = tmp_path / "runs" / "balce" / "seed0" / "train" / "crt"
    assert json.loads((crt_dir / "model.json").read_text())["num_classes"] == 5
    assert json.loads((crt_dir / "metrics.json").read_text()) == control["seeds"][0]
    table = (tmp_path / "table6.md").read_text()
    assert table.count("\n| ") == 7 and "neighbor silencing" in table and "(control)" in table
    assert (tmp_path / "table6.png").stat().st_size > 1000
    # re-running only re-reads finished runs: no training output is written again
    before = train_mtimes(tmp_path)
    assert len(before) == 3 * 2 * 3  # 3 runs x 2 seeds x (weights, model.json, done marker)
    run_ablation(cfg, tmp_path, progress=False)
    assert train_mtimes(tmp_path) == before


def test_grid_definitions() -> None:
    cfg = AblationConfig()
    lam = grid_rows(cfg, "lambda")
    assert [dict(r.run.train)["lambda_s"] for r in lam] == [0.01, 0.1, 0.2, 0.3, 0.5, 1.0]
    assert [dict(r.run.train)["aux_cap"] for r in grid_rows(cfg, "cap")] == [10, 30, 50, 100, 150]
    assert [r.run.per_class for r in grid_rows(cfg, "k")] == [1, 3, 5, 7, 8]
    assert [r.run.split_ratio for r in grid_rows(cfg, "ratio")] == ["1:1:3", "0:1:3", "auto"]
    losses = grid_rows(cfg, "losses")
    assert [dict(r.run.train)["loss"] for r in losses][:5] == ["ce", "logit_adjusted", "balanced_bce", "dro",
                                                              "balanced_softmax"]
    assert not any(r.run.aux for r in losses[:5]) and losses[5].run.aux


@pytest.mark.parametrize("args, message", [
    (["ablate", "OUT", "--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
    (["ablate", "OUT", "--train", "{epochs: 3}"], "--train: not valid JSON"),
    (["ablate", "OUT", "--grid", "nope"], "--grid 'nope': Input should be 'table6'"),
    (["ablate", "OUT", "--pairing", "nearest"], "--pairing 'nearest': Input should be 'visual' or 'random'"),
    (["ablate", "OUT", "--neighbors-vocabulary", "pool"], "the pool vocabulary needs the embedding backend"),
    (["run", "OUT", "--train", "[1]"], "--train: expected a JSON object"),
    (["run", "OUT", "--train", '{"lambda_s": -1}'], "train.lambda_s: must be >= 0.0, got -1"),
    (["run", "OUT", "--filter", '{"gama_low": 0}'], "filter.gama_low: unknown key (did you mean 'gamma_low'?); allowed: band, band_mode"),
    (["run", "OUT", "--lambda-s", "-1"], "lambda_s: must be >= 0.0, got -1.0"),
    (["run", "OUT", "--until", "training"], "--until 'training': unknown stage; use one of classes, neighbors"),
    (["run", "OUT", "--from", "eval", "--until", "train"], "--from eval comes after --until train"),
    (["run", "OUT", "--from", "train"], "--from train: stage classes has not finished"),
    (["run", "OUT.yaml"], "out.yaml: config file not found"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str,
                                 capsys: pytest.CaptureFixture) -> None:
    from neighborlt.cli import main

    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def test_cli_error_is_one_line_from_a_process(tmp_path: Path) -> None:
    """The same in a real `python -m neighborlt` process: nothing else on its stderr (no import-time noise)."""
    proc = subprocess.run([sys.executable, "-m", "neighborlt", "run", str(tmp_path / "out"), "--from", "train"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stage classes has not finished" in lines[0], \
        proc.stderr


def test_pool_vocabulary_limits_neighbours_to_pool_classes(tmp_path: Path, data_dir: Path) -> None:
    """With --neighbors-vocabulary pool the backend can only name pool classes, so every proposed name reaches
    training (nothing unmatched) and K / the split ratio change the neighbour pairs."""
    from neighborlt.ablate import GridData

    # two pool classes (10,000 images, not 25,000): enough for K = 3 to ask more than K = 1 holds; the settings
    # that prove something: K = 1 vs 3 and the ratios with and without head neighbours
    cfg = AblationConfig(grids=["k", "ratio"], protocol="cifar10-neighbours", ks=[1, 3], ratios=["1:1:3", "0:1:3"],
                         protocol_overrides={"pool": ["dog", "truck"]}, data_dir=str(data_dir),
                         relation="neighbors", neighbors_backend="embedding", neighbors_vocabulary="pool")
    data = GridData(cfg, tmp_path)
    pool = set(data.protocol.pool.class_names)
    sets = {row.label: data.training_set(row.run) for g in ("k", "ratio") for row in grid_rows(cfg, g)}
    assert (tmp_path / "neighbors" / "pool_vocabulary.txt").read_text().split("\n")[:-1] == \
        data.protocol.pool.class_names
    for label, aux in sets.items():
        assert aux.unmatched == [], label
        assert set(aux.train.class_names[aux.num_target:]) <= pool and aux.num_auxiliary > 0
    k1, k3 = sets["K = 1"], sets["K = 3"]
    assert len(k1.pairs) < len(k3.pairs)
    # 0:1:3 asks nothing for head classes: the head target (cat, 500 images) has no neighbour pair
    head = list(data.protocol.target_train.class_names).index("cat")
    assert head not in set(sets["ratio 0:1:3"].pairs[:, 0].tolist())
    assert head in set(sets["ratio 1:1:3"].pairs[:, 0].tolist())
    with pytest.raises(Exception, match="no auxiliary pool"):
        GridData(cfg.model_copy(update={"protocol": "cifar10-lt", "protocol_overrides": SMALL}),
                 tmp_path / "lt")._pool_vocabulary()


def test_grid_rows_with_the_same_auxiliary_set_train_once(tmp_path: Path, data_dir: Path) -> None:
    """K = 5 and K = 7 both use all (2) pool classes and the same pairs on this small protocol: one run, two rows."""
    cfg = AblationConfig(grids=["k"], ks=[5, 7], protocol="cifar10-neighbours", protocol_overrides=POOL2,
                         data_dir=str(data_dir), seeds=[0], relation="neighbors", neighbors_backend="embedding",
                         neighbors_vocabulary="pool", aux_cap=8,
                         train={**TRAIN, "epochs": 1, "max_test_per_class": 10})
    trained: list[tuple[str, int]] = []
    (res,) = run_ablation(cfg, tmp_path, progress=False, on_run=lambda n, s: trained.append((n, s)))
    assert trained == [("ns0.1_aux_k5", 0)]
    assert [r["run"] for r in res.rows] == ["ns0.1_aux_k5", "ns0.1_aux_k5"]
    assert res.rows[0]["seeds"] == res.rows[1]["seeds"]
    assert not (tmp_path / "runs" / "ns0.1_aux_k7").exists()


def test_parallel_ablate_processes_share_one_folder(tmp_path: Path, data_dir: Path) -> None:
    """Two `ablate` processes on one folder: each run is trained by exactly one of them (its run lock), and both
    end with the same complete table."""
    train = json.dumps({**TRAIN, "epochs": 1, "max_test_per_class": 10, "crt_epochs": 1, "threads": 1})
    args = [sys.executable, "-m", "neighborlt", "ablate", str(tmp_path), "--grid", "table6", "--seeds", "0",
            "--protocol", "cifar10-neighbours", "--relation", "wordnet", "--aux-cap", "8", "--quiet",
            "--data-dir", str(data_dir), "--protocol-overrides", json.dumps(POOL2), "--train", train]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for name in ("balce", "balce_aux_crt", "ns0.1_aux_crt"):
        log = tmp_path / "runs" / name / "seed0" / "train" / "log.jsonl"
        epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines() if '"epoch"' in line]
        assert epochs == [1], (name, epochs)  # trained once, not twice over each other
    table = json.loads((tmp_path / "table6.json").read_text())["rows"]
    assert len(table) == 6 and all(set(r["seeds"]) == {"0"} for r in table)
    printed = [[line for line in out.splitlines() if line.startswith("| ")] for out in outs]
    assert len(printed[0]) == 7 and printed[0] == printed[1]  # each process printed the same full table


def test_until_and_from_run_a_range_of_stages(tmp_path: Path, data_dir: Path) -> None:
    cfg = PipelineConfig(data_dir=str(data_dir), protocol_overrides=POOL2, train=TRAIN, retrieve={"match": "wordnet"},
                         filter=KEEP_ALL, report=False)
    out = run_pipeline(cfg, tmp_path, progress=False, until_stage="classes")
    assert out["stages"] == ["classes"] and out["method"] is None and out["summary"] is None
    assert (tmp_path / "split.json").is_file() and not (tmp_path / "neighbors.json").exists()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "records" / "pipeline.config.json").is_file()
    out = run_pipeline(cfg, tmp_path, progress=False, from_stage="neighbors", until_stage="retrieve")
    assert out["stages"] == ["neighbors", "retrieve"] and (tmp_path / "retrieve" / "manifest.parquet").is_file()
    assert not (tmp_path / "filter").exists()
    from neighborlt.errors import ConfigError

    with pytest.raises(ConfigError, match="stage filter has not finished"):
        run_pipeline(cfg, tmp_path, progress=False, from_stage="train")


def test_run_config_sections_and_shorthands() -> None:
    from neighborlt.pipeline import stage_configs

    s = stage_configs(PipelineConfig(classes={"dataset": "some/folder", "targets": "a,b", "pool": ["c"]},
                                     train={"epochs": 3, "lambda_s": 0.3}, aux_cap=7))
    assert s["classes"].dataset == "some/folder" and s["classes"].protocol is None and s["classes"].targets == ["a", "b"]
    assert (s["train"].loss, s["train"].lambda_s, s["train"].aux_cap, s["train"].epochs) == \
        ("neighbor_silencing", 0.3, 7, 3)
    assert (s["baseline"].loss, s["baseline"].lambda_s, s["baseline"].aux_manifest) == ("balanced_softmax", 0.1, None)
    demo = stage_configs(PipelineConfig())
    assert demo["classes"].protocol == "cifar10-neighbours" and demo["train"].model == DEMO_TRAIN["model"]
    assert demo["report"] is not None and stage_configs(PipelineConfig(report=False))["report"] is None


def test_the_baseline_process_sends_back_its_error(tmp_path: Path) -> None:
    """The baseline's process (parallel_baseline) sends its one-line error back through the pipe, where the method's
    process raises it; the process itself never prints a traceback."""
    import multiprocessing as mp

    from neighborlt.errors import ConfigError
    from neighborlt.pipeline import _train_child
    from neighborlt.train import TrainConfig

    recv, send = mp.Pipe(duplex=False)
    _train_child(tmp_path / "baseline", TrainConfig(**TRAIN), send)  # no split.json there
    err = recv.recv()
    assert isinstance(err, ConfigError) and "split.json: not found; run `neighborlt classes" in str(err)
