"""Frozen-feature extraction with an on-disk cache (the fast CPU protocol: extract once, train only a head).

Features live in ``cache_dir()/features/<model>/<key>.npy`` (float32 ``[N, D]``) with a ``<key>.json`` sidecar.
The key hashes the model name, the backbone weights (classifier excluded), the eval transform, the image size
and the data fingerprint (file paths + sizes + mtimes, or the array bytes), so any change re-extracts and an
unchanged request is served from disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.base import ImageSet
from ..errors import ConfigError
from ..paths import cache_dir
from ..rundir import atomic_write_json
from .data import build_transform, transform_key
from .models import classifier_keys, create_model, model_normalization

logger = logging.getLogger(__name__)

_VERSION = "1"  # bump when extraction (pooling, batching, dtype) changes


def weights_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a model's state dict without the classifier (names, dtypes, bytes)."""
    skip = set(classifier_keys(model))
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        if k in skip:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def feature_cache_key(model_name: str, model: nn.Module, image_set: ImageSet, image_size: int,
                      precision: str = "fp32") -> dict[str, Any]:
    """The parts of the cache key (model, weights hash, transform, data fingerprint, precision) and their hash
    ``key``; fp32 keys are those of earlier versions (``precision`` joins the key only when it is not fp32)."""
    from ..data import fingerprint

    parts: dict[str, Any] = {
        "version": _VERSION,
        "model": model_name,
        "weights": weights_hash(model),
        "transform": transform_key(build_transform(image_size, train=False,
                                                   normalization=model_normalization(model_name))),
        "image_size": image_size,
        "data": fingerprint(image_set),
        "n": len(image_set),
    }
    if precision != "fp32":
        parts["precision"] = precision
    blob = json.dumps(parts, sort_keys=True).encode()
    parts["key"] = hashlib.sha256(blob).hexdigest()[:24]
    return parts


def _safe(name: str) -> str:
    """A model name as one safe path component (class and model names are untrusted)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    return s[:80]


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("feature cache %s is unreadable (%s); extracting again", path, e)
        return None
    if arr.ndim != 2 or arr.shape[0] != n or arr.dtype != np.float32:
        logger.warning("feature cache %s has shape %s %s, expected [%d, D] float32; extracting again",
                       path, arr.shape, arr.dtype, n)
        return None
    return arr


@torch.inference_mode()
def _extract(model: nn.Module, images: np.ndarray, batch_size: int, device: str,
             normalization: tuple[tuple[float, ...], tuple[float, ...]], bf16: bool = False) -> np.ndarray:
    """Features of uint8 [N, S, S, 3] images with the eval transform (ToTensor + normalise), batched; under bf16
    autocast when ``bf16`` (CUDA)."""
    mean, std = normalization
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = np.empty((len(images), model.num_features), dtype=np.float32)  # type: ignore[arg-type]
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # copy: mmap is read-only
        x = (batch.permute(0, 3, 1, 2).float().div_(255.0) - m) / s
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            f = model.forward_features(x)  # type: ignore[operator]
        out[start:start + len(batch)] = f.float().cpu().numpy()
    return out


def extract_features(model_name: str, init: str, image_set: ImageSet, image_size: int, batch_size: int = 256,
                     device: str = "cpu", bf16: bool | None = None) -> np.ndarray:
    """Pooled backbone features of every image, computed once and then read from the cache.

    The images are decoded to ``image_size`` (:func:`neighborlt.data.as_array`) and passed through the eval
    transform (ToTensor + the model's normalisation: identical to ``build_transform(image_size, train=False,
    normalization=model_normalization(model_name))`` on the decoded images) and ``model.forward_features`` in eval mode.

    Args:
        model_name: see :func:`neighborlt.train.models.create_model`.
        init: ``"pretrained"``, ``"random"`` or a checkpoint path (random weights give a new key each call).
        image_set: the images (labels are not part of the key).
        image_size: input side length.
        batch_size: images per forward pass.
        device: ``"cpu"`` or a CUDA device.
        bf16: bf16 autocast (default: on for CUDA devices, off on CPU); part of the cache key.

    Returns:
        float32 array [N, D] in the order of ``image_set``.

    Raises:
        ConfigError: invalid arguments or model; DataError: undecodable images or checkpoint.

    Example:
        >>> f = extract_features("efficientnet_lite0", "pretrained", image_set, 64)  # doctest: +SKIP
        >>> f.shape  # doctest: +SKIP
        (500, 1280)
    """
    from ..data import as_array

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(image_set) == 0:
        raise ConfigError(f"{image_set.source or 'image set'}: no images to extract features from")
    model = create_model(model_name, num_classes=1, init=init, image_size=image_size)
    if init == "random":
        logger.warning("extracting features of a randomly initialised %s; they are cached under a new key", model_name)
    use_bf16 = str(device).startswith("cuda") if bf16 is None else bool(bf16)
    parts = feature_cache_key(model_name, model, image_set, image_size, "bf16" if use_bf16 else "fp32")
    folder = cache_dir() / "features" / _safe(model_name)
    path = folder / f"{parts['key']}.npy"
    if path.is_file():
        cached = _load_cached(path, len(image_set))
        if cached is not None:
            logger.info("features of %d images from cache %s", len(image_set), path)
            return cached
    images = as_array(image_set, image_size)
    model.eval().to(device)
    t0 = time.perf_counter()
    feats = _extract(model, images, batch_size, device, model_normalization(model_name), bf16=use_bf16)
    seconds = time.perf_counter() - t0
    if not np.isfinite(feats).all():
        raise ConfigError(f"{model_name}: non-finite features; check the checkpoint {init!r}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{parts['key']}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, feats, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_json(path.with_suffix(".json"), {**parts, "init": init, "shape": list(feats.shape),
                                                  "seconds": round(seconds, 3), "device": device})
    logger.info("extracted %s features of %d images in %.1f s (cached %s)", model_name, len(image_set), seconds, path)
    return feats
