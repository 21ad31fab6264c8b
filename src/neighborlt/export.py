"""Stage 5b, export: the paper's *direct classifier*. A model trained on L target + K auxiliary classes
(``RUN/train/model.safetensors`` + ``model.json``) is saved to ``RUN/export/`` with only the L target rows of
its classifier, so that inference ranks target classes only; and :func:`predict_images`, the top-k target
classes of image files (``neighborlt predict``).

``model.json`` fields read here (written by :func:`neighborlt.train.run_train`): ``num_classes`` (L + K),
``num_target_classes`` (L), ``class_names`` / ``class_ids`` (targets first), ``classifier``
(``{"weight": key, "bias": key or null}``, the classifier's state-dict keys) and ``weights`` (the weights file
name, default ``model.safetensors``). The export keeps every other field (architecture, image size, frozen
feature head, ...), so :func:`neighborlt.train.predict_logits` loads it like any trained model; it sets
``num_classes`` to L, cuts the class lists to the targets and adds a ``direct_classifier`` block naming the
source weights (sha256) and the dropped classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import ConfigError, DataError, NeighborLTError
from .rundir import RunDir, atomic_write_bytes, atomic_write_json, config_hash, file_sha256, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INFO = "model.json"
STAGE = "export"


def _as_run(run_dir: str | os.PathLike[str] | RunDir) -> RunDir:
    if isinstance(run_dir, RunDir):
        return run_dir
    if not Path(run_dir).is_dir():
        raise NeighborLTError(f"{run_dir}: run directory not found; pass the --run-dir of a trained run")
    return RunDir(run_dir)


MODEL_DIRS = {"export": ("export",), "train": ("train",), "crt": ("train", "crt")}


def model_dir_for(run_dir: str | os.PathLike[str] | RunDir, which: Literal["export", "train", "crt"] = "export") -> Path:
    """The folder holding one model of a run.

    ``export``: ``RUN/export`` (direct classifier, L rows); ``train``: ``RUN/train`` (L + K rows); ``crt``:
    ``RUN/train/crt`` (re-trained target-only classifier, ``--classifier retrain``). A path that already holds
    ``model.safetensors`` and ``model.json`` is returned as is.

    Raises:
        NeighborLTError: the weights or ``model.json`` are missing (naming the command that makes them).
    """
    root = Path(run_dir.root if isinstance(run_dir, RunDir) else run_dir)
    if (root / WEIGHTS).is_file() and (root / INFO).is_file():
        return root
    if which not in MODEL_DIRS:
        raise ConfigError(f"model {which!r}: choose one of {', '.join(MODEL_DIRS)}")
    d = root.joinpath(*MODEL_DIRS[which])
    fixes = {"export": f"neighborlt export {root}", "train": "neighborlt train",
             "crt": "neighborlt train --classifier retrain"}
    for name in (WEIGHTS, INFO):
        if not (d / name).is_file():
            raise NeighborLTError(f"{d / name}: not found; run `{fixes[which]}` first")
    return d


def classifier_key_names(info: dict[str, Any], where: Path) -> tuple[str, str | None]:
    """The state-dict keys of the classifier weight and bias named in ``model.json`` (``classifier``)."""
    c = info.get("classifier")
    if isinstance(c, dict) and isinstance(c.get("weight"), str) and (c.get("bias") is None or isinstance(c["bias"], str)):
        return c["weight"], c.get("bias")
    raise DataError(
        f"{where}: no 'classifier' {{\"weight\": key, \"bias\": key}} entry; re-run training with a current neighborlt"
    )


def _weights_name(info: dict[str, Any], where: Path) -> str:
    name = info.get("weights", WEIGHTS)
    # model.json is read back from disk: only a plain file name inside the model folder is accepted
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"{where}: 'weights' must be a file name in the same folder, got {name!r}; re-run training")
    return name


def _int_field(info: dict[str, Any], name: str, where: Path) -> int:
    v = info.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise DataError(f"{where}: '{name}' must be a positive integer, got {v!r}; re-run training")
    return v


def read_model_info(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a model folder's ``model.json`` (class count, class names, classifier keys)."""
    where = Path(model_dir) / INFO
    info = read_json(where)
    if not isinstance(info, dict):
        raise DataError(f"{where}: expected a JSON object; re-run training")
    c = _int_field(info, "num_classes", where)
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) != c:
        got = len(names) if isinstance(names, list) else names
        raise DataError(f"{where}: 'class_names' must list {c} names (num_classes), got {got}; re-run training")
    ids = info.get("class_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != c):
        raise DataError(f"{where}: 'class_ids' must list {c} ids (num_classes); re-run training")
    classifier_key_names(info, where)
    _weights_name(info, where)
    return info


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise NeighborLTError(f"{path}: not found; run training first")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]}); re-run training") from None


