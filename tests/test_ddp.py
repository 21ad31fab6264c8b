"""DDP on CPU (gloo, 2 processes): gradients equal one process on the concatenated batch, a whole DDP
training run through the engine ends with the same weights as a single-process run of the same global batch, and
frozen-feature training under DDP has every rank extract its share of the feature chunks (chunk i on rank i % 2),
one merge follows, and the merged features equal one process's extraction. The two processes are spawned once for
all three checks (each spawn re-imports torch in two processes)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from cifar_helpers import read_cifar_test_images
from safetensors.torch import save_file

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


def _all_worker(rank: int, world: int, ports: tuple[int, int, int], out_dir: str, aux, cfg_json: str, frozen_aux,
                frozen_json: str) -> None:
    """One spawn for the three checks: the gradient check, the engine run, then the frozen-feature run, each in its
    own process group."""
    _ddp_worker(rank, world, ports[0], out_dir)
    _engine_worker(rank, world, ports[1], str(Path(out_dir) / "ddp"), aux, cfg_json)
    _frozen_worker(rank, world, ports[2], str(Path(out_dir) / "frozen"), frozen_aux, frozen_json)


CFG = {"model": "efficientnet_lite0", "init": "pretrained", "frozen": True, "head": "mlp", "head_hidden": 32,
       "image_size": 32, "epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0, "loss": "neighbor_silencing",
       "device": "cpu", "aux_cap": 5}


FROZEN_CLASSES = ["airplane", "cat", "ship", "truck"]


def _frozen_job(data_dir: Path, folder: Path) -> tuple[object, Path, object]:
    """The frozen-feature job: 4 CIFAR-10 classes (8 training and 4 test images each), a seeded resnet8 checkpoint
    as the frozen backbone, 1 epoch."""
    from neighborlt.data.auxiliary import AuxTrainingSet
    from neighborlt.train.config import TrainConfig

    images = read_cifar_test_images(data_dir / "cifar10.tar.gz", FROZEN_CLASSES, 12)
    idx = np.arange(len(images)) % 12
    aux = AuxTrainingSet(train=images.subset(np.flatnonzero(idx < 8)), test=images.subset(np.flatnonzero(idx >= 8)),
                         num_target=len(FROZEN_CLASSES), pairs=np.zeros((0, 2), dtype=np.int64))
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    ckpt = folder / "resnet8.safetensors"
    save_file(create_model("resnet8_cifar", 1).state_dict(), str(ckpt))
    cfg = TrainConfig(model="resnet8_cifar", init=str(ckpt), frozen=True, image_size=32, epochs=1, batch_size=8,
                      eval_batch_size=4, lr=0.05, warmup_epochs=0, loss="balanced_softmax", device="cpu")
    return aux, ckpt, cfg


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, object, object, Path]:
    """The three DDP jobs of this file, run once by two gloo processes; returns their folder, the training data,
    and the frozen job's data and checkpoint."""
    from neighborlt.train.config import TrainConfig

    out = tmp_path_factory.mktemp("ddp")
    aux = _small_aux(data_dir)
    frozen_aux, ckpt, frozen_cfg = _frozen_job(data_dir, out / "frozen")
    mp.spawn(_all_worker, args=(2, (_free_port(), _free_port(), _free_port()), str(out), aux,
                                TrainConfig(**CFG).model_dump_json(), frozen_aux, frozen_cfg.model_dump_json()),
             nprocs=2, join=True)
    return out, aux, frozen_aux, ckpt


def test_ddp_gradients_equal_single_process_on_concatenated_batch(spawned: tuple[Path, object, object, Path]) -> None:
    out = spawned[0]
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
def test_ddp_engine_run_matches_single_process(spawned: tuple[Path, object, object, Path], tmp_path: Path) -> None:
    from neighborlt.train.checkpoint import load_weights
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    out, aux = spawned[:2]
    single = run_train(TrainConfig(**CFG), tmp_path / "single", data=aux, progress=False)
    a = load_weights(tmp_path / "single" / "train" / "model.safetensors")
    b = load_weights(out / "ddp" / "train" / "model.safetensors")
    assert single.world_size == 1
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    rows = [r for r in (out / "ddp" / "train" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and '"world_size": 2' in rows[-1]


def _frozen_worker(rank: int, world: int, port: int, out: str, aux, cfg_json: str) -> None:
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NEIGHBORLT_CACHE=str(Path(out) / "cache"))
    torch.set_num_threads(1)
    log = logging.getLogger("neighborlt.train.features")
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(Path(out) / f"rank{rank}.log"))
    run_train(TrainConfig.model_validate_json(cfg_json), Path(out) / "run", data=aux, progress=False)


def test_every_rank_extracts_its_chunks_of_the_frozen_features(spawned: tuple[Path, object, object, Path]) -> None:
    from neighborlt.train.features import extract_features

    out, _, aux, ckpt = spawned
    out = out / "frozen"
    logs = [(out / f"rank{r}.log").read_text() for r in range(2)]
    for r in range(2):  # 32 training and 16 test images: two chunks each, one per rank, none read from the cache
        assert logs[r].count(f"rank {r}/2 computes chunks {r} (0 of its 1 on disk)") == 2, logs[r]
        assert "from cache" not in logs[r], logs[r]
    assert "".join(logs).count("extracted resnet8_cifar features") == 2  # one merge per set
    assert (out / "run" / "train" / "model.safetensors").is_file()
    merged = {len(a): a for a in (np.load(p) for p in (out / "cache" / "features").rglob("*.npy"))}
    assert sorted(merged) == [16, 32] and not list((out / "cache" / "features").rglob("*.chunks"))
    for part in (aux.train, aux.test):  # the ranks' chunks equal one process's extraction
        single = extract_features("resnet8_cifar", str(ckpt), part, 32, batch_size=4)
        np.testing.assert_allclose(merged[len(part)], single, rtol=1e-5, atol=1e-6)
