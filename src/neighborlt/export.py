"""Stage 5b, export: the paper's *direct classifier*. A model trained on L target + K auxiliary classes
(``RUN/train/model.safetensors`` + ``model.json``) is saved to ``RUN/export/`` with only the L target rows of
its classifier, so that inference ranks target classes only; :func:`load` (``neighborlt.load``), a
:class:`Predictor` whose ``predict`` gives the top-k target classes of image files, PIL images or uint8 arrays
without writing any cache; and :func:`predict_images`, the same for image files (``neighborlt predict``).

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import ConfigError, DataError, NeighborLTError
from .rundir import RunDir, atomic_write_bytes, atomic_write_json, file_sha256, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INFO = "model.json"
STAGE_VERSION = 2  # raised when export writes other outputs for the same inputs (2: the one key rule)
STAGE = "export"


def _as_run(run_dir: str | os.PathLike[str] | RunDir) -> RunDir:
    if isinstance(run_dir, RunDir):
        return run_dir
    if not Path(run_dir).is_dir():
        raise NeighborLTError(f"{run_dir}: run directory not found; pass the run directory of a trained run")
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
    key = run.stage_key(STAGE, {}, [weights_path, info_path], version=STAGE_VERSION)
    out_dir = run.path("export")
    if not force and run.is_done(STAGE, key) and (out_dir / WEIGHTS).is_file() and (out_dir / INFO).is_file():
        logger.info("export: up to date (%s), skipping", out_dir)
        return out_dir
    logger.debug("export: running (%s)", "--force" if force else run.stale_reason(STAGE, key))
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


def _is_single(images: Any) -> bool:
    """True when ``images`` is one image (a path, a PIL image or one uint8 array), False for a sequence of them."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return False


def _as_items(images: Any) -> tuple[list[Any], bool]:
    """The images as a list of single images, and whether one image (not a list) was given."""
    if _is_single(images):
        return [images], True
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ConfigError(f"image array of shape {images.shape}: pass [H, W], [H, W, C] or a batch [N, H, W, C]")
        return list(images), False
    if isinstance(images, (bytes, bytearray)) or not isinstance(images, Sequence | Iterable):
        raise ConfigError(f"images: expected a path, a PIL image, a uint8 array or a list of them, got "
                          f"{type(images).__name__}")
    items = list(images)
    for x in items:
        if not _is_single(x):
            raise ConfigError(f"images: every item must be a path, a PIL image or a uint8 [H, W(, C)] array, got "
                              f"{type(x).__name__}{getattr(x, 'shape', '')}")
    return items, False


def _check_item(x: Any, i: int) -> None:
    """Fail early (before any inference) on a missing or undecodable file or a bad array, naming it."""
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{p}: cannot decode image ({e}); pass JPEG/PNG files") from None
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ConfigError(f"image {i}: array dtype {x.dtype}; pass uint8 pixels (0..255)")
        if x.ndim == 3 and x.shape[2] not in (1, 3, 4):
            raise ConfigError(f"image {i}: array of shape {x.shape}; pass [H, W] or [H, W, C] with C in 1, 3, 4")
        if min(x.shape[:2]) < 1:
            raise ConfigError(f"image {i}: empty array of shape {x.shape}")


def decode_image(x: Any, size: int, *, policy: str = "squash", crop_pct: float | None = None) -> np.ndarray:
    """One image (a path, a PIL image or a uint8 array) as uint8 ``[size, size, 3]`` RGB, in memory only, through
    the one decode function (:func:`neighborlt.data.pixels.decode`): ``squash`` is what the decoded-array cache
    holds (cache-mode models), ``center`` the evaluation view of stream-mode models (shorter side to
    ``size / crop_pct``, centre crop)."""
    from .data.pixels import DEFAULT_CROP_PCT, decode

    ref = Path(x) if isinstance(x, (str, os.PathLike)) else x
    return decode(ref, size, policy=policy, crop_pct=crop_pct or DEFAULT_CROP_PCT,  # type: ignore[arg-type]
                  hint="pass JPEG/PNG files")


