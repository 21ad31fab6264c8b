"""The targets manifest, ``RUN/targets.parquet``: every image of a run's split, written once by stage 1 the way the
filter writes the auxiliary manifest, and read back by every later stage instead of scanning the dataset again.

One row per image:

* ``split``: ``train`` / ``test`` (the target classes) or ``pool`` (the protocol's captioned auxiliary pool, whose
  ``pool_index`` the retrieve and filter manifests refer to: pool rows keep the pool's order);
* ``class_index`` and ``name``: the class in ``split.json``'s order (targets head -> tail, or the pool's classes);
* where the image lives, in the vocabulary of the other manifests (:func:`neighborlt.data.manifest.image_ref`):
  ``location`` ``file`` (``path``: the image file), ``shard`` (``path``: the tar, relative to the run directory or
  absolute, ``offset`` / ``size``: the member's bytes), or ``dataset``, a row of an array-backed dataset such as the
  CIFAR pickles or the Omniglot ``.npz`` (``path``: the dataset's name or path as ``split.json`` gives it,
  ``dataset_split``: the split it was read from, ``row``: the image's row in it).

:func:`write_targets` streams the rows in Parquet batches; :func:`load_targets` returns the run's
:class:`~neighborlt.data.protocol.Protocol` (class names, thresholds and siblings from ``split.json``, the images from
this file). An array-backed split is read from its dataset once and subset by row, as building the protocol did, so
loading needs no more memory than that.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from ..errors import ConfigError, DataError
from ..rundir import atomic_output, read_json
from .base import ImageSet, ShardMember
from .manifest import image_refs, read_table
from .protocol import SPLIT_SCHEMA, Protocol, ProtocolConfig

TARGETS_FILE = "targets.parquet"
SPLITS = ("train", "test", "pool")
SCHEMA = pa.schema([
    ("split", pa.string()), ("class_index", pa.int64()), ("name", pa.string()), ("location", pa.string()),
    ("path", pa.string()), ("dataset_split", pa.string()), ("row", pa.int64()), ("offset", pa.int64()),
    ("size", pa.int64()),
])
COLUMNS = tuple(SCHEMA.names)
BATCH_ROWS = 65_536  # rows per Parquet batch while writing


def _batches(split: str, image_set: ImageSet, rows: np.ndarray | None, dataset: str, dataset_split: str,
             root: Path) -> Iterator[pa.RecordBatch]:
    """The rows of one set, ``BATCH_ROWS`` at a time."""
    names = np.asarray(image_set.class_names, dtype=object)
    n = len(image_set)
    for a in range(0, n, BATCH_ROWS):
        b = min(n, a + BATCH_ROWS)
        m = b - a
        labels = image_set.labels[a:b]
        minus = np.full(m, -1, dtype=np.int64)
        if image_set.paths is not None:
            loc, path, off, size = [], [], minus.copy(), minus.copy()
            for k, ref in enumerate(image_set.paths[a:b]):
                if isinstance(ref, ShardMember):
                    shard = Path(os.path.abspath(ref.shard))
                    loc.append("shard")
                    path.append(str(shard.relative_to(root)) if shard.is_relative_to(root) else str(shard))
                    off[k], size[k] = ref.offset, ref.size
                elif isinstance(ref, (str, os.PathLike)):
                    loc.append("file")
                    path.append(os.path.abspath(ref))
                else:
                    raise DataError(f"{image_set.source}: image {a + k} is a {type(ref).__name__}, which "
                                    f"{TARGETS_FILE} cannot reference")
            cols = [loc, path, [""] * m, minus]
        else:
            if rows is None or len(rows) != n:
                raise ValueError(f"{split}: an array-backed set needs its dataset rows (Protocol.rows)")
            cols = [["dataset"] * m, [dataset] * m, [dataset_split] * m, np.asarray(rows[a:b], dtype=np.int64)]
            off, size = minus, minus
        yield pa.record_batch([pa.array([split] * m, pa.string()), pa.array(labels, pa.int64()),
                               pa.array(names[labels], pa.string()), pa.array(cols[0], pa.string()),
                               pa.array(cols[1], pa.string()), pa.array(cols[2], pa.string()),
                               pa.array(cols[3], pa.int64()), pa.array(off, pa.int64()), pa.array(size, pa.int64())],
                              schema=SCHEMA)


def write_targets(protocol: Protocol, path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """Write the images of ``protocol`` (targets train / test, then the pool) to ``path`` atomically, streaming.

    Args:
        protocol: a protocol from :func:`~neighborlt.data.protocol.build_protocol` (array-backed sets need its
            ``rows``).
        path: the file (``RUN/targets.parquet``).
        root: the run directory (shard paths inside it are written relative to it).

    Returns:
        ``path``.
    """
    cfg = protocol.config
    root = Path(os.path.abspath(root))
    sets = [("train", protocol.target_train, cfg.dataset, "train"),
            ("test", protocol.target_test, cfg.test_dataset or cfg.dataset, cfg.test_split),
            ("pool", protocol.pool, cfg.dataset, "train")]
    with atomic_output(path) as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer:
        for split, image_set, dataset, dataset_split in sets:
            if image_set is not None:
                for batch in _batches(split, image_set, protocol.rows.get(split), dataset, dataset_split, root):
                    writer.write_batch(batch)
    return Path(path)


def rerun_command(root: Path) -> str:
    """``neighborlt classes RUN --force`` with the options stage 1 recorded (``records/classes.config.json``)."""
    cmd = f"neighborlt classes {shlex.quote(str(root))}"
    try:
        opts = json.loads((root / "records" / "classes.config.json").read_text(encoding="utf-8"))["options"]
        flags = []
        for k, v in opts.items():
            if k == "force" or v is None or v is False:
                continue
            flag = "--" + k.replace("_", "-")
            text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
            flags.append(flag if v is True else f"{flag} {shlex.quote(text)}")
        cmd = " ".join([cmd, *flags])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cmd += " ... (the options in RUN/records/classes.config.json)"
    return cmd + " --force"


def _read_split(root: Path) -> tuple[dict[str, Any], ProtocolConfig]:
    path = root / "split.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `neighborlt classes {root}` first")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("schema") != SPLIT_SCHEMA or "protocol" not in doc:
        raise DataError(f"{path}: not a schema-{SPLIT_SCHEMA} split file; re-run `{rerun_command(root)}`")
    try:
        cfg = ProtocolConfig(**doc["protocol"])
    except (TypeError, ValidationError) as e:
        raise DataError(f"{path}: invalid protocol config ({str(e).splitlines()[0]}); re-run "
                        f"`{rerun_command(root)}`") from None
    return doc, cfg


def _image_set(part: pa.Table, classes: list[dict[str, Any]], split: str, root: Path, cfg: ProtocolConfig,
               data_dir: str | os.PathLike[str] | None, source: Path, datasets: dict[tuple[str, str], ImageSet]
               ) -> ImageSet:
    """The images of one split's rows, labelled by ``classes`` (``split.json`` order)."""
    fix = f"re-run `{rerun_command(root)}`"
    names = [str(c["name"]) for c in classes]
    ids = [str(c.get("id", c["name"])) for c in classes]
    synonyms = {i: list(c.get("synonyms") or [n]) for i, n, c in zip(ids, names, classes)}
    labels = part["class_index"].fill_null(-1).to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
        raise DataError(f"{source}: {split} row {bad} has class_index {int(labels[bad])}, outside 0..{len(names) - 1} "
                        f"of split.json; {fix}")
    wrong = np.flatnonzero(part["name"].to_numpy(zero_copy_only=False) != np.asarray(names, dtype=object)[labels])
    if len(wrong):
        i = int(wrong[0])
        raise DataError(f"{source}: {split} row {i} names class {part['name'][i].as_py()!r} but class_index "
                        f"{int(labels[i])} is {names[int(labels[i])]!r} in split.json; {fix}")
    common = {"class_names": names, "labels": labels, "class_ids": ids, "source": str(source), "synonyms": synonyms}
    locations = set(pc.unique(part["location"]).to_pylist())
    if locations <= {"file", "shard"}:
        return ImageSet(paths=image_refs(part, root, source), **common)
    if locations != {"dataset"}:
        raise DataError(f"{source}: the {split} rows mix the locations {', '.join(sorted(map(str, locations)))}; a "
                        f"split's images are all files / shard members, or all rows of one dataset; {fix}")
    paths, splits = pc.unique(part["path"]).to_pylist(), pc.unique(part["dataset_split"]).to_pylist()
    if len(paths) != 1 or len(splits) != 1:
        raise DataError(f"{source}: the {split} rows refer to more than one dataset; {fix}")
    key = (str(paths[0]), str(splits[0]))
    if key not in datasets:
        datasets[key] = _load_dataset(*key, data_dir if data_dir is not None else cfg.data_dir, cfg, source, fix)
    raw = datasets[key]
    rows = part["row"].fill_null(-1).to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= len(raw)):
        raise DataError(f"{source}: {split} rows refer to rows outside 0..{len(raw) - 1} of {key[0]} ({key[1]}); the "
                        f"dataset changed; {fix}")
    if len(rows):
        raw_ids = np.asarray(raw.class_ids, dtype=object)[raw.labels[rows]]
        moved = np.flatnonzero(raw_ids != np.asarray(ids, dtype=object)[labels])
        if len(moved):
            i = int(moved[0])
            raise DataError(f"{source}: {split} row {i} is {ids[int(labels[i])]!r}, but row {int(rows[i])} of "
                            f"{key[0]} ({key[1]}) is {raw_ids[i]!r}: the dataset changed; {fix}")
    assert raw.array is not None
    return ImageSet(array=raw.array[rows], **common)


