"""The installed ``neighborlt`` console script: user mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neighborlt import cli
from neighborlt.cli._common import format_validation_error


def _script() -> str:
    """The console script installed next to this interpreter (``make install``), else the one on PATH."""
    here = Path(sys.executable).with_name("neighborlt")
    found = str(here) if here.is_file() else shutil.which("neighborlt")
    if not found:
        pytest.skip("the neighborlt console script is not installed (run `make install`)")
    return found


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NEIGHBORLT_CACHE": str(tmp_path / "cache"), "COLUMNS": "80"}
    return subprocess.run([_script(), *args], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)


@pytest.mark.parametrize(("args", "expect"), [
    (["train", "RUN", "--nope"], "--nope"),  # mistyped option
    (["train", "RUN", "--epochs", "abc"], "--epochs"),  # bad value
    (["eval", "RUN", "--batch-size", "many"], "--batch-size"),
    (["train"], "Missing argument"),  # missing argument
    (["nope"], "nope"),  # no such sub-command
    (["eval", "/nonexistent/run"], "/nonexistent/run"),  # wrong path
    (["train", "RUN", "--lambda-s", "-1"], "--lambda-s"),  # value out of range (pydantic)
])
def test_user_error_is_one_line(args: list[str], expect: str, tmp_path: Path) -> None:
    res = _run(args, tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode != 0, res.stderr
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr and lines[0].startswith("error: ") and expect in lines[0]
    assert res.stdout == ""


def test_help_still_works(tmp_path: Path) -> None:
    res = _run(["train", "--help"], tmp_path)
    assert res.returncode == 0 and "--epochs" in res.stdout and "Traceback" not in res.stderr


# ---- in-process: main() on errors from an external click and from pydantic -------------------------------------


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lambda_s: float = Field(0.1, ge=0.0)


def _tiny_app(body: object) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def go() -> None:
        body()  # type: ignore[operator]

    @app.command()
    def other() -> None:  # two commands, so that `go` is a sub-command
        pass

    return app


def _main_exit(monkeypatch: pytest.MonkeyPatch, body: object, argv: list[str]) -> int:
    monkeypatch.setattr(cli, "app", _tiny_app(body))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return int(exc.value.code or 0)


def test_main_formats_pydantic_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert _main_exit(monkeypatch, lambda: _Cfg(lambda_s=-1), ["go"]) == 2
    assert capsys.readouterr().err == "error: lambda_s: must be >= 0.0, got -1\n"


def test_main_handles_external_click_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    click = pytest.importorskip("click")

    def bad() -> None:
        raise click.UsageError("bad thing\non two lines")

    assert _main_exit(monkeypatch, bad, ["go"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: bad thing on two lines"]


def test_main_propagates_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop() -> None:
        raise typer.Exit(3)

    assert _main_exit(monkeypatch, stop, ["go"]) == 3


def test_format_validation_error_names_key_path_and_allowed_keys() -> None:
    class Run(BaseModel):
        model_config = ConfigDict(extra="forbid")
        train: _Cfg = _Cfg()

    cases = [({"train": {"lambda_s": -1}}, "train.lambda_s: must be >= 0.0, got -1"),
             ({"train": {"lambda_s": "x"}},
              ("train.lambda_s: Input should be a valid number, unable to parse string as a number, got 'x'")),
             ({"train": {"nope": 1}}, "train.nope: unknown key; allowed: lambda_s"),
             ({"train": {"nope": 1, "lambda_s": -1}}, "train.lambda_s: must be >= 0.0, got -1 (and 1 more problem)")]
    for fields, want in cases:
        with pytest.raises(ValidationError) as exc:
            Run(**fields)
        assert format_validation_error(exc.value, model=Run) == want
    with pytest.raises(ValidationError) as exc:
        _Cfg(lambda_s=-1)
    assert format_validation_error(exc.value, prefix="train") == "train.lambda_s: must be >= 0.0, got -1"
