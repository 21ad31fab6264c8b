"""Checkpoint/resume: an interrupted and resumed run ends with exactly the weights of an uninterrupted one
(deterministic mode, in the middle of an epoch and at an epoch boundary), SIGTERM saves and exits cleanly, and
a resume with another configuration is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import run_cli

from neighborlt.errors import ConfigError
from neighborlt.train.checkpoint import load_checkpoint, load_weights
from neighborlt.train.config import TrainConfig
from neighborlt.train.engine import run_train

torch.set_num_threads(2)

# Augmentation, Mixup/CutMix and the auxiliary redraw all consume randomness, so exact equality needs every RNG.
CFG = TrainConfig(model="resnet8_cifar", epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5, aux_cap=6,
                  loss="neighbor_silencing", randaugment="rand-m9-mstd0.5", mixup=0.2, cutmix=0.5,
                  max_test_per_class=4)


@pytest.fixture(scope="module")
def small_aux(data_dir: Path):
    from aux_helpers import sibling_aux_set

    from neighborlt.data import build_protocol

    proto = build_protocol("cifar10-neighbours", data_dir=data_dir, n_max=20, imbalance_ratio=10)
    keep = np.concatenate([np.flatnonzero(proto.pool.labels == c)[:10] for c in range(proto.pool.num_classes)])
    proto.pool = proto.pool.subset(np.sort(keep))
    return sibling_aux_set(proto)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, small_aux) -> Path:
    run = tmp_path_factory.mktemp("full")
    run_train(CFG, run, data=small_aux, progress=False)
    return run


def _sigterm_at(epoch: int, step: int):
    def hook(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path, delivered to this process
    return hook


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a / "train" / "model.safetensors"), load_weights(b / "train" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("stop", [(0, 2), (0, 4)], ids=["mid-epoch", "epoch-boundary"])
def test_resume_equals_uninterrupted(tmp_path: Path, small_aux, uninterrupted: Path, stop: tuple[int, int]) -> None:
    # 42 target + 30 auxiliary images per epoch, batch 16 -> 4 steps: a signal during the last step of epoch 0
    # ("epoch-boundary") leaves the end-of-epoch checkpoint (epoch 1, step 0).
    epoch, step = stop
    res = run_train(CFG, tmp_path, data=small_aux, progress=False, on_step=_sigterm_at(epoch, step))
    assert res.interrupted and res.model_path is None
    assert not (tmp_path / "train" / "model.safetensors").exists()
    _, state = load_checkpoint(tmp_path / "train" / "checkpoint")
    assert (state["epoch"], state["step"]) == ((0, 2) if step == 2 else (1, 0))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    res = run_train(CFG, tmp_path, data=small_aux, progress=False, resume=True)
    assert not res.interrupted and res.epochs_done == 2
    _assert_same_weights(tmp_path, uninterrupted)
    rows = [json.loads(x) for x in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (uninterrupted / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert len(list((tmp_path / "train" / "checkpoint").glob("weights-*.safetensors"))) == 1


def test_resume_guards(tmp_path: Path, small_aux) -> None:
    run_train(CFG, tmp_path, data=small_aux, progress=False, on_step=_sigterm_at(0, 1))
    with pytest.raises(ConfigError, match="--resume"):
        run_train(CFG, tmp_path, data=small_aux, progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        run_train(CFG.model_copy(update={"lr": 0.01}), tmp_path, data=small_aux, progress=False, resume=True)
    # --force discards the unfinished run and trains the new configuration from scratch
    one = CFG.model_copy(update={"epochs": 1})
    res = run_train(one, tmp_path, data=small_aux, progress=False, force=True)
    assert res.epochs_done == 1 and not res.interrupted


@pytest.mark.slow
def test_sigterm_cli_saves_and_exits_cleanly(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """The signal goes to a real ``python -m neighborlt train`` process; the resume runs in-process (the CLI's
    --resume path, without paying a second interpreter's torch import)."""
    run = tmp_path / "run"
    from neighborlt.classes import ClassesConfig, run_classes

    run_classes(ClassesConfig(protocol="cifar10-neighbours", n_max=20, imbalance_ratio=10, data_dir=str(data_dir)), run)
    # 15 epochs of ~0.15 s CPU each: the signal, sent within 50 ms of the first epoch's log line, lands mid-run
    args = ["train", str(run), "--no-aux",
            "--data-dir", str(data_dir), "--model", "resnet8_cifar", "--epochs", "15", "--batch-size", "16",
            "--lr", "0.05", "--warmup-epochs", "0", "--eval-every", "0", "--max-test-per-class", "2",
            "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "neighborlt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = run / "train" / "log.jsonl"
    deadline = time.time() + 300  # the first epoch; generous for loaded machines
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "re-run with --resume" in err and "Traceback" not in err
    _, state = load_checkpoint(run / "train" / "checkpoint")
    assert 0 < state["epoch"] < 15
    assert not (run / "train" / "model.safetensors").exists()
    capsys.readouterr()
    assert run_cli([*args, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    assert (run / "train" / "model.safetensors").is_file()
