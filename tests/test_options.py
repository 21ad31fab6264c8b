"""One source for every training option: every TrainConfig field is settable from the command line (its own flag and
``--set``) and reaches the recorded config; M has one rule everywhere (>= 1, or ``all``); every flag an error message
names exists; the defaults come from ``neighborlt.defaults``."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from neighborlt.defaults import AUX_CAP, FEW_SHOT, LAMBDA_S, MANY_SHOT
from neighborlt.errors import ConfigError
from neighborlt.train.config import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "neighborlt"

# field -> (flags that set it, the value the resolved config then holds); every value differs from the default
FLAGS: dict[str, tuple[list[str], Any]] = {
    "data_dir": (["--data-dir", "/data/here"], "/data/here"),
    "aux_manifest": (["--aux-manifest", "mine.parquet"], "mine.parquet"),
    "aux_cap": (["--aux-cap", "7"], 7),
    "max_test_per_class": (["--max-test-per-class", "5"], 5),
    "model": (["--model", "resnet8_cifar"], "resnet8_cifar"),
    "init": (["--init", "pretrained"], "pretrained"),
    "image_size": (["--image-size", "64"], 64),
    "frozen": (["--frozen", "--init", "pretrained"], True),
    "head": (["--head", "mlp"], "mlp"),
    "head_hidden": (["--head-hidden", "64"], 64),
    "sync_bn": (["--sync-bn"], True),
    "loss": (["--loss", "ce"], "ce"),
    "loss_params": (["--loss-param", "tau=1.5"], {"tau": 1.5}),
    "lambda_s": (["--lambda-s", "0.3"], 0.3),
    "optimizer": (["--optimizer", "adamw"], "adamw"),
    "lr": (["--lr", "0.02"], 0.02),
    "min_lr": (["--min-lr", "0.001"], 0.001),
    "weight_decay": (["--weight-decay", "0.05"], 0.05),
    "layer_decay": (["--layer-decay", "0.75"], 0.75),
    "betas": (["--betas", "0.8", "0.99"], [0.8, 0.99]),
    "momentum": (["--momentum", "0.8"], 0.8),
    "epochs": (["--epochs", "3"], 3),
    "warmup_epochs": (["--warmup-epochs", "0.5"], 0.5),
    "batch_size": (["--batch-size", "32"], 32),
    "grad_accum": (["--grad-accum", "2"], 2),
    "grad_clip": (["--grad-clip", "1.0"], 1.0),
    "sampler": (["--sampler", "sqrt"], "sqrt"),
    "randaugment": (["--randaugment", "rand-m9-mstd0.5"], "rand-m9-mstd0.5"),
    "mixup": (["--mixup", "0.2"], 0.2),
    "cutmix": (["--cutmix", "0.5"], 0.5),
    "mix_prob": (["--mix-prob", "0.5"], 0.5),
    "label_smoothing": (["--label-smoothing", "0.1", "--mixup", "0.2"], 0.1),
    "classifier": (["--classifier", "retrain"], "retrain"),
    "crt_epochs": (["--crt-epochs", "3"], 3),
    "crt_lr": (["--crt-lr", "0.05"], 0.05),
    "seed": (["--seed", "7"], 7),
    "deterministic": (["--no-deterministic"], False),
    "amp": (["--amp", "bf16"], "bf16"),
    "device": (["--device", "cpu"], "cpu"),
    "num_workers": (["--num-workers", "2"], 2),
    "data_mode": (["--data-mode", "stream"], "stream"),
    "threads": (["--threads", "1"], 1),
    "channels_last": (["--channels-last"], True),
    "eval_every": (["--eval-every", "0"], 0),
    "eval_batch_size": (["--eval-batch-size", "64"], 64),
    "recipe": (["--recipe", "clip", "--recipe-dataset", "places-lt"], "clip"),
    "recipe_dataset": (["--recipe-dataset", "places-lt", "--recipe", "clip"], "places-lt"),
}
NEEDS = {"frozen": {"init": "pretrained"}, "label_smoothing": {"mixup": 0.2},  # other fields a value requires
         "recipe": {"recipe_dataset": "places-lt"}, "recipe_dataset": {"recipe": "clip"}}


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


def _printed(args: list[str], capsys: pytest.CaptureFixture, run: Path) -> dict[str, Any]:
    code, out, err = _cli(["train", str(run), "--print-config", *args], capsys)
    assert code == 0, err
    return json.loads(out)


def test_every_field_has_a_case() -> None:
    assert set(FLAGS) == set(TrainConfig.model_fields)


@pytest.mark.parametrize("field", sorted(TrainConfig.model_fields))
def test_every_field_is_settable_by_flag_and_by_set(field: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags, value = FLAGS[field]
    assert TrainConfig.model_fields[field].default != value  # the case proves something
    assert _printed(flags, capsys, tmp_path)[field] == value
    extra = [f"--set={k}={json.dumps(v)}" for k, v in NEEDS.get(field, {}).items()]
    assert _printed([*extra, f"--set={field}={json.dumps(value)}"], capsys, tmp_path)[field] == value
    assert not (tmp_path / "records").exists() and not (tmp_path / "train").exists()  # --print-config trains nothing


def test_print_config_round_trips_through_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [a for f in ("lr", "betas", "aux_cap", "loss_params", "data_dir") for a in FLAGS[f][0]]
    first = _printed(args, capsys, tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(first))
    assert _printed(["--config", str(tmp_path / "cfg.json")], capsys, tmp_path) == first
    assert _printed(["--no-aux"], capsys, tmp_path)["aux_manifest"] is None


def test_printed_config_is_the_recorded_config(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A short real run: what --print-config shows for a command line is what training records."""
    run = tmp_path / "run"
    code, _out, err = _cli(["classes", str(run), "--protocol", "cifar10-neighbours", "--n-max", "20",
                            "--imbalance-ratio", "10", "--pool", "dog", "--data-dir", str(data_dir)], capsys)
    assert code == 0, err
    args = ["--data-dir", str(data_dir), "--no-aux", "--model", "resnet8_cifar", "--epochs", "1", "--batch-size", "16",
            "--max-test-per-class", "5", "--warmup-epochs", "0", "--lr", "0.05", "--min-lr", "0.001", "--momentum",
            "0.8", "--grad-clip", "2.0", "--eval-batch-size", "64", "--threads", "1", "--seed", "4", "--no-progress"]
    printed = _printed(args, capsys, run)
    code, _out, err = _cli(["train", str(run), *args], capsys)
    assert code == 0, err
    recorded = json.loads((run / "records" / "train.config.json").read_text())
    assert {k: recorded[k] for k in printed} == printed
    assert set(recorded) - set(printed) == {"world_size", "config_key"}


