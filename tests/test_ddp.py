"""DDP on CPU (gloo, 2 processes): gradients equal one process on the concatenated batch, and a whole DDP
training run through the engine ends with the same weights as a single-process run of the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from neighborlt.losses import LOSSES
from neighborlt.train import ddp
from neighborlt.train.engine import FeatureHead
from neighborlt.train.models import create_model

COUNTS = torch.tensor([50, 20, 8, 3, 10, 10])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    images = torch.randn(8, 3, 16, 16, generator=g)
    feats = torch.randn(8, 24, generator=g)
    labels = torch.randint(0, 6, (8,), generator=g)
    return images, feats, labels


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    cnn = create_model("resnet8_cifar", 6).eval()  # BatchNorm on running stats: no batch coupling without SyncBN
    torch.manual_seed(1)
    head = FeatureHead(24, 6, "mlp", 16)
    return {"resnet8_cifar": cnn, "mlp_head": head}


def _grads(models: dict[str, torch.nn.Module], images: torch.Tensor, feats: torch.Tensor,
           labels: torch.Tensor, wrap=lambda m: m) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, model in models.items():
        net = wrap(model)
        loss_fn = LOSSES.create("neighbor_silencing", class_counts=COUNTS, neighbor_pairs=torch.tensor([[3, 4]]),
                                lambda_s=0.1)
        x = images if name == "resnet8_cifar" else feats
        loss_fn(net(x), labels).backward()
        out[name] = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = ddp.setup("cpu")
    try:
        images, feats, labels = _batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        grads = _grads(_models(), images[shard], feats[shard], labels[shard], wrap=lambda m: ddp.wrap(m, info))
        torch.save(grads, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ddp.cleanup(info)


def _both_worker(rank: int, world: int, ports: tuple[int, int], out_dir: str, aux, cfg_json: str) -> None:
    """One spawn for both tests (each spawn re-imports torch in two processes): the gradient check, then the engine
    run, each in its own process group."""
    _ddp_worker(rank, world, ports[0], out_dir)
    _engine_worker(rank, world, ports[1], str(Path(out_dir) / "ddp"), aux, cfg_json)


CFG = {"model": "efficientnet_lite0", "init": "pretrained", "frozen": True, "head": "mlp", "head_hidden": 32,
       "image_size": 32, "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0, "loss": "neighbor_silencing",
       "device": "cpu", "aux_cap": 5}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, object]:
    """Both DDP jobs of this file, run once by two gloo processes; returns their folder and the training data."""
    from neighborlt.train.config import TrainConfig

    out = tmp_path_factory.mktemp("ddp")
    aux = _small_aux(data_dir)
    mp.spawn(_both_worker, args=(2, (_free_port(), _free_port()), str(out), aux,
                                 TrainConfig(**CFG).model_dump_json()), nprocs=2, join=True)
    return out, aux


def test_ddp_gradients_equal_single_process_on_concatenated_batch(spawned: tuple[Path, object]) -> None:
    out, _ = spawned
    images, feats, labels = _batch()
    full = _grads(_models(), images, feats, labels)
    half = _grads(_models(), images[:4], feats[:4], labels[:4])
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt")
        for model_name, grads in full.items():
            for k, g in grads.items():
                torch.testing.assert_close(got[model_name][k], g, rtol=1e-5, atol=1e-6)
        # rank 0's own half-batch gradient differs: the all-reduce really happened
        diff = max((got["resnet8_cifar"][k] - half["resnet8_cifar"][k]).abs().max().item() for k in half["resnet8_cifar"])
        assert diff > 1e-4


def _small_aux(data_dir: Path):
    """The CIFAR-10 split-neighbour protocol, shrunk: 5 long-tailed targets (20..2 images), 5 pool classes of
    12 images each, WordNet sibling pairs."""
    from aux_helpers import sibling_aux_set

    from neighborlt.data import build_protocol

    proto = build_protocol("cifar10-neighbours", data_dir=data_dir, n_max=20, imbalance_ratio=10)
    keep = np.concatenate([np.flatnonzero(proto.pool.labels == c)[:12] for c in range(proto.pool.num_classes)])
    proto.pool = proto.pool.subset(np.sort(keep))
    keep = np.concatenate([np.flatnonzero(proto.target_test.labels == c)[:10]
                           for c in range(proto.target_test.num_classes)])
    proto.target_test = proto.target_test.subset(np.sort(keep))
    return sibling_aux_set(proto)


def _engine_worker(rank: int, world: int, port: int, run_dir: str, aux, cfg_json: str) -> None:
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_train(TrainConfig.model_validate_json(cfg_json), run_dir, data=aux, progress=False)


@pytest.mark.slow
def test_ddp_engine_run_matches_single_process(spawned: tuple[Path, object], tmp_path: Path) -> None:
    from neighborlt.train.checkpoint import load_weights
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    out, aux = spawned
    single = run_train(TrainConfig(**CFG), tmp_path / "single", data=aux, progress=False)
    a = load_weights(tmp_path / "single" / "train" / "model.safetensors")
    b = load_weights(out / "ddp" / "train" / "model.safetensors")
    assert single.world_size == 1
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    rows = [r for r in (out / "ddp" / "train" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and '"world_size": 2' in rows[-1]
