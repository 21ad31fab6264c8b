"""Training: models, optimisers and schedules, samplers, datasets/transforms, the feature cache, the engine.

Every name is loaded from its module on first use, so that importing this package (or its light
``neighborlt.train.config``, which the CLI reads at start-up) does not import torch or timm.

Modules: ``config`` (TrainConfig, TrainResult), ``engine`` (run_train), ``inference`` (load_trained_model,
predict_logits), ``heads`` (FeatureHead), ``crt``, ``models``, ``optim``, ``samplers``, ``data``, ``features``,
``checkpoint``, ``ddp``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MODELS": "models",
    "classifier_keys": "models",
    "create_model": "models",
    "model_normalization": "models",
    "build_optimizer": "optim",
    "build_scheduler": "optim",
    "EpochSampler": "samplers",
    "build_sampler": "samplers",
    "effective_class_counts": "samplers",
    "ImageSetDataset": "data",
    "build_transform": "data",
    "extract_features": "features",
    "FeatureHead": "heads",
    "run_train": "engine",
    "TrainConfig": "config",
    "TrainResult": "config",
    "load_trained_model": "inference",
    "predict_logits": "inference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
