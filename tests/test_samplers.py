"""Samplers: auxiliary cap and redraw, determinism, balanced kinds, resume state, DDP rank agreement."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from neighborlt.errors import ConfigError
from neighborlt.train.samplers import build_sampler, effective_class_counts

# 3 target classes (100, 20, 5 images) then 3 auxiliary classes (200, 30, 80 images), interleaved order.
COUNTS = [100, 20, 5, 200, 30, 80]
L = 3


def make_labels(seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("kind", ["random", "class_balanced", "sqrt"])
def test_epoch_length_and_counts(kind: str) -> None:
    labels = make_labels()
    s = build_sampler(kind, labels, num_target_classes=L, aux_cap=50)
    total = 100 + 20 + 5 + 50 + 30 + 50
    assert len(s) == total and len(s.epoch_indices(0)) == total
    counts = s.epoch_counts(4)
    assert counts["target"] + counts["auxiliary"] == total
    ys = labels[s.epoch_indices(4)]
    assert counts["auxiliary"] == int((ys >= L).sum())
    if kind == "random":
        assert counts == {"target": 125, "auxiliary": 130}


def test_random_sampler_uses_all_targets_once_and_caps_auxiliary() -> None:
    labels = make_labels()
    s = build_sampler("random", labels, num_target_classes=L, aux_cap=50, seed=3)
    for epoch in range(3):
        idx = s.epoch_indices(epoch)
        assert len(set(idx.tolist())) == len(idx)  # no duplicates
        per_class = np.bincount(labels[idx], minlength=len(COUNTS)).tolist()
        assert per_class == [100, 20, 5, 50, 30, 50]
        targets = np.flatnonzero(labels < L)
        assert set(targets.tolist()) <= set(idx.tolist())


def test_auxiliary_images_are_redrawn_each_epoch() -> None:
    labels = make_labels()
    s = build_sampler("random", labels, num_target_classes=L, aux_cap=50, seed=0)
    cls3 = [{i for i in s.epoch_indices(e).tolist() if labels[i] == 3} for e in range(20)]
    assert all(len(c) == 50 for c in cls3)
    assert cls3[0] != cls3[1]
    assert len(set().union(*cls3)) > 150  # 20 fresh draws of 50 out of 200 cover most of the class
    # a class under the cap contributes all its images every epoch
    cls4 = [{i for i in s.epoch_indices(e).tolist() if labels[i] == 4} for e in range(3)]
    assert cls4[0] == cls4[1] == cls4[2] and len(cls4[0]) == 30


@pytest.mark.parametrize("kind", ["random", "class_balanced", "sqrt"])
def test_deterministic_per_seed_and_epoch(kind: str) -> None:
    labels = make_labels()
    a = build_sampler(kind, labels, num_target_classes=L, aux_cap=50, seed=7)
    b = build_sampler(kind, labels, num_target_classes=L, aux_cap=50, seed=7)
    c = build_sampler(kind, labels, num_target_classes=L, aux_cap=50, seed=8)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    np.testing.assert_array_equal(a.epoch_indices(2), b.epoch_indices(2))
    assert not np.array_equal(a.epoch_indices(5), a.epoch_indices(6))
    assert not np.array_equal(a.epoch_indices(5), c.epoch_indices(5))


def test_class_balanced_and_sqrt_frequencies() -> None:
    labels = make_labels()
    sizes = np.array([100, 20, 5, 50, 30, 50], dtype=float)  # per-epoch pool sizes after the cap
    cb = build_sampler("class_balanced", labels, num_target_classes=L, aux_cap=50, seed=1)
    sq = build_sampler("sqrt", labels, num_target_classes=L, aux_cap=50, seed=1)
    n_epochs = 40
    f_cb = np.bincount(np.concatenate([labels[cb.epoch_indices(e)] for e in range(n_epochs)]), minlength=6)
    f_sq = np.bincount(np.concatenate([labels[sq.epoch_indices(e)] for e in range(n_epochs)]), minlength=6)
    n = f_cb.sum()
    np.testing.assert_allclose(f_cb / n, np.full(6, 1 / 6), atol=0.01)
    np.testing.assert_allclose(f_sq / n, np.sqrt(sizes) / np.sqrt(sizes).sum(), atol=0.01)
    # a capped auxiliary class is drawn (with replacement) only from its epoch's M selected images
    two = np.repeat([0, 1], [1000, 200])
    s = build_sampler("class_balanced", two, num_target_classes=1, aux_cap=10, seed=0)
    for epoch in range(3):
        aux = s.epoch_indices(epoch)[s.epoch_indices(epoch) >= 1000]
        assert len(aux) > 400 and len(set(aux.tolist())) == 10


def test_no_cap_and_no_auxiliary() -> None:
    labels = make_labels()
    s = build_sampler("random", labels)
    assert len(s) == len(labels) and s.epoch_counts(0) == {"target": len(labels), "auxiliary": 0}
    s2 = build_sampler("random", labels, num_target_classes=L, aux_cap=None)
    assert s2.epoch_counts(0) == {"target": 125, "auxiliary": 310}


def test_effective_class_counts() -> None:
    labels = make_labels()
    assert effective_class_counts(labels, 6, num_target_classes=L, aux_cap=50).tolist() == [100, 20, 5, 50, 30, 50]
    assert effective_class_counts(labels, 7).tolist() == COUNTS + [0]
    assert effective_class_counts(labels, 6, num_target_classes=L, aux_cap=10).tolist() == [100, 20, 5, 10, 10, 10]
    with pytest.raises(ConfigError, match="num_classes is 5"):
        effective_class_counts(labels, 5)


@pytest.mark.parametrize("kind", ["random", "class_balanced"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_agree_and_split_in_process(kind: str, world_size: int) -> None:
    labels = make_labels()
    samplers = [build_sampler(kind, labels, num_target_classes=L, aux_cap=50, seed=11, rank=r, world_size=world_size)
                for r in range(world_size)]
    for s in samplers:
        s.set_epoch(3)
    parts = [list(s) for s in samplers]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(samplers[0])
    full = samplers[0].epoch_indices(3).tolist()
    merged = [parts[i % world_size][i // world_size] for i in range(len(parts[0]) * world_size)]
    padded = len(merged) - len(full)
    assert 0 <= padded < world_size
    assert merged[:len(full)] == full and merged[len(full):] == full[:padded]


def test_state_dict_resume_mid_epoch() -> None:
    labels = make_labels()
    a = build_sampler("sqrt", labels, num_target_classes=L, aux_cap=50, seed=2)
    a.set_epoch(6)
    expected = list(a)
    a.skip(40)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON / torch.save round trip
    b = build_sampler("sqrt", labels, num_target_classes=L, aux_cap=50, seed=2)
    b.load_state_dict(state)
    assert b.epoch == 6 and list(b) == expected[40:]
    assert list(b) == expected  # the skip applies to one iteration only
    b.set_epoch(7)
    a.set_epoch(7)
    assert list(a) == list(b)
    with pytest.raises(ConfigError, match="sampler state has seed=2 but this run has 3"):
        build_sampler("sqrt", labels, num_target_classes=L, aux_cap=50, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="labels_sha256"):
        build_sampler("sqrt", labels[:-1], num_target_classes=L, aux_cap=50, seed=2).load_state_dict(state)


def test_with_dataloader() -> None:
    labels = make_labels()
    ds = TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    s = build_sampler("random", labels, num_target_classes=L, aux_cap=50)
    s.set_epoch(1)
    seen = torch.cat([b[0] for b in DataLoader(ds, batch_size=32, sampler=s)]).tolist()
    assert seen == s.epoch_indices(1).tolist()
    ys = Counter(labels[seen].tolist())
    assert ys[3] == 50 and ys[0] == 100


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown sampler 'balanced'"):
        build_sampler("balanced", [0, 1])
    with pytest.raises(ConfigError, match="rank 2 is not in 0..1"):
        build_sampler("random", [0, 1], rank=2, world_size=2)
    with pytest.raises(ConfigError, match="no training images"):
        build_sampler("random", [])


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        labels = make_labels()
        s = build_sampler("class_balanced", labels, num_target_classes=L, aux_cap=50, seed=5, rank=rank,
                          world_size=world_size)
        result = {}
        for epoch in (0, 1):
            s.set_epoch(epoch)
            mine = torch.tensor(list(s), dtype=torch.int64)
            full = torch.from_numpy(s.epoch_indices(epoch))
            fulls = [torch.empty_like(full) for _ in range(world_size)]
            parts = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(fulls, full)
            dist.all_gather(parts, mine)
            result[epoch] = {
                "lists_agree": all(torch.equal(f, fulls[0]) for f in fulls),
                "interleaved": torch.stack(parts, 1).reshape(-1).tolist(),
                "full": full.tolist(),
            }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ranks_agree(tmp_path) -> None:
    """Two real processes (gloo over loopback): both compute the same epoch list and their slices tile it."""
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for epoch in ("0", "1"):
        assert r0[epoch]["lists_agree"] and r1[epoch]["lists_agree"]
        full, inter = r0[epoch]["full"], r0[epoch]["interleaved"]
        assert inter[:len(full)] == full and len(inter) - len(full) in (0, 1)
    assert r0["0"]["full"] != r0["1"]["full"]
