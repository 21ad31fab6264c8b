"""Stage 6, evaluation: long-tail metrics (overall / many / medium / few top-1, per-class accuracy, balanced
error, worst-class accuracy, harmonic mean of the splits) and the report files in ``RUN/eval/``.

Conventions (the ones long-tail papers use, e.g. OLTR / Decoupling's ``shot_acc``):

* Accuracies and errors are percentages (0..100) everywhere: returned dicts, ``metrics.json``, ``per_class.csv``
  and ``report.md`` (the unit of long-tail papers and of the training engine's logs).
* ``overall`` is top-1 over all test samples. A split's accuracy (``many`` / ``medium`` / ``few``) is the mean of
  the per-class accuracies of the classes in that split that have at least one test sample; with balanced test
  sets (the usual case) this equals top-1 over the split's samples.
* Split membership uses the *training* image count ``n``: few when ``n < few``, many when ``n > many``, medium
  otherwise (defaults 100 and 20: many > 100, medium 20..100, few < 20).
* A split with no evaluable class has accuracy ``None`` (``null`` in JSON, "n/a" in the report); a class with no
  test samples has accuracy ``None`` and is left out of every average, of the balanced error and of the worst class.
* When predictions are given as logits, ties are broken towards the lowest class index (``numpy.argmax``); the
  worst class among equal accuracies is the one with the lowest index.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .data.shots import shot_groups
from .defaults import FEW_SHOT, MANY_SHOT
from .errors import DataError, NeighborLTError
from .metrics import (  # noqa: F401  re-exported: the pure metrics live in neighborlt.metrics
    SCHEMA,
    SPLITS,
    cap_per_class,
    check_counts,
    check_labels,
    evaluate_predictions,
    expected_calibration_error,
    shot_accuracy,
)
from .rundir import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def per_class_csv(metrics: dict[str, Any]) -> str:
    """The ``per_class.csv`` text: ``index,name,train_count,shot,n_test,correct,accuracy`` (accuracy in percent,
    empty for classes without test samples)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "name", "train_count", "shot", "n_test", "correct", "accuracy"])
    for r in metrics["per_class"]:
        w.writerow([r["index"], r["name"], r["train_count"], r["shot"], r["n_test"], r["correct"],
                    "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_markdown(metrics: dict[str, Any], title: str = "Evaluation", source: str | None = None) -> str:
    """The ``report.md`` text: a summary table (percent), the split sizes and the 10 worst classes."""
    th = metrics["thresholds"]
    sc = metrics["split_classes"]
    lines = [f"# {_md_escape(title)}", ""]
    if source:
        lines += [f"Source: `{_md_escape(source)}`", ""]
    lines += [
        (f"Top-1 accuracy (%) on {metrics['n_test']} test images of {metrics['num_classes']} classes. "
         f"Splits by training images: many > {th['many']}, medium {th['few']}..{th['many']}, few < {th['few']}; "
         "a split's accuracy is the mean per-class accuracy of its classes."),
        "",
        "| overall | many | medium | few | balanced error | worst class | harmonic mean |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = metrics["worst_class"]
    worst_s = "n/a" if worst is None else f"{_pct(worst['accuracy'])} ({_md_escape(worst['name'])})"
    lines.append(
        f"| {_pct(metrics['overall'])} | {_pct(metrics['many'])} | {_pct(metrics['medium'])} | {_pct(metrics['few'])} "
        f"| {_pct(metrics['balanced_error'])} | {worst_s} | {_pct(metrics['harmonic_mean'])} |"
    )
    lines += ["", "| split | classes | test images |", "|---|---:|---:|"]
    for s in SPLITS:
        lines.append(f"| {s} | {sc[s]} | {metrics['split_test_samples'][s]} |")
    notes = []
    if metrics.get("ece") is not None:
        lines += ["", (f"Expected calibration error: {_pct(metrics['ece'])} % ({metrics.get('ece_bins', 15)} "
                       "equal-width bins of the top-1 softmax confidence over the target classes).")]
    empty = [s for s in SPLITS if metrics[s] is None]
    if empty:
        notes.append(f"No class with test images in split(s) {', '.join(empty)}: shown as n/a; the harmonic mean "
                     f"uses {', '.join(metrics['harmonic_mean_splits']) or 'no split'}.")
    if metrics["classes_without_test"]:
        names = ", ".join(_md_escape(n) for n in metrics["classes_without_test"][:10])
        more = len(metrics["classes_without_test"]) - 10
        notes.append(f"{len(metrics['classes_without_test'])} class(es) have no test images and are left out of "
                     f"the averages: {names}{f' (+{more} more)' if more > 0 else ''}.")
    if metrics.get("max_test_per_class"):
        notes.append(f"Quick check: the model ran on at most {metrics['max_test_per_class']} test images per class.")
    if metrics.get("predictions_outside_classes"):
        notes.append(f"{metrics['predictions_outside_classes']} prediction(s) fell on the model's extra "
                     f"(auxiliary) outputs and count as errors.")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    rows = [r for r in metrics["per_class"] if r["accuracy"] is not None]
    rows.sort(key=lambda r: (r["accuracy"], r["index"]))
    if rows:
        lines += ["", "Worst classes:", "", "| class | shot | train images | test images | accuracy |",
                  "|---|---|---:|---:|---:|"]
        for r in rows[:10]:
            lines.append(f"| {_md_escape(r['name'])} | {r['shot']} | {r['train_count']} | {r['n_test']} "
                         f"| {_pct(r['accuracy'])} |")
    lines += ["", "Per-class accuracy: `per_class.csv`; plot: `per_class.png`.", ""]
    return "\n".join(lines)


def plot_per_class(metrics: dict[str, Any], path: str | os.PathLike[str], title: str = "Per-class accuracy") -> Path:
    """Write a PNG of per-class accuracy (%) against training images (log x axis), coloured by split."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    th = metrics["thresholds"]
    for s in SPLITS:
        rows = [r for r in metrics["per_class"] if r["shot"] == s and r["accuracy"] is not None]
        if rows:
            x = [max(r["train_count"], 1) for r in rows]
            ax.scatter(x, [r["accuracy"] for r in rows], s=14, alpha=0.75, color=colours[s],
                       label=f"{s} ({len(rows)})")
    ax.set_xscale("log")
    for t in (th["few"], th["many"]):
        if t > 0:
            ax.axvline(t, color="0.7", lw=0.8, ls="--")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("training images (log scale; 0 shown at 1)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    if any(r["accuracy"] is not None for r in metrics["per_class"]):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    *,
    title: str = "Evaluation",
    source: str | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_class.csv``, ``report.md`` and ``per_class.png`` into ``out_dir``.

    Args:
        out_dir: destination directory (created).
        metrics: the dict from :func:`evaluate_predictions` (extra keys are kept in ``metrics.json``).
        title: report heading and plot title.
        source: what was evaluated (shown in the report).

    Returns:
        The four file paths by name (``metrics``, ``per_class``, ``report``, ``plot``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": atomic_write_json(out / "metrics.json", metrics),
        "per_class": atomic_write_text(out / "per_class.csv", per_class_csv(metrics)),
        "report": atomic_write_text(out / "report.md", report_markdown(metrics, title=title, source=source)),
        "plot": plot_per_class(metrics, out / "per_class.png", title=title),
    }
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


# --------------------------------------------------------------------------------------------- where test images go

STAGE_VERSION = 2  # raised when eval writes other outputs for the same inputs (2: the one key rule)
WHERE_KINDS = ("correct", "other_target", "paired_aux", "unpaired_aux")


def where_predictions(
    logits: Any,
    labels: Any,
    num_target: int,
    pairs: Any | None = None,
    *,
    class_names: Sequence[str] | None = None,
    train_counts: Any | None = None,
    many: int = MANY_SHOT,
    few: int = FEW_SHOT,
) -> dict[str, Any]:
    """Where the target test images go under a joint model: the share (%) of images whose top-1 over all L + K
    outputs is the true class (``correct``), another target (``other_target``), an auxiliary class paired with the
    image's own class (``paired_aux``) or an auxiliary class that is not (``unpaired_aux``) — the figures
    ``bench/neighbor_confusion.py`` measures, as the content of ``RUN/eval/where.json``.

    Args:
        logits: [N, C] logits of the joint model (targets ``0..L-1``, auxiliary classes ``L..C-1``).
        labels: true target indices [N] in ``0..L-1``.
        num_target: L.
        pairs: int [P, 2] (target, auxiliary) neighbour pairs (either order); None when unknown: then the paired /
            unpaired shares are ``None`` and only ``aux`` (their sum) is given.
        class_names: names of the L targets (per-class rows carry them).
        train_counts: training images of the L targets; adds ``per_split`` shares (many / medium / few).
        many: "many" threshold (more than ``many`` training images).
        few: "few" threshold (fewer than ``few`` training images).

    Returns:
        ``{"schema", "n_test", "num_target", "num_outputs", "pairs_known", "num_pairs", "share": {kind: %, "aux": %},
        "paired_mass", "margin", "per_split", "per_class"}``; ``paired_mass`` is the mean softmax probability on
        the true class's paired auxiliary classes, ``margin`` the mean logit margin ``z_y - max_k paired z_k`` over
        images whose class has a pair (``None`` when no class has one). Per-class rows: ``index, name, n_test``
        and the four shares (``None`` for classes without test images).

    Raises:
        DataError: bad shapes, labels outside the targets, pairs outside the outputs.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise DataError(f"where: logits must be [N, C], got shape {z.shape}")
    n, c = z.shape
    L = int(num_target)
    if not 1 <= L <= c:
        raise DataError(f"where: num_target {L} must be in 1..{c} (the logits' columns)")
    y = check_labels(labels, L, "where")
    if len(y) != n:
        raise DataError(f"where: {len(y)} labels but {n} rows of logits")
    if n and np.isnan(z).any():
        raise DataError("where: logits contain NaN; check the model")
    paired = np.zeros((L, c), dtype=bool)
    num_pairs = 0
    if pairs is not None:
        pa = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pa) and (pa.min() < 0 or pa.max() >= c):
            raise DataError(f"where: a neighbour pair names class {int(pa.max())} outside the {c} outputs")
        for t, a in pa:
            if t < L <= a:
                paired[t, a] = True
            elif a < L <= t:
                paired[a, t] = True
        num_pairs = int(paired.sum())
    top = z.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    mask_y = paired[y]  # [N, C]: the auxiliary classes paired with each image's own class
    is_aux = top >= L
    to_paired = mask_y[np.arange(n), top] if n else np.zeros(0, dtype=bool)
    kind = np.where(top == y, 0, np.where(~is_aux, 1, np.where(to_paired, 2, 3)))
    known = pairs is not None

    def shares(sel: np.ndarray) -> dict[str, float | None]:
        m = int(sel.sum())
        if m == 0:
            return {**{k: None for k in WHERE_KINDS}, "aux": None}
        out: dict[str, float | None] = {k: 100.0 * float((kind[sel] == i).sum()) / m for i, k in enumerate(WHERE_KINDS)}
        out["aux"] = 100.0 * float(is_aux[sel].sum()) / m
        if not known:
            out["paired_aux"] = out["unpaired_aux"] = None
        return out

    p = np.exp(z - z.max(axis=1, keepdims=True)) if n else z
    if n:
        p /= p.sum(axis=1, keepdims=True)
    has = mask_y.any(axis=1)
    margin = None
    if known and has.any():
        nb = np.where(mask_y, z, -np.inf).max(axis=1)
        margin = float((z[np.arange(n), y] - nb)[has].mean())
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "n_test": int(n),
        "num_target": L,
        "num_outputs": int(c),
        "pairs_known": known,
        "num_pairs": num_pairs,
        "share": shares(np.ones(n, dtype=bool)),
        "paired_mass": float((p * mask_y).sum(axis=1).mean()) if known and n else None,
        "margin": margin,
    }
    groups = None
    if train_counts is not None:
        counts = check_counts(train_counts, "where")
        if len(counts) != L:
            raise DataError(f"where: {len(counts)} training counts but {L} target classes")
        groups = shot_groups(counts, many=many, few=few)
        doc["thresholds"] = {"many": int(many), "few": int(few)}
        doc["per_split"] = {s: shares(np.isin(y, np.flatnonzero(groups == s))) for s in SPLITS}
    if class_names is not None and len(class_names) != L:
        raise DataError(f"where: {len(class_names)} class names but {L} target classes")
    doc["per_class"] = [
        {"index": i, "name": None if class_names is None else str(class_names[i]),
         "shot": None if groups is None else str(groups[i]), "n_test": int((y == i).sum()),
         **{k: v for k, v in shares(y == i).items() if k != "aux"}}
        for i in range(L)
    ]
    return doc


# --------------------------------------------------------------------------------------------- predictions files


def read_predictions_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read test labels and predictions (or logits) from ``.npz`` or ``.csv``.

    ``.npz`` keys: ``labels`` and ``predictions`` [N] or ``logits`` [N, C]; optional ``train_counts`` [C] and
    ``class_names`` [C]. ``.csv``: a header with ``label`` and either ``prediction`` or ``logit_0 .. logit_{C-1}``
    columns, one row per test image.

    Returns:
        ``{"labels", "predictions"}`` plus ``train_counts`` / ``class_names`` when the file has them.

    Raises:
        DataError: missing file, unknown format, missing columns/keys or non-numeric values (naming the line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: predictions file not found; pass an existing .npz or .csv file")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{p}: cannot read .npz ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "write it with numpy.savez (no pickled objects)") from None
        if "labels" not in data:
            raise DataError(f"{p}: no 'labels' array (has: {', '.join(data) or 'nothing'}); save labels=...")
        if "predictions" in data and "logits" in data:
            raise DataError(f"{p}: has both 'predictions' and 'logits'; keep one")
        key = "predictions" if "predictions" in data else "logits" if "logits" in data else None
        if key is None:
            raise DataError(f"{p}: no 'predictions' or 'logits' array; save one of them next to 'labels'")
        out: dict[str, Any] = {"labels": data["labels"], "predictions": data[key]}
        if "train_counts" in data:
            out["train_counts"] = data["train_counts"]
        if "class_names" in data:
            out["class_names"] = [str(x) for x in data["class_names"].tolist()]
        return out
    if suffix == ".csv":
        return _read_predictions_csv(p)
    raise DataError(f"{p}: unknown predictions format {suffix!r}; use .npz or .csv")


def _read_predictions_csv(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text; write the CSV as UTF-8") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise DataError(f"{p}:1: empty file; expected a header with 'label' and 'prediction' or 'logit_<i>' columns")
    header = [h.strip() for h in header]
    if "label" not in header:
        raise DataError(f"{p}:1: no 'label' column in the header; add one")
    li = header.index("label")
    logit_cols = sorted(
        ((int(h[6:]), i) for i, h in enumerate(header) if h.startswith("logit_") and h[6:].isdigit()),
    )
    if "prediction" in header:
        cols, mode = [header.index("prediction")], "pred"
    elif logit_cols:
        if [k for k, _ in logit_cols] != list(range(len(logit_cols))):
            raise DataError(f"{p}:1: logit columns must be logit_0 .. logit_{len(logit_cols) - 1} without gaps")
        cols, mode = [i for _, i in logit_cols], "logits"
    else:
        raise DataError(f"{p}:1: no 'prediction' or 'logit_0..' columns in the header; add one")
    labels: list[int] = []
    values: list[list[float]] = []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{p}:{lineno}: {len(row)} fields but the header has {len(header)}; fix the row")
        try:
            labels.append(int(row[li]))
            if mode == "pred":
                values.append([int(row[cols[0]])])
            else:
                values.append([float(row[c]) for c in cols])
        except ValueError:
            raise DataError(f"{p}:{lineno}: non-numeric label/prediction/logit value; fix the row") from None
    arr = np.asarray(values, dtype=np.int64 if mode == "pred" else np.float64)
    preds = arr[:, 0] if mode == "pred" and len(arr) else arr.reshape(len(labels), len(cols)) if mode == "logits" \
        else np.zeros(0, dtype=np.int64)
    return {"labels": np.asarray(labels, dtype=np.int64), "predictions": preds}


# --------------------------------------------------------------------------------------------- stage


class EvalConfig(BaseModel):
    """Options of ``neighborlt eval`` (the evaluation stage)."""

    model_config = ConfigDict(extra="forbid")

    predictions: Path | None = Field(None, description="a .npz/.csv with labels + predictions or logits; "
                                                       "when unset the model is run on the test set")
    model: Literal["export", "train", "crt"] = Field(
        "export", description="export: the direct classifier (L target rows, RUN/export); train: the full "
                              "L + K model (RUN/train), predictions of auxiliary classes count as errors; crt: "
                              "the re-trained target-only classifier (RUN/train/crt)")
    many: int | None = Field(None, ge=0, description="many-shot: more than this many training images; None: the "
                                                    f"run's thresholds (split.json / classes.json), else {MANY_SHOT}")
    few: int | None = Field(None, ge=0, description="few-shot: fewer than this many training images; None: the "
                                                   f"run's thresholds, else {FEW_SHOT}")
    max_test_per_class: int | None = Field(None, ge=1, description="evaluate the model on at most the first N "
                                                                   "test images of each class (quick checks)")
    batch_size: int = Field(256, ge=1, description="inference batch size")
    device: str = Field("auto", description="torch device for inference: auto (CUDA when present), cpu, cuda[:N]")
    data_dir: Path | None = Field(None, description="offline datasets folder; None: the one recorded in split.json")
    out: Path | None = Field(None, description="output folder (default RUN/eval)")


def _classes_json(run: RunDir) -> tuple[list[str], np.ndarray, dict[str, int]] | None:
    """Class names, training counts and shot thresholds from ``RUN/classes.json`` (None when absent)."""
    p = run.path("classes.json")
    if not p.exists():
        return None
    data = read_json(p)
    try:
        rows = sorted(data["classes"], key=lambda r: int(r["index"]))
        if [int(r["index"]) for r in rows] != list(range(len(rows))):
            raise ValueError("class indices are not 0..C-1")
        th = data.get("thresholds") or {}
        thresholds = {k: int(th[k]) for k in ("many", "few") if k in th}
        names = [str(r["name"]) for r in rows]
        return names, np.asarray([int(r["train_count"]) for r in rows], dtype=np.int64), thresholds
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{p}: malformed classes list ({e}); re-run `neighborlt classes`") from None


def _thresholds(cfg: EvalConfig, recorded: dict[str, int]) -> tuple[int, int]:
    many = cfg.many if cfg.many is not None else recorded.get("many", MANY_SHOT)
    few = cfg.few if cfg.few is not None else recorded.get("few", FEW_SHOT)
    return int(many), int(few)


def _joint_has_aux(run: RunDir) -> bool:
    """Whether ``RUN/train`` holds a joint model with auxiliary rows (``num_classes > num_target_classes``)."""
    p = run.path("train", "model.json")
    if not p.is_file():
        return False
    try:
        info = read_json(p)
        return int(info["num_classes"]) > int(info["num_target_classes"])
    except (NeighborLTError, KeyError, TypeError, ValueError):
        return False


def _joint_pairs(run: RunDir, protocol: Any, info: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """The neighbour pairs the joint model of ``RUN/train`` was trained with.

    Read from ``model.json`` (``neighbor_pairs``, written by training); for a model trained before that field
    existed they are rebuilt from the auxiliary manifest named in ``records/train.config.json`` (``aux_manifest``)
    and kept only when the rebuilt class names equal the model's. Returns ``(pairs or None, where they came from or
    why they are unknown)``.
    """
    if isinstance(info.get("neighbor_pairs"), list):
        return np.asarray(info["neighbor_pairs"], dtype=np.int64).reshape(-1, 2), "model.json"
    cfg_p = run.path("records", "train.config.json")
    manifest = (read_json(cfg_p) if cfg_p.is_file() else {}).get("aux_manifest")
    if not manifest:
        return None, "model.json has no neighbor_pairs and training recorded no auxiliary manifest"
    mpath = Path(manifest) if Path(manifest).is_absolute() else run.root / manifest
    if not mpath.is_file():
        return None, f"model.json has no neighbor_pairs and {mpath} is gone"
    try:
        from .data.auxiliary import load_aux_training_set
    except ImportError:  # pragma: no cover - an older data module
        return None, "model.json has no neighbor_pairs"
    aux = load_aux_training_set(protocol, mpath, run.root)
    names = [str(n) for n in info.get("class_names") or []]
    if aux.train.num_classes != int(info["num_classes"]) or [str(n) for n in aux.train.class_names] != names:
        return None, f"the classes of {mpath.name} differ from the model's; pairs unknown"
    return np.asarray(aux.pairs, dtype=np.int64), f"rebuilt from {mpath.name}"


def _where_for_run(run: RunDir, cfg: EvalConfig, protocol: Any, test: Any, names: list[str], counts: np.ndarray,
                   many: int, few: int, joint_logits: np.ndarray | None) -> dict[str, Any] | None:
    """``where.json`` for a run whose ``RUN/train`` model has auxiliary rows (None when it has none).

    ``joint_logits`` are reused when the evaluated model is the joint one; otherwise the joint model is run on
    the same test images (one more inference pass). A failure is recorded in the document, never raised.
    """
    if not _joint_has_aux(run):
        return None
    from .export import read_model_info
    from .train.inference import predict_logits

    tdir = run.path("train")
    try:
        info = read_model_info(tdir)
        L = len(names)
        if [str(n) for n in info["class_names"][:L]] != names:
            raise DataError(f"{tdir / 'model.json'}: the first {L} class names differ from the run's targets")
        z = joint_logits if joint_logits is not None else predict_logits(
            tdir, test, batch_size=cfg.batch_size, device=cfg.device)
        pairs, how = _joint_pairs(run, protocol, info)
        doc = where_predictions(z, test.labels, L, pairs, class_names=names, train_counts=counts, many=many, few=few)
    except NeighborLTError as e:
        logger.warning("eval: where the test images go: %s", e)
        return {"schema": SCHEMA, "available": False, "reason": str(e), "source": str(tdir)}
    return {"available": True, **doc, "source": str(tdir), "pairs_source": how,
            "max_test_per_class": cfg.max_test_per_class}


def run_eval(cfg: EvalConfig, run_dir: str | os.PathLike[str] | RunDir) -> dict[str, Any]:
    """Evaluate a run and write ``RUN/eval/{metrics.json, per_class.csv, report.md, per_class.png}``.

    With ``cfg.predictions`` the labels and predictions come from that file; class names and training counts
    from the file when it has them, else from ``RUN/classes.json``. Without it, the exported direct classifier
    (``RUN/export``; ``cfg.model="train"`` for the full L + K model, ``"crt"`` for the cRT classifier) is run on the protocol's target test set
    (``RUN/split.json``) and the training counts are the protocol's target training counts. When ``RUN/train``
    holds a joint model with auxiliary rows, ``RUN/eval/where.json`` (:func:`where_predictions`) says where that
    model sends the same test images (its neighbour pairs rebuilt by :func:`_joint_pairs`).

    Re-running with the same config and the same inputs is skipped (the stage key hashes the config and the
    input files).

    Returns:
        The metrics dict (see :func:`evaluate_predictions`).

    Raises:
        NeighborLTError: missing run files, predictions that do not match the classes, bad options.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    out_dir = Path(cfg.out) if cfg.out else run.path("eval")
    stage = "eval"
    if cfg.predictions is not None:
        pred_path = Path(cfg.predictions)
        if not pred_path.is_file():
            raise DataError(f"{pred_path}: predictions file not found; pass an existing .npz or .csv file")
        inputs: list[Any] = [pred_path, *(["classes.json"] if run.path("classes.json").exists() else [])]
    else:
        from .export import model_dir_for, read_model_info

        mdir = model_dir_for(run, cfg.model)
        info = read_model_info(mdir)
        inputs = [mdir / str(info.get("weights", "model.safetensors")), mdir / "model.json",
                  *(["split.json", "targets.parquet"] if run.path("split.json").exists() else [])]
    key = run.stage_key(stage, cfg.model_dump(mode="json"), inputs, version=STAGE_VERSION)
    where_missing = cfg.predictions is None and not (out_dir / "where.json").exists() and _joint_has_aux(run)
    if run.is_done(stage, key) and (out_dir / "metrics.json").exists() and not where_missing:
        logger.info("eval: up to date (%s), skipping", out_dir / "metrics.json")
        return read_json(out_dir / "metrics.json")
    logger.debug("eval: running (%s)", "where.json missing" if where_missing and run.is_done(stage, key)
                else run.stale_reason(stage, key))

    num_outputs: int | None = None
    where: dict[str, Any] | None = None
    if cfg.predictions is not None:
        data = read_predictions_file(cfg.predictions)
        names, counts = data.get("class_names"), data.get("train_counts")
        from_run = _classes_json(run)
        if (names is None or counts is None) and from_run is None:
            raise NeighborLTError(
                f"{cfg.predictions}: no class_names/train_counts in the file and no {run.path('classes.json')}; "
                "add them to the .npz or run `neighborlt classes` first"
            )
        if from_run is not None:
            names = names if names is not None else from_run[0]
            counts = counts if counts is not None else from_run[1]
        many, few = _thresholds(cfg, from_run[2] if from_run is not None else {})
        if len(names) != len(counts):
            raise DataError(f"{cfg.predictions}: {len(names)} class names but {len(counts)} train counts")
        preds = data["predictions"]
        if np.ndim(preds) == 2 and np.shape(preds)[1] > len(counts):
            num_outputs = int(np.shape(preds)[1])  # unmasked L + K logits: auxiliary predictions are errors
        labels = data["labels"]
        source = str(cfg.predictions)
    else:
        from .data import load_targets
        from .train.inference import predict_logits

        protocol = load_targets(run, data_dir=cfg.data_dir)
        many, few = _thresholds(cfg, {"many": protocol.config.many, "few": protocol.config.few})
        test = protocol.target_test
        test = cap_per_class(test, cfg.max_test_per_class)
        names = list(protocol.target_train.class_names)
        counts = protocol.target_train.counts()
        logits = predict_logits(mdir, test, batch_size=cfg.batch_size, device=cfg.device)
        model_names = [str(n) for n in info["class_names"]][: len(names)]
        if model_names and model_names != names:
            raise DataError(
                f"{mdir / 'model.json'}: the model's first {len(names)} class names differ "
                f"from the run's target classes; was it trained in another run directory?"
            )
        if logits.shape[1] > len(names):
            num_outputs = int(logits.shape[1])
        preds, labels = logits, test.labels
        source = str(mdir)
        trained = info if "loss_params" in info else read_model_info(run.path("train")) \
            if run.path("train", "model.json").is_file() else info
        from .pipeline import trained_loss_label

        trained_loss = trained_loss_label(trained)  # what trained (model.json), never the requested config
        source += f" (trained with {trained_loss})"
        where = _where_for_run(run, cfg, protocol, test, names, counts, many, few,
                               logits if mdir == run.path("train") else None)
    metrics = evaluate_predictions(preds, labels, counts, names, many=many, few=few, num_outputs=num_outputs)
    metrics["source"] = source
    if cfg.predictions is None:
        metrics["trained_loss"] = trained_loss
    metrics["model"] = None if cfg.predictions is not None else cfg.model
    metrics["max_test_per_class"] = None if cfg.predictions is not None else cfg.max_test_per_class
    title = "Evaluation" + ("" if cfg.predictions is not None else f" ({cfg.model} model)")
    run.record(stage, {**cfg.model_dump(mode="json"), "resolved": {"many": many, "few": few, "inputs": key.inputs}})
    write_report(out_dir, metrics, title=title, source=source)
    if where is not None:
        atomic_write_json(out_dir / "where.json", where)
    elif (out_dir / "where.json").exists():
        (out_dir / "where.json").unlink()  # it described an earlier evaluation
    run.mark_done(stage, key, overall=metrics["overall"], few=metrics["few"])
    run.log(stage, overall=metrics["overall"], many=metrics["many"], medium=metrics["medium"], few=metrics["few"])
    return metrics
