"""Inference with trained models: load a model from its ``model.json`` + ``model.safetensors``, run it on an
ImageSet (eval transform) or on cached features, and score it on a test set.

Used by the engine (evaluation during training), cRT, ``neighborlt.evaluate`` and ``neighborlt.export``; it
imports only the pure metrics (:mod:`neighborlt.metrics`), never the engine nor the evaluation stage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..defaults import SHOT_THRESHOLDS
from ..errors import NeighborLTError
from ..metrics import target_accuracy
from ..rundir import read_json
from . import checkpoint as ckpt
from . import ddp
from .heads import FeatureHead

__all__ = ["build_from_meta", "evaluate_model", "image_batches", "load_trained_model", "logits_of", "predict_logits",
           "tensor_batches"]


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An untrained model with the architecture described by a ``model.json`` dict."""
    frozen = meta.get("frozen")
    if frozen:
        return FeatureHead(int(frozen["in_features"]), int(meta["num_classes"]), frozen["head"],
                           int(frozen.get("hidden") or 1))
    from .models import create_model

    return create_model(meta["architecture"], int(meta["num_classes"]), init="random",
                        image_size=meta.get("image_size"))


def find_model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or its ``export/`` or ``train/``: the first that holds a ``model.json``."""
    path = Path(path)
    for cand in (path, path / "export", path / "train"):
        if (cand / "model.json").exists():
            return cand
    raise NeighborLTError(f"{path}: no model.json here nor in export/ or train/; run `neighborlt train` first")


def load_trained_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Load the model of a run dir (its ``export/`` if present, else ``train/``) or of a model directory.

    Args:
        path: ``RUN``, ``RUN/train``, ``RUN/train/crt`` or ``RUN/export`` (any folder with model.json +
            model.safetensors).

    Returns:
        ``(model in eval mode on CPU, model.json dict)``.
    """
    d = find_model_dir(path)
    meta = read_json(d / "model.json")
    model = build_from_meta(meta)
    state = ckpt.load_weights(d / meta.get("weights", "model.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise NeighborLTError(f"{d / 'model.safetensors'}: does not fit {d / 'model.json'} ({first}); "
                              "re-run training or export") from None
    return model.eval(), meta


@torch.no_grad()
def logits_of(model: nn.Module, batches: Iterator[torch.Tensor], device: torch.device, amp: bool) -> np.ndarray:
    """float logits [N, C] of ``model`` (switched to eval mode) over input batches, under bf16 autocast when
    ``amp``."""
    model.eval()
    out = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def image_batches(image_set: Any, image_size: int, batch_size: int, num_workers: int | None,
                  model_name: str | None = None, *, data_mode: str = "cache", crop_pct: float | None = None,
                  device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Eval-view image batches [B, 3, S, S] of ``image_set`` in order, normalised with the statistics the weights of
    ``model_name`` expect (ImageNet's when None).

    ``data_mode`` is the model's (``model.json``): ``cache`` squashes to S x S (the decoded-array cache), ``stream``
    resizes the shorter side to S / ``crop_pct`` and centre-crops S, decoding in the workers; its uint8 batches are
    normalised on ``device`` (CPU when None). ``num_workers`` None: the mode's default
    (:func:`neighborlt.train.data.resolve_workers`)."""
    from .data import eval_loader, normalize_uint8, resolve_workers
    from .models import model_normalization

    mode = "stream" if data_mode == "stream" else "cache"
    norm = model_normalization(model_name) if model_name else None  # the input statistics the weights expect
    dev = device or torch.device("cpu")
    loader = eval_loader(image_set, image_size, batch_size, resolve_workers(num_workers, mode), mode=mode,
                         normalization=norm, crop_pct=crop_pct, pin_memory=dev.type == "cuda")
    mean, std = loader.dataset.normalization  # type: ignore[attr-defined]
    for x, _y in loader:
        if x.dtype == torch.uint8:
            yield normalize_uint8(x.to(dev, non_blocking=True), mean, std)
        else:
            yield x


def tensor_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``batch_size`` rows of ``x``."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def predict_logits(run_dir_or_export_dir: str | os.PathLike[str], image_set: Any, *, batch_size: int = 256,
                   device: str = "cpu", num_workers: int = 0) -> np.ndarray:
    """Logits of a trained (or exported) model on ``image_set``.

    Args:
        run_dir_or_export_dir: a run dir (uses ``export/`` when present, else ``train/``) or a folder with
            ``model.json`` + ``model.safetensors``.
        image_set: the images (labels are ignored).
        batch_size: images per inference batch.
        device: ``cpu``, ``cuda`` or ``auto``.
        num_workers: DataLoader workers.

    Returns:
        float32 array [N, C] where C is the model's ``num_classes`` (L after export).

    Example:
        >>> logits = predict_logits("runs/c10", protocol.target_test)  # doctest: +SKIP
        >>> (logits.argmax(1) == protocol.target_test.labels).mean()  # doctest: +SKIP
    """
    model, meta = load_trained_model(run_dir_or_export_dir)
    dev = ddp.resolve_device(device)
    model.to(dev)
    amp = dev.type == "cuda"
    frozen = meta.get("frozen")
    if frozen:
        from .features import extract_features, feature_tensor

        feats = extract_features(frozen["backbone"], frozen["init"], image_set, int(frozen["image_size"]),
                                 batch_size=batch_size, device=str(dev), bf16=False)
        return logits_of(model, tensor_batches(feature_tensor(feats), batch_size),
                         dev, amp).astype(np.float32)
    return logits_of(model, image_batches(image_set, int(meta["image_size"]), batch_size, num_workers,
                                          meta.get("architecture"), data_mode=meta.get("data_mode", "cache"),
                                          crop_pct=meta.get("crop_pct"), device=dev), dev, amp).astype(np.float32)


def evaluate_model(model: nn.Module, test: Any, test_x: torch.Tensor | None, cfg: Any, dev: torch.device,
                   amp: bool, L: int, train_counts: np.ndarray,
                   thresholds: tuple[int, int] = SHOT_THRESHOLDS) -> dict[str, float | None]:
    """Test accuracy (%) of the target rows of ``model``, overall and per shot group; the model's train/eval mode
    is restored afterwards.

    Args:
        model: the model being trained (L + K outputs).
        test: the target test ImageSet (its labels are used; its images unless ``test_x`` is given).
        test_x: frozen-feature inputs of ``test``, or None to run on the images.
        cfg: the run's TrainConfig (``eval_batch_size``, ``image_size``, ``num_workers``, ``model``).
        dev: where to run.
        amp: bf16 autocast.
        L: number of target classes.
        train_counts: training images of the L targets.
        thresholds: ``(many, few)`` shot thresholds.
    """
    was_training = model.training
    if test_x is not None:
        logits = logits_of(model, tensor_batches(test_x, cfg.eval_batch_size), dev, amp)
    else:
        from .data import model_crop_pct, resolve_data_mode

        logits = logits_of(model, image_batches(test, cfg.image_size, cfg.eval_batch_size, cfg.num_workers,
                                                cfg.model, data_mode=resolve_data_mode(cfg.data_mode, cfg.image_size),
                                                crop_pct=model_crop_pct(cfg.model), device=dev),
                           dev, amp)
    model.train(was_training)
    return target_accuracy(logits, np.asarray(test.labels), L, train_counts, thresholds)
