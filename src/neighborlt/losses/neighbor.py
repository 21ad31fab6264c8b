"""Neighbor-silencing cross-entropy: Balanced Softmax with the target/auxiliary neighbour pairs (and optionally the
auxiliary-vs-auxiliary terms) down-weighted or masked.

For a sample of class ``y`` with logits ``z`` and per-class image counts ``n``::

    L = log(1 + sum_{j != y} lam_yj * exp(log n_j - log n_y + z_j - z_y))
      = logsumexp_j(a_j + log lam_yj) - a_y,       a = z + log n,  lam_yy = 1,

with ``lam_yj = lambda_s`` when ``{y, j}`` is a neighbour pair (in either order); otherwise, when ``num_targets``
= L is given and both ``y`` and ``j`` are auxiliary classes (``>= L``), ``aux_weight``; otherwise 1.
``lambda_s = aux_weight = 0`` is the hard mask of the paper's official code (``mask_type
"no_fm_remove_normal_neg_back"``): a target sample does not compete with its own auxiliary classes, an auxiliary
sample competes only with the targets that are not its parents.

The loss is a cross-entropy on the shifted logits ``a + log lam_y.``: per row a column range (the auxiliary block
``L..C-1`` of an auxiliary-class row gets ``log aux_weight``) and the ``|N(y)| + 1`` entries of the label and its
neighbours (``log lambda_s``; the label back to 0). :class:`_NeighborSilencingFn` builds that shift in place (one
B x C buffer), runs one log-softmax forward and the fused log-softmax backward of a one-hot upstream gradient, so
the cost is that of :class:`~neighborlt.losses.softmax.BalancedSoftmaxCE` and the memory O(B * C + C * K_max),
K_max the largest number of neighbours of one class; no C x C matrix is ever built. ``log 0 = -inf`` masks a
term exactly (its probability and gradient are exactly 0, the loss stays finite: the label term is never masked).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..defaults import LAMBDA_S
from ..errors import ConfigError
from ._common import LOSSES, CountsLike, as_counts, check_target, register_counts, work_dtype

logger = logging.getLogger(__name__)

PairsLike = torch.Tensor | np.ndarray | Sequence[Sequence[int]]

#: Named silencing settings (``loss_params={"silencing": NAME}`` of a ``neighbor_silencing`` run, or
#: ``--loss-param silencing=NAME``): ``paper`` is the paper's equation (λs = 0.1 on the pairs, auxiliary classes
#: compete with each other as usual); ``official`` is the hard mask of the authors' code (pairs and every
#: auxiliary-vs-auxiliary term masked).
SILENCING_PRESETS: dict[str, dict[str, float]] = {
    "paper": {"lambda_s": LAMBDA_S, "aux_weight": 1.0},
    "official": {"lambda_s": 0.0, "aux_weight": 0.0},
}


def resolve_silencing(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (keyword arguments of :class:`NeighborSilencingCE`) with a ``silencing`` preset name
    (:data:`SILENCING_PRESETS`, or ``"custom"`` = none) replaced by its ``lambda_s`` / ``aux_weight``.

    Raises:
        ConfigError: an unknown name, or a ``lambda_s`` / ``aux_weight`` given next to a preset that sets it
            otherwise.
    """
    out = dict(params)
    name = out.pop("silencing", None)
    if name is None or name == "custom":
        return out
    if name not in SILENCING_PRESETS:
        raise ConfigError(f"silencing={name!r}: choose one of custom, {', '.join(SILENCING_PRESETS)}")
    for key, value in SILENCING_PRESETS[name].items():
        if key in out and float(out[key]) != value:
            raise ConfigError(f"silencing={name!r} sets {key}={value:g}; drop {key}={out[key]} or use "
                              "silencing=custom")
        out[key] = value
    return out


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


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _shift_(a: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None, logw: torch.Tensor | None,
            num_targets: int | None, log_aux: float) -> torch.Tensor:
    """Add ``log lam_{y_b j}`` to ``a`` [B, C] in place (``a`` must not be needed by autograd) and return it.

    ``num_targets`` (when not None) adds ``log_aux`` to the auxiliary column range of the rows whose label is an
    auxiliary class; ``index``/``logw`` ([C, K + 1], column 0 = the class itself with weight 0, then its neighbours
    with ``log lambda_s``, padding = the class itself with 0) then write the label and neighbour entries as
    ``a + log lam`` from their values before the shift (so a neighbour's ``lambda_s`` replaces ``aux_weight``, and
    the label's own entry is restored)."""
    idx = v = None
    if index is not None:
        idx = index.index_select(0, target)  # [B, K + 1]: the label, then its neighbours (padding repeats it)
        v = a.gather(1, idx)
    if num_targets is not None:
        off = torch.zeros(target.shape[0], dtype=a.dtype, device=a.device).masked_fill_(target >= num_targets, log_aux)
        a.narrow(1, num_targets, a.shape[1] - num_targets).add_(off[:, None])  # the auxiliary block: a column range
    if idx is not None and v is not None and logw is not None:
        a.scatter_(1, idx, v.add_(logw.index_select(0, target)))  # duplicates (padding) write the same value
    return a


