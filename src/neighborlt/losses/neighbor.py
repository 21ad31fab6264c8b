"""Neighbor-silencing cross-entropy: Balanced Softmax with the target/auxiliary neighbour pairs down-weighted.

For a sample of class ``y`` with logits ``z`` and per-class image counts ``n``::

    L = log(1 + sum_{j != y} lam_yj * exp(log n_j - log n_y + z_j - z_y))
      = logsumexp_j(a_j + log lam_yj) - a_y,       a = z + log n,  lam_yy = 1,

with ``lam_yj = lambda_s`` when ``{y, j}`` is a neighbour pair (in either order) and 1 otherwise. Writing
``p = softmax(a)`` and ``N(y)`` for the neighbours of ``y``, this is ``-log p_y + log(1 + c_y)`` with the
sparse correction ``c_y = sum_{k in N(y)} (lambda_s - 1) p_k``: a cross-entropy on ``a`` plus a per-row scalar
that reads only the neighbour entries. Its gradient is ``w_j p_j / (1 + c_y) - [j = y]`` with ``w = lambda_s``
on the neighbours and 1 elsewhere: the log-softmax's own backward applied to an upstream gradient with only
``|N(y)| + 1`` non-zeros per row (the label and the neighbour fix-ups). :class:`_NeighborSilencingFn` computes
exactly that, so the cost stays that of :class:`~neighborlt.losses.softmax.BalancedSoftmaxCE` (one
log-softmax forward, one fused log-softmax backward) and the memory O(B * C + C * K_max), K_max the largest
number of neighbours of one class; no C x C matrix is ever built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError
from ._common import LOSSES, CountsLike, as_counts, check_target, register_counts, work_dtype

logger = logging.getLogger(__name__)

PairsLike = torch.Tensor | np.ndarray | Sequence[Sequence[int]]


def symmetric_pairs(neighbor_pairs: PairsLike | None, num_classes: int) -> torch.Tensor:
    """Validate neighbour pairs and return the symmetric, de-duplicated set as int64 [2, E] (rows sorted).

    Args:
        neighbor_pairs: int array [P, 2] of (target index, auxiliary index); the order inside a pair does not
            matter. None or an empty array means no pairs.
        num_classes: number of classifier outputs C; every index must lie in ``0..C-1``.

    Returns:
        int64 tensor [2, E] holding both ``(i, j)`` and ``(j, i)`` for every pair, each once, sorted by row.

    Raises:
        ConfigError: on a wrong shape, an index out of range or a pair of a class with itself.
    """
    if neighbor_pairs is None:
        return torch.zeros(2, 0, dtype=torch.int64)
    arr = neighbor_pairs.detach().cpu().numpy() if isinstance(neighbor_pairs, torch.Tensor) else np.asarray(
        neighbor_pairs)
    if arr.size == 0:
        return torch.zeros(2, 0, dtype=torch.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"neighbor_pairs must be an integer array [P, 2] of (target, auxiliary) class indices, "
                          f"got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0).any(1) | (arr >= num_classes).any(1))
    if bad.size:
        raise ConfigError(f"neighbor_pairs[{bad[0]}] = {arr[bad[0]].tolist()} has an index outside 0..{num_classes - 1}; "
                          "pairs must index the classifier outputs (targets first, then auxiliary classes)")
    same = np.flatnonzero(arr[:, 0] == arr[:, 1])
    if same.size:
        raise ConfigError(f"neighbor_pairs[{same[0]}] = {arr[same[0]].tolist()} pairs a class with itself; drop it")
    both = np.concatenate([arr, arr[:, ::-1]])
    keys = np.unique(both[:, 0] * num_classes + both[:, 1])
    return torch.from_numpy(np.stack([keys // num_classes, keys % num_classes]))


def padded_neighbors(sym: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class neighbour lists padded to the largest degree K.

    Args:
        sym: [2, E] symmetric pairs sorted by row (from :func:`symmetric_pairs`).
        num_classes: C.

    Returns:
        ``index`` int64 [C, K + 1] whose column 0 is the class itself and columns 1.. its neighbours (padding
        repeats the class itself), and ``is_neighbor`` bool [C, K] marking the real (non-padding) entries.
    """
    rows, cols = sym[0], sym[1]
    deg = torch.bincount(rows, minlength=num_classes)
    k = int(deg.max()) if rows.numel() else 0
    index = torch.arange(num_classes, dtype=torch.int64)[:, None].repeat(1, k + 1)
    is_nb = torch.zeros(num_classes, k, dtype=torch.bool)
    if rows.numel():
        start = torch.cumsum(deg, 0) - deg
        pos = torch.arange(rows.numel()) - start[rows]
        index[rows, pos + 1] = cols
        is_nb[rows, pos] = True
    return index, is_nb


