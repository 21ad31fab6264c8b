"""Stage 1 (classes): files and schema, idempotence, config change refusal, --skip-corrupt logging, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data.make_fixtures import image_folder
from typer.testing import CliRunner

from neighborlt.classes import ClassesConfig, run_classes
from neighborlt.cli import app
from neighborlt.errors import ConfigError, DataError
from neighborlt.rundir import RunDir, read_json

runner = CliRunner()


def test_run_classes_protocol_files_and_idempotence(tmp_path: Path, data_dir: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir))
    res = run_classes(cfg, run)
    assert not res.skipped and res.num_targets == 5 and res.num_pool == 5
    doc = read_json(run.path("classes.json"))
    assert doc["schema"] == 1 and doc["dataset"] == "cifar10-neighbours"
    assert doc["thresholds"] == {"many": 100, "few": 20}
    assert [c["shot"] for c in doc["classes"]] == ["many", "many", "medium", "few", "few"]
    assert doc["classes"][0] == {"index": 0, "name": "cat", "id": "cat", "wnid": None, "synonyms": ["cat"],
                                 "train_count": 500, "test_count": 1000, "shot": "many"}
    assert doc["totals"] == {"many": 658, "medium": 50, "few": 20}
    split = read_json(run.path("split.json"))
    assert split["siblings"]["cat"] == ["dog"] and [r["count"] for r in split["pool"]] == [5000] * 5
    assert run.path("records", "classes.config.json").is_file() and run.path("records", "classes.env.json").is_file()
    before = run.path("classes.json").stat().st_mtime_ns
    again = run_classes(cfg, run)
    assert again.skipped and again.train_counts == res.train_counts
    assert run.path("classes.json").stat().st_mtime_ns == before
    # other options run the stage again and replace its files (the one key rule: later stages follow their hashes)
    other = run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), seed=5), run)
    assert not other.skipped and read_json(run.path("split.json"))["protocol"]["seed"] == 5
    assert read_json(run.path("records", "classes.done.json"))["fields"]["seed"] == 5
    # --force runs it again even when nothing changed
    before = run.path("classes.json").stat().st_mtime_ns
    forced = run_classes(ClassesConfig(protocol="cifar10-neighbours", data_dir=str(data_dir), seed=5, force=True), run)
    assert not forced.skipped and run.path("classes.json").stat().st_mtime_ns != before


def test_run_classes_plain_dataset_skip_corrupt(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "ds", {"apple": 4, "pear": 3})
    (root / "apple" / "002.png").write_bytes(b"broken")
    run = RunDir(tmp_path / "run")
    res = run_classes(ClassesConfig(dataset=str(root), skip_corrupt=True), run)
    assert res.train_counts == [3, 3] and res.skipped_corrupt == 1
    events = [e for e in run.read_log("classes") if e.get("event") == "skipped_corrupt"]
    assert events and events[0]["count"] == 1 and events[0]["files"][0].endswith("002.png")
    assert read_json(run.path("classes.json"))["classes"][1]["name"] == "pear"


def test_classes_config_needs_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ClassesConfig()
    with pytest.raises(ValueError, match="exactly one"):
        ClassesConfig(protocol="cifar10-lt", dataset="cifar10")
    with pytest.raises(ValueError):
        ClassesConfig(protocol="cifar10-lt", lr=0.1)  # extra fields are refused


def test_cli_classes_and_summary(tmp_path: Path, data_dir: Path) -> None:
    r = runner.invoke(app, ["classes", str(tmp_path / "run"), "--protocol", "cifar10-neighbours",
                            "--data-dir", str(data_dir), "--n-max", "400", "--imbalance-ratio", "50"])
    assert r.exit_code == 0, r.output
    assert "5 target classes" in r.output
    counts = [c["train_count"] for c in json.loads((tmp_path / "run" / "classes.json").read_text())["classes"]]
    assert counts == [400, 150, 56, 21, 8]
    r = runner.invoke(app, ["data", "summary", "--protocol", "cifar10-neighbours", "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    assert "automobile" in r.output and "158" in r.output and "few" in r.output
    r = runner.invoke(app, ["data", "summary", "--dataset", "omniglot", "--data-dir", str(data_dir), "--split",
                            "test", "--many", "4", "--few", "2", "--limit", "4"])
    assert r.exit_code == 0, r.output
    assert "242 classes, 1210 images" in r.output.replace("\n", " ")


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "neighborlt", "classes", str(tmp_path / "r"), "--dataset",
                          str(tmp_path / "missing")], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "missing" in err[0] and "no such file or folder" in err[0]


def test_cli_custom_split_on_an_image_folder_then_retrieve(tmp_path: Path) -> None:
    """`classes --dataset PATH --targets ... --pool ...` writes that split (targets head -> tail in the given order,
    long-tailed); `retrieve` then reads the protocol pool as on the presets."""
    root = image_folder(tmp_path / "ds", {"cat": 6, "dog": 6, "fox": 6, "wolf": 6, "owl": 6})
    run = tmp_path / "run"
    r = runner.invoke(app, ["classes", str(run), "--dataset", str(root), "--targets", "fox, cat", "--pool", "dog,wolf",
                            "--n-max", "5", "--imbalance-ratio", "5", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "2 target classes" in r.output and "2 pool classes" in r.output
    split = read_json(run / "split.json")
    assert [t["name"] for t in split["targets"]] == ["fox", "cat"]
    assert [t["train_count"] for t in split["targets"]] == [5, 1]
    assert [p["name"] for p in split["pool"]] == ["dog", "wolf"] and [p["count"] for p in split["pool"]] == [6, 6]
    assert split["protocol"]["dataset"] == str(root.resolve()) and split["protocol"]["seed"] == 1
    (tmp_path / "map.json").write_text(json.dumps({"fox": ["wolf"], "cat": ["dog", "lynx"]}))
    r = runner.invoke(app, ["neighbors", str(run), "--backend", "file", "--mapping-file", str(tmp_path / "map.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["retrieve", str(run)])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "retrieve" / "manifest.parquet").to_pylist()
    assert sorted({(row["name"], tuple(row["parents"])) for row in rows}) == [("dog", ("cat",)), ("wolf", ("fox",))]
    assert len(rows) == 12 and read_json(run / "retrieve" / "stats.json")["names_with_images"] == 2


def test_custom_split_config_and_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_folder(tmp_path / "ds", {"cat": 3, "dog": 3, "fox": 3})
    cfg = ClassesConfig(dataset=str(root), targets="dog,cat", pool=["fox"])  # a YAML string or a list
    assert cfg.targets == ["dog", "cat"] and cfg.protocol_config().pool == ["fox"]
    res = run_classes(cfg, RunDir(tmp_path / "run"))
    assert res.num_targets == 2 and res.num_pool == 1 and res.train_counts == [3, 3]
    from neighborlt.cli import main  # the console entry point in-process (test_cli_error_is_one_line runs the process)

    for args, what in ((["--targets", "cat,lion"], "target class 'lion'"), (["--pool", "cat,emu"], "pool class 'emu'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["classes", str(tmp_path / "r2"), "--dataset", str(root), *args])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1, err
        assert what in lines[0] and "known classes: cat, dog, fox" in lines[0]
    with pytest.raises(ConfigError, match="both a target and in the pool"):
        run_classes(ClassesConfig(dataset=str(root), targets=["cat"], pool=["cat"]), RunDir(tmp_path / "r3"))


# ---- the targets manifest (RUN/targets.parquet) --------------------------------------------------------------


def _rewrite_targets(run: RunDir, split: str, n: int, **values: object) -> None:
    """Set columns of the ``n``-th row of ``split`` in RUN/targets.parquet (a hand edit of the manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = run.path("targets.parquet")
    rows = pq.read_table(path).to_pylist()
    i = [k for k, r in enumerate(rows) if r["split"] == split][n]
    rows[i].update(values)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


def test_targets_manifest_image_folder_round_trip(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from neighborlt.data import build_protocol, load_targets
    from neighborlt.data.base import ShardMember

    ds = tmp_path / "ds"
    image_folder(ds / "train", {"apple": 4, "pear": 3, "plum": 2})
    image_folder(ds / "test", {"apple": 2, "pear": 1, "plum": 2})
    run = RunDir(tmp_path / "run")
    res = run_classes(ClassesConfig(dataset=str(ds), pool=["plum"]), run)
    assert res.targets_path == run.path("targets.parquet") and res.train_counts == [4, 3]
    table = pq.read_table(res.targets_path)
    assert table.column("split").to_pylist() == ["train"] * 7 + ["test"] * 3 + ["pool"] * 2
    assert set(table.column("location").to_pylist()) == {"file"}
    assert table.column("name").to_pylist()[:7] == ["apple"] * 4 + ["pear"] * 3
    p = load_targets(run)
    ref = build_protocol(str(ds), pool=["plum"])
    assert p.target_train.class_names == ["apple", "pear"] and p.pool.class_names == ["plum"]
    assert p.target_train.counts().tolist() == [4, 3] and p.target_test.counts().tolist() == [2, 1]
    for got, want in ((p.target_train, ref.target_train), (p.target_test, ref.target_test), (p.pool, ref.pool)):
        assert [Path(x) for x in got.paths] == [Path(x).resolve() for x in want.paths]
        assert got.labels.tolist() == want.labels.tolist()
    assert (p.config.many, p.config.few) == (ref.config.many, ref.config.few)
    # a shard member is a location too (the vocabulary of the auxiliary manifest): its bytes are read from the tar
    import io
    import tarfile

    data = (ds / "train" / "pear" / "000.png").read_bytes()
    with tarfile.open(run.path("shards.tar"), "w") as tf:
        info = tarfile.TarInfo("x.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with tarfile.open(run.path("shards.tar")) as tf:
        offset = tf.getmember("x.png").offset_data
    _rewrite_targets(run, "train", 0, location="shard", path="shards.tar", offset=offset, size=len(data))
    q = load_targets(run)
    assert q.target_train.paths[0] == ShardMember(run.path("shards.tar"), offset, len(data))
    assert q.target_train.load(0).tobytes() == p.target_train.load(4).tobytes()  # pear/000.png


def test_targets_manifest_array_backed_protocol(tmp_path: Path, data_dir: Path) -> None:
    """Omniglot's images live in one .npz: rows reference the dataset's rows, and loading gives the same pixels."""
    import numpy as np
    import pyarrow.parquet as pq

    from neighborlt.data import build_protocol, load_targets

    run = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(protocol="omniglot-neighbours", data_dir=str(data_dir)), run)
    table = pq.read_table(run.path("targets.parquet"))
    assert set(table.column("location").to_pylist()) == {"dataset"}
    assert set(table.column("path").to_pylist()) == {"omniglot"}
    p = load_targets(run)
    ref = build_protocol("omniglot-neighbours", data_dir)
    for got, want in ((p.target_train, ref.target_train), (p.target_test, ref.target_test), (p.pool, ref.pool)):
        assert got.class_ids == want.class_ids and np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.array, want.array)
    assert p.siblings == ref.siblings and p.config == ref.config
    # a row that points at another class's image is a changed dataset, not silently another image
    _rewrite_targets(run, "train", 0, row=int(ref.rows["train"][-1]))
    with pytest.raises(DataError, match="the dataset changed; re-run `neighborlt classes .* --force`"):
        load_targets(run)


def test_run_dir_without_targets_manifest_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neighborlt.data import load_targets

    ds = image_folder(tmp_path / "ds", {"apple": 2, "pear": 2})
    run = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(dataset=str(ds), imbalance_ratio=2.0), run)
    run.path("targets.parquet").unlink()  # a run directory of an older neighborlt
    with pytest.raises(DataError) as e:
        load_targets(run)
    msg = str(e.value)
    assert "\n" not in msg and "targets.parquet: not found" in msg
    assert f"neighborlt classes {run.root} --dataset {ds.resolve()} --imbalance-ratio 2.0 --force" in msg
    from neighborlt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(run.root), "--no-aux", "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "targets.parquet: not found" in err
    # the command it names writes the manifest again
    run_classes(ClassesConfig(dataset=str(ds), imbalance_ratio=2.0, force=True), run)
    assert load_targets(run).target_train.counts().tolist() == [2, 1]


def test_train_reads_the_targets_manifest(tmp_path: Path) -> None:
    """Training takes its images from RUN/targets.parquet: an image path changed there is the one it reads."""
    from neighborlt.data import load_targets
    from neighborlt.errors import NeighborLTError
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    ds = image_folder(tmp_path / "ds", {"apple": 3, "pear": 3})
    run = RunDir(tmp_path / "run")
    run_classes(ClassesConfig(dataset=str(ds)), run)
    broken = tmp_path / "elsewhere" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    _rewrite_targets(run, "train", 1, path=str(broken))
    assert load_targets(run).target_train.paths[1] == broken
    cfg = TrainConfig(model="resnet8_cifar", image_size=16, epochs=1, batch_size=4, warmup_epochs=0, aux_manifest=None)
    with pytest.raises(NeighborLTError, match="broken.png"):
        run_train(cfg, run, progress=False)
