"""Dataset readers: split files (ImageNet-LT / Places-LT / iNat format), ImageFolder trees, Tiny-ImageNet's
official layout, the official CIFAR-10/100 pickles, iNaturalist-18 JSON and the Omniglot ``.npz``.

Every reader returns an :class:`~neighborlt.data.base.ImageSet` and turns bad input (missing files, labels out
of range, empty classes, a class-names file that disagrees with the labels) into a one-line
:class:`~neighborlt.errors.DataError` naming the file and line. ``load_dataset`` resolves a dataset name or
path, extracting archives once into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, where
from ..paths import cache_dir, data_search_paths
from .archives import extract_archive, is_archive
from .base import ImageSet

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CLASS_NAME_FILES = ("classnames.txt", "class_names.txt", "classes.txt")
NAMED_DATASETS = ("cifar10", "cifar100", "tiny-imagenet", "omniglot")
OMNIGLOT_TRAIN_DRAWERS = range(1, 16)  # drawers 1-15 train, 16-20 test (no official split; PROVENANCE.md)


# --------------------------------------------------------------------------------------------------- helpers
def _verify_image(path: Path) -> str | None:
    """Decode ``path`` fully; return the error text or None when it decodes."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def drop_corrupt(image_set: ImageSet, *, skip_corrupt: bool) -> ImageSet:
    """Decode every file of a path-backed set; drop corrupt ones (``skip_corrupt``) or raise on the first.

    Args:
        image_set: a path-backed set.
        skip_corrupt: drop corrupt images and list them in ``ImageSet.skipped`` instead of raising.

    Returns:
        The set without corrupt images (the same object when none is corrupt).

    Raises:
        DataError: a corrupt image when ``skip_corrupt`` is False.
    """
    if image_set.paths is None:
        return image_set
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as ex:
        errors = list(ex.map(_verify_image, image_set.paths, chunksize=256))
    bad = [i for i, e in enumerate(errors) if e is not None]
    if not bad:
        return image_set
    if not skip_corrupt:
        i = bad[0]
        raise DataError(
            f"{image_set.paths[i]}: cannot decode image ({errors[i]}); remove it or pass --skip-corrupt "
            f"({len(bad)} corrupt in {image_set.source})"
        )
    keep = np.setdiff1d(np.arange(len(image_set)), np.asarray(bad))
    out = image_set.subset(keep)
    out.skipped = list(image_set.skipped) + [str(image_set.paths[i]) for i in bad]
    logger.warning("skipped %d corrupt image(s) in %s (first: %s)", len(bad), image_set.source, out.skipped[-len(bad)])
    _check_nonempty(out, image_set.source, "after skipping corrupt images")
    return out


