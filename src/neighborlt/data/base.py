"""The labeled image collection every reader returns and every later stage consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError


@dataclass(frozen=True, slots=True)  # slots: millions per run (about 130 bytes each, bench/data_scale.py --refs)
class ShardMember:
    """One image stored inside a WebDataset tar shard, read with one seek (the retrieve stage's downloads).

    Attributes:
        shard: the ``.tar`` file.
        offset: byte offset of the member's data in the tar.
        size: length of the member's data in bytes.
    """

    shard: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except FileNotFoundError:
            from .pixels import shard_missing_error

            raise shard_missing_error(Path(self.shard)) from None
        if len(data) != self.size:
            raise DataError(f"{self.shard}: truncated at offset {self.offset}; re-run `neighborlt retrieve`")
        return data

    def __str__(self) -> str:
        return f"{self.shard}@{self.offset}+{self.size}"


def open_image(p: Any) -> Image.Image:
    """Open a file path, a :class:`ShardMember` or an :class:`~neighborlt.data.pixels.ArrayRow` with Pillow (lazy,
    like ``Image.open``; a missing shard is a one-line error naming the command that makes it)."""
    from .pixels import open_ref

    return open_ref(p)


@dataclass
class ImageSet:
    """Labeled images: references (``paths``: files, shard members and rows of in-memory arrays, mixed freely) or
    one in-memory uint8 array (``array``). Sets are combined by joining reference lists, never by copying pixels;
    every read goes through :func:`neighborlt.data.pixels.decode`.

    Attributes:
        class_names: name of each class index (human-readable, e.g. ``"golden retriever"``).
        labels: int64 array [N] of class indices into ``class_names``.
        paths: per sample an image file, a :class:`ShardMember` inside a tar shard or an
            :class:`~neighborlt.data.pixels.ArrayRow` of an in-memory array (reference-backed sets), or None.
        array: uint8 array [N, H, W, 3] or [N, H, W] (array-backed sets), or None.
        class_ids: stable id per class (WordNet id for Tiny-ImageNet, folder name for ImageFolder);
            defaults to ``class_names``.
        source: where the set came from (file or directory) for error messages.
        synonyms: all known names per class id (Tiny-ImageNet ``words.txt``); classes without an entry
            are known by their name only.
        skipped: files dropped as corrupt when the reader ran with ``skip_corrupt=True`` (never silent:
            readers log the count and stages write it to the run log).
    """

    class_names: list[str]
    labels: np.ndarray
    paths: list[Any] | None = None
    array: np.ndarray | None = None
    class_ids: list[str] = field(default_factory=list)
    source: str = ""
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.class_ids:
            self.class_ids = list(self.class_names)
        if (self.paths is None) == (self.array is None):
            raise ValueError("ImageSet needs exactly one of paths or array")
        n = len(self.paths) if self.paths is not None else len(self.array)  # type: ignore[arg-type]
        if n != len(self.labels):
            raise ValueError(f"{self.source}: {n} images but {len(self.labels)} labels")
        if len(self.class_ids) != len(self.class_names):
            raise ValueError(f"{self.source}: {len(self.class_ids)} class ids but {len(self.class_names)} names")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            bad = int(np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))[0])
            raise DataError(
                f"{self.source}: label {int(self.labels[bad])} of sample {bad} is out of range "
                f"0..{len(self.class_names) - 1}; fix the label or the class-names file"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> np.ndarray:
        """Number of images per class, int64 [num_classes]."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def ref(self, i: int) -> Any:
        """The reference of sample ``i``: its file, :class:`ShardMember` or :class:`~neighborlt.data.pixels.ArrayRow`
        (a row of ``array`` for array-backed sets)."""
        if self.paths is not None:
            return self.paths[i]
        from .pixels import ArrayRow

        return ArrayRow(self.array_source(), int(i))

    def refs(self) -> list[Any]:
        """Every sample's reference (see :meth:`ref`), for joining sets without copying pixels."""
        if self.paths is not None:
            return list(self.paths)
        src = self.array_source()
        from .pixels import ArrayRow

        return [ArrayRow(src, i) for i in range(len(self))]

    def array_source(self) -> Any:
        """The :class:`~neighborlt.data.pixels.ArraySource` of an array-backed set (one per set, so its fingerprint
        is computed once)."""
        from .pixels import ArraySource

        if self.array is None:
            raise ValueError(f"{self.source}: not an array-backed set")
        src = self.__dict__.get("_array_source")
        if src is None or src.array is not self.array:
            src = ArraySource(self.array, self.source or "array")
            self.__dict__["_array_source"] = src
        return src

    def load(self, i: int) -> Image.Image:
        """Decode sample ``i`` as an RGB PIL image (grayscale is converted), through the one decode function."""
        from .pixels import decode

        return Image.fromarray(decode(self.ref(i), policy="full", hint="remove it or pass --skip-corrupt"))

    def subset(self, indices: Sequence[int] | np.ndarray, *, relabel: dict[int, int] | None = None,
               class_names: list[str] | None = None, class_ids: list[str] | None = None) -> ImageSet:
        """A new set with the given samples; optionally remap labels to a new class list."""
        idx = np.asarray(indices, dtype=np.int64)
        labels = self.labels[idx]
        names, ids = self.class_names, self.class_ids
        if relabel is not None:
            labels = np.array([relabel[int(y)] for y in labels], dtype=np.int64)
            if class_names is None:
                raise ValueError("relabel needs class_names")
            names = class_names
            ids = class_ids or class_names
        keep_ids = set(ids)
        return ImageSet(
            class_names=list(names),
            labels=labels,
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            array=self.array[idx] if self.array is not None else None,
            class_ids=list(ids),
            source=self.source,
            synonyms={k: list(v) for k, v in self.synonyms.items() if k in keep_ids},
            skipped=list(self.skipped),
        )
