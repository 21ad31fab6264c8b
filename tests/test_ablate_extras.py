"""`neighborlt ablate --print-commands` (a grid run across machines: one shell command per run, then the same
`ablate` command writes the tables without training) and the ablation page ``OUT/index.html``."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from neighborlt.ablate import AblationConfig, grid_rows, prepare_runs, train_config
from neighborlt.pipeline import DEMO_TRAIN
from neighborlt.report import write_ablation_page

# one pool class: the filter stage reads every pool image (5,000 here, not 25,000); the claims need one auxiliary class
SMALL = {"n_max": 40, "imbalance_ratio": 10, "pool": ["dog"]}
TRAIN = {**DEMO_TRAIN, "image_size": 16, "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "max_test_per_class": 5,
         "crt_epochs": 1, "threads": 1}
RUNS = ("balce", "balce_aux_crt", "ns0.1_aux_crt")  # the distinct runs of table6


def _ablate_args(out: Path, data_dir: Path) -> list[str]:
    return ["ablate", str(out), "--grid", "table6", "--seeds", "0",
            "--protocol", "cifar10-neighbours", "--relation", "wordnet", "--aux-cap", "8", "--quiet",
            "--data-dir", str(data_dir), "--protocol-overrides", json.dumps(SMALL), "--train", json.dumps(TRAIN)]


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=600, **kw)  # type: ignore


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`neighborlt ARGS` through the console entry point, in-process (no second torch import): its exit status,
    stdout and stderr as a subprocess would give them."""
    from neighborlt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(args)
        except SystemExit as e:
            code = int(e.code or 0)
    return subprocess.CompletedProcess(["neighborlt", *args], code, stdout.getvalue(), stderr.getvalue())


def _cfg(data_dir: Path) -> AblationConfig:
    """What the CLI options of `_ablate_args` resolve to."""
    return AblationConfig(grids=["table6"], protocol_overrides=SMALL, data_dir=str(data_dir), seeds=[0],
                          relation="wordnet", aux_cap=8, train=TRAIN)


def _state(out: Path) -> dict[str, int]:
    """mtimes of every run's training outputs (a re-train would change them)."""
    files = [p for name in RUNS for p in (out / "runs" / name / "seed0").glob("train/*") if p.is_file()]
    files += [out / "runs" / name / "seed0" / "records" / "train.done.json" for name in RUNS]
    return {str(p): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, object]:
    """table6 (1 seed): its commands printed (one `neighborlt job RUN` each), run as shell commands by two parallel
    workers (separate processes),
    then `ablate` over the finished runs. The two `ablate` calls run in-process: a separate process proves nothing
    there (the printed commands are the ones that must work from a shell)."""
    out = tmp_path_factory.mktemp("grid")
    exe = f"{shlex.quote(sys.executable)} -m neighborlt"
    printed = _cli([*_ablate_args(out, data_dir), "--print-commands", "--executable", exe])
    assert printed.returncode == 0, printed.stderr[-3000:]
    commands = printed.stdout.splitlines()
    listed = (out / "commands.txt").read_text().splitlines()
    # what GNU parallel / a job array does, here with 2 workers started elsewhere with another cache setting: the
    # commands pin the directory and the cache, so the workers read the same files (and reach the same config key)
    elsewhere = tmp_path_factory.mktemp("worker-cache")
    env = {**os.environ, "NEIGHBORLT_CACHE": str(elsewhere)}
    with ThreadPoolExecutor(2) as ex:
        done = list(ex.map(lambda c: _run(["bash", "-c", c], cwd=str(tmp_path_factory.mktemp("worker")), env=env),
                           commands))
    assert list(elsewhere.iterdir()) == []
    for c, d in zip(commands, done):
        assert d.returncode == 0, (c, d.stdout[-2000:], d.stderr[-3000:])
    before = _state(out)
    tables = _cli(_ablate_args(out, data_dir))
    assert tables.returncode == 0, tables.stderr[-3000:]
    again = prepare_runs(_cfg(data_dir), out, executable=exe)
    return {"out": out, "commands": commands, "listed": listed, "printed": printed, "tables": tables, "before": before,
            "after": _state(out), "again": again}