class _NeighborSilencingFn(torch.autograd.Function):
    """Mean neighbor-silencing loss of hard labels with a fused backward.

    Forward: ``out = log_softmax(z + log n + log lam_y.)`` (the shift of :func:`_shift_`, ``-inf`` where a term is
    masked), ``loss = -mean_b out[b, y_b]``. Backward (``g`` = upstream grad / B): the log-softmax backward of the
    one-hot upstream gradient ``-g [j = y_b]``, i.e. ``grad = g (softmax(out)_j - [j = y_b])``: exactly the fused
    nll + log-softmax backward of cross-entropy; a masked entry has probability and gradient exactly 0.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, log_counts: torch.Tensor,
                index: torch.Tensor | None, logw: torch.Tensor | None, num_targets: int | None,
                log_aux: float) -> torch.Tensor:  # type: ignore[override]
        # log_counts and logw arrive already in the working dtype (see NeighborSilencingCE._tables)
        a = logits.to(log_counts.dtype) + log_counts  # a fresh [B, C] buffer: shifted in place
        out = torch.log_softmax(_shift_(a, target, index, logw, num_targets, log_aux), dim=1)
        del a
        loss = out.gather(1, target[:, None]).mean().neg()
        ctx.save_for_backward(out, target)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        out, target = ctx.saved_tensors
        g = (grad_loss / out.shape[0]).to(out.dtype)
        upstream = torch.zeros_like(out).scatter_(1, target[:, None], (-g).expand(out.shape[0], 1).contiguous())
        grad = torch.ops.aten._log_softmax_backward_data(upstream, out, 1, out.dtype)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


@LOSSES.register(
    "neighbor_silencing",
    paper="neighbor-silencing loss of category extrapolation with auxiliary open-set classes",
    formula="L = log(1 + sum_{j != y} lam_yj exp(log n_j - log n_y + z_j - z_y)); lam_yj = lambda_s on pairs, "
            "aux_weight between two auxiliary classes (num_targets given), else 1",
    description="Balanced Softmax with the (target, auxiliary) neighbour pairs down-weighted by lambda_s "
                "(and the auxiliary-vs-auxiliary terms by aux_weight); lambda_s = aux_weight = 0 is the "
                "authors' hard mask",
)
class NeighborSilencingCE(nn.Module):
    """Neighbor-silencing cross-entropy over L target + K auxiliary classes.

    For a sample of class ``y``::

        L = log(1 + sum_{j != y} lam_yj * exp(log n_j - log n_y + z_j - z_y)),

    ``lam_yj = lambda_s`` when ``{y, j}`` is a neighbour pair (in either order); otherwise, when ``num_targets``
    = L is given and ``y, j >= L`` (two auxiliary classes, ``j != y``), ``aux_weight``; otherwise 1. With
    ``lambda_s = aux_weight = 1`` (or no pairs and ``aux_weight = 1``) it equals
    :class:`~neighborlt.losses.softmax.BalancedSoftmaxCE`. Silencing a pair (``lambda_s < 1``) stops a target and
    its visually similar auxiliary classes from being pushed apart as hard as unrelated classes.
    ``lambda_s = 0, aux_weight = 0`` (:data:`SILENCING_PRESETS` ``"official"``) is the hard mask of the paper's
    official code: a target-class sample does not compete with its own auxiliary classes; an auxiliary-class
    sample competes with neither its parent targets nor any other auxiliary class. Masked terms are exact (``log
    0 = -inf`` in the shifted logits: zero probability, zero gradient, finite loss).

    ``n_j`` is the number of training images of class ``j`` *used per epoch*: for a target class all its
    images, for an auxiliary class the images drawn per epoch after the per-class cap M (``min(M, images)``;
    ``neighborlt.train.samplers.effective_class_counts`` computes it).

    Soft (Mixup/CutMix) targets ``T`` [B, C] give the convex combination of the hard-label losses
    ``sum_c T_bc L(z_b, c)``: each Mixup/CutMix label costs one more shifted log-softmax (exact, like the hard
    path); a label-smoothing floor adds one sparse [C, C] x [C, B] product over the pairs plus the auxiliary
    block's row sums (O(B * (C + pairs)) time, O(B * C) memory). Soft targets cost one or two host syncs per call
    on CUDA (the number of labels per row).

    Args:
        class_counts: per-class image counts [C] (C = L + K, targets first).
        neighbor_pairs: int [P, 2] of (target index, auxiliary index) pairs, e.g.
            ``AuxTrainingSet.pairs``; None means no pairs.
        lambda_s: weight of a neighbour pair's term (the paper's lambda_s; ``neighborlt.defaults.LAMBDA_S`` = 0.1
            by default, 1 disables silencing, 0 masks the pair). Must be >= 0.
        num_targets: L, the number of target classes (outputs ``0..L-1``); needed for ``aux_weight``. The engine
            passes it.
        aux_weight: weight of the term of another auxiliary class in an auxiliary-class sample's loss (1: as in
            the paper's equation; 0: masked, as in the official code). Must be >= 0; != 1 needs ``num_targets``.

    Example:
        >>> from neighborlt.losses import BalancedSoftmaxCE
        >>> z, y = torch.zeros(1, 3), torch.tensor([1])
        >>> ns = NeighborSilencingCE([100, 10, 50], neighbor_pairs=[[1, 2]], lambda_s=0.1)
        >>> bool(ns(z, y) < BalancedSoftmaxCE([100, 10, 50])(z, y))
        True
    """

    needs_features = False

    def __init__(self, class_counts: CountsLike, neighbor_pairs: PairsLike | None = None,
                 lambda_s: float = LAMBDA_S, num_targets: int | None = None, aux_weight: float = 1.0) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = c = len(counts)
        lambda_s, aux_weight = float(lambda_s), float(aux_weight)
        if not np.isfinite(lambda_s) or lambda_s < 0:
            raise ConfigError(f"lambda_s must be a finite number >= 0, got {lambda_s}")
        if not np.isfinite(aux_weight) or aux_weight < 0:
            raise ConfigError(f"aux_weight must be a finite number >= 0, got {aux_weight}")
        if num_targets is not None:
            if isinstance(num_targets, bool) or int(num_targets) != num_targets or not 0 <= int(num_targets) <= c:
                raise ConfigError(f"num_targets must be an integer in 0..{c} (the number of target classes L), "
                                  f"got {num_targets}")
            num_targets = int(num_targets)
        elif aux_weight != 1.0:
            raise ConfigError(f"aux_weight={aux_weight:g} needs num_targets (L, the number of target classes) to "
                              "know which outputs are auxiliary")
        self.lambda_s, self.aux_weight, self.num_targets = lambda_s, aux_weight, num_targets
        register_counts(self, counts)
        sym = symmetric_pairs(neighbor_pairs, c)
        index, is_nb = padded_neighbors(sym, c)
        self.num_pairs = sym.shape[1] // 2
        self.register_buffer("pair_index", sym)
        self.register_buffer("neighbor_index", index)
        logw = torch.zeros(index.shape, dtype=torch.float64)
        logw[:, 1:].masked_fill_(is_nb, _log(lambda_s))
        self.register_buffer("neighbor_logw", logw)  # [C, K + 1]: 0 at the label column and on padding
        # the auxiliary block acts only with >= 2 auxiliary classes and aux_weight != 1
        self._aux_active = num_targets is not None and aux_weight != 1.0 and c - num_targets >= 2
        self._pairs_active = self.num_pairs > 0 and lambda_s != 1.0
        self.max_gathered_labels = 8  # soft targets with more non-floor entries per row use the sparse product
        self._cast_key: tuple[Any, ...] | None = None
        self._cast: tuple[torch.Tensor, torch.Tensor] = (self.log_counts, self.neighbor_logw)
        if index.numel() * 8 > 256 * 2**20:
            logger.warning("neighbor silencing: one class has %d neighbours, so the padded [C, K] neighbour table "
                           "takes %.0f MiB; check neighbors.json for an auxiliary class matched to very many "
                           "targets", index.shape[1] - 1, index.numel() * 16 / 2**20)
        logger.debug("neighbor silencing: C=%d, %d pairs, max degree %d, lambda_s=%g, aux_weight=%g, L=%s",
                     c, self.num_pairs, index.shape[1] - 1, lambda_s, aux_weight, num_targets)

    def effective_params(self) -> dict[str, float]:
        """The weights this loss trains with (``model.json`` records them): ``lambda_s`` and ``aux_weight``."""
        return {"lambda_s": self.lambda_s, "aux_weight": self.aux_weight}

    @property
    def is_balanced_softmax(self) -> bool:
        """True when no term is re-weighted (the loss is exactly Balanced Softmax)."""
        return not (self._aux_active or self._pairs_active)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` [B, C] against ``target`` (int64 [B] or float [B, C])."""
        soft = check_target(logits, target, self.num_classes)
        if not soft:
            log_counts, logw = self._tables(work_dtype(logits))
            if self.is_balanced_softmax:
                return _NeighborSilencingFn.apply(logits, target, log_counts, None, None, None, 0.0)
            return _NeighborSilencingFn.apply(logits, target, log_counts, self.neighbor_index, logw,
                                              self.num_targets if self._aux_active else None,
                                              _log(self.aux_weight))
        return self._soft(logits, target)

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_counts`` and ``neighbor_logw`` cast to ``dtype`` once (cached; ``.to()``/``.cuda()`` reset it)."""
        key = (dtype, self.log_counts.device, self.log_counts._version, self.neighbor_logw._version)
        if self._cast_key != key:
            self._cast = (self.log_counts.to(dtype), self.neighbor_logw.to(dtype))
            self._cast_key = key
        return self._cast

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> NeighborSilencingCE:
        self._cast_key = None
        return super()._apply(fn, *args, **kwargs)

    def _offsets(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The constant shift ``log lam_{labels_b, j}`` [B, C] (0 / log lambda_s / log aux_weight)."""
        _, logw = self._tables(like.dtype)
        w = torch.zeros(labels.shape[0], self.num_classes, dtype=like.dtype, device=like.device)
        return _shift_(w, labels, self.neighbor_index, logw, self.num_targets if self._aux_active else None,
                       _log(self.aux_weight))

    def _log_mass(self, out: torch.Tensor) -> torch.Tensor:
        """``log S_bc = log sum_j lam_cj p_bj`` [B, C] for every label c at once (``p = exp(out)``):
        ``S = base_c + sum_{k in N(c)} (lambda_s - base_ck) p_k`` with ``base_c`` = 1 for a target label and
        ``P_targets + aux_weight (P_aux - p_c) + p_c`` for an auxiliary one (``base_ck`` = aux_weight between two
        auxiliary classes, else 1); clamped below at ``p_c`` (``S >= p_c`` exactly) against cancellation."""
        p = out.exp()
        s = torch.ones_like(p)
        if self._aux_active:
            L = int(self.num_targets)  # type: ignore[arg-type]
            pa = p[:, L:]
            mass_t = p[:, :L].sum(1, keepdim=True)
            s = torch.cat([s[:, :L], mass_t + self.aux_weight * (pa.sum(1, keepdim=True) - pa) + pa], 1)
        if self.num_pairs:
            rows, cols = self.pair_index[0], self.pair_index[1]
            base = torch.ones(rows.shape[0], dtype=p.dtype, device=p.device)
            if self._aux_active:
                L = int(self.num_targets)  # type: ignore[arg-type]
                base = base.masked_fill((rows >= L) & (cols >= L), self.aux_weight)
            vals = self.lambda_s - base
            adj = torch.sparse_coo_tensor(self.pair_index, vals, (self.num_classes, self.num_classes),
                                          is_coalesced=True, check_invariants=False)
            with torch.autocast(p.device.type, enabled=False):
                s = s + torch.sparse.mm(adj, p.t()).t()  # [B, C]; adj is symmetric
        return torch.maximum(torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)), out)

    def _soft(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``mean_b sum_c T_bc L(z_b, c)``.

        The target is split into a per-row floor (label smoothing, ``min_c T_bc``) and a sparse rest (the one or
        two Mixup/CutMix labels). Each label of the rest costs one shifted logsumexp (exact, as the hard path); the
        floor, when non-zero, needs ``L(z_b, c) = log S_bc - log p_bc`` for every class: :meth:`_log_mass`.
        """
        dt = work_dtype(logits)
        log_counts, _ = self._tables(dt)
        a = logits.to(dt) + log_counts
        out = torch.log_softmax(a, dim=1)
        t = target.to(dt)
        if self.is_balanced_softmax:
            return -(t * out).sum(1).mean()  # the soft cross-entropy on z + log n, i.e. soft Balanced Softmax
        floor = t.amin(1)
        k = min(self.max_gathered_labels + 1, self.num_classes)
        top, labels = t.topk(k, dim=1)  # the Mixup/CutMix labels; the floor fills the remaining columns
        if k == self.num_classes or not bool((top[:, -1] > floor).any()):
            weight = top - floor[:, None]  # [B, k]; 0 on columns that only hold the floor
            used = int((weight > 0).sum(1).max())  # labels per row above the floor (columns sorted by weight)
            loss = torch.zeros(t.shape[0], dtype=dt, device=t.device)
            for col in range(used):
                y = labels[:, col]
                lse = torch.logsumexp(a + self._offsets(y, a), dim=1)
                loss = loss + weight[:, col] * (lse - a.gather(1, y[:, None])[:, 0])
            dense = floor[:, None] if bool((floor > 0).any()) else None
        else:  # a genuinely dense soft target
            loss = torch.zeros(t.shape[0], dtype=dt, device=t.device)
            dense = t
        if dense is not None:
            loss = loss + (dense * (self._log_mass(out) - out)).sum(1)
        return loss.mean()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, pairs={self.num_pairs}, lambda_s={self.lambda_s}, "
                f"num_targets={self.num_targets}, aux_weight={self.aux_weight}")
