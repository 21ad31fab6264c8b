"""Losses: every registered loss against its formula, soft (Mixup) targets, devices and state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neighborlt.errors import ConfigError
from neighborlt.losses import (
    LOSSES,
    BalancedBCE,
    BalancedSoftmaxCE,
    CrossEntropy,
    DROLoss,
    LogitAdjustedCE,
    NeighborSilencingCE,
)

COUNTS = [120, 60, 25, 9, 4, 2, 30, 30]  # 5 targets (head -> tail), 3 auxiliary classes
PAIRS = [[3, 5], [4, 6], [4, 7], [0, 7]]
C = len(COUNTS)
ALL = LOSSES.names()
# losses whose soft-target value is linear in the target (the convex combination of hard-label losses)
LINEAR_IN_TARGET = [n for n in ALL if n != "dro"]


def _make(name: str, **params: object) -> torch.nn.Module:
    if name == "neighbor_silencing":
        params.setdefault("neighbor_pairs", PAIRS)
    return LOSSES.create(name, class_counts=COUNTS, **params)


def _call(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor,
          feats: torch.Tensor | None = None) -> torch.Tensor:
    if loss.needs_features:
        return loss(logits, target, features=feats)
    return loss(logits, target)


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, C, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3, 4])
    f = torch.randn(10, 6, generator=g, dtype=torch.float64)
    return z, y, f


def test_registry_names_and_meta() -> None:
    assert set(ALL) == {"ce", "balanced_softmax", "logit_adjusted", "balanced_bce", "dro", "neighbor_silencing"}
    for name in ALL:
        meta = LOSSES.meta(name)
        assert meta["formula"] and "description" in meta
        assert LOSSES.get(name).__doc__ and "L" in LOSSES.get(name).__doc__
    with pytest.raises(ConfigError, match="choose one of: balanced_bce"):
        LOSSES.create("focal", class_counts=COUNTS)


@pytest.mark.parametrize("name", ALL)
def test_generic_forward_backward(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    z, y, f = batch
    loss = _make(name)
    z = z.clone().requires_grad_(True)
    f = f.clone().requires_grad_(True)
    value = _call(loss, z, y, f)
    assert value.ndim == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    if loss.needs_features:
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_one_hot_soft_target_equals_hard(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    z, y, f = batch
    hard = _call(_make(name), z, y, f)
    soft = _call(_make(name), z, F.one_hot(y, C).double(), f)
    torch.testing.assert_close(soft, hard, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LINEAR_IN_TARGET)
def test_mixup_target_is_convex_combination(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    """A Mixup target lam*e(y1) + (1-lam)*e(y2) gives lam*L(y1) + (1-lam)*L(y2), row by row."""
    z, y1, _ = batch
    y2 = y1.flip(0)
    lam = torch.linspace(0.1, 0.9, len(y1), dtype=torch.float64)
    target = lam[:, None] * F.one_hot(y1, C) + (1 - lam)[:, None] * F.one_hot(y2, C)
    loss = _make(name)
    per_row = [lam[i] * loss(z[i:i + 1], y1[i:i + 1]) + (1 - lam[i]) * loss(z[i:i + 1], y2[i:i + 1])
               for i in range(len(y1))]
    torch.testing.assert_close(loss(z, target), torch.stack(per_row).mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_counts_are_buffers_and_state_round_trips(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    z, y, f = batch
    loss = _make(name)
    assert "class_counts" in dict(loss.named_buffers())
    torch.testing.assert_close(loss.class_counts, torch.tensor(COUNTS, dtype=torch.float64))
    _call(loss, z, y, f)  # DRO: sizes and fills its centroid state
    fresh = _make(name)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(_call(fresh, z, y, f), _call(loss, z, y, f))


@pytest.mark.parametrize("name", ALL)
def test_low_precision_logits(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    """bf16 logits (autocast) are computed in float32 and get a bf16 gradient."""
    z, y, f = batch
    zb = z.to(torch.bfloat16).requires_grad_(True)
    value = _call(_make(name), zb, y, f.float())
    assert value.dtype == torch.float32
    value.backward()
    assert zb.grad is not None and zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name: str, batch: tuple[torch.Tensor, ...]) -> None:
    z, y, f = batch
    cpu = _call(_make(name), z, y, f)
    gpu = _call(_make(name).cuda(), z.cuda(), y.cuda(), f.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.parametrize("bad", [[1, 2, -3], [[1, 2]], [1.0, float("nan")], []])
def test_bad_counts_raise(bad: object) -> None:
    with pytest.raises(ConfigError, match="class_counts"):
        BalancedSoftmaxCE(bad)  # type: ignore[arg-type]


def test_zero_count_is_raised_to_one() -> None:
    loss = BalancedSoftmaxCE([10, 0, 5])
    assert loss.class_counts.tolist() == [10.0, 1.0, 5.0]
    assert torch.isfinite(loss(torch.zeros(1, 3), torch.tensor([1])))


def test_shape_errors() -> None:
    loss = BalancedSoftmaxCE([1, 2, 3])
    with pytest.raises(ValueError, match="built for 3"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="soft target shape"):
        loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="integer"):
        loss(torch.zeros(2, 3), torch.zeros(2))


# -- formulas on hand-built tensors -----------------------------------------------------------------------------

def test_ce_formula() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5]])
    expected = -(1.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert CrossEntropy()(z, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_formula() -> None:
    # z = 0, n = [1, 3]: p(y=0) = 1 / (1 + 3)
    assert BalancedSoftmaxCE([1, 3])(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.log(4))
    z = torch.tensor([[0.3, -1.0, 2.0]])
    n = [50.0, 5.0, 1.0]
    num = n[1] * math.exp(-1.0)
    den = sum(nj * math.exp(zj) for nj, zj in zip(n, [0.3, -1.0, 2.0]))
    assert BalancedSoftmaxCE(n)(z, torch.tensor([1])).item() == pytest.approx(-math.log(num / den), rel=1e-6)


def test_logit_adjusted_formula_and_tau_one_is_balanced_softmax(batch: tuple[torch.Tensor, ...]) -> None:
    z, y, _ = batch
    pi = np.array(COUNTS, dtype=float) / sum(COUNTS)
    tau = 0.7
    adj = z.numpy() + tau * np.log(pi)
    lse = np.log(np.exp(adj).sum(1))
    expected = float(np.mean(lse - adj[np.arange(len(y)), y.numpy()]))
    assert LogitAdjustedCE(COUNTS, tau=tau)(z, y).item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(LogitAdjustedCE(COUNTS, tau=1.0)(z, y), BalancedSoftmaxCE(COUNTS)(z, y))


def test_balanced_bce_formula_sum_over_classes_mean_over_batch(batch: tuple[torch.Tensor, ...]) -> None:
    z, y, _ = batch
    pi = np.array(COUNTS, dtype=float) / sum(COUNTS)
    zz = z.numpy() + np.log(pi) - np.log(1 - pi)
    t = np.eye(C)[y.numpy()]
    sig = 1 / (1 + np.exp(-zz))
    expected = float(np.mean(np.sum(-(t * np.log(sig) + (1 - t) * np.log(1 - sig)), axis=1)))
    assert BalancedBCE(COUNTS)(z, y).item() == pytest.approx(expected, rel=1e-10)
    # label smoothing as LiVT builds it: off = s / C, on = 1 - s + s / C
    s = 0.1
    ts = np.full((len(y), C), s / C)
    ts[np.arange(len(y)), y.numpy()] = 1 - s + s / C
    expected_s = float(np.mean(np.sum(-(ts * np.log(sig) + (1 - ts) * np.log(1 - sig)), axis=1)))
    assert BalancedBCE(COUNTS, smoothing=s)(z, y).item() == pytest.approx(expected_s, rel=1e-10)


# -- DRO-LT -----------------------------------------------------------------------------------------------------

def _dro_reference(feats: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, eps: torch.Tensor,
                   temp: float) -> torch.Tensor:
    """The official losses.py computation (centroid x batch matrix, softmax over the batch), looped."""
    classes = torch.unique(labels)
    total = torch.zeros((), dtype=feats.dtype)
    for c in classes:
        d = torch.linalg.vector_norm(feats - centroids[c], dim=1)  # [B]
        logit = -(d + eps[c] * (labels == c)) / temp
        log_prob = logit - torch.logsumexp(logit, 0)
        total = total - log_prob[labels == c].mean()
    return total / len(classes)


def test_dro_robust_term_matches_official_formula(batch: tuple[torch.Tensor, ...]) -> None:
    _, y, f = batch
    loss = DROLoss(COUNTS, temperature=0.5)
    with torch.no_grad():
        loss.epsilons.copy_(torch.linspace(0.2, 1.5, C))
    cents = torch.randn(C, f.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = loss.robust_loss(f, y, cents)
    want = _dro_reference(f, y, cents, loss.epsilons.detach().double(), 0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dro_total_combines_ce_and_learns_margins(batch: tuple[torch.Tensor, ...]) -> None:
    z, y, f = batch
    loss = DROLoss(COUNTS, lambda_ce=0.3)
    total = loss(z, y, features=f)
    cents, _ = loss.current_centroids()
    expected = 0.3 * F.cross_entropy(z, y) + 0.7 * loss.robust_loss(f, y, cents)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert loss.epsilons.grad is not None and loss.epsilons.grad[y.unique()].abs().min() > 0
    with pytest.raises(ValueError, match="features"):
        loss(z, y)


def test_dro_centroids_update_each_epoch() -> None:
    g = torch.Generator().manual_seed(3)
    loss = DROLoss([5, 5, 5, 5], feature_dim=3)
    z = torch.zeros(4, 4)
    # epoch 0: running centroids of the batches seen so far (current batch included)
    f1, y1 = torch.randn(4, 3, generator=g), torch.tensor([0, 0, 1, 2])
    loss.epoch_start(0)
    loss(z, y1, features=f1)
    cents, valid = loss.current_centroids()
    torch.testing.assert_close(cents[0].float(), f1[:2].mean(0))
    assert valid.tolist() == [True, True, True, False]
    f2, y2 = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 1, 1])
    loss(z, y2, features=f2)
    torch.testing.assert_close(loss.current_centroids()[0][1].float(), torch.cat([f1[2:3], f2[1:]]).mean(0))
    # eval mode / no grad does not accumulate
    loss.eval()
    loss(z, y2, features=f2 + 100)
    loss.train()
    # epoch 1: centroids are the epoch-0 means; class 3 (never seen) has none
    loss.epoch_start(1)
    assert loss.has_centroid.tolist() == [True, True, True, False]
    torch.testing.assert_close(loss.centroids[0], torch.cat([f1[:2], f2[:1]]).mean(0))
    torch.testing.assert_close(loss.centroids[2], f1[3])
    assert loss.feature_count.sum() == 0
    # features seen during epoch 1 do not move the centroids until epoch 2; idempotent epoch_start
    f3 = torch.randn(4, 3, generator=g) + 10
    loss(z, torch.tensor([0, 0, 3, 3]), features=f3)
    loss.epoch_start(1)
    torch.testing.assert_close(loss.centroids[0], torch.cat([f1[:2], f2[:1]]).mean(0))
    assert loss.current_centroids()[1][3]  # class 3: running centroid within epoch 1
    loss.epoch_start(2)
    torch.testing.assert_close(loss.centroids[0], f3[:2].mean(0))
    torch.testing.assert_close(loss.centroids[1], torch.cat([f1[2:3], f2[1:]]).mean(0))  # kept
    torch.testing.assert_close(loss.centroids[3], f3[2:].mean(0))


def test_dro_lazy_feature_dim_state_dict() -> None:
    a = DROLoss([3, 3])
    a(torch.zeros(2, 2), torch.tensor([0, 1]), features=torch.randn(2, 5))
    a.epoch_start(1)
    b = DROLoss([3, 3])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.centroids, a.centroids)
    assert b.centroids.shape == (2, 5) and int(b.last_epoch) == 1


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"lambda_ce": 1.5}, {"ce": "focal"}])
def test_dro_bad_params(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DROLoss(COUNTS, **kw)  # type: ignore[arg-type]


def test_neighbor_silencing_is_registered_with_pairs() -> None:
    loss = LOSSES.create("neighbor_silencing", class_counts=COUNTS, neighbor_pairs=PAIRS, lambda_s=0.2)
    assert isinstance(loss, NeighborSilencingCE) and loss.num_pairs == 4 and loss.lambda_s == 0.2


def test_balanced_bce_bad_smoothing() -> None:
    with pytest.raises(ConfigError, match="smoothing"):
        BalancedBCE(COUNTS, smoothing=1.0)
