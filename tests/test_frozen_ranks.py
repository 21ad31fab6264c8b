"""Frozen-feature training under DDP (gloo, 2 processes on CPU): every rank extracts its share of the feature
chunks (chunk i on rank i % 2), one merge follows, and both ranks train on the single-process features."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from cifar_helpers import read_cifar_test_images
from safetensors.torch import save_file

CLASSES = ["airplane", "cat", "ship", "truck"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, aux, cfg_json: str) -> None:
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.engine import run_train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NEIGHBORLT_CACHE=str(Path(out) / "cache"))
    torch.set_num_threads(1)
    log = logging.getLogger("neighborlt.train.features")
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(Path(out) / f"rank{rank}.log"))
    run_train(TrainConfig.model_validate_json(cfg_json), Path(out) / "run", data=aux, progress=False)


def test_every_rank_extracts_its_chunks_of_the_frozen_features(tmp_path: Path, data_dir: Path) -> None:
    from neighborlt.data.auxiliary import AuxTrainingSet
    from neighborlt.train.config import TrainConfig
    from neighborlt.train.features import extract_features
    from neighborlt.train.models import create_model

    images = read_cifar_test_images(data_dir / "cifar10.tar.gz", CLASSES, 12)
    idx = np.arange(len(images)) % 12
    aux = AuxTrainingSet(train=images.subset(np.flatnonzero(idx < 8)), test=images.subset(np.flatnonzero(idx >= 8)),
                         num_target=len(CLASSES), pairs=np.zeros((0, 2), dtype=np.int64))
    torch.manual_seed(3)
    ckpt = tmp_path / "resnet8.safetensors"
    save_file(create_model("resnet8_cifar", 1).state_dict(), str(ckpt))
    cfg = TrainConfig(model="resnet8_cifar", init=str(ckpt), frozen=True, image_size=32, epochs=1, batch_size=8,
                      eval_batch_size=4, lr=0.05, warmup_epochs=0, loss="balanced_softmax", device="cpu")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), aux, cfg.model_dump_json()), nprocs=2, join=True)

    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    for r in range(2):  # 32 training and 16 test images: two chunks each, one per rank, none read from the cache
        assert logs[r].count(f"rank {r}/2 computes chunks {r} (0 of its 1 on disk)") == 2, logs[r]
        assert "from cache" not in logs[r], logs[r]
    assert "".join(logs).count("extracted resnet8_cifar features") == 2  # one merge per set
    assert (tmp_path / "run" / "train" / "model.safetensors").is_file()
    merged = {len(a): a for a in (np.load(p) for p in (tmp_path / "cache" / "features").rglob("*.npy"))}
    assert sorted(merged) == [16, 32] and not list((tmp_path / "cache" / "features").rglob("*.chunks"))
    for part in (aux.train, aux.test):  # the ranks' chunks equal one process's extraction
        single = extract_features("resnet8_cifar", str(ckpt), part, 32, batch_size=4)
        np.testing.assert_allclose(merged[len(part)], single, rtol=1e-5, atol=1e-6)

