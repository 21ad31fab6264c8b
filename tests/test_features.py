"""Datasets/transforms and the frozen-feature cache (reuse, invalidation, chunks that survive ``kill -9``, ranks)
on real CIFAR-10 images."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_helpers import read_cifar_test_images
from safetensors.torch import save_file

from neighborlt.data.base import ImageSet
from neighborlt.errors import ConfigError
from neighborlt.paths import cache_dir
from neighborlt.train.data import ImageSetDataset, build_transform, model_crop_pct
from neighborlt.train.features import chunk_ranges, extract_features, rank_chunks
from neighborlt.train.inference import image_batches
from neighborlt.train.models import create_model, model_normalization

CLASSES = ["airplane", "cat", "ship", "truck"]


@pytest.fixture(scope="module")
def images(data_dir) -> ImageSet:
    torch.set_num_threads(2)
    s = read_cifar_test_images(data_dir / "cifar10.tar.gz", CLASSES, 4)
    assert len(s) == 16 and s.array.shape == (16, 32, 32, 3)
    return s


def _feature_files() -> set[str]:
    return {p.name for p in (cache_dir() / "features").rglob("*.npy")}


def test_transforms(images: ImageSet) -> None:
    img = images.load(0)
    ev = build_transform(32, train=False)
    x = ev(img)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(ev(img), x)  # deterministic
    tr = build_transform(32, train=True, randaugment="rand-m9-mstd0.5-inc1")
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random crop/flip/RandAugment
    big = build_transform(96, train=True)(img)  # large sizes: random resized crop
    assert big.shape == (3, 96, 96)
    mean, std = model_normalization("efficientnet_lite0")
    half = build_transform(32, train=False, normalization=(mean, std))(img)
    torch.testing.assert_close(half, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ConfigError, match="invalid RandAugment config 'rand-x9'"):
        build_transform(32, train=True, randaugment="rand-x9")


def test_image_set_dataset(images: ImageSet) -> None:
    ds = ImageSetDataset(images, build_transform(24, train=False), 24)
    assert len(ds) == 16
    x, y = ds[5]
    assert x.shape == (3, 24, 24) and y == 1 and isinstance(y, int)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 24, 24) and batch[1].tolist() == [0] * 4 + [1] * 4


def test_feature_cache_reuse_and_invalidation(images: ImageSet, tmp_path, caplog) -> None:
    before = _feature_files()
    f1 = np.array(extract_features("efficientnet_lite0", "pretrained", images, 32, batch_size=6))  # not the mmap
    assert f1.shape == (16, 1280) and f1.dtype == np.float32 and np.isfinite(f1).all()
    new = _feature_files() - before
    assert len(new) == 1
    path = next((cache_dir() / "features").rglob(next(iter(new))))

    # Reuse: poison the cached file; an unchanged request returns exactly what is on disk.
    sentinel = np.full_like(f1, 7.0)
    np.save(path, sentinel)
    with caplog.at_level(logging.INFO, logger="neighborlt.train.features"):
        again = extract_features("efficientnet_lite0", "pretrained", images, 32, batch_size=32)
    assert "from cache" in caplog.text
    np.testing.assert_array_equal(again, sentinel)  # batch size is not part of the key
    np.save(path, f1)

    # Invalidation: each changed key part extracts again into a new file.
    n = len(_feature_files())
    f_size = extract_features("efficientnet_lite0", "pretrained", images, 40)  # transform / image size
    assert len(_feature_files()) == n + 1 and not np.allclose(f_size, f1)
    changed = images.array.copy()
    changed[3] = 255 - changed[3]
    other = ImageSet(class_names=images.class_names, labels=images.labels, array=changed)
    f_data = extract_features("efficientnet_lite0", "pretrained", other, 32)  # data
    assert len(_feature_files()) == n + 2
    np.testing.assert_allclose(np.delete(f_data, 3, 0), np.delete(f1, 3, 0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(f_data[3], f1[3], atol=1e-3)
    # weights: a checkpoint whose backbone differs by one tensor
    m = create_model("efficientnet_lite0", 4, init="pretrained")
    with torch.no_grad():
        m.net._conv_head.weight.mul_(1.1)
    ckpt = tmp_path / "tuned.safetensors"
    save_file(m.state_dict(), str(ckpt))
    f_w = extract_features("efficientnet_lite0", str(ckpt), images, 32)
    assert len(_feature_files()) == n + 3 and not np.allclose(f_w, f1)
    # the classifier is not part of the key: same backbone, other head -> the cached file
    m2 = create_model("efficientnet_lite0", 9, init="pretrained")
    ckpt2 = tmp_path / "head_only.safetensors"
    save_file(m2.state_dict(), str(ckpt2))
    np.testing.assert_array_equal(extract_features("efficientnet_lite0", str(ckpt2), images, 32), f1)
    assert len(_feature_files()) == n + 3

    # A corrupt cache file is re-extracted, not trusted.
    path.write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neighborlt.train.features"):
        np.testing.assert_allclose(extract_features("efficientnet_lite0", "pretrained", images, 32), f1, atol=1e-5)
    assert "unreadable" in caplog.text


def test_features_equal_eval_transform_path(images: ImageSet) -> None:
    """The batched extraction equals forward_features on the eval transform of ImageSetDataset."""
    feats = extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32)
    model = create_model("resnet8_cifar", 1, init=_seeded_checkpoint()).eval()
    ds = ImageSetDataset(images, build_transform(32, train=False, normalization=model_normalization("resnet8_cifar")),
                         32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = model.forward_features(x).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)

    # stream mode: the centre view decoded in the loader, uint8 normalised before the model; its own cache key
    stream = extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32, data_mode="stream")
    view = image_batches(images, 32, 16, 0, "resnet8_cifar", data_mode="stream", crop_pct=model_crop_pct("resnet8_cifar"))
    with torch.no_grad():
        ref_stream = torch.cat([model.forward_features(x) for x in view]).numpy()
    np.testing.assert_allclose(stream, ref_stream, rtol=1e-4, atol=1e-5)
    assert not np.allclose(stream, feats, atol=1e-3)  # another view (resize 37 + crop 32 vs the 32 px array)


_CKPT: list[str] = []


def _seeded_checkpoint() -> str:
    if not _CKPT:
        torch.manual_seed(3)
        path = cache_dir() / "test-resnet8-seed3.safetensors"
        save_file(create_model("resnet8_cifar", 1).state_dict(), str(path))
        _CKPT.append(str(path))
    return _CKPT[0]


# A child process that extracts features of a saved image array; a global forward hook on the first convolution
# sleeps ``delay`` s per batch so a kill lands mid-extraction. It prints its log lines to stderr.
_CHILD = """
import logging, sys, time
import numpy as np, torch
from torch import nn
from neighborlt.data.base import ImageSet
from neighborlt.train.features import extract_features

