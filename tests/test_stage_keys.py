"""The one completion-key rule (issue 21): every stage's key holds its key fields, the hashes of the files it reads
and a stage version, so a changed input runs everything downstream again and nothing else; ``neighborlt run`` says
which stages ran and why; written files follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from run_helpers import mtimes

from neighborlt.classes import ClassesConfig, run_classes
from neighborlt.errors import ConfigError, DataError
from neighborlt.filter import FilterConfig, run_filter
from neighborlt.neighbors import NeighborsConfig, run_neighbors
from neighborlt.pipeline import DEMO_TRAIN, PipelineConfig, pipeline_config, stage_configs
from neighborlt.retrieve import RetrieveConfig, run_retrieve
from neighborlt.rundir import RunDir, atomic_write_text, change_reason, file_sha256, read_json
from neighborlt.train import TrainConfig, run_train

SMALL = {"n_max": 20, "imbalance_ratio": 10}
# the runs below read no protocol pool image (retrieve reads tiny_pool): one pool class, 5,000 image rows not 25,000
RUN_SPLIT = {**SMALL, "pool": ["dog"]}
KEEP_ALL = {"caption": False, "band": False, "leak": False, "dedup": False}  # no feature extraction: seconds
TINY = {**DEMO_TRAIN, "image_size": 16, "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "max_test_per_class": 2}
OUTPUTS = ("train/model.safetensors", "train/model.json", "records/train.done.json")


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A local pool folder with 6 small images per pool class name (what the images show does not matter here) and
    a neighbour mapping onto it: retrieve and filter take a second, not minutes over CIFAR's 25,000 pool images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for name in ("dog", "truck", "horse"):
        (root / "pool" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "pool" / name / f"{i}.png")
    mapping = root / "mapping.json"
    mapping.write_text(json.dumps({"cat": ["dog"], "automobile": ["truck"]}))
    return {"pool": root / "pool", "mapping": mapping}


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from neighborlt.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the rule itself --------------------------------------------------------------------------------------------


def test_stage_key_parts_and_reasons(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    (tmp_path / "split.json").write_text("{}")
    k1 = rd.stage_key("train", {"epochs": 2, "lr": 0.1}, ["split.json", "missing.parquet"], version=1)
    assert k1.inputs["split.json"] is not None and k1.inputs["missing.parquet"] is None
    assert rd.stale_reason("train", k1) == "not run before" and not rd.is_done("train", k1)
    rd.mark_done("train", k1)
    assert rd.is_done("train", k1) and rd.stale_reason("train", k1) is None
    assert not rd.is_done("train", k1, "train/model.json")  # its outputs must still be there
    # each part changes the key, and the reason names it
    assert rd.stale_reason("train", rd.stage_key("train", {"epochs": 3, "lr": 0.1}, ["split.json", "missing.parquet"],
                                                 version=1)) == "epochs changed"
    (tmp_path / "split.json").write_text('{"seed": 5}')
    k2 = rd.stage_key("train", {"epochs": 2, "lr": 0.1}, ["split.json", "missing.parquet"], version=1)
    assert k2.key != k1.key and rd.stale_reason("train", k2) == "split.json changed"
    k3 = rd.stage_key("train", {"epochs": 2, "lr": 0.1}, ["split.json", "missing.parquet"], version=2)
    assert rd.stale_reason("train", k3) == "stage version changed; split.json changed"
    assert change_reason({"key": "a"}, {"key": "b", "fields": {}}) == "finished by an older version of neighborlt"


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "index.html", "<html>")
        assert stat.S_IMODE(p.stat().st_mode) == 0o640  # mkstemp alone gives 0600
        os.umask(0o002)
        p = atomic_write_text(tmp_path / "summary.md", "# x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o664
        # the same as a plainly opened file
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert stat.S_IMODE(plain.stat().st_mode) == stat.S_IMODE(p.stat().st_mode)
    finally:
        os.umask(old)


# ---- a changed input runs everything downstream ------------------------------------------------------------------


def test_classes_force_with_new_options_retrains(tmp_path: Path, data_dir: Path) -> None:
    rd = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), **RUN_SPLIT), rd)
    cfg = TrainConfig(**TINY, aux_manifest=None, data_dir=str(data_dir))
    assert not run_train(cfg, rd, progress=False).skipped
    first = mtimes(rd.root, *OUTPUTS)
    assert run_train(cfg, rd, progress=False).skipped and mtimes(rd.root, *OUTPUTS) == first
    # the split changes (another seed, hence other images): the same train command must not keep the old model
    run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), seed=5, force=True, **RUN_SPLIT), rd)
    res = run_train(cfg, rd, progress=False)
    assert not res.skipped
    now = mtimes(rd.root, *OUTPUTS)
    assert len(now) == 3 and all(now[k] != first[k] for k in OUTPUTS)
    done = read_json(rd.path("records", "train.done.json"))
    assert done["inputs"]["split.json"] == file_sha256(rd.path("split.json"))
    assert run_train(cfg, rd, progress=False).skipped


def test_wrong_dataset_path_in_an_existing_run_is_a_missing_path(tmp_path: Path, data_dir: Path) -> None:
    rd = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), **RUN_SPLIT), rd)
    with pytest.raises(DataError, match="no such file or folder") as e:
        run_classes(ClassesConfig(dataset=str(tmp_path / "typo"), data_dir=str(data_dir)), rd)
    assert "different" not in str(e.value)
    assert rd.path("classes.json").is_file()  # the finished stage's files are untouched by the failed one


def test_edited_neighbors_json_reruns_retrieve_filter_and_train(tmp_path: Path, data_dir: Path,
                                                                tiny_pool: dict[str, Path]) -> None:
    rd = RunDir(tmp_path / "run")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(tiny_pool["mapping"].read_text())
    run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), **RUN_SPLIT), rd)
    ncfg = NeighborsConfig(backend="file", mapping_file=str(mapping))
    rcfg = RetrieveConfig(pool=str(tiny_pool["pool"]), data_dir=str(data_dir))
    fcfg = FilterConfig(**KEEP_ALL, min_per_class=1)
    tcfg = TrainConfig(**TINY, loss="neighbor_silencing", aux_cap=4, data_dir=str(data_dir))

    def stages() -> dict[str, bool]:
        return {"neighbors": run_neighbors(ncfg, rd).skipped, "retrieve": run_retrieve(rcfg, rd).skipped,
                "filter": run_filter(fcfg, rd).skipped, "train": run_train(tcfg, rd, progress=False).skipped}

    assert stages() == dict.fromkeys(("neighbors", "retrieve", "filter", "train"), False)
    assert read_json(rd.path("train", "model.json"))["num_classes"] == 7
    assert stages() == dict.fromkeys(("neighbors", "retrieve", "filter", "train"), True)
    # a hand edit of neighbors.json (truck dropped): everything that reads it, directly or not, runs again
    doc = read_json(rd.path("neighbors.json"))
    doc["auxiliary"] = [a for a in doc["auxiliary"] if a["name"] != "truck"]
    doc["targets"] = [{**t, "found": [n for n in t.get("found", []) if n != "truck"]} for t in doc["targets"]]
    rd.path("neighbors.json").write_text(json.dumps(doc))
    assert stages() == {"neighbors": True, "retrieve": False, "filter": False, "train": False}
    assert read_json(rd.path("train", "model.json"))["num_classes"] == 6
    assert rd.stale_reason("retrieve", rd.stage_key("retrieve", {}, [])) is not None
    # the mapping file is an input of the neighbours stage: editing it runs the stage (and the rest) again
    mapping.write_text(json.dumps({"cat": ["dog"], "automobile": ["truck"], "deer": ["horse"]}))
    assert stages() == dict.fromkeys(("neighbors", "retrieve", "filter", "train"), False)
    assert read_json(rd.path("train", "model.json"))["num_classes"] == 8


# ---- neighborlt run after an edit --------------------------------------------------------------------------------


def test_run_after_an_edit_reruns_what_changed_and_says_why(tmp_path: Path, data_dir: Path, tiny_pool: dict[str, Path],
                                                            capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "exp.yaml"
    doc = {"run_dir": str(tmp_path / "runs" / "x"), "data_dir": str(data_dir), "protocol_overrides": RUN_SPLIT,
           "neighbors": {"backend": "file", "mapping_file": str(tiny_pool["mapping"])},
           "retrieve": {"pool": str(tiny_pool["pool"])}, "filter": {**KEEP_ALL, "min_per_class": 1}, "train": TINY,
           "aux_cap": 4, "max_test_per_class": 2, "report": False,
           "parallel_baseline": False}  # one process: no spawned baseline trainer importing torch for each run
    config.write_text(yaml.safe_dump(doc))
    code, out, err = _cli(["run", str(config)], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("stages run: classes (not run before), neighbors (not run before)") and "skipped" not in last
    run = tmp_path / "runs" / "x"
    # nothing changed: every stage is skipped, and the line says so
    code, out, err = _cli(["run", str(config)], capsys)
    assert code == 0, err
    assert ("stages run: none; skipped (up to date): classes, neighbors, retrieve, filter, train, export, eval"
            in out.splitlines()[-1])
    # the user edits train.epochs: train (and its baseline), export and eval run again, the data stages do not
    before = mtimes(run, "classes.json", "neighbors.json", "retrieve/manifest.parquet", "filter/aux_manifest.parquet")
    config.write_text(yaml.safe_dump({**doc, "train": {**TINY, "epochs": 2}}))
    code, out, err = _cli(["run", str(config)], capsys)
    assert code == 0, err
    last = out.splitlines()[-1]
    assert "train (epochs changed; baseline: epochs changed)" in last
    assert "export (train/model.safetensors, train/model.json changed; baseline:" in last
    assert "skipped (up to date): classes, neighbors, retrieve, filter;" in last
    assert mtimes(run, *before) == before
    assert len([r for r in (run / "train" / "log.jsonl").read_text().splitlines() if r.strip()]) == 2
    # deleting a stage's folder runs that stage again, with no error about it
    import shutil

    shutil.rmtree(run / "train")
    code, out, err = _cli(["run", str(config)], capsys)
    assert code == 0, err
    assert "stages run: train (its outputs were missing, or --force)" in out.splitlines()[-1]


# ---- one writer per value: λs ------------------------------------------------------------------------------------


def test_lambda_s_has_one_writer() -> None:
    with pytest.raises(ConfigError, match=r"^--loss-param lambda_s=0.3: λs has its own option; pass --lambda-s"):
        TrainConfig(loss="neighbor_silencing", loss_params={"lambda_s": 0.3})
    with pytest.raises(ConfigError, match=r"silencing=paper sets λs = 0.1: drop --lambda-s 0.3 or use"):
        TrainConfig(loss="neighbor_silencing", lambda_s=0.3, loss_params={"silencing": "paper"})
    # a preset alone fills the field (what the records and reports show is what trains)
    off = TrainConfig(loss="neighbor_silencing", loss_params={"silencing": "official"})
    assert off.lambda_s == 0.0 and "lambda_s" not in off.model_fields_set
    assert TrainConfig(**json.loads(off.model_dump_json())) == off  # the recorded config validates again
    assert TrainConfig(loss="neighbor_silencing", lambda_s=0.0, loss_params={"silencing": "official"}).lambda_s == 0.0
    # the pipeline: --lambda-s next to a preset in the train section is the same one-line error
    cfg = pipeline_config({"lambda_s": 0.3, "train": {**TINY, "loss_params": {"silencing": "paper"}}})
    with pytest.raises(ConfigError, match=r"^train: --loss-param silencing=paper sets λs = 0.1"):
        stage_configs(cfg)
    assert stage_configs(PipelineConfig(train={**TINY, "loss_params": {"silencing": "official"}}))["train"].lambda_s == 0


@pytest.fixture(scope="module")
def small_aux(data_dir: Path):
    import numpy as np
    from aux_helpers import sibling_aux_set

    from neighborlt.data import build_protocol

    proto = build_protocol("cifar10-neighbours", data_dir=data_dir, **SMALL)
    keep = np.concatenate([np.flatnonzero(proto.pool.labels == c)[:10] for c in range(proto.pool.num_classes)])
    proto.pool = proto.pool.subset(np.sort(keep))
    return sibling_aux_set(proto)


def test_model_json_records_the_losss_effective_parameters(tmp_path: Path, small_aux) -> None:
    cfg = TrainConfig(model="resnet8_cifar", image_size=16, epochs=1, batch_size=16, lr=0.05, warmup_epochs=0,
                      aux_cap=8, max_test_per_class=2, eval_every=0, loss="neighbor_silencing",
                      loss_params={"silencing": "official"})
    run_train(cfg, tmp_path, data=small_aux, progress=False)
    meta = read_json(tmp_path / "train" / "model.json")
    assert meta["loss_params"] == {"lambda_s": 0.0, "aux_weight": 0.0} and meta["aux_cap"] == 8
    assert meta["silencing"] == "official"
    from neighborlt.pipeline import trained_loss_label

    assert trained_loss_label(meta) == "neighbor_silencing (λs=0, aux_weight=0, M=8)"


# ---- a flag an error names exists on the command that prints it ---------------------------------------------------

# module (or package) -> the commands whose runs print its errors; training's errors are checked in test_options
PRINTED_BY = {"classes.py": ["classes"], "neighbors": ["neighbors"], "retrieve": ["retrieve"], "filter": ["filter"],
              "evaluate.py": ["eval"], "export.py": ["export", "predict"], "report": ["report"],
              "pipeline.py": ["run", "demo"], "ablate.py": ["ablate"], "pilot.py": ["pilot"], "rundir.py": ["run"]}
OTHER_TOOLS = {"--output", "--save"}  # img2dataset's own flags, in the command line retrieve prints for it


def test_flags_named_in_stage_errors_exist_on_their_command() -> None:
    import ast
    import re

    import typer.main

    from neighborlt.cli import app

    src = Path(__file__).resolve().parents[1] / "src" / "neighborlt"
    commands = {name: {o for p in cmd.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
                for name, cmd in typer.main.get_command(app).commands.items()}
    missing, seen = [], 0
    for key, names in PRINTED_BY.items():
        have = set().union(*(commands[n] for n in names))
        for path in sorted((src / key).glob("*.py")) if (src / key).is_dir() else [src / key]:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                name = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else \
                    getattr(getattr(node, "func", None), "attr", "")
                if not (isinstance(node, ast.Call) and name.endswith("Error")):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", sub.value):
                            seen += 1
                            if flag not in have and flag not in OTHER_TOOLS:
                                missing.append(f"{path.name}:{node.lineno} {flag} (not on {'/'.join(names)})")
    assert seen > 20  # the scan sees the messages (--force, --from, --until, --backend, ...)
    assert not missing, "error messages name flags their command does not have: " + "; ".join(missing)