# ---- M: one rule -------------------------------------------------------------------------------------------


def test_aux_cap_one_rule_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neighborlt.train.samplers import build_sampler, effective_class_counts

    for given in ("all", "ALL", None):
        assert TrainConfig(aux_cap=given).aux_cap is None
    assert TrainConfig().aux_cap == AUX_CAP and TrainConfig(aux_cap="12").aux_cap == 12
    assert TrainConfig(aux_cap="all").key() == TrainConfig(aux_cap=None).key()
    for bad in (0, -3, "0"):
        with pytest.raises(ConfigError, match="use --aux-cap all"):
            TrainConfig(aux_cap=bad)
    with pytest.raises(ConfigError, match="use --aux-cap all"):
        build_sampler("random", [0, 1, 1], num_target_classes=1, aux_cap=0)
    with pytest.raises(ConfigError, match="use --aux-cap all"):
        effective_class_counts([0, 1, 1], 2, 1, aux_cap=0)
    with pytest.raises(ConfigError, match="'all'"):
        TrainConfig(aux_cap=2.5)
    assert _printed(["--aux-cap", "all"], capsys, tmp_path)["aux_cap"] is None
    assert _printed(["--set", "aux_cap=all"], capsys, tmp_path)["aux_cap"] is None
    code, out, err = _cli(["train", str(tmp_path), "--print-config", "--aux-cap", "0"], capsys)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("error: --aux-cap 0") and "all" in err


def test_defaults_come_from_one_place() -> None:
    import inspect

    from neighborlt.data.shots import shot_groups
    from neighborlt.losses.neighbor import NeighborSilencingCE
    from neighborlt.metrics import shot_accuracy

    assert TrainConfig().lambda_s == LAMBDA_S
    assert inspect.signature(NeighborSilencingCE).parameters["lambda_s"].default == LAMBDA_S
    for fn in (shot_groups, shot_accuracy):
        params = inspect.signature(fn).parameters
        assert (params["many"].default, params["few"].default) == (MANY_SHOT, FEW_SHOT)
    for path in [*sorted((SRC / "train").glob("*.py")), SRC / "cli" / "train.py", SRC / "metrics.py",
                 SRC / "evaluate.py", SRC / "data" / "shots.py"]:
        text = path.read_text(encoding="utf-8")
        assert "(100, 20)" not in text and "= 100," not in text and "= 20," not in text, path
        assert not re.search(r"lambda_s: float = (Field\()?0\.1", text), path


# ---- flags named in messages exist ---------------------------------------------------------------------------


def _all_cli_options() -> set[str]:
    import typer.main

    from neighborlt.cli import app

    options: set[str] = set()

    def walk(cmd: Any) -> None:
        for p in getattr(cmd, "params", []):
            options.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return options


def _error_message_flags(paths: list[Path]) -> dict[str, set[str]]:
    """Flags (``--name``) in the string parts of every ``...Error(...)`` call: where each is named."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if not name.endswith("Error"):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", sub.value):
                        found.setdefault(flag, set()).add(f"{path.name}:{node.lineno}")
    return found


def test_flags_named_in_training_errors_exist() -> None:
    paths = [*sorted((SRC / "train").glob("*.py")), SRC / "cli" / "train.py", SRC / "defaults.py"]
    named = _error_message_flags(paths)
    assert {"--label-smoothing", "--no-aux", "--force", "--resume"} <= set(named)  # the scan sees the messages
    options = _all_cli_options()  # (once: typer builds every command's parameters from its signature)
    missing = {flag: where for flag, where in named.items() if flag not in options}
    assert not missing, f"error messages name flags no command has: {missing}"