images, ckpt, out, chunk_rows, workers, distributed, delay = sys.argv[1:8]
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
torch.set_num_threads(1)
def slow(m, i, o):
    if isinstance(m, nn.Conv2d) and m.in_channels == 3:
        time.sleep(float(delay))
torch.nn.modules.module.register_module_forward_hook(slow)
a = np.load(images)
s = ImageSet(class_names=["a", "b"], labels=np.arange(len(a)) % 2, array=a)
f = extract_features("resnet8_cifar", ckpt, s, 32, batch_size=2, chunk_rows=int(chunk_rows),
                     num_workers=int(workers), distributed=distributed == "1")
np.save(out, np.asarray(f))
"""


def _child(tmp_path: Path, images: ImageSet, cache: Path, out: Path, *, chunk_rows: int, workers: int,
           distributed: bool, delay: float, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    script, arr = tmp_path / "child.py", tmp_path / "images.npy"
    script.write_text(_CHILD)
    np.save(arr, images.array)
    e = {**os.environ, "NEIGHBORLT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    (cache / "arrays").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script), str(arr), _seeded_checkpoint(), str(out), str(chunk_rows),
                             str(workers), "1" if distributed else "0", str(delay)], env=e, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def test_kill_9_mid_extraction_resumes_missing_chunks(images: ImageSet, tmp_path: Path, monkeypatch,
                                                     caplog) -> None:
    """A real SIGKILL after the first chunk file appears; the re-run computes only the missing chunks and its
    features equal an uninterrupted run's."""
    reference = np.array(extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32))
    cache = tmp_path / "cache"
    proc = _child(tmp_path, images, cache, tmp_path / "never.npy", chunk_rows=4, workers=1, distributed=False,
                  delay=0.3)
    deadline = time.monotonic() + 120
    chunks: list[Path] = []
    while not chunks and proc.poll() is None and time.monotonic() < deadline:
        chunks = list(cache.glob("features/*/*.chunks/rows-*.npy"))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert chunks, f"no chunk file appeared before the deadline; child stderr: {err[-500:]}"
    folder = chunks[0].parent
    done = sorted(int(p.name.split("-")[1]) // 4 for p in folder.glob("rows-*.npy"))
    assert len(images) == 16 and done and len(done) < 4, done  # the kill came mid-extraction (4 chunks of 4 rows)
    assert done == list(range(len(done))), done  # finished chunks are whole, in order; the one in flight left nothing
    assert not (tmp_path / "never.npy").exists() and not list(folder.parent.glob("*.npy"))  # nothing merged

    monkeypatch.setenv("NEIGHBORLT_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="neighborlt.train.features"):
        resumed = extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32, batch_size=2, chunk_rows=4,
                                   num_workers=0)
    missing = [i for i in range(4) if i not in done]
    want = ",".join(map(str, missing)) if len(missing) == 1 or missing[-1] - missing[0] != len(missing) - 1 \
        else f"{missing[0]}-{missing[-1]}"
    assert f"computes chunks {want} ({len(done)} of its 4 on disk)" in caplog.text, caplog.text
    side = json.loads(next(folder.parent.glob("*.json")).read_text())
    assert side["computed_chunks_by_merger"] == len(missing) and side["chunks"] == 4
    np.testing.assert_array_equal(resumed, reference)
    assert not folder.exists()  # merged once, chunks removed


def test_two_ranks_split_chunks_and_merge_once(images: ImageSet, tmp_path: Path, monkeypatch, caplog) -> None:
    """RANK=0/1 WORLD_SIZE=2 without a process group (rank 1 a child process, rank 0 this one): rank r computes
    chunks i % 2 == r, exactly one of them merges, and both get the single-process features."""
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and rank_chunks(5, 1, 2) == [1, 3]
    reference = np.array(extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32))
    cache = tmp_path / "cache"
    child = _child(tmp_path, images, cache, tmp_path / "rank1.npy", chunk_rows=4, workers=0, distributed=True,
                   delay=0.0, env={"RANK": "1", "WORLD_SIZE": "2"})
    monkeypatch.setenv("NEIGHBORLT_CACHE", str(cache))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="neighborlt.train.features"):
        rank0 = np.array(extract_features("resnet8_cifar", _seeded_checkpoint(), images, 32, batch_size=2,
                                          chunk_rows=4, num_workers=0, distributed=True))
    err = child.communicate(timeout=180)[1]
    assert child.returncode == 0, err
    assert "rank 0/2 computes chunks 0,2 (0 of its 2 on disk)" in caplog.text, caplog.text
    assert "rank 1/2 computes chunks 1,3 (0 of its 2 on disk)" in err, err
    assert caplog.text.count("extracted resnet8_cifar features") + err.count("extracted resnet8_cifar features") == 1
    np.testing.assert_array_equal(rank0, reference)
    np.testing.assert_array_equal(np.load(tmp_path / "rank1.npy"), reference)
    assert not list(cache.glob("features/*/*.chunks"))
