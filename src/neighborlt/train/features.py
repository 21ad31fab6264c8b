"""Frozen-feature extraction in resumable chunks, with an on-disk cache (the fast CPU protocol: extract once, train
only a head; the filter's band, leak and dedup rules; cRT).

Features live in ``cache_dir()/features/<model>/<key>.npy`` (float32 ``[N, D]``, returned memory-mapped
read-only) with a ``<key>.json`` sidecar. The key hashes the model name, the backbone weights (classifier
excluded), the eval transform, the image size and the data fingerprint (file paths + sizes + mtimes, or the array
bytes), so any change re-extracts and an unchanged request is served from disk.

Extraction runs over a torch ``DataLoader`` (in stream mode workers decode each image to the evaluation view and
the uint8 batches are normalised on the device; in cache mode rows of the decoded array) in chunks of
``chunk_rows`` consecutive rows. Each chunk is written atomically to ``<key>.chunks/rows-<start>-<stop>.npy`` as
it finishes, so a killed extraction (``kill -9`` included) loses at most the chunks in flight, and the next call
computes only the missing ones. With ``distributed=True`` (every rank of a ``torchrun`` job calls it) chunk ``i``
belongs to rank ``i % WORLD_SIZE``; each rank computes its own chunks, waits until the others' are on disk, and
the first process to take the merge lock (``fcntl.flock``, released by the kernel if its holder dies) concatenates
the chunks into ``<key>.npy`` (one chunk in memory at a time) and removes the chunk folder. No collective is used,
so a rank that finishes early does not time out a barrier; a rank that dies leaves the others waiting (torchrun
stops the job), and the re-run computes only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.base import ImageSet
from ..errors import ConfigError, DataError
from ..paths import cache_dir
from ..rundir import atomic_output, atomic_write_json
from .data import build_transform, transform_key
from .models import classifier_keys, create_model, model_normalization

logger = logging.getLogger(__name__)

_VERSION = "1"  # bump when extraction (pooling, batching, dtype) changes
CHUNK_ROWS = 4096  # rows per chunk file: at most this many images are recomputed after a kill
_WAIT_LOG_S = 60.0  # a rank waiting for the others' chunks says so this often


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
                      precision: str = "fp32", data_mode: str = "cache") -> dict[str, Any]:
    """The parts of the cache key (model, weights hash, transform, data fingerprint, precision, view) and their
    hash ``key``; fp32 cache-mode keys are those of earlier versions (``precision`` joins the key only when it is
    not fp32, the view only in stream mode: the shorter side resized to S / crop_pct and centre-cropped)."""
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
    if data_mode == "stream":
        from .data import model_crop_pct

        parts["view"] = {"mode": "stream", "crop_pct": model_crop_pct(model_name)}
    blob = json.dumps(parts, sort_keys=True).encode()
    parts["key"] = hashlib.sha256(blob).hexdigest()[:24]
    return parts


def _safe(name: str) -> str:
    """A model name as one safe path component (class and model names are untrusted)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    return s[:80]


def default_feature_folder(model_name: str) -> Path:
    """Where a model's features are cached by default: ``cache_dir()/features/<model>`` (the ``<key>.npy`` and
    ``<key>.json`` sidecar of :func:`extract_model_features`)."""
    return cache_dir() / "features" / _safe(model_name)


