"""Torch datasets over an :class:`~neighborlt.data.base.ImageSet`, the train/eval transforms and the loaders.

Two access modes, one dataset class (:class:`ImageSetDataset`), chosen by ``train.data_mode``
(:func:`resolve_data_mode`):

- ``cache``: the images are decoded once to a uint8 ``[N, S, S, 3]`` array (:func:`neighborlt.data.as_array`, cached
  on disk and memory-mapped, squashed to S x S), so an epoch costs only the augmentation: torchvision pipelines with
  timm's RandAugment, normalised in the workers. These are the pixels and the randomness of every README table.
- ``stream``: each sample is decoded in the loader workers from its file, shard member or array row
  (:func:`neighborlt.data.pixels.decode`): RandomResizedCrop from the full image (JPEG drafted to the crop), or the
  centre view for evaluation. Workers return uint8 batches; normalisation (and Mixup/CutMix) happen on the device.
  The augmentation of a sample is a function of ``(seed, epoch, position in the epoch's list)``, never of the worker,
  so any worker count and any mid-epoch resume give the same pixels.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ..cores import available_cores
from ..data.base import ImageSet
from ..errors import ConfigError

logger = logging.getLogger(__name__)

SMALL_IMAGE = 64  # at or below this side length: pad-and-crop + flip (CIFAR recipe); above: random resized crop
AUTO_CACHE_MAX_SIDE = SMALL_IMAGE  # data_mode auto: cache at or below this image side, stream above
DataMode = Literal["cache", "stream"]
PREFETCH_FACTOR = 4  # batches each stream worker keeps ready


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


def resolve_data_mode(mode: str, image_size: int) -> DataMode:
    """The access mode a run uses: ``cache`` or ``stream`` as given; ``auto`` is ``cache`` when ``image_size`` is at
    most :data:`AUTO_CACHE_MAX_SIDE` (64 px: the array is small, and the README tables were made this way), else
    ``stream`` (at 224 px an ImageNet-LT cache with its auxiliary images would take 591 GiB and hours before step 1).

    Example:
        >>> resolve_data_mode("auto", 32), resolve_data_mode("auto", 224)
        ('cache', 'stream')
    """
    if mode == "auto":
        return "cache" if image_size <= AUTO_CACHE_MAX_SIDE else "stream"
    if mode not in ("cache", "stream"):
        raise ConfigError(f"unknown data_mode {mode!r}; choose one of: auto, cache, stream")
    return mode  # type: ignore[return-value]


def cores_per_rank(world_size: int = 1) -> int:
    """CPU cores this process may use (:func:`~neighborlt.cores.available_cores`) divided among the ranks of one
    machine (>= 1)."""
    return max(1, available_cores() // max(1, world_size))


def resolve_workers(num_workers: int | None, mode: str, world_size: int = 1) -> int:
    """Loader workers per rank: ``num_workers`` when given; else the cores per rank in stream mode and 0 in cache
    mode (cache-mode augmentation draws from the main process's generator without workers: the README's
    randomness)."""
    if num_workers is not None:
        return int(num_workers)
    return cores_per_rank(world_size) if mode == "stream" else 0


def model_crop_pct(name: str | None) -> float:
    """The evaluation crop share of a model's pretrained config (timm ``crop_pct``), 0.875 when it names none."""
    from ..data.pixels import DEFAULT_CROP_PCT

    if not name:
        return DEFAULT_CROP_PCT
    try:
        import timm

        if timm.is_model(name):
            cfg = timm.get_pretrained_cfg(name)
            if cfg is not None and getattr(cfg, "crop_pct", None):
                return float(cfg.crop_pct)
    except (ImportError, RuntimeError, ValueError):
        pass
    return DEFAULT_CROP_PCT


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` of a uint8 batch ``[B, 3, H, W]`` (on any device), as float32; the same float
    operations as ``ToTensor`` + ``Normalize``, so the result equals the CPU transform's bit for bit."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32, copy=True).div_(255).sub_(m).div_(s)  # one float buffer, never the caller's


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random source of one training sample: a function of ``(seed, epoch, position in the epoch's list)``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(position),
                                                         0x53545245]))


def _pad_crop(a: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop of the original size from ``a`` zero-padded by ``pad`` on every side (the CIFAR recipe)."""
    h, w = a.shape[:2]
    p = np.zeros((h + 2 * pad, w + 2 * pad, a.shape[2]), dtype=a.dtype)
    p[pad:pad + h, pad:pad + w] = a
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    return p[top:top + h, left:left + w]


class ImageSetDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(image tensor, label)`` pairs of an ImageSet, in ``cache`` or ``stream`` mode (module docstring).

    Cache mode: images decoded once at ``image_size`` and passed through ``transform`` (a float tensor per sample).
    Stream mode: ``__getitem__`` takes ``(index, epoch, position)`` when ``train`` (the augmentation's seed), an
    index otherwise, and returns uint8 ``[3, S, S]``; :meth:`normalize` turns a batch of them into the model's input
    on its device.

    Args:
        image_set: the images (references of any kind, or an array).
        transform: cache mode: applied to each PIL RGB image (see :func:`build_transform`); None gives the eval
            transform. Ignored in stream mode.
        image_size: side length S of the model's input.
        mode: ``"cache"`` or ``"stream"``.
        train: stream mode: random crops and flips (else the centre view).
        seed: stream mode: the run's seed (with the epoch and position, the sample's augmentation).
        randaugment: stream mode: a timm RandAugment spec, applied after the crop and flip.
        normalization: (mean, std) of the model's input (default ImageNet's).
        crop_pct: stream evaluation: the share of the resized shorter side kept (the model's pretrained config).

    Example:
        >>> ds = ImageSetDataset(image_set, build_transform(32, train=True), 32)  # doctest: +SKIP
        >>> x, y = ds[0]  # doctest: +SKIP
    """

    def __init__(self, image_set: ImageSet, transform: Callable[[Image.Image], Any] | None, image_size: int, *,
                 mode: DataMode = "cache", train: bool = False, seed: int = 0, randaugment: str | None = None,
                 normalization: Normalization | None = None, crop_pct: float | None = None) -> None:
        from ..data.pixels import DEFAULT_CROP_PCT

        if mode not in ("cache", "stream"):
            raise ConfigError(f"unknown data mode {mode!r}; choose cache or stream")
        self.image_set = image_set
        self.image_size = image_size
        self.mode = mode
        self.labels = image_set.labels
        self.normalization = normalization if normalization is not None else default_normalization()
        self.train = train
        self.seed = int(seed)
        self.crop_pct = float(crop_pct or DEFAULT_CROP_PCT)
        self._randaugment: Any = None
        self._loader: DataLoader[Any] | None = None
        self._batches = _BatchList()
        if mode == "cache":
            from ..data import as_array

            self.transform = transform if transform is not None else build_transform(image_size, train=False)
            self.array: np.ndarray | None = as_array(image_set, image_size)
        else:
            self.transform = None
            self.array = None
            if image_size < 8:
                raise ConfigError(f"image_size must be >= 8, got {image_size}")
            if train and randaugment:
                self._randaugment = _rand_augment(randaugment, image_size, self.normalization)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        if self.mode == "cache":
            img = Image.fromarray(np.asarray(self.array[key]))  # type: ignore[index]
            return self.transform(img), int(self.labels[key])  # type: ignore[misc]
        from ..data.pixels import decode

        S = self.image_size
        if self.train:
            if not isinstance(key, tuple):
                raise TypeError("a stream-mode training dataset is indexed by (index, epoch, position)")
            i, epoch, position = (int(k) for k in key)
            rng = sample_rng(self.seed, epoch, position)
            ref = self.image_set.ref(i)
            if S <= SMALL_IMAGE:
                a = _pad_crop(decode(ref, S, policy="squash"), max(1, S // 8), rng)
            else:
                a = decode(ref, S, policy="train", rng=rng)
            if rng.random() < 0.5:
                a = a[:, ::-1]
            if self._randaugment is not None:
                a = self._apply_randaugment(a, rng)
        else:
            i = int(key)
            a = decode(self.image_set.ref(i), S, policy="center", crop_pct=self.crop_pct)
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a).permute(2, 0, 1), int(self.labels[i])

    def _apply_randaugment(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """timm's RandAugment draws from Python's ``random`` and NumPy's global generator: both seeded per sample
        from ``rng``, the caller's states restored."""
        state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(int(rng.integers(0, 2**63 - 1)))
            np.random.seed(int(rng.integers(0, 2**32 - 1)))
            return np.asarray(self._randaugment(Image.fromarray(np.ascontiguousarray(a))), dtype=np.uint8)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch from this dataset (stream mode) as the model's normalised float input, on ``x``'s device."""
        mean, std = self.normalization
        return normalize_uint8(x, mean, std)

    # -- stream-mode training loader -------------------------------------------------------------------------

    def train_batches(self, batches: list[list[int]], epoch: int, first_position: Sequence[int] | None = None, *,
                      rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream-mode training batches ``(uint8 [B, 3, S, S], int64 [B])`` for index batches of this rank's list.

        One loader serves the whole run: its workers persist across epochs and keep :data:`PREFETCH_FACTOR`
        batches each in flight. Sample ``k`` of batch ``b`` is at position ``first_position[b] + k`` of this rank's
        list, i.e. at ``rank + world_size * (first_position[b] + k)`` of the epoch's full list: the position that,
        with the seed and the epoch, fixes its augmentation (so ranks agree and resume is exact).

        Args:
            batches: index batches (this rank's, in order).
            epoch: the epoch.
            first_position: position in this rank's list of each batch's first sample (default: consecutive
                batches from 0).
            rank: this rank; world_size: the ranks.
            num_workers: loader workers (0: decode in this process).
            pin_memory: page-locked batches (CUDA).
        """
        if self.mode != "stream" or not self.train:
            raise ConfigError("train_batches needs a stream-mode training dataset")
        if first_position is None:
            first_position = list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
        keyed = [[(int(i), int(epoch), int(rank + world_size * (int(p0) + k))) for k, i in enumerate(b)]
                 for b, p0 in zip(batches, first_position)]
        if self._loader is None or self._loader.num_workers != num_workers:
            g = torch.Generator()
            g.manual_seed(0)  # the loader's own seed draw must not consume the global generator
            self._loader = DataLoader(self, batch_sampler=self._batches, num_workers=num_workers,
                                      pin_memory=pin_memory, generator=g, persistent_workers=num_workers > 0,
                                      prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None)
        self._batches.batches = keyed
        it = iter(self._loader)
        done = False
        try:
            for x, y in it:
                yield x, torch.as_tensor(y, dtype=torch.int64)
            done = True
        finally:
            if not done:  # abandoned mid-epoch (a signal): stop the workers now, not at garbage collection
                self.close()

    def close(self) -> None:
        """Stop the persistent workers of :meth:`train_batches` now. Dropping the dataset is not enough: it and its
        loader refer to each other, so the workers would live on until a garbage collection."""
        loader, self._loader = self._loader, None
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loader"] = None  # workers get the dataset, never the loader that feeds them
        return state


class _BatchList(Sampler[list[Any]]):
    """The batches of the current epoch, replaced before each pass (a persistent loader re-reads it per epoch)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _rand_augment(spec: str, image_size: int, normalization: Normalization) -> Any:
    from timm.data import rand_augment_transform

    mean = normalization[0]
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    try:
        return rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"invalid RandAugment config {spec!r} ({e}); use e.g. 'rand-m9-mstd0.5-inc1'") from None


def eval_loader(image_set: ImageSet, image_size: int, batch_size: int, num_workers: int, *, mode: DataMode,
                normalization: Normalization | None = None, crop_pct: float | None = None,
                pin_memory: bool = False) -> DataLoader[Any]:
    """A loader of the evaluation view of ``image_set`` in order: cache mode yields normalised float batches
    (the decoded array through the eval transform), stream mode uint8 batches (normalise them with
    :func:`normalize_uint8` on the device)."""
    if mode == "cache":
        ds = ImageSetDataset(image_set, build_transform(image_size, train=False, normalization=normalization),
                             image_size)
    else:
        ds = ImageSetDataset(image_set, None, image_size, mode="stream", normalization=normalization,
                             crop_pct=crop_pct)
    kw: dict[str, Any] = {"prefetch_factor": PREFETCH_FACTOR} if num_workers > 0 and mode == "stream" else {}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory, **kw)