def _check_nonempty(image_set: ImageSet, source: object, context: str = "", lines: dict[int, str] | None = None) -> None:
    """Raise when a class has no images (``lines`` maps class index -> 'file:line' of its definition)."""
    counts = image_set.counts()
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        c = int(empty[0])
        loc = lines.get(c, str(source)) if lines else str(source)
        more = f" ({len(empty)} empty classes)" if len(empty) > 1 else ""
        raise DataError(
            f"{loc}: class {c} ({image_set.class_names[c]!r}) has no images{(' ' + context) if context else ''}{more}; "
            "add images or remove the class from the class list"
        )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def read_class_names(path: str | os.PathLike[str]) -> tuple[list[str], dict[int, str]]:
    """Read a class-names file: one name per line (line order = index), or ``index name`` lines.

    Returns:
        (names, location of each index as ``file:line``).

    Raises:
        DataError: duplicate or missing indices, empty names.
    """
    path = Path(path)
    entries: list[tuple[int | None, str, int]] = []
    for ln, raw in enumerate(_read_lines(path), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        if head.isdigit() and rest.strip():
            entries.append((int(head), rest.strip(), ln))
        else:
            entries.append((None, line, ln))
    if not entries:
        raise DataError(f"{path}: class-names file is empty; write one class name per line")
    indexed = [e for e in entries if e[0] is not None]
    if indexed and len(indexed) != len(entries):
        ln = next(e[2] for e in entries if e[0] is None)
        raise DataError(f"{where(path, ln)}: mixes 'index name' and plain-name lines; use one form throughout")
    if not indexed:
        return [e[1] for e in entries], {i: where(path, e[2]) for i, e in enumerate(entries)}
    names: dict[int, str] = {}
    locs: dict[int, str] = {}
    for idx, name, ln in entries:
        assert idx is not None
        if idx in names:
            raise DataError(f"{where(path, ln)}: class index {idx} appears twice; keep one line per class")
        names[idx], locs[idx] = name, where(path, ln)
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise DataError(f"{path}: class indices must be 0..{len(names) - 1}; index {missing[0]} is missing")
    return [names[i] for i in range(len(names))], locs


# --------------------------------------------------------------------------------------------------- split files
def read_split_file(split_file: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                    class_names_file: str | os.PathLike[str] | None = None, *,
                    skip_corrupt: bool = False, verify: bool = False) -> ImageSet:
    """Read an ImageNet-LT / Places-LT / iNaturalist-18 split file (``relative/path label`` per line).

    Args:
        split_file: the text file, e.g. ``ImageNet_LT_train.txt``.
        root: folder the relative paths start from (default: the split file's folder).
        class_names_file: class names (one per line or ``index name``); default ``classnames.txt`` /
            ``class_names.txt`` / ``classes.txt`` next to the split file, else the labels' numbers.
        skip_corrupt: decode every image and drop corrupt ones (listed in ``skipped``).
        verify: decode every image and raise on the first corrupt one.

    Raises:
        DataError: a malformed line, a missing image, a label out of range, an empty class.
    """
    split_file = Path(split_file)
    base = Path(root) if root is not None else split_file.parent
    if class_names_file is None:
        for cand in CLASS_NAME_FILES:
            if (split_file.parent / cand).is_file():
                class_names_file = split_file.parent / cand
                break
    names: list[str] | None = None
    name_locs: dict[int, str] = {}
    if class_names_file is not None:
        names, name_locs = read_class_names(class_names_file)
    paths: list[Path] = []
    labels: list[int] = []
    for ln, raw in enumerate(_read_lines(split_file), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # the label is the last field; paths may contain spaces
        rel, lab = (parts[0].strip(), parts[1]) if len(parts) == 2 else ("", line)
        if not rel or not lab.lstrip("-").isdigit():
            raise DataError(f"{where(split_file, ln)}: expected 'relative/path label', got {line[:80]!r}")
        y = int(lab)
        if y < 0 or (names is not None and y >= len(names)):
            rng = f"0..{len(names) - 1} (the {len(names)} classes of {class_names_file})" if names else ">= 0"
            raise DataError(
                f"{where(split_file, ln)}: label {y} is out of range {rng}; fix the label or the class-names file"
            )
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{where(split_file, ln)}: path {rel!r} must be relative to {base} without '..'")
        full = base / p
        if not full.is_file():
            raise DataError(f"{where(split_file, ln)}: image {full} not found; fix the path or --root")
        paths.append(full)
        labels.append(y)
    if not paths:
        raise DataError(f"{split_file}: no 'path label' lines; is this the right split file?")
    if names is None:
        names = [str(i) for i in range(max(labels) + 1)]
    out = ImageSet(class_names=names, labels=np.asarray(labels), paths=paths, source=str(split_file))
    _check_nonempty(out, split_file, f"in {split_file}", name_locs)
    if skip_corrupt or verify:
        out = drop_corrupt(out, skip_corrupt=skip_corrupt)
    return out


# --------------------------------------------------------------------------------------------------- ImageFolder
def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); ``os.scandir`` avoids a stat per file on big trees."""
    found: list[str] = []
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(e.path)
    # each Path is its folder's Path joined with the name: parsing only the name is half the cost of a whole path
    parents: dict[str, Path] = {}
    out: list[Path] = []
    for p in sorted(found):
        head, _, name = p.rpartition(os.sep)
        parent = parents.get(head)
        if parent is None:
            parent = parents[head] = Path(head or os.sep)
        out.append(parent / name)
    return out


def read_image_folder(root: str | os.PathLike[str], *, skip_corrupt: bool = False, verify: bool = False) -> ImageSet:
    """Read an ImageFolder tree ``root/<class>/**/<image>`` (classes in sorted folder order).

    Raises:
        DataError: no class folders, or a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected root/<class>/<image> (ImageFolder layout)")
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        files = _list_images(root / name)
        if not files:
            raise DataError(f"{root / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...); "
                            "add images or delete the folder")
        paths.extend(files)
        labels.extend([c] * len(files))
    out = ImageSet(class_names=classes, labels=np.asarray(labels), paths=paths, source=str(root))
    if skip_corrupt or verify:
        out = drop_corrupt(out, skip_corrupt=skip_corrupt)
    return out


# --------------------------------------------------------------------------------------------------- Tiny-ImageNet
def read_words(path: str | os.PathLike[str], wanted: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read ImageNet ``words.txt`` (``wnid<TAB>name, synonym, ...``) -> wnid -> names."""
    path = Path(path)
    want = set(wanted) if wanted is not None else None
    out: dict[str, list[str]] = {}
    for ln, raw in enumerate(_read_lines(path), 1):
        if not raw.strip():
            continue
        wnid, sep, words = raw.partition("\t")
        if not sep:
            raise DataError(f"{where(path, ln)}: expected 'wnid<TAB>names', got {raw[:60]!r}")
        wnid = wnid.strip()
        if want is None or wnid in want:
            out[wnid] = [w.strip() for w in words.split(",") if w.strip()]
    return out


def read_tiny_imagenet(root: str | os.PathLike[str], split: str = "train", *, skip_corrupt: bool = False,
                       verify: bool = False) -> ImageSet:
    """Read Tiny-ImageNet's official layout (``wnids.txt``, ``words.txt``, ``train/<wnid>/images``,
    ``val/images`` + ``val/val_annotations.txt``). ``split`` is ``train`` or ``val`` (``test`` = val).

    Class ids are the WordNet ids, class names the first name in ``words.txt``, and ``synonyms`` all names.

    Raises:
        DataError: missing files, unknown wnids in the annotations, empty classes.
    """
    root = Path(root)
    wnids_file = root / "wnids.txt"
    wnids = [w.strip() for w in _read_lines(wnids_file) if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{wnids_file}: duplicate class ids; keep each wnid once")
    index = {w: i for i, w in enumerate(wnids)}
    words_file = root / "words.txt"
    words = read_words(words_file, wnids) if words_file.is_file() else {}
    names = [words.get(w, [w])[0] for w in wnids]
    synonyms = {w: words.get(w, [w]) for w in wnids}
    paths: list[Path] = []
    labels: list[int] = []
    line_of: dict[int, str] = {i: where(wnids_file, ln) for ln, i in enumerate(range(len(wnids)), 1)}
    if split == "train":
        for i, w in enumerate(wnids):
            d = root / "train" / w / "images"
            if not d.is_dir():
                raise DataError(f"{d}: missing training folder for class {w} (listed in {wnids_file})")
            files = _list_images(d)
            paths.extend(files)
            labels.extend([i] * len(files))
        source = root / "train"
    elif split in ("val", "test"):
        ann = root / "val" / "val_annotations.txt"
        for ln, raw in enumerate(_read_lines(ann), 1):
            if not raw.strip():
                continue
            parts = raw.split("\t")
            if len(parts) < 2:
                raise DataError(f"{where(ann, ln)}: expected 'file<TAB>wnid<TAB>box', got {raw[:60]!r}")
            fname, w = parts[0].strip(), parts[1].strip()
            if w not in index:
                raise DataError(f"{where(ann, ln)}: class {w!r} is not in {wnids_file}; fix the annotation")
            if "/" in fname or "\\" in fname or fname.startswith("."):
                raise DataError(f"{where(ann, ln)}: bad file name {fname!r}")
            p = root / "val" / "images" / fname
            if not p.is_file():
                raise DataError(f"{where(ann, ln)}: image {p} not found")
            paths.append(p)
            labels.append(index[w])
        source = ann
    else:
        raise ConfigError(f"tiny-imagenet split {split!r} is unknown; use 'train' or 'val' (= 'test')")
    out = ImageSet(class_names=names, labels=np.asarray(labels), paths=paths, class_ids=list(wnids),
                   source=str(source), synonyms=synonyms)
    _check_nonempty(out, source, f"in {source}", line_of)
    if skip_corrupt or verify:
        out = drop_corrupt(out, skip_corrupt=skip_corrupt)
    return out


# --------------------------------------------------------------------------------------------------- CIFAR pickles
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: plain containers and numpy arrays only (pickles are hostile bytes)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (official CIFAR python batches expected)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a valid CIFAR python pickle ({e}); download the official copy again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_pickles(root: str | os.PathLike[str], split: str = "train") -> ImageSet:
    """Read the official CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) pickles.

    The variant is detected from the files present (``batches.meta`` -> CIFAR-10, ``meta`` -> CIFAR-100).

    Raises:
        DataError: missing batches, malformed data or labels out of range.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR split {split!r} is unknown; use 'train' or 'test'")
    if (root / "batches.meta").is_file():
        meta = _unpickle(root / "batches.meta")
        names = [str(n) for n in meta.get("label_names", [])]
        files = [root / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [root / "test_batch"]
        key = "labels"
    elif (root / "meta").is_file():
        meta = _unpickle(root / "meta")
        names = [str(n) for n in meta.get("fine_label_names", [])]
        files = [root / ("train" if split == "train" else "test")]
        key = "fine_labels"
    else:
        raise DataError(f"{root}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) found")
    if not names:
        raise DataError(f"{root}: the meta file lists no class names")
    arrays, labels = [], []
    for f in files:
        d = _unpickle(f)
        x = np.asarray(d.get("data"))
        y = np.asarray(d.get(key, []), dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DataError(f"{f}: expected uint8 data [N, 3072] and {key} [N], got {x.dtype} {x.shape} / {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            i = int(np.flatnonzero((y < 0) | (y >= len(names)))[0])
            raise DataError(f"{f}: label {int(y[i])} of sample {i} is out of range 0..{len(names) - 1}")
        arrays.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    out = ImageSet(class_names=names, labels=np.concatenate(labels), array=np.ascontiguousarray(np.concatenate(arrays)),
                   source=str(root))
    _check_nonempty(out, root, f"in {split}")
    return out


# --------------------------------------------------------------------------------------------------- iNaturalist
def read_inat_json(json_file: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, *,
                   skip_corrupt: bool = False, verify: bool = False, check_files: bool = True) -> ImageSet:
    """Read an iNaturalist-18 style JSON (``images``, ``annotations``, ``categories``).

    Categories are indexed by sorted category id; ``file_name`` is relative to ``root`` (default: the
    JSON file's folder).

    Raises:
        DataError: malformed JSON, images without annotation, unknown categories, missing files.
    """
    json_file = Path(json_file)
    base = Path(root) if root is not None else json_file.parent
    try:
        doc = json.loads(json_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{json_file}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{json_file}: expected lists 'images', 'annotations' and 'categories' (iNaturalist format)")
    try:
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): i for i, c in enumerate(cats)}
        names = [str(c.get("name", c["id"])) for c in cats]
        ann = {int(a["image_id"]): int(a["category_id"]) for a in doc["annotations"]}
        images = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{json_file}: malformed entry ({type(e).__name__}: {e}); see the iNaturalist-18 format") from None
    paths: list[Path] = []
    labels: list[int] = []
    for k, (img_id, fname) in enumerate(images):
        if img_id not in ann:
            raise DataError(f"{json_file}: image {img_id} ({fname}) has no annotation (images[{k}])")
        cid = ann[img_id]
        if cid not in cat_index:
            raise DataError(f"{json_file}: image {img_id} has category_id {cid}, not in 'categories'")
        p = Path(fname)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{json_file}: file_name {fname!r} (images[{k}]) must be relative without '..'")
        full = base / p
        if check_files and not full.is_file():
            raise DataError(f"{json_file}: image {full} (images[{k}]) not found; fix --root")
        paths.append(full)
        labels.append(cat_index[cid])
    if not paths:
        raise DataError(f"{json_file}: no images")
    out = ImageSet(class_names=names, labels=np.asarray(labels), paths=paths,
                   class_ids=[str(c["id"]) for c in cats], source=str(json_file))
    _check_nonempty(out, json_file, f"in {json_file}")
    if skip_corrupt or verify:
        out = drop_corrupt(out, skip_corrupt=skip_corrupt)
    return out


# --------------------------------------------------------------------------------------------------- Omniglot
def read_omniglot(npz_file: str | os.PathLike[str], split: str = "train") -> ImageSet:
    """Read ``omniglot_small.npz``; drawers 1-15 are ``train``, 16-20 ``test`` (no official split).

    Images are grayscale uint8 [N, 105, 105] (ink 0, background 255); class names are ``Alphabet/characterNN``,
    class ids the same, and ``synonyms`` maps each id to its alphabet for grouping.
    """
    npz_file = Path(npz_file)
    if split not in ("train", "test", "all"):
        raise ConfigError(f"omniglot split {split!r} is unknown; use 'train' (drawers 1-15), 'test' (16-20) or 'all'")
    try:
        with np.load(npz_file, allow_pickle=False) as d:
            x, y, drawer, names = d["x"], d["y_fine"], d["drawer"], [str(n) for n in d["fine_names"]]
    except FileNotFoundError:
        raise DataError(f"{npz_file}: file not found") from None
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{npz_file}: not the omniglot_small.npz layout ({e}); see PROVENANCE.md") from None
    if split == "train":
        keep = np.isin(drawer, list(OMNIGLOT_TRAIN_DRAWERS))
    elif split == "test":
        keep = ~np.isin(drawer, list(OMNIGLOT_TRAIN_DRAWERS))
    else:
        keep = np.ones(len(y), dtype=bool)
    out = ImageSet(class_names=names, labels=y[keep], array=np.ascontiguousarray(x[keep]), source=str(npz_file))
    _check_nonempty(out, npz_file, f"in split {split}")
    return out


# --------------------------------------------------------------------------------------------------- load_dataset
def _descend(root: Path) -> Path:
    """An extracted archive often holds one top folder; step into it."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root


def _find(candidates: list[str], data_dir: str | os.PathLike[str] | None) -> Path | None:
    for d in data_search_paths(data_dir):
        for c in candidates:
            if (d / c).exists():
                return d / c
    return None


def _missing(name: str, candidates: list[str], data_dir: Any, how: str) -> DataError:
    looked = ", ".join(str(p) for p in data_search_paths(data_dir))
    return DataError(f"dataset {name!r} not found: looked for {' / '.join(candidates)} in {looked}; {how}")


def _cifar_download(name: str) -> Path:
    """Fetch the official CIFAR python pickles through torchvision into ``cache_dir()/downloads``.

    Only torchvision's download + md5 check + extraction is used; the batches are then read by our restricted
    unpickler (torchvision's dataset class would ``pickle.load`` them unrestricted).
    """
    import torchvision
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    target = cache_dir() / "downloads"
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = target / cls.base_folder
    if not all(check_integrity(str(folder / f), md5) for f, md5 in cls.train_list + cls.test_list):
        logger.info("downloading the official %s from %s into %s", name, cls.url, target)
        try:
            download_and_extract_archive(cls.url, str(target), filename=cls.filename, md5=cls.tgz_md5)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
            raise DataError(f"{name}: download from {cls.url} failed ({e}); check the connection or use "
                            "--data-dir") from None
        bad = [f for f, md5 in cls.train_list + cls.test_list if not check_integrity(str(folder / f), md5)]
        if bad:
            raise DataError(f"{folder / bad[0]}: checksum mismatch after download; delete {target} and retry")
    return folder


def _load_path(path: Path, split: str, skip_corrupt: bool) -> ImageSet:
    if is_archive(path) and path.is_file():
        return _load_path(_descend(extract_archive(path)), split, skip_corrupt)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return read_omniglot(path, split)
        if suffix == ".json":
            return read_inat_json(path, skip_corrupt=skip_corrupt)
        return read_split_file(path, skip_corrupt=skip_corrupt)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; pass a dataset name ({', '.join(NAMED_DATASETS)}) or a path")
    if (path / "wnids.txt").is_file():
        return read_tiny_imagenet(path, split, skip_corrupt=skip_corrupt)
    if (path / "batches.meta").is_file() or (path / "meta").is_file():
        return read_cifar_pickles(path, split)
    for cand in (split, "val" if split == "test" else None, "test" if split == "val" else None):
        if cand and (path / cand).is_dir():
            return read_image_folder(path / cand, skip_corrupt=skip_corrupt)
    return read_image_folder(path, skip_corrupt=skip_corrupt)


# Local names a CIFAR copy may have (offline ImageFolder archive, official pickles), and where --download puts it.
_CIFAR_FILES: dict[str, tuple[list[str], str]] = {
    "cifar10": (["cifar10.tar.gz", "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"],
                "downloads/cifar-10-batches-py"),
    "cifar100": (["cifar-100-python", "cifar-100-python.tar.gz", "cifar100.tar.gz", "cifar100"],
                 "downloads/cifar-100-python"),
}


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None, *,
                 skip_corrupt: bool = False, download: bool = False) -> ImageSet:
    """Load a dataset by name or path.

    Args:
        name: ``cifar10`` | ``cifar100`` | ``tiny-imagenet`` | ``omniglot`` (looked up in the data directory:
            ``--data-dir``, ``$NEIGHBORLT_DATA``, ``../shared/data``, the cache), or a path: an ImageFolder tree
            (with ``train/``/``test/`` sub-folders or not), a Tiny-ImageNet root, a CIFAR pickle folder, a split
            file, an iNaturalist JSON, an ``.npz``, or an archive of any of these.
        split: ``train`` or ``test`` (Tiny-ImageNet: ``val`` = ``test``).
        data_dir: overrides the data directory.
        skip_corrupt: decode every image first and drop corrupt ones (listed in ``ImageSet.skipped``);
            otherwise a corrupt image raises when it is decoded.
        download: fetch CIFAR-10/100 through torchvision when no local copy exists.

    Returns:
        The :class:`ImageSet`.

    Raises:
        DataError: the dataset is missing (the message says where it looked and how to get it) or malformed.

    Example:
        >>> train = load_dataset("cifar10", "train")  # doctest: +SKIP
        >>> train.counts()[:3]  # doctest: +SKIP
        array([5000, 5000, 5000])
    """
    if split == "val" and name not in ("tiny-imagenet",):
        split = "test" if name in ("cifar10", "cifar100", "omniglot") else split
    if name in _CIFAR_FILES:
        cands, downloaded = _CIFAR_FILES[name]
        found = _find(cands, data_dir) or _find([downloaded], None)
        if found is None and download:
            found = _cifar_download(name)
        if found is None:
            raise _missing(name, cands, data_dir, "pass download=True (CLI: --download) to fetch the official copy "
                           "through torchvision, or put it in --data-dir")
        return _load_path(found, split, skip_corrupt)
    if name == "tiny-imagenet":
        cands = ["tiny-imagenet-200.tar.gz", "tiny-imagenet-200", "tiny-imagenet-200.zip"]
        found = _find(cands, data_dir)
        if found is None:
            raise _missing(name, cands, data_dir, "download http://cs231n.stanford.edu/tiny-imagenet-200.zip "
                           "into --data-dir")
        return _load_path(found, "val" if split == "test" else split, skip_corrupt)
    if name == "omniglot":
        cands = ["omniglot_small.npz"]
        found = _find(cands, data_dir)
        if found is None:
            raise _missing(name, cands, data_dir, "build it from github.com/brendenlake/omniglot (see PROVENANCE.md)")
        return read_omniglot(found, split)
    path = Path(name).expanduser()
    if not path.exists() and data_dir is not None and (Path(data_dir) / name).exists():
        path = Path(data_dir) / name
    if not path.exists():
        raise DataError(
            f"dataset {name!r}: not a known name ({', '.join(NAMED_DATASETS)}) and no such file or folder; "
            "pass a name or an existing path"
        )
    return _load_path(path, split, skip_corrupt)


__all__ = [
    "IMAGE_EXTENSIONS", "NAMED_DATASETS", "drop_corrupt", "load_dataset", "read_cifar_pickles", "read_class_names",
    "read_image_folder", "read_inat_json", "read_omniglot", "read_split_file", "read_tiny_imagenet", "read_words",
]
