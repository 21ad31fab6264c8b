"""Epoch samplers: random, class-balanced and square-root, all with the auxiliary-class cap M.

Each epoch's index list is a pure function of ``(seed, epoch)`` and the labels: every auxiliary class
(label >= ``num_target_classes``) contributes at most ``aux_cap`` of its images, drawn afresh each epoch; all
target images are used. Under DDP every rank computes the same list, pads it (by wrapping around) to a multiple
of the world size and takes every ``world_size``-th entry starting at its rank, so ranks agree without
communicating.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from ..defaults import parse_aux_cap
from ..errors import ConfigError

logger = logging.getLogger(__name__)

SamplerKind = Literal["random", "class_balanced", "sqrt"]
SAMPLER_KINDS: tuple[str, ...] = ("random", "class_balanced", "sqrt")


def effective_class_counts(labels: np.ndarray | list[int], num_classes: int, num_target_classes: int | None = None,
                           aux_cap: int | None = None) -> np.ndarray:
    """Images per class used in one epoch: ``n_j`` for the long-tail losses.

    Target classes count all their images; an auxiliary class (index >= ``num_target_classes``) counts
    ``min(n_j, aux_cap)``, the number the sampler draws for it per epoch.

    Args:
        labels: int class index per training image.
        num_classes: C = L + K.
        num_target_classes: L; None means every class is a target class (no cap).
        aux_cap: M (>= 1, :func:`neighborlt.defaults.parse_aux_cap`); None means no cap.

    Returns:
        int64 array [C].

    Example:
        >>> effective_class_counts([0, 0, 0, 1, 1, 1], 2, num_target_classes=1, aux_cap=2).tolist()
        [3, 2]
    """
    aux_cap = parse_aux_cap(aux_cap)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.int64)
    if len(counts) > num_classes:
        raise ConfigError(f"labels go up to {len(counts) - 1} but num_classes is {num_classes}")
    if num_target_classes is not None and aux_cap is not None:
        counts[num_target_classes:] = np.minimum(counts[num_target_classes:], aux_cap)
    return counts


class EpochSampler(Sampler[int]):
    """A deterministic, resumable, DDP-aware epoch sampler (see the module docstring).

    Args:
        labels: int class index per training image.
        kind: ``"random"`` (a permutation of the epoch's images), ``"class_balanced"`` (each draw picks a class
            uniformly, then one of its images; Kang et al. 2020) or ``"sqrt"`` (class probability proportional
            to the square root of its image count). Balanced kinds draw with replacement and keep the epoch
            length equal to the number of images selected for the epoch.
        num_target_classes: L; classes ``>= L`` are auxiliary. None: all classes are targets.
        aux_cap: M, the most images an auxiliary class contributes per epoch (>= 1; 0 is refused, as everywhere:
            :func:`neighborlt.defaults.parse_aux_cap`); None: no cap.
        seed: base seed; the epoch list depends only on ``(seed, epoch)`` and the labels.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, labels: np.ndarray | list[int], kind: str = "random", *, num_target_classes: int | None = None,
                 aux_cap: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if kind not in SAMPLER_KINDS:
            raise ConfigError(f"unknown sampler {kind!r}; choose one of: {', '.join(SAMPLER_KINDS)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
        aux_cap = parse_aux_cap(aux_cap)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) == 0:
            raise ConfigError("the sampler got no training images")
        self.kind = kind
        self.num_target_classes = num_target_classes
        self.aux_cap = aux_cap
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._start = 0  # samples of this rank's list to skip (mid-epoch resume)
        self._fingerprint = hashlib.sha256(self.labels.tobytes()).hexdigest()[:16]
        # Indices of each class, in index order; the epoch draws come from these.
        order = np.argsort(self.labels, kind="stable")
        classes, starts = np.unique(self.labels[order], return_index=True)
        bounds = list(starts[1:]) + [len(order)]
        self._by_class = {int(c): order[s:e] for c, s, e in zip(classes, starts, bounds)}
        L = num_target_classes
        self._capped = {
            c: (aux_cap is not None and L is not None and c >= L and len(idx) > aux_cap)
            for c, idx in self._by_class.items()
        }
        self.total_size = sum(
            min(len(idx), aux_cap) if self._capped[c] else len(idx)  # type: ignore[type-var]
            for c, idx in self._by_class.items()
        )
        if self.total_size == 0:
            raise ConfigError("the sampler selects no images per epoch")
        self.num_samples = math.ceil(self.total_size / world_size)

    # -- epoch list -----------------------------------------------------------------------------------------

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x4E4C54]))

    def _selected(self, epoch: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
        """This epoch's images per class: all target images, ``aux_cap`` fresh draws per auxiliary class."""
        out = {}
        for c, idx in self._by_class.items():
            out[c] = rng.choice(idx, size=self.aux_cap, replace=False) if self._capped[c] else idx
        return out

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The full epoch list (all ranks, before padding), int64 [total_size]."""
        epoch = self.epoch if epoch is None else epoch
        rng = self._rng(epoch)
        sel = self._selected(epoch, rng)
        if self.kind == "random":
            idx = np.concatenate([sel[c] for c in sorted(sel)])
            return rng.permutation(idx)
        classes = np.array(sorted(sel), dtype=np.int64)
        sizes = np.array([len(sel[c]) for c in classes], dtype=np.float64)
        weights = np.ones_like(sizes) if self.kind == "class_balanced" else np.sqrt(sizes)
        weights[sizes == 0] = 0.0
        draws = rng.choice(len(classes), size=self.total_size, p=weights / weights.sum())
        out = np.empty(self.total_size, dtype=np.int64)
        # Group the draw positions by class in O(N log N) (C can be ~28k: no per-class scan of all draws).
        order = np.argsort(draws, kind="stable")
        per_class = np.bincount(draws, minlength=len(classes))
        start = 0
        for j in np.flatnonzero(per_class):
            pos = order[start:start + per_class[j]]
            start += per_class[j]
            out[pos] = rng.choice(sel[int(classes[j])], size=len(pos), replace=True)
        return out

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's share of the epoch list (padded by wrap-around to ``num_samples``)."""
        idx = self.epoch_indices(epoch)
        padded = self.num_samples * self.world_size
        if padded > len(idx):
            idx = np.concatenate([idx, np.resize(idx, padded - len(idx))])
        return idx[self.rank:padded:self.world_size]

    def epoch_counts(self, epoch: int | None = None) -> dict[str, int]:
        """Images of the epoch's full list (all ranks) from target and from auxiliary classes."""
        labels = self.labels[self.epoch_indices(epoch)]
        L = self.num_target_classes
        n_aux = int((labels >= L).sum()) if L is not None else 0
        return {"target": int(len(labels) - n_aux), "auxiliary": n_aux}

    # -- Sampler protocol -------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list the next iteration yields (call at the start of every epoch)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def skip(self, n: int) -> None:
        """Make the next iteration start after the first ``n`` samples of this rank's list (mid-epoch resume)."""
        self._start = max(0, int(n))

    def __iter__(self) -> Iterator[int]:
        idx = self.rank_indices()[self._start:]
        self._start = 0
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples

    # -- resume ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the next iteration (the list itself is recomputed)."""
        return {
            "epoch": self.epoch, "start": self._start, "seed": self.seed, "kind": self.kind,
            "num_target_classes": self.num_target_classes, "aux_cap": self.aux_cap,
            "world_size": self.world_size, "labels_sha256": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch and position; the sampler's configuration and labels must be the same."""
        for key in ("seed", "kind", "num_target_classes", "aux_cap", "labels_sha256"):
            mine = self._fingerprint if key == "labels_sha256" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"sampler state has {key}={state[key]!r} but this run has {mine!r}; resume with the same "
                    "configuration and data, or start a new run directory"
                )
        if state.get("world_size", self.world_size) != self.world_size:
            logger.warning("resuming with world size %d (checkpoint: %d); the epoch position restarts at 0",
                           self.world_size, state["world_size"])
            state = {**state, "start": 0}
        self.epoch = int(state["epoch"])
        self._start = int(state.get("start", 0))


def build_sampler(kind: str, labels: np.ndarray | list[int], *, num_target_classes: int | None = None,
                  aux_cap: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> EpochSampler:
    """Create an :class:`EpochSampler`.

    Args:
        kind: ``"random"``, ``"class_balanced"`` or ``"sqrt"``.
        labels: class index per training image (targets ``0..L-1``, auxiliary ``L..L+K-1``).
        num_target_classes: L (None: no auxiliary classes).
        aux_cap: M, images per auxiliary class per epoch (the method uses ``neighborlt.defaults.AUX_CAP`` = 50;
            None: all).
        seed: base seed.
        rank: this process's rank (``torch.distributed.get_rank()``).
        world_size: number of processes.

    Example:
        >>> s = build_sampler("random", [0] * 5 + [1] * 100, num_target_classes=1, aux_cap=10)
        >>> len(s), s.epoch_counts(0)
        (15, {'target': 5, 'auxiliary': 10})
    """
    return EpochSampler(labels, kind, num_target_classes=num_target_classes, aux_cap=aux_cap, seed=seed,
                        rank=rank, world_size=world_size)

