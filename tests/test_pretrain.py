"""MAE pre-training (``neighborlt pretrain``) on a tiny CIFAR-10 protocol: the encoder it writes is what ``train
--init`` fine-tunes, a SIGTERM + resume ends bit-identical to an uninterrupted run, DDP (gloo, 2 processes) runs,
and bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from run_helpers import run_cli

from neighborlt.pretrain.config import PretrainConfig
from neighborlt.pretrain.mae import MaskedAutoencoder, sincos_2d
from neighborlt.pretrain.stage import run_pretrain
from neighborlt.rundir import read_json
from neighborlt.train.checkpoint import load_weights
from neighborlt.train.models import create_model

# ViT with 4-px patches at 32 px (64 tokens), 64-d, 2 blocks: seconds per epoch on a CPU
TINY = {"model": "vit_pico_patch4_32", "image_size": 32, "epochs": 2, "warmup_epochs": 0, "batch_size": 16,
        "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "blr": 1.5e-2, "threads": 1}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Stage 1 of the CIFAR-10 protocol shrunk to 5 long-tailed targets (20..2 images, 42 in all)."""
    run = tmp_path_factory.mktemp("pretrain") / "stage1"
    assert run_cli(["classes", str(run), "--protocol", "cifar10-neighbours", "--n-max", "20", "--imbalance-ratio", "10",
                 "--data-dir", str(data_dir)]) == 0
    return run


