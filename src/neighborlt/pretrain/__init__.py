"""Pre-training of a backbone on a run's own images (stage ``pretrain``): the paper's from-scratch paradigm, MAE on
the long-tailed target data as LiVT does (Appendix B.1), writing ``RUN/pretrain/encoder.safetensors`` for
``neighborlt train --init``.

Modules: ``config`` (PretrainConfig, PretrainResult; LiVT's recipe as defaults), ``mae`` (MaskedAutoencoder on a
timm ViT, after facebookresearch/mae ``models_mae.py``), ``stage`` (run_pretrain). Names load on first use, so
importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PretrainConfig": "config",
    "PretrainResult": "config",
    "MaskedAutoencoder": "mae",
    "run_pretrain": "stage",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
