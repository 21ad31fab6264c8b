"""Stage 1 (``classes``): resolve the target classes of a run and write ``RUN/classes.json``, ``RUN/split.json`` and
the targets manifest ``RUN/targets.parquet`` (every image of the split and where it lives).

The run is either a split-neighbour protocol (``--protocol cifar10-neighbours``), a plain dataset
(``--dataset PATH_OR_NAME``, every class a target, optionally long-tailed), or a custom split-neighbour protocol on
any labelled dataset (``--dataset PATH --targets A,B,C --pool D,E``: those targets, long-tailed head -> tail in the
given order, and those classes as the captioned auxiliary pool). Later stages read the split back with
:func:`neighborlt.data.load_targets`, which never scans the dataset again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .data.protocol import Protocol, ProtocolConfig, build_protocol, resolve_config, split_record
from .data.shots import shot_groups
from .data.targets import TARGETS_FILE, write_targets
from .data.wordnet import is_wnid
from .rundir import RunDir, atomic_write_json, read_json

logger = logging.getLogger(__name__)

STAGE = "classes"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same options (2: the one key rule)
SCHEMA = 1


class ClassesConfig(BaseModel):
    """Options of stage 1; unset fields take the protocol preset's defaults."""

    model_config = ConfigDict(extra="forbid")

    protocol: str | None = None  # preset name (see neighborlt.data.PRESETS)
    dataset: str | None = None  # or a dataset name / path (plain: every class is a target, no pool)
    targets: list[str] | None = None  # target class names or ids, head -> tail (None: every class / the preset's)
    pool: list[str] | None = None  # auxiliary pool classes (None: none for a dataset, the preset's for a protocol)
    test_dataset: str | None = None  # test images from another path (e.g. a test split file); None: the dataset's
    #   own test split (ImageFolder: its test/ or val/ folder)
    data_dir: str | None = None
    seed: int | None = None
    imbalance_ratio: float | None = Field(None, ge=1.0)  # n_max / n_min of the targets
    n_max: int | None = Field(None, ge=1)  # images of the head target class
    num_targets: int | None = Field(None, ge=1)  # tiny-imagenet protocol only
    many: int | None = Field(None, ge=0)  # shot thresholds (many-shot > many, few-shot < few)
    few: int | None = Field(None, ge=0)
    skip_corrupt: bool = False  # drop undecodable images (counted in logs/classes.jsonl) instead of failing
    download: bool = False  # fetch CIFAR through torchvision when missing (online)
    force: bool = False  # run again even when finished with the same options (other options always run again)

    @field_validator("targets", "pool", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        """``"a,b,c"`` (the CLI / a YAML string) is the list ``[a, b, c]``."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ClassesConfig:
        if (self.protocol is None) == (self.dataset is None):
            raise ValueError("give exactly one of protocol (a preset) or dataset (a name or path)")
        return self

    def protocol_config(self) -> ProtocolConfig:
        """The :class:`ProtocolConfig` these options resolve to."""
        src = self.protocol if self.protocol is not None else _absolute(self.dataset)
        assert src is not None
        return resolve_config(src, self.data_dir, seed=self.seed, imbalance_ratio=self.imbalance_ratio,
                              n_max=self.n_max, num_targets=self.num_targets, many=self.many, few=self.few,
                              targets=self.targets, pool=self.pool, test_dataset=_absolute(self.test_dataset),
                              skip_corrupt=self.skip_corrupt or None, download=self.download or None)


def _absolute(dataset: str | None) -> str | None:
    """A dataset path as an absolute path (split.json is read again from other working directories); names such as
    ``cifar10`` stay names."""
    from .data.readers import NAMED_DATASETS

    if dataset is None or dataset in NAMED_DATASETS:
        return dataset
    p = Path(dataset).expanduser()
    return str(p.resolve()) if p.exists() else dataset


class ClassesResult(BaseModel):
    """What stage 1 produced."""

    classes_path: Path
    split_path: Path
    targets_path: Path  # RUN/targets.parquet
    num_targets: int
    num_pool: int
    train_counts: list[int]
    skipped: bool  # True when the stage was already done with the same config
    skipped_corrupt: int = 0


def classes_record(protocol: Protocol) -> dict[str, Any]:
    """The ``classes.json`` document (schema in docs/architecture.md)."""
    cfg = protocol.config
    tr = protocol.target_train.counts()
    te = protocol.target_test.counts()
    shots = shot_groups(tr, cfg.many, cfg.few)
    rows = []
    for i, (cid, name) in enumerate(zip(protocol.target_train.class_ids, protocol.target_train.class_names)):
        rows.append({
            "index": i, "name": name, "id": cid, "wnid": cid if is_wnid(cid) else None,
            "synonyms": protocol.target_train.synonyms.get(cid, [name]),
            "train_count": int(tr[i]), "test_count": int(te[i]), "shot": str(shots[i]),
        })
    totals = {s: int(tr[shots == s].sum()) for s in ("many", "medium", "few")}
    return {
        "schema": SCHEMA,
        "dataset": cfg.preset or cfg.dataset,
        "thresholds": {"many": cfg.many, "few": cfg.few},
        "classes": rows,
        "totals": totals,
        "num_pool_classes": protocol.pool.num_classes if protocol.pool is not None else 0,
    }


def run_classes(cfg: ClassesConfig, run_dir: RunDir | str | os.PathLike[str]) -> ClassesResult:
    """Build the protocol, write ``targets.parquet`` + ``split.json`` + ``classes.json`` atomically, record
    config/env, mark done.

    A re-run with the same config is skipped (unless ``cfg.force``); other options run the stage again and replace
    its files, and every later stage then runs again too (their keys hold these files' hashes).

    Args:
        cfg: the stage options.
        run_dir: the run directory.

    Returns:
        A :class:`ClassesResult`.

    Raises:
        DataError: the dataset is missing or malformed.

    Example:
        >>> run_classes(ClassesConfig(protocol="cifar10-neighbours"), "runs/demo").train_counts  # doctest: +SKIP
        [500, 158, 50, 15, 5]
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    pcfg = cfg.protocol_config()
    key = run.stage_key(STAGE, pcfg.identity(), version=STAGE_VERSION)
    classes_path, split_path, targets_path = run.path("classes.json"), run.path("split.json"), run.path(TARGETS_FILE)
    if not cfg.force and run.is_done(STAGE, key, "classes.json", "split.json", TARGETS_FILE):
        doc = read_json(classes_path)
        split = read_json(split_path)
        logger.info("classes: already done for this config in %s; skipping", run.root)
        return ClassesResult(classes_path=classes_path, split_path=split_path, targets_path=targets_path,
                             num_targets=len(doc["classes"]),
                             num_pool=len(split.get("pool", [])),
                             train_counts=[int(r["train_count"]) for r in doc["classes"]], skipped=True,
                             skipped_corrupt=len(split.get("skipped_corrupt", [])))
    logger.debug("classes: running (%s)", "--force" if cfg.force else run.stale_reason(STAGE, key))
    run.record(STAGE, {"options": cfg.model_dump(mode="json"), "protocol": pcfg.model_dump(mode="json")},
               seed=pcfg.seed)
    run.clear_done(STAGE)
    protocol = build_protocol(pcfg)
    split = split_record(protocol)
    if split["skipped_corrupt"]:
        run.log(STAGE, event="skipped_corrupt", count=len(split["skipped_corrupt"]), files=split["skipped_corrupt"])
        logger.warning("classes: skipped %d corrupt images (listed in %s)", len(split["skipped_corrupt"]),
                       run.path("logs", f"{STAGE}.jsonl"))
    write_targets(protocol, targets_path, run.root)
    atomic_write_json(split_path, split)
    atomic_write_json(classes_path, classes_record(protocol))
    counts = protocol.target_train.counts().tolist()
    run.log(STAGE, event="done", num_targets=protocol.num_targets, train_images=int(sum(counts)),
            pool_classes=len(split["pool"]), stats=protocol.stats)
    run.mark_done(STAGE, key, num_targets=protocol.num_targets, train_images=int(sum(counts)))
    return ClassesResult(classes_path=classes_path, split_path=split_path, targets_path=targets_path,
                         num_targets=protocol.num_targets,
                         num_pool=len(split["pool"]), train_counts=counts, skipped=False,
                         skipped_corrupt=len(split["skipped_corrupt"]))


__all__ = ["ClassesConfig", "ClassesResult", "classes_record", "run_classes"]