def direct_state_dict(
    state: dict[str, torch.Tensor], weight_key: str, bias_key: str | None, num_target: int, where: Path
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose classifier keeps only its first ``num_target`` rows (the target classes)."""
    if weight_key not in state:
        raise DataError(f"{where}: classifier weight {weight_key!r} is not in the weights; re-run training")
    w = state[weight_key]
    if w.ndim != 2:
        raise DataError(f"{where}: classifier weight {weight_key!r} has shape {tuple(w.shape)}, expected [C, D]")
    if num_target > w.shape[0]:
        raise DataError(
            f"{where}: num_target_classes {num_target} exceeds the classifier's {w.shape[0]} rows; re-run training"
        )
    out = {k: v for k, v in state.items()}
    out[weight_key] = w[:num_target].clone().contiguous()
    if bias_key is not None:
        if bias_key not in state:
            raise DataError(f"{where}: classifier bias {bias_key!r} is not in the weights; re-run training")
        b = state[bias_key]
        if b.shape != (w.shape[0],):
            raise DataError(f"{where}: classifier bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        out[bias_key] = b[:num_target].clone().contiguous()
    return out


def export_direct(run_dir: str | os.PathLike[str] | RunDir, *, force: bool = False) -> Path:
    """Write ``RUN/export/`` = the trained model with only the L target classifier rows (the direct classifier).

    The exported logits equal the first L logits of the full model. The step is skipped when ``RUN/export``
    is already up to date with the current ``RUN/train`` weights (unless ``force``).

    Args:
        run_dir: the run directory (with ``train/model.safetensors`` and ``train/model.json``).
        force: re-export even when up to date.

    Returns:
        The export folder ``RUN/export``.

    Raises:
        NeighborLTError: missing or inconsistent training outputs (one line naming the file).

    Example:
        >>> export_direct("runs/demo")  # doctest: +SKIP
        PosixPath('runs/demo/export')
    """
    from safetensors.torch import save

    run = _as_run(run_dir)
    src = run.path("train")
    info_path = src / INFO
    if not info_path.is_file():
        raise NeighborLTError(f"{info_path}: not found; run `neighborlt train` for this run directory first")
    info = read_model_info(src)
    weights_path = src / _weights_name(info, info_path)
    if not weights_path.is_file():
        raise NeighborLTError(f"{weights_path}: not found; run `neighborlt train` for this run directory first")
    num_classes = int(info["num_classes"])
    num_target = info.get("num_target_classes", num_classes)
    if not isinstance(num_target, int) or isinstance(num_target, bool) or not 1 <= num_target <= num_classes:
        raise DataError(f"{info_path}: 'num_target_classes' must be 1..{num_classes}, got {num_target!r}; re-run training")
    src_sha = file_sha256(weights_path)
    key = config_hash({"weights": src_sha, "info": info})
    out_dir = run.path("export")
    if not force and run.is_done(STAGE, key) and (out_dir / WEIGHTS).is_file() and (out_dir / INFO).is_file():
        logger.info("export: up to date (%s), skipping", out_dir)
        return out_dir
    run.record(STAGE, {"source": str(weights_path), "source_sha256": src_sha, "num_classes": num_classes,
                       "num_target_classes": num_target})
    weight_key, bias_key = classifier_key_names(info, info_path)
    state = _load_tensors(weights_path)
    if weight_key in state and state[weight_key].ndim == 2 and state[weight_key].shape[0] != num_classes:
        raise DataError(
            f"{weights_path}: classifier {weight_key!r} has {state[weight_key].shape[0]} rows but model.json says "
            f"num_classes={num_classes}; re-run training"
        )
    direct = direct_state_dict(state, weight_key, bias_key, num_target, weights_path)
    names = list(info["class_names"])
    out_info = dict(info)
    if isinstance(info.get("class_ids"), list):
        out_info["class_ids"] = list(info["class_ids"])[:num_target]
    out_info.update(
        schema=int(info.get("schema", 1)),
        num_classes=num_target,
        num_target_classes=num_target,
        class_names=names[:num_target],
        weights=WEIGHTS,
        direct_classifier={
            "source": str(weights_path),
            "source_sha256": src_sha,
            "source_num_classes": num_classes,
            "kept_rows": [0, num_target],
            "dropped_classes": names[num_target:],
        },
    )
    # Old model.json out, weights in, new model.json last: an interrupted export never leaves a model.json
    # that describes other weights (a folder without model.json is reported as "run export").
    (out_dir / INFO).unlink(missing_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS, save(direct, metadata={"neighborlt": "direct_classifier"}))
    atomic_write_json(out_dir / INFO, out_info)
    run.mark_done(STAGE, key, num_target_classes=num_target, dropped=num_classes - num_target)
    logger.info("export: %d target rows kept, %d auxiliary rows dropped -> %s", num_target,
                num_classes - num_target, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------- inference


def predict_images(
    run_or_model_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Top-k predictions of the exported direct classifier for image files.

    Args:
        run_or_model_dir: a run directory (uses ``RUN/export``) or a model folder.
        images: image file paths.
        top_k: number of classes per image (capped at the number of classes).
        batch_size: inference batch size.
        device: torch device (``auto``: CUDA when present).

    Returns:
        One ``{"path", "top": [{"index", "name", "probability"}]}`` per image, in input order.

    Raises:
        NeighborLTError: no model, a missing or undecodable image.
    """
    import torch

    from .data.base import ImageSet
    from .train import predict_logits

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    if not images:
        raise ConfigError("no image files given; pass one or more image paths")
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
    from PIL import Image

    for p in paths:  # check every file up front so a bad one is named before any inference
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{p}: cannot decode image ({e}); pass JPEG/PNG files") from None
    mdir = model_dir_for(run_or_model_dir, "export")
    info = read_model_info(mdir)
    names = [str(n) for n in info["class_names"]]
    image_set = ImageSet(class_names=names, labels=np.zeros(len(paths), dtype=np.int64), paths=paths,
                         source="predict")
    logits = predict_logits(mdir, image_set, batch_size=batch_size, device=device)
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    k = min(top_k, probs.shape[1])
    # topk sorts by value; stable ordering for ties is by lower index (sort is stable on CPU with sorted=True)
    vals, idx = torch.sort(probs, dim=1, descending=True, stable=True)
    out = []
    for p, v, ix in zip(paths, vals[:, :k].tolist(), idx[:, :k].tolist()):
        out.append({"path": str(p), "top": [{"index": j, "name": names[j], "probability": float(q)}
                                            for j, q in zip(ix, v)]})
    return out
