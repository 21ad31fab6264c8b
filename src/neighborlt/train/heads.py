"""Modules the engine trains besides :mod:`neighborlt.train.models`: the head of the frozen-feature protocol and
the wrapper that returns features with the logits."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["FeatureHead", "WithFeatures"]


class FeatureHead(nn.Module):
    """A linear or one-hidden-layer MLP classifier on frozen backbone features.

    Has the same interface as :func:`neighborlt.train.models.create_model` models (``forward``,
    ``forward_features``, ``num_features``, ``get_classifier``); the classifier is always ``fc``.

    Args:
        in_features: D, the width of the backbone features.
        num_classes: outputs (L + K while training, L after export / cRT).
        kind: ``"linear"`` or ``"mlp"`` (Linear + GELU, then ``fc``).
        hidden: hidden units of the MLP.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = 512) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ConfigError(f"unknown head {kind!r}; choose linear or mlp")
        self.kind = kind
        self.in_features = in_features
        if kind == "mlp":
            self.body: nn.Module = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU())
            self.num_features = hidden
        else:
            self.body = nn.Identity()
            self.num_features = in_features
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``fc`` ([B, num_features])."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.fc(self.body(x))

    def get_classifier(self) -> nn.Linear:
        """The final linear layer (``fc``)."""
        return self.fc


class WithFeatures(nn.Module):
    """Returns ``(logits, features)`` from one forward pass, so that DDP hooks see the whole computation
    (losses such as DRO-LT need the pooled features too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], features [B, D])``."""
        feats = self.model.forward_features(x)  # type: ignore[operator]
        return self.model.get_classifier()(feats), feats  # type: ignore[operator]