class _NeighborSilencingFn(torch.autograd.Function):
    """Mean neighbor-silencing loss of hard labels with a fused backward.

    Forward: ``out = log_softmax(z + log n)``; gather the label and neighbour entries ``v = out[b, index[y_b]]``;
    ``loss_b = log(1 + c_b) - v_b0`` with ``c_b = sum_k coef_yk exp(v_bk)`` and ``coef = lambda_s - 1`` on real
    neighbours, 0 at the label column and on padding. Backward (``g`` = upstream grad / B, ``s_b = g / (1 + c_b)``): the log-softmax
    backward ``G - p * sum_j G_j`` of a sparse upstream gradient ``G`` with K + 1 entries per row::

        G[b, y_b] = -g,   G[b, k] = (lambda_s - 1) p_bk s_b   (k in N(y_b)),   so sum_j G_bj = -s_b
        grad      = G - p * sum_j G_bj = w_j p_j s_b - g [j = y_b]
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, log_counts: torch.Tensor,
                index: torch.Tensor, coef_table: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # log_counts and coef_table arrive already in the working dtype (see NeighborSilencingCE._tables)
        dt = log_counts.dtype
        out = torch.log_softmax(logits.to(dt) + log_counts, dim=1)
        idx = index.index_select(0, target)  # [B, K + 1]: label, then its neighbours (padding repeats the label)
        v = out.gather(1, idx)
        wp = coef_table.index_select(0, target).mul_(v.exp())  # (lambda_s - 1) p_k; 0 at the label and padding
        corr = wp.sum(1)  # c_b
        loss = torch.log1p(corr).sub_(v[:, 0]).mean()
        ctx.save_for_backward(out, idx, wp, corr)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        out, idx, wp, corr = ctx.saved_tensors
        g = grad_loss / out.shape[0]
        scale = g / corr.add(1.0).clamp_min_(torch.finfo(corr.dtype).tiny)  # s_b = g / (1 + c_b)
        # Sparse upstream gradient G: -g at the label, (lambda_s - 1) p_k s_b at the neighbours, so that
        # sum_j G_bj = -s_b; the log-softmax backward G - p * sum(G) then gives p_j s_b (lambda_s on neighbours)
        # - g at the label in one fused pass over B x C, exactly like the nll + log-softmax backward of CE.
        fix = wp * scale[:, None]
        fix.select(1, 0).fill_(-g)
        sparse_grad = torch.zeros_like(out).scatter_add_(1, idx, fix)
        grad = torch.ops.aten._log_softmax_backward_data(sparse_grad, out, 1, out.dtype)
        return grad.to(ctx.in_dtype), None, None, None, None


@LOSSES.register(
    "neighbor_silencing",
    paper="neighbor-silencing loss of category extrapolation with auxiliary open-set classes",
    formula="L = log(1 + sum_{j != y} lam_yj exp(log n_j - log n_y + z_j - z_y)); lam_yj = lambda_s on pairs, else 1",
    description="Balanced Softmax with the (target, auxiliary) neighbour pairs down-weighted by lambda_s",
)
class NeighborSilencingCE(nn.Module):
    """Neighbor-silencing cross-entropy over L target + K auxiliary classes.

    For a sample of class ``y``::

        L = log(1 + sum_{j != y} lam_yj * exp(log n_j - log n_y + z_j - z_y)),

    ``lam_yj = lambda_s`` when ``{y, j}`` is a neighbour pair (in either order), otherwise 1. With
    ``lambda_s = 1`` or no pairs it equals :class:`~neighborlt.losses.softmax.BalancedSoftmaxCE`. Silencing a
    pair (``lambda_s < 1``) stops a target and its visually similar auxiliary classes from being pushed apart
    as hard as unrelated classes, so the auxiliary images shape the target's features without stealing its
    decision region.

    ``n_j`` is the number of training images of class ``j`` *used per epoch*: for a target class all its
    images, for an auxiliary class the images drawn per epoch after the per-class cap M (``min(M, images)``;
    ``neighborlt.train.samplers.effective_class_counts`` computes it).

    Soft (Mixup/CutMix) targets ``T`` [B, C] give the convex combination of the hard-label losses
    ``sum_c T_bc L(z_b, c)``: the Mixup/CutMix labels read only their neighbours' probabilities; a label-smoothing
    floor adds one sparse [C, C] x [C, B] product over the pairs (O(B * pairs) time, O(B * C) memory). Soft
    targets cost one or two host syncs per call on CUDA (the number of labels per row).

    Hard labels use :class:`_NeighborSilencingFn`, whose backward is the softmax backward plus sparse
    fix-ups on the label and neighbour entries of each row; memory is O(B * C + C * K_max), where K_max is
    the largest number of neighbours of one class.

    Args:
        class_counts: per-class image counts [C] (C = L + K, targets first).
        neighbor_pairs: int [P, 2] of (target index, auxiliary index) pairs, e.g.
            ``AuxTrainingSet.pairs``; None means no pairs.
        lambda_s: weight of a neighbour pair's term (the paper's lambda_s; 0.1 by default, 1 disables silencing).
            Must be >= 0; small values (< 1e-3) lose float32 precision when a neighbour takes nearly all the
            probability mass.

    Example:
        >>> from neighborlt.losses import BalancedSoftmaxCE
        >>> z, y = torch.zeros(1, 3), torch.tensor([1])
        >>> ns = NeighborSilencingCE([100, 10, 50], neighbor_pairs=[[1, 2]], lambda_s=0.1)
        >>> bool(ns(z, y) < BalancedSoftmaxCE([100, 10, 50])(z, y))
        True
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike, neighbor_pairs: PairsLike | None = None,
                 lambda_s: float = 0.1) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = len(counts)
        lambda_s = float(lambda_s)
        if not np.isfinite(lambda_s) or lambda_s < 0:
            raise ConfigError(f"lambda_s must be a finite number >= 0, got {lambda_s}")
        self.lambda_s = lambda_s
        register_counts(self, counts)
        sym = symmetric_pairs(neighbor_pairs, self.num_classes)
        index, is_nb = padded_neighbors(sym, self.num_classes)
        self.num_pairs = sym.shape[1] // 2
        self.register_buffer("pair_index", sym)
        self.register_buffer("neighbor_index", index)
        coef = torch.zeros(index.shape, dtype=torch.float64)
        coef[:, 1:] = is_nb.to(torch.float64) * (lambda_s - 1.0)
        self.register_buffer("neighbor_coef", coef)  # [C, K + 1]: 0 at the label column and on padding
        self.max_gathered_labels = 8  # soft targets with more non-floor entries per row use the sparse product
        self._cast_key: tuple[Any, ...] | None = None
        self._cast: tuple[torch.Tensor, torch.Tensor] = (self.log_counts, self.neighbor_coef)
        if index.numel() * 8 > 256 * 2**20:
            logger.warning("neighbor silencing: one class has %d neighbours, so the padded [C, K] neighbour table "
                           "takes %.0f MiB; check neighbors.json for an auxiliary class matched to very many "
                           "targets", index.shape[1] - 1, index.numel() * 16 / 2**20)
        logger.debug("neighbor silencing: C=%d, %d pairs, max degree %d, lambda_s=%g",
                     self.num_classes, self.num_pairs, index.shape[1] - 1, lambda_s)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` [B, C] against ``target`` (int64 [B] or float [B, C])."""
        soft = check_target(logits, target, self.num_classes)
        if not soft:
            log_counts, coef = self._tables(work_dtype(logits))
            return _NeighborSilencingFn.apply(logits, target, log_counts, self.neighbor_index, coef)
        return self._soft(logits, target)

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_counts`` and ``neighbor_coef`` cast to ``dtype`` once (cached; ``.to()``/``.cuda()`` reset it)."""
        key = (dtype, self.log_counts.device, self.log_counts._version, self.neighbor_coef._version)
        if self._cast_key != key:
            self._cast = (self.log_counts.to(dtype), self.neighbor_coef.to(dtype))
            self._cast_key = key
        return self._cast

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> NeighborSilencingCE:
        self._cast_key = None
        return super()._apply(fn, *args, **kwargs)

    def _soft(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``mean_b sum_c T_bc (log(1 + c_bc) - log p_bc)`` with ``c_bc = (lambda_s - 1) sum_{k in N(c)} p_bk``.

        The target is split into a per-row floor (label smoothing, ``min_c T_bc``) and a sparse rest (the one or
        two Mixup/CutMix labels). The rest reads ``c_bc`` only at the neighbours of its labels (gathers); the floor,
        when non-zero, needs ``c_bc`` for every class: one sparse [C, C] x [C, B] product over the pairs.
        """
        dt = work_dtype(logits)
        log_counts, coef = self._tables(dt)
        out = torch.log_softmax(logits.to(dt) + log_counts, dim=1)
        t = target.to(dt)
        loss = -(t * out).sum(1)  # the soft cross-entropy on z + log n, i.e. soft Balanced Softmax
        if self.num_pairs == 0 or self.lambda_s == 1.0:
            return loss.mean()
        floor = t.amin(1)
        k = min(self.max_gathered_labels + 1, self.num_classes)
        top, labels = t.topk(k, dim=1)  # the Mixup/CutMix labels; the floor fills the remaining columns
        if k == self.num_classes or not bool((top[:, -1] > floor).any()):
            weight = top - floor[:, None]  # [B, k]; 0 on columns that only hold the floor
            b = labels.shape[0]
            flat = labels.reshape(-1)
            nb_idx = self.neighbor_index.index_select(0, flat).reshape(b, -1)  # [B, k * (K + 1)]
            p_nb = out.gather(1, nb_idx).exp().reshape(b * k, -1)
            corr = (coef.index_select(0, flat) * p_nb).sum(1).reshape(b, k)
            loss = loss + (weight * torch.log1p(corr)).sum(1)
            dense = floor[:, None] if bool((floor > 0).any()) else None
        else:  # a genuinely dense soft target
            dense = t
        if dense is not None:
            vals = torch.full((self.pair_index.shape[1],), self.lambda_s - 1.0, dtype=dt, device=logits.device)
            adj = torch.sparse_coo_tensor(self.pair_index, vals, (self.num_classes, self.num_classes),
                                          is_coalesced=True, check_invariants=False)
            with torch.autocast(logits.device.type, enabled=False):
                corr_all = torch.sparse.mm(adj, out.exp().t()).t()  # [B, C]; adj is symmetric
            loss = loss + (dense * torch.log1p(corr_all)).sum(1)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, pairs={self.num_pairs}, lambda_s={self.lambda_s}"
