"""The one place pixels are decoded: any image reference (a file, a :class:`~neighborlt.data.base.ShardMember` in a
tar shard, a row of an in-memory array, a PIL image or a uint8 array) to uint8 RGB under a resize policy.

Policies (:func:`decode`):

- ``"squash"``: resize to ``size x size`` (bilinear, antialiased), the pixels of the decoded-array cache
  (:func:`neighborlt.data.as_array`, ``train.data_mode = cache``) and of every model trained on it. A JPEG whose
  longer side is at least ``2 * size`` is drafted (DCT-domain downscale) first.
- ``"center"``: the evaluation view of timm and of every published ImageNet baseline: the shorter side is resized to
  ``floor(size / crop_pct)`` (bicubic) and the centre ``size x size`` is cropped. A JPEG is drafted to the smallest
  scale that still covers the resized image.
- ``"train"``: torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) drawn with a caller's
  ``numpy.random.Generator`` from the image's header size, *before* decoding; a JPEG is then drafted to the smallest
  scale that still covers the crop box at ``size`` pixels, and only the box is resampled (bicubic) to ``size``.
- ``"full"``: the whole image, RGB, no resize (contact sheets, :meth:`ImageSet.load`).

Errors are one line: an undecodable image names its file, or its shard and byte offset; a missing shard names the
command that makes it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..errors import DataError

Policy = Literal["squash", "center", "train", "full"]
POLICIES: tuple[str, ...] = ("squash", "center", "train", "full")
#: timm's default evaluation crop (resize the shorter side to S / 0.875, centre-crop S) when a model names none
DEFAULT_CROP_PCT = 0.875
SQUASH_RESAMPLE = Image.Resampling.BILINEAR  # the decoded-array cache's filter (changing it changes every cache)
RESAMPLE = Image.Resampling.BICUBIC  # stream mode: train crops and eval resizes, as timm's pretrained configs
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ArraySource:
    """An in-memory uint8 image array ``[N, H, W(, 3)]`` that :class:`ArrayRow` references point into.

    Compared by identity; its :meth:`fingerprint` (sha256 of shape, dtype and bytes) is computed once.
    """

    def __init__(self, array: np.ndarray, name: str = "array") -> None:
        self.array = array
        self.name = name
        self._fp: str | None = None

    def fingerprint(self) -> str:
        if self._fp is None:
            a = np.ascontiguousarray(self.array)
            h = hashlib.sha256(f"{a.shape}|{a.dtype}".encode())
            h.update(memoryview(a).cast("B"))
            self._fp = h.hexdigest()[:20]
        return self._fp

    def __len__(self) -> int:
        return len(self.array)


@dataclass(frozen=True, eq=False)
class ArrayRow:
    """Row ``index`` of an :class:`ArraySource`: how an in-memory image sits in a mixed
    :class:`~neighborlt.data.base.ImageSet` beside files and shard members (no copy of the pixels)."""

    source: ArraySource
    index: int

    @property
    def pixels(self) -> np.ndarray:
        return self.source.array[self.index]

    def __str__(self) -> str:
        return f"{self.source.name}[{self.index}]"


def shard_missing_error(shard: Path) -> DataError:
    """The one-line error of a missing tar shard, naming the command that makes it."""
    run = shard.parent.parent.parent if shard.parent.name == "shards" and shard.parent.parent.name == "retrieve" \
        else None
    fix = f"`neighborlt retrieve {run}`" if run is not None else "`neighborlt retrieve RUN` (the run that wrote it)"
    return DataError(f"{shard}: shard not found; make it with {fix}")


def read_ref_bytes(ref: Any) -> bytes:
    """The encoded bytes of a file or shard member (one seek for a shard member)."""
    from .base import ShardMember

    if isinstance(ref, ShardMember):
        try:
            return ref.read_bytes()
        except FileNotFoundError:
            raise shard_missing_error(Path(ref.shard)) from None
    return Path(ref).read_bytes()


def open_ref(ref: Any) -> Image.Image:
    """A lazily opened PIL image of a file path, :class:`ShardMember`, :class:`ArrayRow`, uint8 array or PIL image
    (only the header is read until pixels are needed)."""
    from .base import ShardMember

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, ArrayRow):
        return Image.fromarray(_gray2d(np.asarray(ref.pixels)))
    if isinstance(ref, np.ndarray):
        return Image.fromarray(_gray2d(ref))
    if isinstance(ref, ShardMember):
        return Image.open(io.BytesIO(read_ref_bytes(ref)))
    return Image.open(ref)


def _gray2d(a: np.ndarray) -> np.ndarray:
    return a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a


def _to_rgb(img: Image.Image, size: int) -> np.ndarray:
    """The squash rule: RGB, then a bilinear resize to ``size x size`` unless already that size."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), SQUASH_RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def rrc_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = RRC_SCALE,
            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, width, height)`` for an image of the given size, drawn
    from ``rng`` (10 tries, then the centre crop at the nearest allowed ratio)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _center_geometry(width: int, height: int, size: int, crop_pct: float) -> tuple[int, int]:
    """torchvision ``Resize(floor(size / crop_pct))``'s output size for an image of the given size."""
    short_target = math.floor(size / crop_pct)
    if width <= height:
        return short_target, int(short_target * height / width)
    return int(short_target * width / height), short_target