def _copy_stage1(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_mae_masks_and_reconstructs_like_models_mae() -> None:
    """The model itself: 75 % of the 64 patches removed per image, the loss only on them, a fixed sin-cos position
    embedding (MAE's util/pos_embed.py) that fine-tuning will learn."""
    torch.manual_seed(0)
    vit = create_model("vit_pico_patch4_32", 1).timm_model
    mae = MaskedAutoencoder(vit, 32, 1, 2, mask_ratio=0.75, norm_pix_loss=True)
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    loss, pred, mask = mae(x, noise)
    assert pred.shape == (3, 64, 4 * 4 * 3) and mask.shape == (3, 64)
    assert mask.sum(1).tolist() == [48.0, 48.0, 48.0]
    assert torch.equal(mask[0].bool(), noise[0] >= noise[0].sort().values[16])  # the smallest 16 noises are kept
    assert torch.equal(mae.encoder.pos_embed[0], torch.from_numpy(sincos_2d(64, 8)).float())
    assert not mae.encoder.pos_embed.requires_grad and torch.isfinite(loss)
    # the loss is taken on the removed patches only: a prediction for a kept patch does not count
    keep, removed = int(torch.nonzero(mask[0] == 0)[0]), int(torch.nonzero(mask[0] == 1)[0])
    for patch, counts in ((keep, False), (removed, True)):
        other = pred.detach().clone()
        other[0, patch] += 10.0
        assert bool(mae.forward_loss(x, other, mask) != mae.forward_loss(x, pred.detach(), mask)) is counts
    assert mae.patchify(x).shape == (3, 64, 48)
    assert set(mae.encoder_state()) == {k for k in vit.state_dict() if not k.startswith("head.")}


def test_pretrain_then_train_init_end_to_end(stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _copy_stage1(stage1, tmp_path / "run")
    args = ["pretrain", str(run), "--method", "mae", "--model", "vit_pico_patch4_32", "--image-size", "32",
            "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--decoder-dim", "32", "--decoder-depth",
            "1", "--decoder-heads", "2", "--blr", "0.015", "--threads", "1"]
    assert run_cli(args) == 0
    assert "fine-tune with: neighborlt train" in capsys.readouterr().out
    p = run / "pretrain"
    meta = read_json(p / "encoder.json")
    assert (meta["method"], meta["model"], meta["patch_size"], meta["images"], meta["epochs"]) == (
        "mae", "vit_pico_patch4_32", 4, 42, 2)
    rows = [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    rec = read_json(run / "records" / "pretrain.config.json")
    assert rec["resolved_lr"] == pytest.approx(0.015 * 16 / 256) and rec["mask_ratio"] == 0.75
    enc = load_weights(p / "encoder.safetensors")
    own = create_model("vit_pico_patch4_32", 5).state_dict()
    assert {"timm_model." + k for k in enc} == {k for k in own if not k.startswith("timm_model.head.")}
    assert torch.equal(enc["pos_embed"][0], torch.from_numpy(sincos_2d(64, 8)).float())  # MAE's, not a random one
    # a re-run is skipped; train --init fine-tunes exactly these weights (lr ~ 0: the backbone stays put)
    assert run_cli(args) == 0 and "skipped" in capsys.readouterr().out
    assert run_cli(["train", str(run), "--model", "vit_pico_patch4_32", "--image-size", "32", "--init",
                 str(p / "encoder.safetensors"), "--no-aux", "--epochs", "1", "--batch-size", "16", "--warmup-epochs",
                 "0", "--optimizer", "adamw", "--lr", "1e-12", "--weight-decay", "0", "--threads", "1",
                 "--max-test-per-class", "5", "--no-progress"]) == 0
    tuned = load_weights(run / "train" / "model.safetensors")
    for k in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token"):
        assert torch.allclose(tuned["timm_model." + k], enc[k], atol=1e-6), k
    assert read_json(run / "train" / "model.json")["init"] == str(p / "encoder.safetensors")
    # a changed option is a new run (the old encoder is replaced)
    assert run_cli([*args[:-2], "--mask-ratio", "0.5", "--threads", "1"]) == 0
    assert "skipped" not in capsys.readouterr().out and read_json(p / "encoder.json")["mask_ratio"] == 0.5


@pytest.mark.parametrize("mode", [{"data_mode": "cache"}, {"data_mode": "stream", "num_workers": 2}])
def test_sigterm_and_resume_are_bit_identical(stage1: Path, tmp_path: Path, mode: dict) -> None:
    cfg = PretrainConfig(**TINY, **mode)  # stream: decoded per sample in 2 loader workers, as training at scale
    full = run_pretrain(cfg, _copy_stage1(stage1, tmp_path / "full"))
    assert not full.interrupted and full.epochs_done == 2
    part_dir = _copy_stage1(stage1, tmp_path / "part")
    steps: list[tuple[int, int]] = []

    def stop_after_first_step(epoch: int, step: int) -> None:
        steps.append((epoch, step))
        if len(steps) == 1:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler would: a checkpoint mid-epoch, then exit

    part = run_pretrain(cfg, part_dir, on_step=stop_after_first_step)
    assert part.interrupted and part.encoder_path is None and steps == [(0, 1)]
    assert not (part_dir / "pretrain" / "encoder.safetensors").exists()
    resumed = run_pretrain(cfg, part_dir, resume=True)
    assert not resumed.interrupted and resumed.loss == full.loss
    assert mp.active_children() == []  # stream mode's loader workers stopped with each run
    a = load_weights(tmp_path / "full" / "pretrain" / "encoder.safetensors")
    b = load_weights(part_dir / "pretrain" / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    # (the control: another seed gives other weights, so the comparison can fail)
    # the log has one row per epoch, as without the interruption
    rows = [json.loads(x) for x in (part_dir / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, run: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res = run_pretrain(PretrainConfig(**{**TINY, "epochs": 1}), run)
    assert res.world_size == 2 and not res.interrupted


@pytest.mark.slow  # two spawned processes each import torch and timm
def test_pretrain_under_ddp(stage1: Path, tmp_path: Path) -> None:
    run = _copy_stage1(stage1, tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(run)), nprocs=2, join=True)
    meta = read_json(run / "pretrain" / "encoder.json")
    assert meta["images"] == 42 and meta["epochs"] == 1
    assert (run / "pretrain" / "encoder.safetensors").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "resnet8_cifar"], "MAE pre-training needs a ViT (timm VisionTransformer); model 'resnet8_cifar'"),
    (["--method", "simclr"], "--method 'simclr': unknown pre-training method; known: mae"),
    (["--aux-manifest", "filter/aux_manifest.parquet"], "aux_manifest.parquet: not found; make it with"),
])
def test_bad_input_is_one_line(stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                               message: str) -> None:
    run = _copy_stage1(stage1, tmp_path / "bad")
    assert run_cli(["pretrain", str(run), "--image-size", "32", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["pretrain", str(tmp_path / "nope"), "--model", "vit_pico_patch4_32", "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such run directory" in err and "\n" not in err
