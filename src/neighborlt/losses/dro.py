"""DRO-LT: distributional robustness loss on backbone features (Samuel & Chechik, ICCV 2021), combined with CE."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._common import LOSSES, CountsLike, as_counts, check_target, register_counts, work_dtype

logger = logging.getLogger(__name__)


@LOSSES.register(
    "dro",
    paper="https://arxiv.org/abs/2104.03066",
    code="https://github.com/dvirsamuel/DRO-LT (losses.py)",
    formula=("L = lambda_ce * CE(z, y) + (1 - lambda_ce) * L_rob;  L_rob = mean_c mean_{i: y_i = c} "
             "-log[ exp((-||f_i - mu_c|| - eps_c) / T) / sum_{j in batch} exp(-(||f_j - mu_c|| + eps_c [y_j = c]) / T) ]"),
    description="DRO-LT (Samuel & Chechik, ICCV 2021): centroid-distance robustness loss with learned margins",
)
class DROLoss(nn.Module):
    """Distributional Robustness Loss for long-tail learning (DRO-LT; Samuel & Chechik, ICCV 2021) plus CE.

    With backbone features ``f`` [B, D], class centroids ``mu_c`` (detached) and learned per-class margins
    ``eps_c`` (``nn.Parameter``, initialised to 1 as in the official code), the robustness term is, for each
    class ``c`` present in the batch::

        l(c, j)   = -(||f_j - mu_c||_2 + eps_c * [y_j = c]) / T
        L_rob(c)  = -mean_{i: y_i = c} ( l(c, i) - logsumexp_{j in batch} l(c, j) )

    averaged over the classes present in the batch (``losses.py`` of github.com/dvirsamuel/DRO-LT: the softmax of
    each centroid runs over the batch samples, the margin is added to the distance of the positives, and the
    loss is ``loss.sum() / len(classes)``; ``base_temperature = temperature``). The total is
    ``lambda_ce * CE + (1 - lambda_ce) * L_rob``; the official training script adds the two with weight 1 each
    (``--feat_loss ce_lt,robust_loss``), which is ``lambda_ce = 0.5`` up to a factor of 2.

    Deviations from the official code, all forced by training end to end in one pass:

    * Centroids: the official script recomputes them before each epoch with an extra pass over the training
      set in eval mode. Here the detached features seen during the previous epoch are accumulated and
      ``epoch_start(epoch)`` turns them into centroids (under DDP the sums are all-reduced). During the first
      epoch (no previous epoch) running centroids of the batches seen so far, the current one included, are
      used; a class absent from the previous epoch keeps its older centroid, or gets its running one.
    * The official code trains the feature extractor with ``CE`` weighted by ``n_c / max n`` (``ce_lt``) and then
      re-trains the classifier; here one loss trains both, with plain CE (``ce="ce"``) or Balanced Softmax
      (``ce="balanced_softmax"``) on the logits.
    * Soft (Mixup/CutMix) targets: the CE term uses the soft target; the robustness term uses each row's
      dominant class (``argmax``).

    The margins are parameters of this module: the engine must pass ``loss.parameters()`` to the optimizer and
    move the module to the training device. ``needs_features = True``: call ``loss(logits, target,
    features=f)`` with the pooled features of ``model.forward_features``.

    Args:
        class_counts: per-class training counts [C].
        feature_dim: feature size D; None allocates the centroid buffers at the first call.
        temperature: T (the paper's default 0.07).
        lambda_ce: weight of the CE term in ``[0, 1]``.
        ce: ``"ce"`` or ``"balanced_softmax"`` for the classifier term.
        epsilon_init: initial margin ``eps_c``.
    """

    needs_features = True

    def __init__(self, class_counts: CountsLike, feature_dim: int | None = None, temperature: float = 0.07,
                 lambda_ce: float = 0.5, ce: Literal["ce", "balanced_softmax"] = "ce",
                 epsilon_init: float = 1.0) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        self.num_classes = c = len(counts)
        if temperature <= 0:
            raise ConfigError(f"DRO temperature must be > 0, got {temperature}")
        if not 0.0 <= lambda_ce <= 1.0:
            raise ConfigError(f"DRO lambda_ce must be in [0, 1], got {lambda_ce}")
        if ce not in ("ce", "balanced_softmax"):
            raise ConfigError(f"DRO ce must be 'ce' or 'balanced_softmax', got {ce!r}")
        self.temperature = float(temperature)
        self.lambda_ce = float(lambda_ce)
        self.ce = ce
        register_counts(self, counts)
        self.epsilons = nn.Parameter(torch.full((c,), float(epsilon_init)))
        d = int(feature_dim) if feature_dim else 0
        self.register_buffer("centroids", torch.zeros(c, d))
        self.register_buffer("has_centroid", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("feature_sum", torch.zeros(c, d, dtype=torch.float64))
        self.register_buffer("feature_count", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("last_epoch", torch.tensor(-1, dtype=torch.int64))

    # -- centroid state -------------------------------------------------------------------------------------

    def _ensure_dim(self, d: int, device: torch.device) -> None:
        if self.centroids.shape[1] == d:
            return
        if self.centroids.shape[1] != 0:
            raise ValueError(f"DROLoss was built for {self.centroids.shape[1]}-d features, got {d}-d")
        c = self.num_classes
        self.centroids = torch.zeros(c, d, device=device)
        self.feature_sum = torch.zeros(c, d, dtype=torch.float64, device=device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # lazily sized buffers: take the feature size of the checkpoint
        key = prefix + "centroids"
        if key in state_dict and self.centroids.shape != state_dict[key].shape and self.centroids.shape[1] == 0:
            self._ensure_dim(state_dict[key].shape[1], self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def epoch_start(self, epoch: int) -> None:
        """Turn the features accumulated during the previous epoch into class centroids (idempotent per epoch).

        Args:
            epoch: index of the epoch about to start; a repeated call with the same index does nothing.
        """
        if int(self.last_epoch) == epoch:
            return
        sums, counts = self.feature_sum, self.feature_count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        seen = counts > 0
        if seen.any():
            self.centroids[seen] = (sums[seen] / counts[seen, None]).to(self.centroids.dtype)
            self.has_centroid |= seen
        sums.zero_()
        counts.zero_()
        self.last_epoch.fill_(epoch)
        logger.debug("DRO epoch %d: centroids for %d/%d classes", epoch, int(self.has_centroid.sum()),
                     self.num_classes)

    @torch.no_grad()
    def _accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        f = features.detach().to(torch.float64)
        self.feature_sum.index_add_(0, labels, f)
        self.feature_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def current_centroids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids used now: the previous epoch's, else the running mean of this epoch; and a validity mask."""
        running = self.feature_sum / self.feature_count.clamp_min(1.0)[:, None]
        cent = torch.where(self.has_centroid[:, None], self.centroids.to(torch.float64), running)
        return cent, self.has_centroid | (self.feature_count > 0)

    # -- loss -----------------------------------------------------------------------------------------------

    def robust_loss(self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """The DRO-LT term for features [B, D], labels [B] and (detached) centroids [C, D]."""
        dt = work_dtype(features)
        f = features.to(dt)
        mu = centroids.to(dt)[labels]  # [B, D]: the centroid of each anchor's class
        dist = torch.cdist(mu, f)  # [B(anchor class), B(sample)]
        same = labels[:, None] == labels[None, :]
        logit = -(dist + same * self.epsilons.to(dt)[labels][:, None]) / self.temperature
        log_prob_pos = logit.diagonal() - torch.logsumexp(logit, dim=1)  # sample i against its class centroid
        per_class_n = torch.bincount(labels, minlength=self.num_classes).to(dt)
        n_present = (per_class_n > 0).sum()
        return -(log_prob_pos / per_class_n[labels]).sum() / n_present

    def forward(self, logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``lambda_ce * CE(logits, target) + (1 - lambda_ce) * L_rob(features)`` (mean over the batch).

        Args:
            logits: [B, C].
            target: int64 [B] or soft target float [B, C].
            features: pooled backbone features [B, D] (required).
        """
        soft = check_target(logits, target, self.num_classes)
        if features is None or features.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise ValueError("DROLoss needs features=[B, D] (the pooled backbone features of the same batch)")
        dt = work_dtype(logits)
        z = logits.to(dt)
        if self.ce == "balanced_softmax":
            z = z + self.log_counts.to(dt)
        labels = target.argmax(1) if soft else target
        ce = F.cross_entropy(z, target.to(dt) if soft else target)
        self._ensure_dim(features.shape[1], features.device)
        if self.training and torch.is_grad_enabled():
            self._accumulate(features, labels)
        centroids, _ = self.current_centroids()
        with torch.autocast(features.device.type, enabled=False):  # distances in float32 even under bf16 autocast
            rob = self.robust_loss(features, labels, centroids.detach())
        return self.lambda_ce * ce + (1.0 - self.lambda_ce) * rob

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, temperature={self.temperature}, lambda_ce={self.lambda_ce}, "
                f"ce={self.ce!r}")
