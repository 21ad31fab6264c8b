"""The one pixel seam and stream mode: decode policies (squash = the cache's pixels, centre view = torchvision's
Resize + CenterCrop, draft-aware RandomResizedCrop), mixed reference sets (array rows, files, shard members) with no
pixels copied, one-line errors naming the file or shard offset, and stream-mode training whose augmentation
depends only on (seed, epoch, position): a SIGTERM + resume ends with the weights of an uninterrupted run, with 0
and with 2 loader workers."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from neighborlt.data import ImageSet, ShardMember, as_array
from neighborlt.data.auxiliary import AuxTrainingSet, _concat
from neighborlt.data.pixels import ArrayRow, decode, rrc_box
from neighborlt.errors import DataError
from neighborlt.export import decode_image
from neighborlt.rundir import read_json
from neighborlt.train.checkpoint import load_checkpoint, load_weights
from neighborlt.train.config import TrainConfig
from neighborlt.train.data import ImageSetDataset, resolve_data_mode
from neighborlt.train.engine import run_train

torch.set_num_threads(1)


def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth image with some noise (JPEG-like content, not white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (1 + seed % 3) + yy) % 256, (yy * 2 + seed * 17) % 256, (xx + yy * 3) % 256], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _jpeg_bytes(a: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _shard(path: Path, blobs: list[bytes]) -> list[ShardMember]:
    """A tar shard as retrieve writes them; the members' data offsets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, b in enumerate(blobs):
            info = tarfile.TarInfo(f"{k:06d}.jpg")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    with tarfile.open(path) as tar:
        return [ShardMember(path, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> AuxTrainingSet:
    """3 target classes as rows of an in-memory array, auxiliary class 3 as JPEG files and class 4 as members of a
    retrieve shard (96 x 128 px: stream mode's RandomResizedCrop path at 72 px)."""
    root = tmp_path_factory.mktemp("mixed")
    arr = np.stack([_pixels(128, 96, s) for s in range(18)])
    targets = ImageSet(class_names=["a", "b", "c"], labels=np.repeat([0, 1, 2], [8, 6, 4]), array=arr,
                       source="targets")
    files = []
    for k in range(8):
        p = root / f"aux{k}.jpg"
        p.write_bytes(_jpeg_bytes(_pixels(120 + 4 * k, 100, 50 + k)))
        files.append(p)
    members = _shard(root / "run" / "retrieve" / "shards" / "000000.tar",
                     [_jpeg_bytes(_pixels(100, 130, 80 + k)) for k in range(8)])
    names = ["a", "b", "c", "x", "y"]
    aux = ImageSet(class_names=names, labels=np.repeat([3, 4], 8), paths=files + members, source="aux")
    train = _concat(targets, aux, aux.labels, names, names)
    test = ImageSet(class_names=["a", "b", "c"], labels=np.array([0, 1, 2, 0, 1, 2]),
                    array=np.stack([_pixels(128, 96, 100 + s) for s in range(6)]), source="test")
    return AuxTrainingSet(train=train, test=test, num_target=3, pairs=np.array([[0, 3], [1, 4]]))


def test_mixed_set_holds_references_not_pixels(mixed: AuxTrainingSet) -> None:
    train = mixed.train
    assert train.array is None and len(train) == 34
    rows = [r for r in train.paths if isinstance(r, ArrayRow)]
    assert len(rows) == 18 and all(r.source is rows[0].source for r in rows)
    assert isinstance(train.paths[18], Path) and isinstance(train.paths[-1], ShardMember)
    x = as_array(train, 40)  # cache mode over the mixed set: every reference through the squash policy
    for i in (0, 17, 18, 33):
        assert np.array_equal(x[i], decode(train.ref(i), 40, policy="squash")), i
    assert np.array_equal(x[0], np.asarray(Image.fromarray(train.paths[0].pixels).resize(
        (40, 40), Image.Resampling.BILINEAR)))
    assert np.array_equal(decode_image(train.paths[18], 40), x[18])  # export decodes with the same function
    assert np.array_equal(np.asarray(train.load(33)), decode(train.ref(33), policy="full"))


def test_center_view_is_torchvision_resize_and_centre_crop(tmp_path: Path) -> None:
    a = _pixels(157, 101, 3)
    p = tmp_path / "x.png"
    Image.fromarray(a).save(p)
    ref = T.Compose([T.Resize(int(64 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    assert np.array_equal(decode(p, 64, policy="center"), np.asarray(ref(Image.fromarray(a))))
    ref9 = T.Compose([T.Resize(int(64 / 0.9), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    assert np.array_equal(decode(p, 64, policy="center", crop_pct=0.9), np.asarray(ref9(Image.fromarray(a))))


def test_train_crop_box_and_draft(tmp_path: Path) -> None:
    for s in range(200):
        left, top, w, h = rrc_box(400, 300, np.random.default_rng(s))
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        assert 0.08 * 400 * 300 * 0.99 <= w * h <= 400 * 300
    big = _pixels(1600, 1200, 7)
    p = tmp_path / "big.jpg"
    p.write_bytes(_jpeg_bytes(big))
    full = Image.open(p).convert("RGB")
    diffs = []
    for s in range(6):
        got = decode(p, 64, policy="train", rng=np.random.default_rng(s))
        left, top, w, h = rrc_box(1600, 1200, np.random.default_rng(s))
        want = np.asarray(full.resize((64, 64), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        diffs.append(np.abs(got.astype(int) - want.astype(int)).mean())
        assert np.array_equal(got, decode(p, 64, policy="train", rng=np.random.default_rng(s)))
    assert max(diffs) < 8, diffs  # drafted (DCT-domain downscale) crops show the same content


def test_bad_images_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image"):
        decode(bad, 32, policy="center")
    shard = tmp_path / "s.tar"
    m = _shard(shard, [_jpeg_bytes(_pixels(40, 40, 1)), b"garbage bytes"])
    with pytest.raises(DataError, match=rf"s\.tar@{m[1].offset}\+{m[1].size}: cannot decode image"):
        decode(m[1], 32, policy="squash")
    run = tmp_path / "myrun"
    gone = ShardMember(run / "retrieve" / "shards" / "000007.tar", 512, 100)
    with pytest.raises(DataError, match=rf"000007\.tar: shard not found; make it with `neighborlt retrieve {run}`"):
        decode(gone, 32, policy="train", rng=np.random.default_rng(0))
    s = ImageSet(class_names=["a"], labels=[0], paths=[gone])
    with pytest.raises(DataError, match="neighborlt retrieve"):
        as_array(s, 8)


def test_stream_samples_depend_on_seed_epoch_position_only(mixed: AuxTrainingSet) -> None:
    ds = ImageSetDataset(mixed.train, None, 72, mode="stream", train=True, seed=5, randaugment="rand-m9-mstd0.5")
    x, y = ds[(20, 1, 7)]
    assert x.dtype == torch.uint8 and x.shape == (3, 72, 72) and y == mixed.train.labels[20]
    assert torch.equal(x, ds[(20, 1, 7)][0])
    assert not torch.equal(x, ds[(20, 1, 8)][0]) and not torch.equal(x, ds[(20, 2, 7)][0])
    batches = [[0, 20, 33], [5, 18]]
    a = [b for b, _ in ds.train_batches(batches, 3, num_workers=0)]
    b = [b for b, _ in ds.train_batches(batches, 3, num_workers=2)]
    assert len(mp.active_children()) == 2  # the persistent loader's workers, until close()
    ds.close()
    assert mp.active_children() == []
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(a[1][0], ds[(5, 3, 3)][0])  # second batch starts at position 3
    ev = ImageSetDataset(mixed.test, None, 72, mode="stream")[0][0]
    assert torch.equal(ev.permute(1, 2, 0), torch.tensor(decode(mixed.test.array[0], 72, policy="center")))


def test_auto_mode_rule() -> None:
    assert resolve_data_mode("auto", 64) == "cache" and resolve_data_mode("auto", 65) == "stream"
    assert resolve_data_mode("stream", 32) == "stream"
    assert TrainConfig(image_size=224).data_mode == "auto"


CFG = TrainConfig(model="resnet8_cifar", image_size=72, data_mode="stream", epochs=2, batch_size=8, lr=0.05,
                  warmup_epochs=0.5, aux_cap=4, loss="neighbor_silencing", randaugment="rand-m9-mstd0.5",
                  mixup=0.2, cutmix=0.5, num_workers=0, eval_batch_size=8)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, mixed: AuxTrainingSet) -> Path:
    run = tmp_path_factory.mktemp("full")
    run_train(CFG, run, data=mixed, progress=False)
    return run


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_is_bit_identical(tmp_path: Path, mixed: AuxTrainingSet, uninterrupted: Path,
                                        workers: int) -> None:
    # 18 targets + 2 x 4 auxiliary draws = 26 images per epoch, batch 8 -> 3 steps; stop after step 2 of epoch 0
    cfg = CFG.model_copy(update={"num_workers": workers})

    def hook(e: int, s: int) -> None:
        if (e, s) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    res = run_train(cfg, tmp_path, data=mixed, progress=False, on_step=hook)
    assert res.interrupted
    _, state = load_checkpoint(tmp_path / "train" / "checkpoint")
    assert (state["epoch"], state["step"]) == (0, 2)
    assert mp.active_children() == []  # the interrupted run stopped its loader workers
    res = run_train(cfg, tmp_path, data=mixed, progress=False, resume=True)
    assert not res.interrupted and res.epochs_done == 2
    assert mp.active_children() == []  # so did the finished one (not left to a garbage collection)
    wa = load_weights(tmp_path / "train" / "model.safetensors")
    wb = load_weights(uninterrupted / "train" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = read_json(tmp_path / "train" / "model.json")
    assert meta["data_mode"] == "stream" and meta["crop_pct"] == pytest.approx(0.875)
    assert read_json(tmp_path / "records" / "train.done.json")["data_mode"] == "stream"
    # each process logs its start-up once: seconds from run_train's start to its first optimizer step
    for folder in (tmp_path, uninterrupted):
        rows = [json.loads(line) for line in (folder / "train" / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2] and "first_step_s" not in rows[1]
        assert rows[0]["first_step_s"] > 0


def test_shard_members_of_one_shard_share_one_path(tmp_path: Path) -> None:
    """Millions of auxiliary images are references in memory: the members of one shard share its Path (about 130
    bytes per member instead of 350, bench/data_scale.py --refs) and still pickle to loader workers."""
    import pickle

    import pyarrow as pa

    from neighborlt.data.auxiliary import rows_image_set
    from neighborlt.data.manifest import image_refs

    rows = [{"location": "shard", "path": f"retrieve/shards/{k // 3:06d}.tar", "offset": 512 * k, "size": 10}
            for k in range(6)]
    for refs in (image_refs(pa.Table.from_pylist(rows), tmp_path), rows_image_set(rows, None, tmp_path).paths):
        assert refs is not None and [r.shard for r in refs] == [tmp_path / f"retrieve/shards/{k // 3:06d}.tar"
                                                                for k in range(6)]
        assert refs[0].shard is refs[2].shard and refs[3].shard is refs[5].shard and refs[0].shard != refs[3].shard
        assert pickle.loads(pickle.dumps(refs)) == refs and not hasattr(refs[0], "__dict__")
