"""The granularity pilot (the paper's Fig. 3): does a long-tailed dataset whose classes come from *fewer* superclasses
(a finer-grained dataset) show a smaller head-tail accuracy gap?

``neighborlt pilot OUT`` samples ``num_classes`` classes from exactly S superclasses for each S of
``superclasses`` (WordNet subtrees for Tiny-ImageNet, alphabets for Omniglot), long-tails them at each imbalance
ratio, trains Balanced-CE from scratch on the targets alone and reports the head-tail gap: the mean per-class test
accuracy of the head third of the classes (by training-count rank) minus that of the tail third, mean ± std over
seeds.

One output folder holds everything::

    OUT/superclasses.json               the partition of the dataset's classes and, per (S, seed), the sample
    OUT/runs/s<S>_r<ratio>/seed<N>/     one complete run directory (classes, split, train/, eval/) per setting
    OUT/pilot.md, pilot.json, pilot.png the table (gap, head, tail, overall; mean ± std) and the gap-vs-ratio plot
    OUT/index.html                      the tables and the plot on one page

Design (so that only the granularity changes between rows):

* The superclasses are one fixed partition of the dataset's classes (:func:`superclass_groups`). For S, a seed
  draws S superclasses among those holding at least ``ceil(num_classes / S)`` classes and an equal share of
  classes from each.
* The head -> tail order interleaves the superclasses (round robin over a seeded order), so every superclass has
  head and tail classes; the sample and the order are the same at every ratio, so within a row only the ratio
  changes.
* The seed draws the sample, the long-tail subset and the training run, so the std covers all three.

Every run is a run directory keyed by its config, so re-running the same command only trains what is missing, and
several ``pilot`` processes on one OUT (or ``--workers N``) share the runs through a lock per run folder.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .ablate import fmt_mean_std, mean_std
from .errors import ConfigError
from .rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, run_lock

logger = logging.getLogger(__name__)

# ResNet-8 from scratch at 32 px, as the README's from-scratch tables (epochs chosen for a 2-core CPU).
PILOT_TRAIN: dict[str, Any] = {
    "model": "resnet8_cifar", "image_size": 32, "epochs": 15, "warmup_epochs": 1, "batch_size": 64, "lr": 0.05,
    "loss": "balanced_softmax", "threads": 1, "eval_every": 0,
}


class PilotConfig(BaseModel):
    """Options of ``neighborlt pilot`` (``train`` holds the TrainConfig fields of every run)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "tiny-imagenet"  # a dataset name or path whose class ids are WordNet ids or "group/class"
    data_dir: str | None = None
    num_classes: int = Field(40, ge=2)  # classes per long-tailed dataset
    superclasses: list[int] = [5, 10, 20, 40]  # S: how many superclasses the classes are drawn from
    ratios: list[float] = [1.0, 2.0, 10.0, 20.0, 100.0]  # imbalance ratios n_max / n_min
    n_max: int = Field(100, ge=1)  # training images of the head class
    seeds: list[int] = [0, 1, 2]
    partition_groups: int = Field(48, ge=2)  # WordNet datasets: split the hypernym tree into at least this many
    #   superclasses (superclass_partition); "group/class" ids: the groups as they are
    head_tail_fraction: float = Field(1 / 3, gt=0.0, le=0.5)  # head / tail = this share of the classes by rank
    train: dict[str, Any] = Field(default_factory=lambda: dict(PILOT_TRAIN))  # TrainConfig fields of every run

    @field_validator("superclasses", "ratios", "seeds")
    @classmethod
    def _non_empty(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("give at least one value")
        if len(set(value)) != len(value):
            raise ValueError(f"values repeat in {value}")
        return value

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if r < 1]
        if bad:
            raise ValueError(f"imbalance ratios are n_max / n_min >= 1, got {bad}")
        return value

    @field_validator("superclasses")
    @classmethod
    def _superclasses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if s < 1]
        if bad:
            raise ValueError(f"superclass counts must be >= 1, got {bad}")
        return value


