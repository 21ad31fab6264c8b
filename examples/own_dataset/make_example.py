"""Build the "Bring your own dataset" example from the offline Tiny-ImageNet archive (no internet needed).

It writes, under ``--out`` (default ``examples/own_dataset/data``):

* ``my_dataset/train/<class name>/*.jpg`` and ``my_dataset/test/<class name>/*.jpg``: a small long-tailed ImageFolder
  dataset of six Tiny-ImageNet classes (head -> tail: 300, 130, 55, 25, 10, 5 training images with the defaults;
  50 test images each, Tiny-ImageNet's validation images). This stands in for *your* long-tailed dataset.
* ``pool/images/*.jpg`` and ``pool/pool.csv`` (``path,caption``): a separate captioned image pool, 100 images of each
  of ten *other* Tiny-ImageNet classes, captioned with their Tiny-ImageNet names (``words.txt``). This stands in for
  the images you could collect for auxiliary classes (a web crawl, a URL list, an unlabelled folder with captions).

The targets were picked so that their WordNet neighbours are classes of the pool (golden retriever -> Labrador
retriever, lemon -> orange, school bus -> trolleybus, sports car -> convertible / beach wagon, mantis -> grasshopper /
cockroach, chimpanzee -> orangutan); two pool classes (bullfrog, teapot) are nobody's neighbour and are never used.

Run from the repository root::

    .venv/bin/python examples/own_dataset/make_example.py

The Tiny-ImageNet archive is found like every neighborlt dataset (``--data-dir``, ``$NEIGHBORLT_DATA``,
``../shared/data``) and extracted once into the cache (``$NEIGHBORLT_CACHE``, default ``~/.cache/neighborlt``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

#: Target classes of the example, head -> tail (Tiny-ImageNet names; the folder names of the dataset).
TARGETS = ["golden retriever", "lemon", "school bus", "sports car", "mantis", "chimpanzee"]
#: Pool classes: WordNet neighbours of the targets, plus two classes that are nobody's neighbour.
POOL = ["Labrador retriever", "orange", "trolleybus", "convertible", "beach wagon", "grasshopper", "cockroach",
        "orangutan", "bullfrog", "teapot"]


def long_tail_counts(n_classes: int, n_max: int, ratio: float) -> list[int]:
    """Exponential profile n_max * ratio^(-i/(L-1)): the usual long-tail benchmark shape."""
    if n_classes == 1:
        return [n_max]
    return [max(1, round(n_max * ratio ** (-i / (n_classes - 1)))) for i in range(n_classes)]


def _copy(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dst = folder / p.name
        shutil.copyfile(p, dst)
        out.append(dst)
    return out


def build(out: Path, *, data_dir: str | None = None, n_max: int = 300, ratio: float = 60.0, test: int = 50,
          pool_per_class: int = 100, seed: int = 0, targets: list[str] | None = None,
          pool: list[str] | None = None) -> dict[str, object]:
    """Write the example dataset and pool under ``out``; returns a summary (counts, paths)."""
    from neighborlt.data.readers import load_dataset

    targets = targets or TARGETS
    pool = pool or POOL
    train = load_dataset("tiny-imagenet", "train", data_dir)
    val = load_dataset("tiny-imagenet", "test", data_dir)
    by_name = {n: i for i, n in enumerate(train.class_names)}
    missing = [n for n in targets + pool if n not in by_name]
    if missing:
        raise SystemExit(f"not Tiny-ImageNet class names: {', '.join(missing)}")
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    dataset, pool_dir = out / "my_dataset", out / "pool"
    counts = long_tail_counts(len(targets), n_max, ratio)

    def pick(image_set: object, name: str, n: int) -> list[Path]:
        idx = np.flatnonzero(np.asarray(image_set.labels) == by_name[name])  # type: ignore[attr-defined]
        chosen = np.sort(rng.permutation(idx)[:n])
        return [Path(image_set.paths[i]) for i in chosen]  # type: ignore[attr-defined]

    for name, n in zip(targets, counts):
        _copy(pick(train, name, n), dataset / "train" / name)
        _copy(pick(val, name, test), dataset / "test" / name)
    rows = []
    for name in pool:
        cid = train.class_ids[by_name[name]]
        words = ", ".join(train.synonyms.get(cid, [name]))
        for p in _copy(pick(train, name, pool_per_class), pool_dir / "images"):
            rows.append({"path": f"images/{p.name}", "caption": f"a photo of a {words}"})
    pool_dir.mkdir(parents=True, exist_ok=True)
    with open(pool_dir / "pool.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    return {"dataset": str(dataset), "pool": str(pool_dir / "pool.csv"), "train_counts": dict(zip(targets, counts)),
            "test_per_class": test, "pool_images": len(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("examples/own_dataset/data"), help="output folder")
    ap.add_argument("--data-dir", default=None, help="folder holding tiny-imagenet-200.tar.gz (default: as neighborlt)")
    ap.add_argument("--n-max", type=int, default=300, help="training images of the head class")
    ap.add_argument("--ratio", type=float, default=60.0, help="imbalance ratio n_max / n_min")
    ap.add_argument("--test", type=int, default=50, help="test images per class (at most 50)")
    ap.add_argument("--pool-per-class", type=int, default=100, help="pool images per pool class (at most 500)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = build(a.out, data_dir=a.data_dir, n_max=a.n_max, ratio=a.ratio, test=a.test,
                 pool_per_class=a.pool_per_class, seed=a.seed)
    counts = ", ".join(f"{k} {v}" for k, v in info["train_counts"].items())  # type: ignore[union-attr]
    print(f"wrote {info['dataset']}/train and /test ({counts}; {info['test_per_class']} test images each)")
    print(f"wrote {info['pool']} ({info['pool_images']} captioned pool images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
