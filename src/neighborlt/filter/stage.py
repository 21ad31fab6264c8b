"""Stage 4 (``filter``): keep the retrieved images that are clean, relevant and leak-free.

:func:`run_filter` is the funnel: it reads the retrieve manifest into one
:class:`~neighborlt.filter.candidates.Candidates` table, computes the features once, and applies the rules of
:mod:`neighborlt.filter.rules` in order, each narrowing the table and recording why a row left (each can be switched
off, :class:`~neighborlt.filter.config.FilterConfig`):

1. ``downloaded``: the retrieve manifest says ``ok``.
2. ``caption``: the caption names the image's class (normalised auxiliary name or a synonym, whole words).
3. ``band``: γ1 < cos(feature, prototype of a parent target) < γ2, the best parent when there are several
   (prototype = the mean L2-normalised feature of the target's training images), or per-class quantiles.
4. ``leak``: not an exact (SHA-256) or near duplicate (feature cosine ≥ ``leak_threshold``) of a target test image.
5. ``dedup``: not an exact duplicate of an earlier kept image, nor a near duplicate of one of its own class.
6. ``cap``: at most ``max_per_class`` images per class (most similar to the parent first).
7. ``kept``: classes with fewer than ``min_per_class`` images are dropped whole.

Writes ``RUN/filter/aux_manifest.parquet`` (the kept images: what training reads), ``decisions.parquet`` (every
candidate with the rule that rejected it), ``funnel.json`` (counts per rule, overall and per class) and contact
sheets ``sheets/<class>_kept.png`` / ``_rejected.png`` (:mod:`neighborlt.filter.sheets`).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``, or an initialised process group) every rank computes its share of the
features (:func:`neighborlt.train.features.extract_features`, one merge); rank 0 alone then applies the feature
rules and writes the outputs, while the other ranks wait for its done record (``records/filter.done.json`` with this
run's key, polled: no collective, as for the features) and return the same :class:`FilterResult`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..coverage import write_coverage
from ..data import manifest as mf
from ..errors import ConfigError
from ..rundir import RunDir, StageKey, atomic_write_json, read_json
from .candidates import Candidates
from .config import FilterConfig
from .rules import (
    band_rule,
    cap_rule,
    caption_rule,
    center_features,
    compute_features,
    dedup_rule,
    downloaded_rule,
    image_sha256,
    leak_rule,
    min_class_rule,
)
from .sheets import sheet_stem, write_contact_sheets

logger = logging.getLogger(__name__)

STAGE = "filter"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same inputs (2: the one key rule)
FUNNEL = ("candidates", "downloaded", "caption", "band", "leak", "dedup", "cap", "kept")
OUTPUTS = ("filter/aux_manifest.parquet", "filter/funnel.json")  # what a finished stage must still have
_WAIT_LOG_S = 60.0  # a rank waiting for rank 0's outputs says so this often


class FilterResult(BaseModel):
    """What :func:`run_filter` produced."""

    model_config = ConfigDict(extra="forbid")

    aux_manifest: str  # RUN/filter/aux_manifest.parquet
    funnel: dict[str, int]  # images left after each rule (FUNNEL order)
    classes: int  # auxiliary classes with kept images
    dropped_classes: list[str]  # classes with fewer than min_per_class images
    skipped: bool = False


def run_filter(cfg: FilterConfig, run_dir: RunDir | str | os.PathLike[str]) -> FilterResult:
    """Apply the filter rules to ``RUN/retrieve/manifest.parquet`` and write the auxiliary manifest.

    Args:
        cfg: the stage options.
        run_dir: the run directory (``split.json``, ``retrieve/manifest.parquet``).

    Returns:
        A :class:`FilterResult`.

    Raises:
        ConfigError: the retrieve manifest or split is missing (the message names the command that makes it).

    Example:
        >>> run_filter(FilterConfig.keep_all(), "runs/demo").funnel["kept"]  # doctest: +SKIP
        25000
    """
    rd, key = _open(cfg, run_dir)
    if not cfg.force and rd.is_done(STAGE, key, *OUTPUTS):
        logger.info("filter: finished with the same options and manifest in %s; skipping", rd.path(STAGE))
        return _finished(rd, skipped=True)
    from ..train.features import rank_and_world  # (torch: imported when the stage runs)

    rank, world = rank_and_world(True)
    if rank == 0:
        logger.debug("filter: running (%s)", "--force" if cfg.force else rd.stale_reason(STAGE, key))
        rd.clear_done(STAGE)  # no marker next to half-new outputs; the other ranks wait for this run's marker
        rd.record(STAGE, cfg)
    c = Candidates.read(rd.path("retrieve", "manifest.parquet"))
    downloaded_rule(c)  # the two rules without features run on every rank: they choose the rows to featurise
    if cfg.caption:
        caption_rule(c, rd.root)
    protocol = _load_targets(cfg, rd) if cfg.needs_features and c.live() else None
    feats = compute_features(cfg, c, protocol, rd.root) if protocol is not None else None  # every rank its chunks
    if rank != 0:
        return _wait_for_rank0(rd, key, rank, world)
    if cfg.band and feats is not None:
        band_rule(c, feats, protocol.target_train, cfg)
    if cfg.leak and feats is not None:
        leak_rule(c, feats, protocol.target_test, cfg.leak_threshold)
    if cfg.dedup and c.live():
        dedup_rule(c, feats, cfg.dedup_threshold)
    if cfg.max_per_class is not None:
        cap_rule(c, cfg.max_per_class, by_similarity=cfg.band)
    dropped = min_class_rule(c, cfg.min_per_class)
    return _write_outputs(cfg, rd, key, c, dropped, protocol)


def _open(cfg: FilterConfig, run_dir: RunDir | str | os.PathLike[str]) -> tuple[RunDir, StageKey]:
    """The run directory and the stage's completion key; one line naming the command when an input is missing."""
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    src = root / "retrieve" / "manifest.parquet"
    if not src.is_file():  # checked before RunDir(), which would create a mistyped folder
        raise ConfigError(f"{src}: not found; run `neighborlt retrieve {root}` first")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    if not rd.path("split.json").is_file():
        raise ConfigError(f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first")
    key = rd.stage_key(STAGE, cfg.key_fields(), [src, "split.json", "targets.parquet", "classes.json"],
                       version=STAGE_VERSION)
    return rd, key


def _finished(rd: RunDir, *, skipped: bool) -> FilterResult:
    """The result of the finished stage, read from its ``funnel.json``."""
    doc = read_json(rd.path(STAGE, "funnel.json"))
    return FilterResult(aux_manifest=str(rd.path(STAGE, "aux_manifest.parquet")), funnel=doc["total"],
                        classes=doc["classes"], dropped_classes=doc["dropped_classes"], skipped=skipped)


def _wait_for_rank0(rd: RunDir, key: StageKey, rank: int, world: int) -> FilterResult:
    """Block until rank 0 has written the outputs and the done record of ``key``, then return its result (read from
    ``funnel.json``, as rank 0 returned it). No collective is used (as for the features' merge), so the rules may
    take longer than a barrier's time-out; a rank 0 that dies leaves the others waiting until torchrun stops the job."""
    logger.info("filter: rank %d/%d leaves the rules and the outputs to rank 0; waiting for %s", rank, world,
                rd.path("records", f"{STAGE}.done.json"))
    last = time.monotonic()
    while not rd.is_done(STAGE, key, *OUTPUTS):
        if time.monotonic() - last >= _WAIT_LOG_S:
            logger.info("filter: rank %d/%d still waiting for rank 0's outputs in %s", rank, world, rd.path(STAGE))
            last = time.monotonic()
        time.sleep(0.2)
    return _finished(rd, skipped=False)


def _load_targets(cfg: FilterConfig, rd: RunDir) -> Any:
    from ..data import load_targets

    return load_targets(rd.root, data_dir=cfg.data_dir)


def _write_outputs(cfg: FilterConfig, rd: RunDir, key: StageKey, c: Candidates, dropped: list[str],
                   protocol: Any) -> FilterResult:
    """The auxiliary manifest, the decisions, the funnel, the contact sheets and the coverage; then the done record."""
    out = rd.path(STAGE)
    aux_path = out / "aux_manifest.parquet"
    mf.write_table(c.kept_table(), aux_path)
    mf.write_table(c.decisions_table(), out / "decisions.parquet")
    classes = len(c.class_index())
    funnel = _funnel(c, cfg, dropped, classes)
    funnel["pair_density"] = _density(c, protocol, rd)
    atomic_write_json(out / "funnel.json", funnel)
    if cfg.sheets:
        protocol = protocol if protocol is not None else _load_targets(cfg, rd)
        write_contact_sheets(c, out / "sheets", protocol.pool, rd.root, classes=cfg.sheets, images=cfg.sheet_images)
    write_coverage(rd.root, STAGE)  # filter/coverage.json; one warning naming the targets without a silenced pair
    rd.log(STAGE, event="done", funnel=funnel["total"], classes=classes, dropped_classes=dropped)
    rd.mark_done(STAGE, key, funnel=funnel["total"])
    logger.info("filter: %s", " -> ".join(f"{s} {funnel['total'][s]}" for s in FUNNEL))
    return FilterResult(aux_manifest=str(aux_path), funnel=funnel["total"], classes=classes, dropped_classes=dropped)


def _funnel(c: Candidates, cfg: FilterConfig, dropped: list[str], n_classes: int) -> dict[str, Any]:
    """Images left after each rule, overall and per class (a rejected image counts up to the rule before it)."""
    stage_of = {s: k for k, s in enumerate(FUNNEL)}
    decision = c.decision

    def left(idx: list[int]) -> dict[str, int]:
        out = {"candidates": len(idx)}
        for s in FUNNEL[1:]:
            out[s] = sum(1 for i in idx if not decision[i] or stage_of[decision[i]] > stage_of[s])
        return out

    per = c.by_class(list(range(len(c))))
    return {"schema": 1, "stages": list(FUNNEL), "total": left(list(range(len(c)))),
            "per_class": [{"name": n, "parents": list(c.parents[idx[0]]), **left(idx)} for n, idx in per.items()],
            "rules": cfg.key_fields(), "classes": n_classes, "dropped_classes": dropped}


def _density(c: Candidates, protocol: Any, rd: RunDir) -> dict[str, Any]:
    """:func:`~neighborlt.data.auxiliary.pair_density` of the kept classes (targets named in ``classes.json``)."""
    from ..data.auxiliary import pair_density

    targets = [x["name"] for x in read_json(rd.path("classes.json"))["classes"]] if rd.path("classes.json").is_file() \
        else list(protocol.target_train.class_names) if protocol is not None else []
    index = {n: i for i, n in enumerate(targets)}
    class_index = c.class_index()
    pairs = sorted({(index[p], len(targets) + class_index[c.name[i]]) for i in c.live() for p in c.parents[i]
                    if p in index})
    return pair_density(np.array(pairs, dtype=np.int64), len(targets), len(class_index))


__all__ = ["FUNNEL", "FilterResult", "center_features", "image_sha256", "run_filter", "sheet_stem"]