def superclass_groups(class_ids: Sequence[str], partition_groups: int) -> dict[str, str]:
    """Class id -> superclass of a hierarchical dataset: WordNet ids are grouped by
    :func:`~neighborlt.data.wordnet.superclass_partition`, ``group/class`` ids (Omniglot's ``Alphabet/character``)
    by their ``group``.

    Raises:
        ConfigError: the class ids carry no hierarchy.
    """
    from .data.wordnet import is_wnid, superclass_partition

    ids = list(class_ids)
    if ids and all(is_wnid(c) for c in ids):
        return superclass_partition(ids, partition_groups)
    if ids and all("/" in c for c in ids):
        return {c: c.split("/", 1)[0] for c in ids}
    raise ConfigError("pilot: the dataset's classes carry no hierarchy; it needs WordNet-id class folders "
                      "(nXXXXXXXX, as Tiny-ImageNet) or 'group/class' ids (as Omniglot's Alphabet/character)")


def sample_classes(groups: dict[str, str], num_classes: int, superclasses: int, seed: int) -> list[str]:
    """``num_classes`` class ids drawn from exactly ``superclasses`` superclasses (equal shares, the first
    ``num_classes % superclasses`` drawn superclasses one more), head -> tail in round-robin order over the drawn
    superclasses, so each of them spans the head and the tail. Seeded by ``(seed, superclasses)``.

    Raises:
        ConfigError: fewer than ``superclasses`` superclasses hold enough classes.
    """
    if superclasses > num_classes:
        raise ConfigError(f"pilot: {superclasses} superclasses cannot hold {num_classes} classes (one class at "
                          f"least each); use --superclasses values <= --num-classes")
    members: dict[str, list[str]] = {}
    for cid in sorted(groups):
        members.setdefault(groups[cid], []).append(cid)
    need = math.ceil(num_classes / superclasses)
    eligible = sorted(g for g, m in members.items() if len(m) >= need)
    if len(eligible) < superclasses:
        raise ConfigError(
            f"pilot: only {len(eligible)} of the {len(members)} superclasses hold >= {need} classes, {superclasses} "
            f"needed for {num_classes} classes; lower --num-classes or drop {superclasses} from --superclasses")
    rng = np.random.default_rng([seed, superclasses])
    drawn = [eligible[i] for i in rng.permutation(len(eligible))[:superclasses]]
    share = [num_classes // superclasses + (i < num_classes % superclasses) for i in range(superclasses)]
    picked = [[members[g][j] for j in rng.permutation(len(members[g]))[:n]] for g, n in zip(drawn, share)]
    return [lst[i] for i in range(max(share)) for lst in picked if i < len(lst)]


def run_name(superclasses: int, ratio: float) -> str:
    return f"s{superclasses}_r{ratio:g}"


def _classes_config(cfg: PilotConfig, targets: list[str], ratio: float, seed: int) -> Any:
    from .classes import ClassesConfig

    return ClassesConfig(dataset=cfg.dataset, data_dir=cfg.data_dir, targets=targets, pool=[], imbalance_ratio=ratio,
                         n_max=cfg.n_max, seed=seed)


def train_config(cfg: PilotConfig, seed: int) -> Any:
    """The resolved TrainConfig of one pilot run: Balanced-CE (unless ``train`` says otherwise) on the targets only."""
    from .train import TrainConfig

    return TrainConfig(**{**cfg.train, "seed": seed, "aux_manifest": None, "data_dir": cfg.data_dir})


def run_one(cfg: PilotConfig, out_dir: str, superclasses: int, ratio: float, seed: int, targets: list[str], *,
            wait: bool, progress: bool = False) -> bool:
    """Make, train and evaluate one run directory (skipped when finished); False when another process holds it."""
    from .classes import run_classes
    from .evaluate import EvalConfig, run_eval
    from .train import run_train

    run_dir = Path(out_dir) / "runs" / run_name(superclasses, ratio) / f"seed{seed}"
    with run_lock(run_dir, wait=wait) as mine:
        if not mine:
            return False
        run_classes(_classes_config(cfg, targets, ratio, seed), run_dir)
        res = run_train(train_config(cfg, seed), run_dir, resume="auto", progress=progress)
        if res.interrupted:
            raise ConfigError(f"training of {run_dir} was interrupted; re-run the same pilot command to resume")
        run_eval(EvalConfig(model="train", data_dir=cfg.data_dir), run_dir)
    return True


def _worker(args: tuple[dict[str, Any], str, int, float, int, list[str], bool]) -> bool:
    cfg_doc, out, s, r, seed, targets, wait = args
    return run_one(PilotConfig(**cfg_doc), out, s, r, seed, targets, wait=wait)


def head_tail(per_class: list[dict[str, Any]], fraction: float) -> dict[str, float]:
    """Head, tail and gap (head - tail) of the per-class accuracies (%), classes in head -> tail rank order; head /
    tail are the first / last ``ceil(fraction * C)`` classes."""
    acc = [float(r["accuracy"]) for r in sorted(per_class, key=lambda r: r["index"]) if r["accuracy"] is not None]
    if len(acc) < 2:
        raise ConfigError("pilot: a run has fewer than 2 classes with test images; cannot split head and tail")
    n = max(1, math.ceil(fraction * len(acc)))
    head, tail = float(np.mean(acc[:n])), float(np.mean(acc[-n:]))
    return {"head": head, "tail": tail, "gap": head - tail}


def run_pilot(cfg: PilotConfig, out_dir: str | os.PathLike[str], *, workers: int = 1, progress: bool = True,
              on_run: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Train every run of the pilot (skipping finished ones) and write its table, plot and page.

    Args:
        cfg: the study.
        out_dir: the experiment folder (created; re-running resumes).
        workers: training processes (each runs whole runs; give ``train.threads`` = 1 when > 1 share the cores).
        progress: show the training progress bars (one worker only).
        on_run: called as ``on_run(run_name, seed)`` before each run this process trains (``workers`` = 1).

    Returns:
        The content of ``OUT/pilot.json``: the config and one row per (S, ratio) with the per-seed figures and
        their mean ± std (the partition and the samples are in ``OUT/superclasses.json``).
    """
    from .data import load_dataset

    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more training processes")
    from .train import TrainConfig
    from .validation import check_section

    check_section(cfg.train, TrainConfig, "--train")  # a bad train field: one line before any work
    train_config(cfg, cfg.seeds[0])  # ... and a field that does not fit a targets-only run
    out = Path(out_dir)
    _check_same_study(out, cfg)
    image_set = load_dataset(cfg.dataset, "train", cfg.data_dir)
    groups = superclass_groups(image_set.class_ids, cfg.partition_groups)
    names = dict(zip(image_set.class_ids, image_set.class_names))
    counts = image_set.counts()
    short = [f"{names[c]!r} ({counts[image_set.class_ids.index(c)]} images)" for c in image_set.class_ids
             if counts[image_set.class_ids.index(c)] < cfg.n_max]
    if short:
        raise ConfigError(f"pilot: --n-max {cfg.n_max}: {len(short)} classes have fewer training images, e.g. "
                          f"{short[0]}; lower --n-max")
    empty = [r for r in cfg.ratios if int(cfg.n_max / r) < 1]
    if empty:
        raise ConfigError(f"pilot: with --n-max {cfg.n_max}, ratio {empty[0]:g} leaves the tail class no image; "
                          f"use ratios <= {cfg.n_max} or a larger --n-max")
    samples = {(s, seed): sample_classes(groups, cfg.num_classes, s, seed) for s in cfg.superclasses
               for seed in cfg.seeds}
    sizes: dict[str, int] = {}
    for g in groups.values():
        sizes[g] = sizes.get(g, 0) + 1
    atomic_write_json(out / "superclasses.json", {
        "dataset": cfg.dataset, "groups": len(sizes), "group_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "group_names": {g: _group_name(g) for g in sizes},
        "samples": [{"superclasses": s, "seed": seed, "classes": cls, "class_names": [names[c] for c in cls],
                     "superclass_of": [groups[c] for c in cls]} for (s, seed), cls in samples.items()]})

    RunDir(out).record("pilot", cfg)
    todo = [(s, r, seed) for s in cfg.superclasses for r in cfg.ratios for seed in cfg.seeds]
    doc = cfg.model_dump(mode="json")
    if workers == 1:
        busy = []
        for s, r, seed in todo:
            if on_run:
                on_run(run_name(s, r), seed)
            if not run_one(cfg, str(out), s, r, seed, samples[(s, seed)], wait=False, progress=progress):
                busy.append((s, r, seed))
        for s, r, seed in busy:  # held by another process: wait for it (then it is only read)
            run_one(cfg, str(out), s, r, seed, samples[(s, seed)], wait=True, progress=progress)
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            args = [(doc, str(out), s, r, seed, samples[(s, seed)], False) for s, r, seed in todo]
            done = list(pool.map(_worker, args))
            busy_args = [(*a[:-1], True) for a, ok in zip(args, done) if not ok]
            list(pool.map(_worker, busy_args))
    return write_results(cfg, out)


# may change between runs on one OUT: more runs, where the data live, or how finished runs are summarised
EXTENSIBLE = ("seeds", "superclasses", "ratios", "data_dir", "head_tail_fraction")


def _check_same_study(out: Path, cfg: PilotConfig) -> None:
    """An OUT holds one study: more seeds, superclass counts or ratios extend it; any other change is a one-line
    error naming the field (its runs would conflict with the finished ones)."""
    path = out / "records" / "pilot.config.json"
    if not path.is_file():
        return
    try:
        old = read_json(path)
    except Exception:  # noqa: BLE001 - an unreadable record: nothing to compare with
        return
    from .train.config import EXECUTION_FIELDS

    new = cfg.model_dump(mode="json")

    def flat(doc: dict[str, Any]) -> dict[str, Any]:  # train.<field>, execution-only fields aside
        out = {k: v for k, v in doc.items() if k != "train"}
        out.update({f"train.{k}": v for k, v in (doc.get("train") or {}).items() if k not in EXECUTION_FIELDS})
        return out

    flat_old, flat_new = flat(old), flat(new)
    diff = [k for k in sorted(set(flat_old) | set(flat_new))
            if k not in EXTENSIBLE and flat_old.get(k) != flat_new.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"{out}: made by a pilot with {k} = {flat_old.get(k)!r}, not {flat_new.get(k)!r}; use a "
                          "new folder (only --seeds, --superclasses, --ratios and --head-tail-fraction may change on "
                          "one folder)")


def _group_name(group: str) -> str:
    from .data.wordnet import is_wnid, synset

    if is_wnid(group):
        return str(synset(group).lemma_names()[0])
    return group


def write_results(cfg: PilotConfig, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every finished run of ``cfg`` and write ``OUT/pilot.{json,md,png}`` and ``OUT/index.html``."""
    out = Path(out_dir)
    rows = []
    for s in cfg.superclasses:
        for r in cfg.ratios:
            per_seed: dict[int, dict[str, float]] = {}
            for seed in cfg.seeds:
                d = out / "runs" / run_name(s, r) / f"seed{seed}"
                try:
                    m = read_json(d / "eval" / "metrics.json")
                except Exception:  # noqa: BLE001 - a missing or broken file: the run has not finished
                    raise ConfigError(f"{d}: not evaluated yet; re-run the same `neighborlt pilot` command") from None
                per_seed[seed] = {**head_tail(m["per_class"], cfg.head_tail_fraction), "overall": m["overall"],
                                  "train_images": int(sum(c["train_count"] for c in m["per_class"]))}
            row: dict[str, Any] = {"superclasses": s, "ratio": r, "seeds": per_seed}
            for k in ("gap", "head", "tail", "overall"):
                row[k] = mean_std([per_seed[sd][k] for sd in cfg.seeds])
            rows.append(row)
        # the same classes in the same order at ratio 1: what the imbalance adds to the gap (class difficulty,
        # which makes the ratio-1 gap differ from 0, cancels)
        balanced = next((row for row in rows[-len(cfg.ratios):] if row["ratio"] == 1.0), None)
        for row in rows[-len(cfg.ratios):]:
            if balanced is not None:
                for sd in cfg.seeds:
                    row["seeds"][sd]["gap_vs_balanced"] = row["seeds"][sd]["gap"] - balanced["seeds"][sd]["gap"]
                row["gap_vs_balanced"] = mean_std([row["seeds"][sd]["gap_vs_balanced"] for sd in cfg.seeds])
    md = _markdown(cfg, rows)
    doc = {"config": cfg.model_dump(mode="json"), "rows": rows}
    atomic_write_json(out / "pilot.json", doc)
    atomic_write_text(out / "pilot.md", md)
    _plot(cfg, rows, out / "pilot.png")
    from .report import write_pilot_page

    write_pilot_page(out)
    return doc


def _markdown(cfg: PilotConfig, rows: list[dict[str, Any]]) -> str:
    tr = {**cfg.train}
    pct = round(100 * cfg.head_tail_fraction)
    head = (f"{cfg.num_classes} classes of `{cfg.dataset}` from S superclasses, long-tailed (n_max {cfg.n_max}), "
            f"{tr.get('loss', 'balanced_softmax')}, {tr.get('model')} at {tr.get('image_size')} px, "
            f"{tr.get('epochs')} epochs, seeds {', '.join(map(str, cfg.seeds))}. Gap = mean per-class accuracy of "
            f"the head {pct} % of the classes minus the tail {pct} % (by training-count rank), mean ± std over seeds.")
    cols = " | ".join(f"ratio {r:g}" for r in cfg.ratios)
    lines = [head, ""]
    tables = [("gap", "head − tail gap (points)")]
    if 1.0 in cfg.ratios:
        tables.append(("gap_vs_balanced", "gap minus the same classes' gap at ratio 1 (points; paired per seed)"))
    tables += [("overall", "overall accuracy (%)"), ("tail", "tail accuracy (%)")]
    for key, title in tables:
        lines += [f"**{title}**", "", f"| superclasses | {cols} |", "|---|" + "---|" * len(cfg.ratios)]
        for s in cfg.superclasses:
            cells = [fmt_mean_std(*next(r[key] for r in rows if r["superclasses"] == s and r["ratio"] == ratio))
                     for ratio in cfg.ratios]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(cfg: PilotConfig, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("gap", "head − tail accuracy (points)")]
    if all("gap_vs_balanced" in r for r in rows):
        keys.append(("gap_vs_balanced", "gap − the same classes' gap at ratio 1"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for s in cfg.superclasses:
            pts = [r for r in rows if r["superclasses"] == s]
            y = [r[key][0] for r in pts]
            e = [0.0 if math.isnan(r[key][1]) else r[key][1] for r in pts]
            ax.errorbar([r["ratio"] for r in pts], y, yerr=e, marker="o", capsize=3, label=f"{s} superclasses")
        ax.set_xscale("log")
        ax.set_xticks(list(cfg.ratios), [f"{r:g}" for r in cfg.ratios])
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xlabel("imbalance ratio n_max / n_min")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    name = str(cfg.train.get("loss", "balanced_softmax"))
    loss = {"balanced_softmax": "Balanced-CE"}.get(name, name)
    fig.suptitle(f"{cfg.num_classes} classes of {cfg.dataset}, {loss}, mean ± std over {len(cfg.seeds)} seeds",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["PILOT_TRAIN", "PilotConfig", "head_tail", "run_one", "run_pilot", "sample_classes", "superclass_groups",
           "train_config", "write_results"]