@pytest.mark.slow  # shares the ~60 s grid fixture
def test_print_commands_prepares_folders_and_prints_one_command_per_run(grid: dict, data_dir: Path) -> None:
    out: Path = grid["out"]  # type: ignore[assignment]
    commands: list[str] = grid["commands"]  # type: ignore[assignment]
    assert len(commands) == len(RUNS)  # stdout holds the commands only (the logs went to stderr)
    assert grid["listed"] == commands  # OUT/commands.txt: for `parallel < OUT/commands.txt` or a SLURM array
    cfg = _cfg(data_dir)
    specs = {r.run.name: r.run for r in grid_rows(cfg, "table6")}
    for name, command in zip(RUNS, commands):
        run = (out / "runs" / name / "seed0").resolve()
        assert command.startswith(f"cd {shlex.quote(str(Path.cwd().resolve()))} && export NEIGHBORLT_CACHE=")
        assert command.endswith(f" && {shlex.quote(sys.executable)} -m neighborlt job {run}")  # one process per run
        # the folder is a complete run directory with the resolved TrainConfig that `ablate` itself would train
        for f in ("classes.json", "split.json"):
            assert (run / f).read_bytes() == (out / f).read_bytes()
        assert json.loads((run / "train.json").read_text()) == train_config(cfg, specs[name], 0).model_dump(mode="json")
        assert (run / "filter" / "aux_manifest.parquet").is_file() == (name != "balce")
        for f in ("train/model.safetensors", "export/model.safetensors", "eval/metrics.json"):
            assert (run / f).is_file(), (name, f)  # trained, exported and evaluated by its command
        assert json.loads((run / "eval" / "metrics.json").read_text())["max_test_per_class"] == 5  # the run's cap


def test_job_refuses_a_folder_without_train_json(tmp_path: Path) -> None:
    """`neighborlt job` on a folder that `ablate --print-commands` did not prepare: one line naming the file and
    the command that makes it; a broken train.json names its key."""
    res = _cli(["job", str(tmp_path)])
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert f"{tmp_path / 'train.json'}: not found" in res.stderr and "--print-commands" in res.stderr
    (tmp_path / "train.json").write_text(json.dumps({"epoch": 3}))
    res = _cli(["job", str(tmp_path)])
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert "train.json: " in res.stderr and "epoch" in res.stderr and "epochs" in res.stderr


@pytest.mark.slow  # shares the ~60 s grid fixture
def test_ablate_reads_runs_trained_by_the_printed_commands(grid: dict) -> None:
    out: Path = grid["out"]  # type: ignore[assignment]
    assert grid["after"] == grid["before"]  # nothing was trained again: same config key, finished runs only read
    stdout = grid["tables"].stdout  # type: ignore[attr-defined]
    assert len([ln for ln in stdout.splitlines() if ln.startswith("| ")]) == 7
    rows = json.loads((out / "table6.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["seeds"]["0"]["overall"] is not None for r in rows)
    for r in rows:  # the direct-classifier rows report the metrics of the runs trained by the printed commands
        if r["classifier"] == "metrics":
            done = json.loads((out / "runs" / r["run"] / "seed0" / "records" / "train.done.json").read_text())
            splits = ("overall", "many", "medium", "few")
            assert {s: r["seeds"]["0"][s] for s in splits} == {s: done["metrics"].get(s) for s in splits}
    assert (out / "index.html").is_file()
    assert grid["again"] == []  # every run is finished: nothing left to print
    assert (out / "commands.txt").read_text() == ""


def _img_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


@pytest.mark.slow  # shares the ~60 s grid fixture
def test_ablation_page_is_self_contained(grid: dict, tmp_path: Path) -> None:
    out: Path = grid["out"]  # type: ignore[assignment]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    for attr in re.findall(r"\b(?:src|href|action|srcset|poster)\s*=\s*\"([^\"]*)\"", page, flags=re.IGNORECASE):
        assert attr.startswith(("data:image/png;base64,", "#")), attr[:80]
    sources = _img_sources(page)
    assert len(sources) == 1  # the table6 plot
    with Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1], validate=True))) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300
    # the markdown table as an HTML table: header + 6 rows, and the runs and config sections
    assert page.count("<table>") >= 3 and "<th>variant</th>" in page and page.count("<tr>") >= 7 + 4
    assert "+ neighbor silencing + direct classifier" in page and "Neighbor silencing − †" in page
    assert "ablate config (records/ablate.config.json)" in page and "cifar10-neighbours" in page
    for name in RUNS:
        assert f"<td>{name}</td>" in page

    try:  # renders in headless Chromium with no broken image and no console error (where Chromium is installed)
        from test_report import _chromium, _render_check
    except ImportError:  # pragma: no cover
        pytest.skip("tests/test_report.py's Chromium helpers are not importable")
    exe = _chromium()
    n, broken, console = _render_check(exe, tmp_path, out / "index.html")
    assert (n, broken, console) == (1, 0, [])