class Predictor:
    """A trained model ready for inference on a handful of images (or many), without any disk cache.

    Made by :func:`load`. ``predict`` ranks the **target** classes only: a model folder with L target + K
    auxiliary rows (``RUN/train``) has its auxiliary logits dropped before the softmax, which equals the exported
    direct classifier (``RUN/export``, L rows). Images are decoded in memory exactly as training and evaluation
    decode them (:func:`neighborlt.data.as_array`), so the logits equal :func:`neighborlt.train.predict_logits`;
    nothing is written anywhere (no decoded-array or feature cache).

    Attributes:
        model_dir: the folder the weights came from.
        info: its ``model.json``.
        class_names: the L target class names, in logit order.
        image_size: the input side length the model was trained at.

    Example:
        >>> p = neighborlt.load("runs/demo")  # doctest: +SKIP
        >>> p.predict("cat.jpg", top_k=2)  # doctest: +SKIP
        {'path': 'cat.jpg', 'top': [{'index': 0, 'name': 'cat', 'probability': 0.91}, ...]}
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, device: str = "auto", batch_size: int = 64) -> None:
        import torch

        from .train import load_trained_model
        from .train.ddp import resolve_device

        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size}: must be at least 1")
        self.model_dir = Path(model_dir)
        self.info = read_model_info(self.model_dir)
        num_classes = int(self.info["num_classes"])
        L = self.info.get("num_target_classes", num_classes)
        if not isinstance(L, int) or isinstance(L, bool) or not 1 <= L <= num_classes:
            raise DataError(f"{self.model_dir / INFO}: 'num_target_classes' must be 1..{num_classes}, got {L!r}")
        self.num_target_classes = L
        self.class_names = [str(n) for n in self.info["class_names"][:L]]
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self._amp = self.device.type == "cuda"
        model, meta = load_trained_model(self.model_dir)
        self.model = model.to(self.device).eval()
        frozen = meta.get("frozen")
        self.backbone: Any = None
        self._view: dict[str, Any] = {"policy": "squash"}  # how decode_image reads a new image for this model
        self._backbone_name: str | None = None
        if frozen:
            from .train.models import create_model

            self.image_size = int(frozen["image_size"])
            self._backbone_name = str(frozen["backbone"])
            self.backbone = create_model(self._backbone_name, num_classes=1, init=str(frozen["init"]),
                                         image_size=self.image_size).eval().to(self.device)
            self._transform = None
        else:
            from .train.data import build_transform
            from .train.models import model_normalization

            self.image_size = int(meta["image_size"])
            if meta.get("data_mode") == "stream":  # the model was evaluated on centre views, not squashed images
                self._view = {"policy": "center", "crop_pct": meta.get("crop_pct")}
            arch = meta.get("architecture")
            norm = model_normalization(arch) if arch else None  # the input statistics the weights expect
            self._transform = build_transform(self.image_size, train=False, normalization=norm)
        self._torch = torch

    def __repr__(self) -> str:
        return (f"Predictor({str(self.model_dir)!r}, {self.num_target_classes} target classes, "
                f"{self.image_size} px, device {self.device})")

    def _batch_logits(self, arrays: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if self.backbone is not None:  # as neighborlt.train.features: ToTensor + normalise, fp32 features
                from .train.models import model_normalization

                mean, std = model_normalization(self._backbone_name or "")
                m = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
                s = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
                x = (torch.from_numpy(arrays).to(self.device).permute(0, 3, 1, 2).float().div_(255.0) - m) / s
                x = self.backbone.forward_features(x).float()
            else:
                from PIL import Image

                assert self._transform is not None
                x = torch.stack([self._transform(Image.fromarray(a)) for a in arrays]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
                out = self.model(x).float().cpu()
        return out.numpy()[:, : self.num_target_classes].astype(np.float32)

    def logits(self, images: Any) -> np.ndarray:
        """The target-class logits (float32 ``[N, L]``) of one image or many (paths, PIL images, uint8 arrays).

        Raises:
            DataError: a missing or undecodable file; ConfigError: an array that is not uint8 [H, W(, C)].
        """
        items, _ = _as_items(images)
        if not items:
            raise ConfigError("no images given; pass one or more images")
        for i, x in enumerate(items):  # every input is checked before any inference
            _check_item(x, i)
        parts = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            parts.append(self._batch_logits(np.stack([decode_image(x, self.image_size, **self._view)
                                                      for x in chunk])))
        return np.concatenate(parts)

    def predict(self, images: Any, top_k: int = 5) -> dict[str, Any] | list[dict[str, Any]]:
        """The top-k target classes of one image or many, as ``neighborlt predict`` prints them.

        Args:
            images: an image file path, a PIL image or a uint8 array ``[H, W]`` / ``[H, W, C]``; or a list of
                them, or a uint8 batch ``[N, H, W, C]``.
            top_k: classes per image (capped at the number of target classes).

        Returns:
            For one image a dict ``{"path", "top": [{"index", "name", "probability"}]}`` (``path`` is None for
            in-memory images), probabilities softmax-normalised over the target classes and sorted (ties: lower
            index first); for a list or batch, a list of such dicts in input order.

        Raises:
            ConfigError: ``top_k < 1``, no images, an unsupported input; DataError: a missing or undecodable file.
        """
        torch = self._torch
        if top_k < 1:
            raise ConfigError(f"--top-k {top_k}: must be at least 1")
        items, single = _as_items(images)
        logits = self.logits(items)
        probs = torch.softmax(torch.from_numpy(logits), dim=1)
        k = min(top_k, probs.shape[1])
        vals, idx = torch.sort(probs, dim=1, descending=True, stable=True)
        rows = []
        for x, v, ix in zip(items, vals[:, :k].tolist(), idx[:, :k].tolist()):
            path = str(x) if isinstance(x, (str, os.PathLike)) else None
            rows.append({"path": path, "top": [{"index": j, "name": self.class_names[j], "probability": float(q)}
                                               for j, q in zip(ix, v)]})
        return rows[0] if single else rows


def find_model_dir(path: str | os.PathLike[str]) -> Path:
    """The model folder of ``path``: the folder itself when it holds ``model.json`` + ``model.safetensors``, else
    ``path/export`` (the direct classifier), else ``path/train`` (its auxiliary rows are masked at prediction).

    Raises:
        NeighborLTError: none of them holds a model (naming the commands that make one).
    """
    root = Path(path)
    if not root.exists():
        raise NeighborLTError(f"{root}: not found; pass a run directory or its export/ or train/ folder")
    for d in (root, root / "export", root / "train"):
        if (d / INFO).is_file() and (d / WEIGHTS).is_file():
            return d
    raise NeighborLTError(f"{root}: no model.json + model.safetensors here nor in export/ or train/; run "
                          f"`neighborlt train {root}` and `neighborlt export {root}` first")


def load(path: str | os.PathLike[str], *, device: str = "auto", batch_size: int = 64) -> Predictor:
    """A :class:`Predictor` for a run directory, its ``export/`` folder or its ``train/`` folder.

    Args:
        path: ``RUN`` (uses ``RUN/export`` when present, else ``RUN/train``), ``RUN/export``, ``RUN/train`` or
            ``RUN/train/crt`` (any folder with ``model.json`` + ``model.safetensors``).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass.

    Example:
        >>> import neighborlt
        >>> p = neighborlt.load("runs/demo")  # doctest: +SKIP
        >>> p.predict(["a.jpg", "b.png"], top_k=3)  # doctest: +SKIP
    """
    return Predictor(find_model_dir(path), device=device, batch_size=batch_size)


def predict_images(
    run_or_model_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Top-k predictions of the exported direct classifier for image files (``neighborlt predict``).

    The same as ``load(run_or_model_dir).predict(list(images), top_k)``: decoded in memory, no cache written.

    Args:
        run_or_model_dir: a run directory (uses ``RUN/export``, else ``RUN/train`` with its auxiliary rows masked)
            or a model folder.
        images: image file paths.
        top_k: number of classes per image (capped at the number of target classes).
        batch_size: inference batch size.
        device: torch device (``auto``: CUDA when present).

    Returns:
        One ``{"path", "top": [{"index", "name", "probability"}]}`` per image, in input order.

    Raises:
        NeighborLTError: no model, a missing or undecodable image.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    if not images:
        raise ConfigError("no image files given; pass one or more image paths")
    paths = [Path(p) for p in images]
    for i, p in enumerate(paths):  # check every file up front so a bad one is named before the model loads
        _check_item(p, i)
    rows = load(run_or_model_dir, device=device, batch_size=batch_size).predict(paths, top_k=top_k)
    assert isinstance(rows, list)
    return rows