def default_workers(device: torch.device, data_mode: str) -> int:
    """DataLoader workers for extraction: in stream mode the cores this rank may use (``LOCAL_WORLD_SIZE`` ranks
    share the machine; :func:`~neighborlt.train.data.cores_per_rank`), at most 16, and on the CPU half of them,
    since the forward pass runs on the same cores; in cache mode none (a row of the decoded array costs less than
    handing it over from a worker: ``bench/feature_throughput.py``)."""
    from .data import cores_per_rank

    if data_mode != "stream":
        return 0
    per_rank = cores_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(16, per_rank if device.type == "cuda" else per_rank // 2)


def rank_and_world(distributed: bool) -> tuple[int, int]:
    """``(rank, world size)``: the default process group's when one is initialised, else ``RANK`` /
    ``WORLD_SIZE`` from the environment (torchrun sets both); ``(0, 1)`` when not ``distributed``."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < max(1, world):
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); launch with torchrun")
    return rank, max(1, world)


def default_chunk_rows(n: int, world: int) -> int:
    """Rows per chunk when the caller names none: :data:`CHUNK_ROWS`, and under ``world`` > 1 ranks at most
    ``ceil(n / world)``, so that every rank has a chunk to compute even when the set is small."""
    return CHUNK_ROWS if world <= 1 else max(1, min(CHUNK_ROWS, -(-n // world)))


def chunk_ranges(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` row ranges of ``chunk_rows`` rows covering ``0..n``."""
    return [(s, min(n, s + chunk_rows)) for s in range(0, n, chunk_rows)]


def rank_chunks(num_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` of ``world`` computes: ``i % world == rank``."""
    return list(range(rank, num_chunks, world))


def _chunk_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"rows-{start:012d}-{stop:012d}.npy"


def _spans(idx: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (chunk lists in log lines stay short)."""
    out: list[str] = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out) or "none"


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("feature cache %s is unreadable (%s); extracting again", path, e)
        return None
    if arr.ndim != 2 or arr.shape[0] != n or arr.dtype != np.float32:
        logger.warning("feature cache %s has shape %s %s, expected [%d, D] float32; extracting again",
                       path, arr.shape, arr.dtype, n)
        return None
    return arr


def _chunk_ok(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        ok = a.ndim == 2 and a.shape[0] == rows and a.dtype == np.float32
    except (OSError, ValueError):
        ok = False
    if not ok:
        logger.warning("feature chunk %s is unreadable or has the wrong shape; computing it again", path)
    return ok


def _plan(folder: Path, n: int, chunk_rows: int) -> int:
    """The chunk size of an extraction: the one recorded in ``folder/plan.json`` (an interrupted run resumes with
    its own chunks), else ``chunk_rows`` (recorded now)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    if plan.is_file():
        try:
            doc = json.loads(plan.read_text())
            if int(doc["n"]) == n and int(doc["chunk_rows"]) >= 1:
                if int(doc["chunk_rows"]) != chunk_rows:
                    logger.info("features: resuming %s with its %d-row chunks", folder, int(doc["chunk_rows"]))
                return int(doc["chunk_rows"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logger.warning("features: %s does not describe this extraction; starting its chunks again", plan)
        for p in folder.glob("rows-*.npy"):
            p.unlink(missing_ok=True)
    atomic_write_json(plan, {"n": n, "chunk_rows": chunk_rows})
    return chunk_rows


class _RangeBatches:
    """Batch sampler: consecutive batches of at most ``batch_size`` rows of each range (never crossing one),
    generated lazily (no index list that grows with the data)."""

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int) -> None:
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for a, b in self.ranges:
            for s in range(a, b, self.batch_size):
                yield list(range(s, min(b, s + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in self.ranges)


@torch.inference_mode()
def _compute_chunks(model: nn.Module, dataset: Any, ranges: list[tuple[int, int]], folder: Path, *,
                    batch_size: int, device: torch.device, bf16: bool, num_workers: int, what: str) -> None:
    """``model.forward_features`` of the rows of each range, one DataLoader over all of them (batches never cross
    a range), each range saved atomically as soon as its last batch is done."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_RangeBatches(ranges, batch_size), num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    it = iter(loader)
    for a, b in ranges:
        buf: np.ndarray | None = None
        pos = 0
        while pos < b - a:
            x = next(it)[0].to(device, non_blocking=True)
            if x.dtype == torch.uint8:  # stream mode: uint8 from the workers, normalised here (on the device)
                x = dataset.normalize(x)
            if x.ndim == 4:  # NHWC, as the decoded-array loop fed it: faster CPU convolutions, the same features
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                f = model.forward_features(x)  # type: ignore[operator]
            f = f.float().cpu().numpy()
            if buf is None:
                buf = np.empty((b - a, f.shape[1]), dtype=np.float32)
            buf[pos:pos + len(f)] = f
            pos += len(f)
        assert buf is not None
        if not np.isfinite(buf).all():
            raise ConfigError(f"{what}: non-finite features in rows {a}..{b - 1}; check the checkpoint")
        _atomic_save(_chunk_path(folder, a, b), buf)


def _wait_for_chunks(folder: Path, ranges: list[tuple[int, int]], merged: Path, world: int) -> None:
    """Block until every chunk (or the merged file) is on disk, saying every minute which ones are missing."""
    last = time.monotonic()
    while not merged.is_file():
        missing = [i for i, (a, b) in enumerate(ranges) if not _chunk_path(folder, a, b).is_file()]
        if not missing:
            return
        if time.monotonic() - last >= _WAIT_LOG_S:
            logger.info("features: waiting for chunks %s (ranks %s) in %s", _spans(missing),
                        _spans(sorted({i % world for i in missing})), folder)
            last = time.monotonic()
        time.sleep(0.2)


def _merge(folder: Path, ranges: list[tuple[int, int]], merged: Path, n: int, sidecar: dict[str, Any]) -> bool:
    """Concatenate the chunks into ``merged`` (atomically, one chunk in memory at a time) and remove the chunk
    folder, unless another process already did. Returns True when this process merged."""
    lock = merged.with_suffix(".lock")
    with open(lock, "a+") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            if merged.is_file() and _load_cached(merged, n) is not None:
                return False
            first = np.load(_chunk_path(folder, *ranges[0]), mmap_mode="r", allow_pickle=False)
            with atomic_output(merged) as tmp:  # readers see no merged file or the whole of it
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, first.shape[1]))
                for a, b in ranges:
                    p = _chunk_path(folder, a, b)
                    try:
                        out[a:b] = np.load(p, mmap_mode="r", allow_pickle=False)
                    except (OSError, ValueError) as e:
                        raise DataError(f"{p}: unreadable feature chunk ({e}); delete it and re-run") from None
                out.flush()
                del out
            atomic_write_json(merged.with_suffix(".json"), {**sidecar, "shape": [n, int(first.shape[1])]})
            shutil.rmtree(folder, ignore_errors=True)
            return True
        finally:
            lock.unlink(missing_ok=True)  # waiters hold the old inode and find the merged file; see module doc


def extract_model_features(model: nn.Module, model_name: str, image_set: ImageSet, image_size: int, *,
                           init: str = "", folder: str | os.PathLike[str] | None = None, batch_size: int = 256,
                           device: str = "cpu", bf16: bool | None = None, num_workers: int | None = None,
                           chunk_rows: int | None = None, distributed: bool = False,
                           data_mode: str = "auto") -> np.ndarray:
    """Pooled ``forward_features`` of every image of ``image_set`` under ``model``, in resumable chunks, cached.

    Args:
        model: a model from :func:`~neighborlt.train.models.create_model` (its classifier is not part of the key).
        model_name: its architecture (the input normalisation and the cache folder).
        image_set: the images (labels are not part of the key).
        image_size: input side length S.
        init: where the weights came from (recorded in the sidecar only).
        folder: where ``<key>.npy`` and its chunks live (default ``cache_dir()/features/<model>``).
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``cuda`` is ``cuda:LOCAL_RANK`` when ``distributed``.
        bf16: bf16 autocast (default: on for CUDA devices, off on CPU); part of the cache key.
        num_workers: DataLoader workers (default :func:`default_workers`).
        chunk_rows: rows per chunk file (default :func:`default_chunk_rows`; an interrupted extraction resumes with
            the chunk size it started with).
        distributed: every rank of a torchrun job calls this; each computes chunks ``i % WORLD_SIZE == RANK``.
        data_mode: the evaluation view (:func:`~neighborlt.train.data.resolve_data_mode`; ``auto``: cache at
            <= 64 px, else stream): ``cache`` squashes to S x S through the decoded-array cache and the eval
            transform of :func:`~neighborlt.train.data.build_transform`; ``stream`` decodes each image in the
            workers, resizes the shorter side to S / crop_pct (the model's pretrained config) and centre-crops S.

    Returns:
        float32 array [N, D] in the order of ``image_set``, memory-mapped read-only.

    Raises:
        ConfigError: invalid arguments, non-finite features; DataError: undecodable images.
    """
    from .data import ImageSetDataset, model_crop_pct, resolve_data_mode
    from .ddp import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = len(image_set)
    if n == 0:
        raise ConfigError(f"{image_set.source or 'image set'}: no images to extract features from")
    rank, world = rank_and_world(distributed)
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    use_bf16 = dev.type == "cuda" if bf16 is None else bool(bf16)
    mode = resolve_data_mode(data_mode, image_size)
    parts = feature_cache_key(model_name, model, image_set, image_size, "bf16" if use_bf16 else "fp32", mode)
    root = Path(folder) if folder is not None else default_feature_folder(model_name)
    root.mkdir(parents=True, exist_ok=True)
    merged = root / f"{parts['key']}.npy"
    if merged.is_file():
        cached = _load_cached(merged, n)
        if cached is not None:
            logger.info("features of %d images from cache %s", n, merged)
            return cached
    chunks = root / f"{parts['key']}.chunks"
    rows = _plan(chunks, n, default_chunk_rows(n, world) if chunk_rows is None else chunk_rows)
    ranges = chunk_ranges(n, rows)
    own = rank_chunks(len(ranges), rank, world)
    todo = [i for i in own if not _chunk_ok(_chunk_path(chunks, *ranges[i]), ranges[i][1] - ranges[i][0])]
    logger.info("features %s of %d images (%s mode): %d chunks of %d rows; rank %d/%d computes chunks %s (%d of its "
                "%d on disk)", model_name, n, mode, len(ranges), rows, rank, world, _spans(todo), len(own) - len(todo),
                len(own))
    t0 = time.perf_counter()
    if todo:
        workers = default_workers(dev, mode) if num_workers is None else num_workers
        norm = model_normalization(model_name)
        if mode == "cache":
            ds = ImageSetDataset(image_set, build_transform(image_size, train=False, normalization=norm), image_size,
                                 normalization=norm)
        else:
            ds = ImageSetDataset(image_set, None, image_size, mode="stream", normalization=norm,
                                 crop_pct=model_crop_pct(model_name))
        model.eval().to(dev)
        _compute_chunks(model, ds, [ranges[i] for i in todo], chunks, batch_size=batch_size, device=dev,
                        bf16=use_bf16, num_workers=workers, what=f"{model_name} ({init or 'model'})")
    seconds = time.perf_counter() - t0
    _wait_for_chunks(chunks, ranges, merged, world)
    sidecar = {**parts, "data_mode": mode, "init": init, "seconds": round(seconds, 3), "device": str(dev), "chunk_rows": rows,
               "chunks": len(ranges), "world_size": world, "computed_chunks_by_merger": len(todo)}
    if _merge(chunks, ranges, merged, n, sidecar):
        logger.info("extracted %s features of %d images (%d chunks here) in %.1f s (cached %s)", model_name, n,
                    len(todo), seconds, merged)
    out = _load_cached(merged, n)
    if out is None:
        raise DataError(f"{merged}: the merged features cannot be read back; delete it and re-run")
    return out


@contextlib.contextmanager
def _quiet_classifier_messages() -> Iterator[None]:
    """Drop :func:`~neighborlt.train.models.load_weights`' classifier messages while a feature model is built."""
    log = logging.getLogger(create_model.__module__)

    def keep(record: logging.LogRecord) -> bool:
        return "classifier" not in record.getMessage()

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def feature_tensor(features: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor over ``features`` (e.g. :func:`extract_features`' read-only memory map), without a copy
    when they already are contiguous float32: the pages stay the page cache's, shared by every rank and process that
    reads the same cache file. The training and inference loops only read such a tensor (a batch is an index or a
    slice of it, fed to a head that computes out of place), so torch's warning about a non-writable array is silenced
    here rather than paid for with a copy of the whole set."""
    arr = np.ascontiguousarray(features, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(arr)


def extract_features(model_name: str, init: str, image_set: ImageSet, image_size: int, batch_size: int = 256,
                     device: str = "cpu", bf16: bool | None = None, *, num_workers: int | None = None,
                     chunk_rows: int | None = None, distributed: bool = False, data_mode: str = "auto") -> np.ndarray:
    """Pooled backbone features of every image, computed once (in resumable chunks) and then read from the cache.

    The images go through :class:`~neighborlt.train.data.ImageSetDataset` (the evaluation view of ``data_mode``,
    the model's normalisation) and ``model.forward_features`` in eval mode; see :func:`extract_model_features` for
    the chunks, the ranks, the views and the arguments.

    Args:
        model_name: see :func:`neighborlt.train.models.create_model`.
        init: ``"pretrained"``, ``"random"`` or a checkpoint path (random weights give a new key each call).

    Returns:
        float32 array [N, D] in the order of ``image_set`` (memory-mapped read-only).

    Raises:
        ConfigError: invalid arguments or model; DataError: undecodable images or checkpoint.

    Example:
        >>> f = extract_features("efficientnet_lite0", "pretrained", image_set, 64)  # doctest: +SKIP
        >>> f.shape  # doctest: +SKIP
        (500, 1280)
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(image_set) == 0:
        raise ConfigError(f"{image_set.source or 'image set'}: no images to extract features from")
    with _quiet_classifier_messages():  # features need no classifier: that it is re-initialised is not news
        model = create_model(model_name, num_classes=1, init=init, image_size=image_size)
    if init == "random":
        logger.warning("extracting features of a randomly initialised %s; they are cached under a new key", model_name)
    return extract_model_features(model, model_name, image_set, image_size, init=init, batch_size=batch_size,
                                  device=device, bf16=bf16, num_workers=num_workers, chunk_rows=chunk_rows,
                                  distributed=distributed, data_mode=data_mode)