def _decode_open(im: Image.Image, size: int | None, policy: str, rng: np.random.Generator | None,
                 crop_pct: float, draft: bool = True) -> np.ndarray:
    if policy == "full":
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)
    assert size is not None
    jpeg = draft and im.format == "JPEG"
    if policy == "squash":
        if jpeg and max(im.size) >= 2 * size:
            im.draft("RGB", (size, size))  # fast DCT-domain downscale for large JPEGs
        return _to_rgb(im, size)
    w, h = im.size
    if policy == "center":
        rw, rh = _center_geometry(w, h, size, crop_pct)
        if jpeg:
            im.draft("RGB", (rw, rh))  # the largest reduction that still covers the resized image
        if im.mode != "RGB":
            im = im.convert("RGB")
        im = im.resize((rw, rh), RESAMPLE) if im.size != (rw, rh) else im
        left, top = round((rw - size) / 2.0), round((rh - size) / 2.0)
        if rw < size or rh < size:  # torchvision CenterCrop pads; only for crop_pct > 1
            out = Image.new("RGB", (size, size))
            out.paste(im, (-left, -top))
            return np.asarray(out, dtype=np.uint8)
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    if policy == "train":
        if rng is None:
            raise ValueError("decode(policy='train') needs rng")
        left, top, cw, ch = rrc_box(w, h, rng)
        if jpeg:  # keep the crop box at least `size` pixels in both directions after the draft
            im.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
        if im.mode != "RGB":
            im = im.convert("RGB")
        sx, sy = im.size[0] / w, im.size[1] / h
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        return np.asarray(im.resize((size, size), RESAMPLE, box=box), dtype=np.uint8)
    raise ValueError(f"unknown decode policy {policy!r}; choose one of: {', '.join(POLICIES)}")


def decode(ref: Any, size: int | None = None, *, policy: Policy = "squash", rng: np.random.Generator | None = None,
           crop_pct: float = DEFAULT_CROP_PCT, hint: str = "remove it or reload with --skip-corrupt") -> np.ndarray:
    """One image as uint8 ``[H, W, 3]`` RGB (grayscale is replicated) under a resize policy (module docstring).

    Args:
        ref: a file path, :class:`~neighborlt.data.base.ShardMember`, :class:`ArrayRow`, uint8 array
            ``[H, W(, 1|3)]`` or PIL image.
        size: output side (``"full"``: ignored).
        policy: ``"squash"`` | ``"center"`` | ``"train"`` | ``"full"``.
        rng: the random source of the ``"train"`` crop.
        crop_pct: ``"center"``: the share of the resized shorter side kept.
        hint: the fix named when a file cannot be decoded.

    Raises:
        DataError: an undecodable image (names the file, or the shard and offset) or a missing shard (names the
            command that makes it).

    Example:
        >>> decode(np.zeros((40, 60), np.uint8), 32, policy="center").shape
        (32, 32, 3)
    """
    if policy == "squash" and isinstance(ref, (np.ndarray, ArrayRow)):
        a = _gray2d(np.asarray(ref.pixels if isinstance(ref, ArrayRow) else ref))
        if a.ndim == 3 and a.shape == (size, size, 3) and a.dtype == np.uint8:
            return np.ascontiguousarray(a)  # already the cache's pixels
    if isinstance(ref, (np.ndarray, ArrayRow, Image.Image)):  # a caller's PIL image is never drafted (mutated)
        return _decode_open(open_ref(ref), size, policy, rng, crop_pct, draft=False)
    try:
        with open_ref(ref) as im:
            return _decode_open(im, size, policy, rng, crop_pct)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{ref}: image file not found; {hint}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{ref}: cannot decode image ({e}); {hint}") from None


def ref_fingerprint(ref: Any) -> str:
    """What a reference's pixels come from, for cache keys: path + size + mtime (files, shards) or the array's
    fingerprint + row."""
    from .base import ShardMember

    if isinstance(ref, ArrayRow):
        return f"{ref.source.fingerprint()}[{ref.index}]"
    path = ref.shard if isinstance(ref, ShardMember) else ref
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if isinstance(ref, ShardMember):
            raise shard_missing_error(Path(ref.shard)) from None
        raise DataError(f"{path}: image file not found; re-create it or rebuild the set") from None
    return f"{ref}|{st.st_size}|{st.st_mtime_ns}"


__all__ = ["DEFAULT_CROP_PCT", "POLICIES", "ArrayRow", "ArraySource", "decode", "open_ref", "read_ref_bytes",
           "ref_fingerprint", "rrc_box", "shard_missing_error"]
