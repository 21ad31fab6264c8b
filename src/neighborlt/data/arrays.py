"""Decode an ImageSet once into a uint8 ``[N, S, S, 3]`` array cached on disk and shared across processes: the
``cache`` data mode (``train.data_mode``), with :func:`neighborlt.data.pixels.decode`'s ``"squash"`` policy.

The cache key is a fingerprint of the sources (file paths, sizes and modification times, or the bytes of an
in-memory array) and the size, so a changed file re-decodes. The cached ``.npy`` is memory-mapped read-only, so
several data-loader workers or training runs share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ConfigError
from ..paths import cache_dir
from .base import ImageSet
from .pixels import SQUASH_RESAMPLE, decode, ref_fingerprint

logger = logging.getLogger(__name__)

_VERSION = "1"  # bump when the decoding (resampling filter, channel handling) changes
RESAMPLE = SQUASH_RESAMPLE  # the squash policy of neighborlt.data.pixels.decode


def fingerprint(image_set: ImageSet) -> str:
    """sha256 (first 20 hex digits) of what the pixels come from: per reference its path + size + mtime (files,
    shards) or its array's fingerprint + row; the array's bytes for an array-backed set."""
    h = hashlib.sha256(_VERSION.encode())
    if image_set.paths is not None:
        for p in image_set.paths:
            h.update(f"{ref_fingerprint(p)}\n".encode())
    else:
        h.update(image_set.array_source().fingerprint().encode())
    return h.hexdigest()[:20]


def _decode_range(image_set: ImageSet, out: np.ndarray, start: int, stop: int, size: int) -> None:
    for i in range(start, stop):
        out[i] = decode(image_set.ref(i), size, policy="squash")


def as_array(image_set: ImageSet, size: int, *, workers: int | None = None) -> np.ndarray:
    """All images of ``image_set`` as uint8 ``[N, size, size, 3]`` RGB (grayscale is replicated), decoded once.

    The result is stored as ``cache_dir()/arrays/<fingerprint>-<size>.npy`` (written atomically) and returned
    memory-mapped read-only; later calls, in this or any process, load it without decoding.

    Args:
        image_set: file- or array-backed images.
        size: output side length (bilinear resize, antialiased when shrinking).
        workers: decoding threads (default: CPU count, at most 8).

    Raises:
        DataError: an image cannot be decoded (the message names the file).

    Example:
        >>> x = as_array(load_dataset("tiny-imagenet", "val"), 32)  # doctest: +SKIP
        >>> x.shape, x.dtype  # doctest: +SKIP
        ((10000, 32, 32, 3), dtype('uint8'))
    """
    if size < 1:
        raise ConfigError(f"as_array size must be >= 1, got {size}")
    key = f"{fingerprint(image_set)}-{size}"
    root = cache_dir() / "arrays"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{key}.npy"
    if not final.is_file():
        # processes sharing the cache (test workers, ranks) decode one set one at a time: the second waits for the
        # first's array (flock, released by the kernel if the holder dies) instead of decoding it again
        import fcntl

        with open(root / f".lock.{key}", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                return _load_or_decode(image_set, size, key, root, final, workers)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return _load_or_decode(image_set, size, key, root, final, workers)


def _load_or_decode(image_set: ImageSet, size: int, key: str, root: os.PathLike[str] | str, final: os.PathLike[str],
                    workers: int | None) -> np.ndarray:
    """The cached array ``final`` when it is readable and of the right shape, else decode it (atomically)."""
    if os.path.isfile(final):
        try:
            arr = np.load(final, mmap_mode="r")
            if arr.shape == (len(image_set), size, size, 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass
        logger.warning("decoded-array cache %s is unreadable; decoding again", final)
    n = len(image_set)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        nw = workers or max(1, min(8, os.cpu_count() or 1))
        chunk = max(1, min(2048, (n + nw - 1) // nw))
        with ThreadPoolExecutor(nw) as ex:
            futs = [ex.submit(_decode_range, image_set, out, s, min(n, s + chunk), size) for s in range(0, n, chunk)]
            for f in futs:
                f.result()
        out.flush()
        del out
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("decoded %d images of %s to %dx%d in %.1f s (cached %s)", n, image_set.source or "image set",
                size, size, time.perf_counter() - t0, final)
    return np.load(final, mmap_mode="r")


__all__ = ["as_array", "fingerprint"]
