"""Torch datasets over an :class:`~neighborlt.data.base.ImageSet` and the train/eval transforms.

Images are decoded once to a uint8 ``[N, S, S, 3]`` array (:func:`neighborlt.data.as_array`, cached on disk and
memory-mapped), so an epoch costs only the augmentation. Transforms are torchvision pipelines with timm's
RandAugment and ImageNet normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..data.base import ImageSet
from ..errors import ConfigError

logger = logging.getLogger(__name__)

SMALL_IMAGE = 64  # at or below this side length: pad-and-crop + flip (CIFAR recipe); above: random resized crop


Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def default_normalization() -> Normalization:
    """ImageNet (mean, std) (timm's defaults): the normalisation when no model is named."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def build_transform(image_size: int, train: bool, randaugment: str | None = None, *,
                    normalization: Normalization | None = None) -> Callable[[Image.Image], Any]:
    """The image transform for training or evaluation.

    Training: for ``image_size <= 64`` a random crop with ``image_size // 8`` padding (4 px at 32 px) and a
    horizontal flip, the CIFAR recipe; for larger images a random resized crop and a flip. Then optionally
    RandAugment (timm's ``rand_augment_transform``, e.g. ``"rand-m9-mstd0.5-inc1"``). Evaluation: resize the
    shorter side and centre-crop to ``image_size``. Both end with ``ToTensor`` and normalisation.

    Args:
        image_size: output side length in pixels.
        train: training (random) or evaluation (deterministic) transform.
        randaugment: a timm RandAugment config string, or None.
        normalization: (mean, std); default ImageNet statistics. Pass
            ``neighborlt.train.models.model_normalization(model_name)`` for pretrained weights that expect
            another convention (``efficientnet_lite0``: 0.5 / 0.5).

    Returns:
        A callable mapping a PIL RGB image to a float tensor [3, image_size, image_size].

    Raises:
        ConfigError: invalid size or RandAugment string.

    Example:
        >>> t = build_transform(32, train=True, randaugment="rand-m9-mstd0.5")
        >>> t(Image.new("RGB", (32, 32))).shape
        torch.Size([3, 32, 32])
    """
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8, got {image_size}")
    mean, std = normalization if normalization is not None else default_normalization()
    ops: list[Any] = []
    if train:
        if image_size <= SMALL_IMAGE:
            ops += [T.Resize(image_size), T.CenterCrop(image_size),
                    T.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="constant")]
        else:
            ops += [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
        ops.append(T.RandomHorizontalFlip())
        if randaugment:
            from timm.data import rand_augment_transform

            hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
            try:
                ops.append(rand_augment_transform(randaugment, hparams))
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise ConfigError(
                    f"invalid RandAugment config {randaugment!r} ({e}); use e.g. 'rand-m9-mstd0.5-inc1'"
                ) from None
    else:
        if randaugment:
            logger.debug("RandAugment is only applied to training transforms")
        ops += [T.Resize(image_size), T.CenterCrop(image_size)]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def transform_key(transform: Any) -> str:
    """A stable text description of a transform (its repr: every op and parameter), for cache keys."""
    return " ".join(repr(transform).split())


class ImageSetDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(image tensor, label)`` pairs from an ImageSet decoded once at ``image_size``.

    Args:
        image_set: the images (file- or array-backed).
        transform: applied to each PIL RGB image (see :func:`build_transform`); None gives the eval transform.
        image_size: side length the images are decoded to (the transform's input size).

    Example:
        >>> ds = ImageSetDataset(image_set, build_transform(32, train=True), 32)  # doctest: +SKIP
        >>> x, y = ds[0]  # doctest: +SKIP
    """

    def __init__(self, image_set: ImageSet, transform: Callable[[Image.Image], Any] | None, image_size: int) -> None:
        from ..data import as_array

        self.image_set = image_set
        self.image_size = image_size
        self.transform = transform if transform is not None else build_transform(image_size, train=False)
        self.array: np.ndarray = as_array(image_set, image_size)
        self.labels = image_set.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(np.asarray(self.array[i]))
        return self.transform(img), int(self.labels[i])
