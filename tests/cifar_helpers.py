"""Helpers shared by several test modules (imported as ``cifar_helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from neighborlt.data.base import ImageSet


def read_cifar_test_images(archive, classes: list[str], per_class: int) -> ImageSet:
    """The first ``per_class`` CIFAR-10 test JPEGs of each class, read straight from the archive (the test split
    comes first in it, so this stops early instead of extracting 60,000 files)."""
    want = {c: [] for c in classes}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "train":
                break
            if member.isfile() and len(parts) == 4 and parts[2] in want and len(want[parts[2]]) < per_class:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    want[parts[2]].append(np.asarray(im.convert("RGB")))
    labels = np.repeat(np.arange(len(classes)), [len(want[c]) for c in classes])
    return ImageSet(class_names=classes, labels=labels, array=np.stack([a for c in classes for a in want[c]]),
                    source=str(archive))
