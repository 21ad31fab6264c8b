"""Training: models, optimisers and schedules, samplers, datasets/transforms, the feature cache, the engine.

Building blocks are importable directly; the engine names (``run_train``, ``TrainConfig``, ``TrainResult``,
``predict_logits``) are loaded on first use so that importing this package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .models import MODELS, classifier_keys, create_model, model_normalization
from .optim import build_optimizer, build_scheduler
from .samplers import EpochSampler, build_sampler, effective_class_counts

_LAZY = {
    "ImageSetDataset": "data",
    "build_transform": "data",
    "extract_features": "features",
    "run_train": "engine",
    "TrainConfig": "engine",
    "TrainResult": "engine",
    "predict_logits": "engine",
}

__all__ = [
    "MODELS",
    "EpochSampler",
    "ImageSetDataset",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_sampler",
    "build_scheduler",
    "build_transform",
    "classifier_keys",
    "create_model",
    "effective_class_counts",
    "extract_features",
    "model_normalization",
    "predict_logits",
    "run_train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
