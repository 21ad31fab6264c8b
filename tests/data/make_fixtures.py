"""Generators of small dataset fixtures in each supported layout (written into a temp dir by the tests)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _img(path: Path, seed: int, size: int = 16, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def image_folder(root: Path, classes: dict[str, int], ext: str = ".png") -> Path:
    """``root/<class>/<i><ext>`` with the given number of images per class."""
    k = 0
    for name, n in classes.items():
        for i in range(n):
            _img(root / name / f"{i:03d}{ext}", k)
            k += 1
    return root


def split_file(root: Path, labels: list[int], names: list[str] | None, name: str = "train.txt") -> Path:
    """An ImageNet-LT style split file ``images/<i>.jpg label`` plus an optional ``classnames.txt``."""
    lines = []
    for i, y in enumerate(labels):
        _img(root / "images" / f"{i:03d}.jpg", i)
        lines.append(f"images/{i:03d}.jpg {y}")
    (root / name).write_text("\n".join(lines) + "\n")
    if names is not None:
        (root / "classnames.txt").write_text("\n".join(names) + "\n")
    return root / name


def tiny_imagenet(root: Path, wnids: list[str], n_train: int = 3, n_val: int = 2) -> Path:
    """A miniature of Tiny-ImageNet's official layout (grayscale image included)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = {"n02085620": "Chihuahua", "n02094433": "Yorkshire terrier", "n01443537": "goldfish, Carassius auratus",
             "n99999999": "unrelated"}
    (root / "words.txt").write_text("".join(f"{w}\t{words.get(w, w)}\n" for w in wnids) + "n00000001\tentity\n")
    ann = []
    k = 0
    for w in wnids:
        for i in range(n_train):
            _img(root / "train" / w / "images" / f"{w}_{i}.JPEG", k, 64, "L" if k == 0 else "RGB")
            k += 1
        for i in range(n_val):
            fn = f"val_{len(ann)}.JPEG"
            _img(root / "val" / "images" / fn, k, 64)
            k += 1
            ann.append(f"{fn}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def cifar_pickles(root: Path, variant: str = "cifar10", per_batch: int = 6) -> Path:
    """Official-format CIFAR python pickles (random pixels, labels cycling over the classes)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if variant == "cifar10":
        names = ["airplane", "automobile", "bird"]
        dump("batches.meta", {b"label_names": [n.encode() for n in names]})
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            dump(b, {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                     b"labels": [i % 3 for i in range(per_batch)]})
    else:
        names = ["apple", "aquarium_fish", "baby", "bear"]
        dump("meta", {b"fine_label_names": [n.encode() for n in names]})
        for b in ("train", "test"):
            dump(b, {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                     b"fine_labels": [i % 4 for i in range(per_batch)]})
    return root


def inat_json(root: Path, n_per_cat: int = 2) -> Path:
    """An iNaturalist-18 style annotation file with 3 categories (ids not contiguous)."""
    cats = [{"id": 7, "name": "Aves"}, {"id": 2, "name": "Plantae"}, {"id": 30, "name": "Insecta"}]
    images, anns = [], []
    k = 0
    for c in cats:
        for _ in range(n_per_cat):
            fn = f"train_val2018/{c['name']}/{k}.jpg"
            _img(root / fn, k)
            images.append({"id": 100 + k, "file_name": fn, "width": 16, "height": 16})
            anns.append({"id": k, "image_id": 100 + k, "category_id": c["id"]})
            k += 1
    path = root / "train2018.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def omniglot_npz(path: Path, alphabets: int = 2, chars: int = 4, drawers: int = 20) -> Path:
    """A miniature omniglot_small.npz with the same arrays and meaning."""
    rng = np.random.default_rng(0)
    names = [f"Alpha{a}/character{c + 1:02d}" for a in range(alphabets) for c in range(chars)]
    y = np.repeat(np.arange(len(names)), drawers)
    drawer = np.tile(np.arange(1, drawers + 1), len(names))
    x = rng.integers(0, 2, (len(y), 105, 105), dtype=np.uint8) * 255
    np.savez(path, x=x, y_fine=y, y_coarse=y // chars, drawer=drawer, fine_names=np.array(names),
             coarse_names=np.array([f"Alpha{a}" for a in range(alphabets)]),
             fine_to_coarse=np.arange(len(names)) // chars)
    return path