def _load_dataset(dataset: str, split: str, data_dir: Any, cfg: ProtocolConfig, source: Path, fix: str) -> ImageSet:
    from .readers import load_dataset

    raw = load_dataset(dataset, split, data_dir, skip_corrupt=cfg.skip_corrupt, download=cfg.download)
    if raw.array is None:
        raise DataError(f"{source}: rows refer to {dataset} ({split}) by row, but it is not an array-backed dataset "
                        f"(its images are files); {fix}")
    return raw


def load_targets(run_dir: str | os.PathLike[str] | Any, data_dir: str | os.PathLike[str] | None = None) -> Protocol:
    """The run's split: its classes, shot thresholds and siblings from ``RUN/split.json``, its images (targets
    train / test, pool) from ``RUN/targets.parquet``; nothing scans the dataset again.

    Args:
        run_dir: the run directory (path or :class:`~neighborlt.rundir.RunDir`).
        data_dir: where array-backed datasets are looked up (default: the one ``split.json`` recorded); file and
            shard rows are read where the manifest says.

    Returns:
        The :class:`~neighborlt.data.protocol.Protocol` (``rows`` is empty).

    Raises:
        ConfigError: ``split.json`` is missing (stage 1 has not run).
        DataError: ``targets.parquet`` is missing (a run directory of an older neighborlt), malformed, or disagrees
            with ``split.json``; the message gives the ``neighborlt classes ... --force`` command that writes it again.

    Example:
        >>> p = load_targets("runs/demo")  # doctest: +SKIP
        >>> p.target_train.counts().tolist(), p.config.many, p.config.few  # doctest: +SKIP
        ([500, 158, 50, 15, 5], 100, 20)
    """
    root = Path(run_dir) if isinstance(run_dir, (str, os.PathLike)) else Path(run_dir.root)  # a Path has .root too
    doc, cfg = _read_split(root)
    path = root / TARGETS_FILE
    fix = f"re-run `{rerun_command(root)}`"
    if not path.is_file():
        raise DataError(f"{path}: not found (the run directory was made by an older neighborlt); {fix}")
    table = read_table(path, COLUMNS, "targets manifest")
    unknown = set(pc.unique(table["split"]).to_pylist()) - set(SPLITS)
    if unknown:
        raise DataError(f"{path}: unknown split {min(map(str, unknown))!r} (train, test or pool); {fix}")
    targets, pool = list(doc.get("targets") or []), list(doc.get("pool") or [])
    datasets: dict[tuple[str, str], ImageSet] = {}
    sets: dict[str, ImageSet | None] = {}
    for split, classes, count in (("train", targets, "train_count"), ("test", targets, "test_count"),
                                  ("pool", pool, "count")):
        part = table.filter(pc.equal(table["split"], split))
        if split == "pool" and not pool and not part.num_rows:
            sets[split] = None
            continue
        image_set = _image_set(part, classes, split, root, cfg, data_dir, path, datasets)
        recorded = [int(c[count]) for c in classes if count in c]
        if len(recorded) == len(classes) and image_set.counts().tolist() != recorded:
            raise DataError(f"{path}: its {split} images per class differ from the counts in split.json; {fix}")
        sets[split] = image_set
    train, test = sets["train"], sets["test"]
    assert train is not None and test is not None
    return Protocol(config=cfg, target_train=train, target_test=test, pool=sets["pool"],
                    siblings=dict(doc.get("siblings") or {}), stats=dict(doc.get("stats") or {}))


__all__ = ["COLUMNS", "SCHEMA", "SPLITS", "TARGETS_FILE", "load_targets", "rerun_command", "write_targets"]