def test_ablation_page_escapes_file_strings(tmp_path: Path) -> None:
    """Strings read from the grid files (labels, config values) never reach the page unescaped."""
    (tmp_path / "records").mkdir()
    hostile = '<script>alert("x")</script><img src="http://example.com/x.png">'
    (tmp_path / "records" / "ablate.config.json").write_text(json.dumps({"protocol": hostile, "seeds": [0],
                                                                         "train": {"model": hostile}}))
    (tmp_path / "g.md").write_text(f"### g: {hostile}\n\nintro\n\n| variant | overall |\n|---|---|\n"
                                   f"| {hostile} | 12.5 ± 0.3 |\n| a \\| b | – |\n\n* bullet {hostile}\n")
    (tmp_path / "g.json").write_text(json.dumps({"rows": [{"run": hostile, "seeds": {"0": {}}, "wall_s_mean": 3}]}))
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    (tmp_path / "g.png").write_bytes(buf.getvalue())
    page = write_ablation_page(tmp_path, ["g", "missing"]).read_text(encoding="utf-8")
    assert "<script" not in page  # only escaped text
    assert 'src="http' not in page and "&lt;script&gt;" in page
    assert "<td>a | b</td>" in page and '<td class=num>12.5 ± 0.3</td>' in page
    assert "OUT/missing.md" in page and "neighborlt ablate OUT --grid missing" in page
    assert len(_img_sources(page)) == 1


@pytest.mark.parametrize(("command", "option", "message"), [
    ("ablate", ["--train", '{"channel_last": true}'],
     "error: --train channel_last: unknown key (did you mean 'channels_last'?)"),
    ("ablate", ["--train", '{"lr": -1}'], "error: --train lr: must be > 0.0, got -1"),
    ("ablate", ["--filter", '{"bnd": false}'], "error: --filter bnd: unknown key (did you mean 'band'?)"),
    ("pilot", ["--train", '{"epoch": 3}'], "error: --train epoch: unknown key (did you mean 'epochs'?)"),
])
def test_bad_section_key_is_one_line_before_any_work(command: str, option: list[str], message: str,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --train / --filter key stops the command before it prepares any data (no output folder)."""
    from neighborlt.cli import main  # the console entry point, in-process

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([command, str(out), *option])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not out.exists()


def test_means_that_round_to_zero_print_without_a_minus_sign() -> None:
    from neighborlt.ablate import fmt_mean_std as fmt

    assert fmt(-0.04, 0.2) == "0.0 ± 0.2" and fmt(-0.05001, 0.2) == "-0.1 ± 0.2" and fmt(0.04, float("nan")) == "0.0"
