"""neighborlt: long-tail image classification by category extrapolation.

Add open-set auxiliary classes that look like the target classes, train on both with the
neighbor-silencing loss, and drop the auxiliary classifier rows at inference.

The Python API mirrors the CLI; every name below is imported on first use, so ``import neighborlt`` stays light
(no torch)::

    import neighborlt

    predictor = neighborlt.load("runs/demo")            # a run dir, its export/ or its train/ folder
    predictor.predict("cat.jpg", top_k=5)                # what `neighborlt predict` prints; no cache is written
    predictor.predict([pil_image, uint8_array])          # one dict per image

    neighborlt.run_classes(neighborlt.ClassesConfig(protocol="cifar10-neighbours"), "runs/c10")
    neighborlt.run_neighbors(neighborlt.NeighborsConfig(backend="wordnet"), "runs/c10")
    ...                                                  # run_retrieve, run_filter, run_train, export_direct,
                                                         # run_eval, run_report; run_pipeline, run_ablation
    neighborlt.LOSSES.names(), neighborlt.SOURCES.names(), neighborlt.BACKENDS.names()
    neighborlt.list_models("resnet*"), neighborlt.create_model("resnet8_cifar", num_classes=10)
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, NeighborLTError
from .paths import resolve_data_dir
from .registry import Registry
from .rundir import RunDir

if TYPE_CHECKING:  # pragma: no cover
    from .ablate import AblationConfig, run_ablation
    from .classes import ClassesConfig, run_classes
    from .evaluate import EvalConfig, run_eval
    from .export import Predictor, export_direct, load, predict_images
    from .filter import FilterConfig, run_filter
    from .losses import LOSSES
    from .neighbors import BACKENDS, NeighborsConfig, run_neighbors
    from .pipeline import PipelineConfig, run_pipeline
    from .pretrain import PretrainConfig, run_pretrain
    from .report import ReportConfig, run_report
    from .retrieve import SOURCES, RetrieveConfig, run_retrieve
    from .train import MODELS, TrainConfig, create_model, run_train

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first attribute access).
_LAZY: dict[str, str] = {
    # stages, in pipeline order, and their configs
    "run_classes": "classes", "ClassesConfig": "classes",
    "run_neighbors": "neighbors", "NeighborsConfig": "neighbors",
    "run_retrieve": "retrieve", "RetrieveConfig": "retrieve",
    "run_filter": "filter", "FilterConfig": "filter",
    "run_pretrain": "pretrain", "PretrainConfig": "pretrain",
    "run_train": "train", "TrainConfig": "train",
    "export_direct": "export",
    "run_eval": "evaluate", "EvalConfig": "evaluate",
    "run_report": "report", "ReportConfig": "report",
    "run_pipeline": "pipeline", "PipelineConfig": "pipeline",
    "run_ablation": "ablate", "AblationConfig": "ablate",
    # inference
    "load": "export", "Predictor": "export", "predict_images": "export",
    # registries and the model factory
    "LOSSES": "losses", "SOURCES": "retrieve", "BACKENDS": "neighbors", "MODELS": "train",
    "create_model": "train",
}

__all__ = [
    "BACKENDS", "LOSSES", "MODELS", "SOURCES",
    "AblationConfig", "ClassesConfig", "ConfigError", "DataError", "EvalConfig", "FilterConfig", "NeighborLTError",
    "NeighborsConfig", "PipelineConfig", "Predictor", "PretrainConfig", "Registry", "ReportConfig", "RetrieveConfig",
    "RunDir",
    "TrainConfig", "__version__", "create_model", "export_direct", "list_models", "load", "predict_images",
    "resolve_data_dir", "run_ablation", "run_classes", "run_eval", "run_filter", "run_neighbors", "run_pipeline",
    "run_pretrain", "run_report", "run_retrieve", "run_train",
]


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use (PEP 562) and cache the attribute."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def list_models(filter: str = "", *, pretrained: bool = False, timm: bool = False) -> list[str]:
    """Model names :func:`create_model` accepts, in the style of ``timm.list_models``.

    Args:
        filter: a shell-style wildcard (``"resnet*"``); empty: every name.
        pretrained: only models with pretrained weights (``efficientnet_lite0``'s are offline; timm's need the
            internet or the Hugging Face cache).
        timm: also list timm's models (any timm name works in :func:`create_model`).

    Returns:
        neighborlt's own models first (sorted), then timm's (sorted, when ``timm``).

    Example:
        >>> list_models("*cifar")
        ['resnet32_cifar', 'resnet8_cifar']
    """
    from .train.models import MODELS

    names = [n for n in MODELS.names() if not pretrained or "pretrained" in MODELS.meta(n)]
    if filter:
        names = fnmatch.filter(names, filter)
    if timm:
        import timm as _timm

        names += [n for n in _timm.list_models(filter or "", pretrained=pretrained) if n not in names]
    return names

