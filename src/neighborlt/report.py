"""The run report: one self-contained HTML page (``RUN/report/index.html``) and its markdown twin
(``RUN/report/report.md``) built only from files the earlier stages wrote.

Sections, each shown when its inputs exist (otherwise the section names the command that makes them):

* summary: the headline numbers (method against baseline, where the test images go);
* class-frequency profile (``classes.json``);
* many / medium / few / overall accuracy, method (``eval/metrics.json``) against the baseline
  (``baseline/eval/metrics.json``, written by ``neighborlt run`` / ``demo``);
* per-class accuracy against training images (``eval/per_class.csv``, the baseline's when present);
* where the target test images go under the joint model (``eval/where.json``, see
  :func:`neighborlt.evaluate.where_predictions`);
* the acquisition funnel (``filter/funnel.json``) and contact sheets (``filter/sheets/<class>_kept.png`` /
  ``<class>_rejected.png``);
* coverage: per target, the proposed auxiliary names, the matched ones with image counts and the unmatched ones
  (``filter/coverage.json`` / ``retrieve/coverage.json``, :mod:`neighborlt.coverage`), with the warning that names the
  targets without an auxiliary class or a silenced pair;
* training curves (``train/log.jsonl``, the baseline's when present);
* config and provenance (``records/*.config.json`` / ``*.env.json`` / ``*.done.json``).

The page has no script and no external reference: figures are inline ``data:image/png;base64`` images (matplotlib,
Agg), the CSS is inline. Every string read from a file (class names above all) is escaped; matplotlib labels have
their ``$`` escaped so that a class name is never parsed as mathtext. The markdown file links the same figures,
written next to it in ``figures/``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .coverage import coverage_warnings
from .defaults import FEW_SHOT, MANY_SHOT
from .errors import NeighborLTError
from .rundir import RunDir, atomic_write_bytes, atomic_write_text, read_json

logger = logging.getLogger(__name__)

SPLITS = ("many", "medium", "few")
SHOT_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
WHERE_COLOURS = {"correct": "#2ca02c", "other_target": "#9a9a9a", "paired_aux": "#ff7f0e",
                 "unpaired_aux": "#9467bd", "aux": "#9467bd"}
WHERE_LABELS = {"correct": "correct", "other_target": "other target", "paired_aux": "paired auxiliary",
                "unpaired_aux": "unpaired auxiliary", "aux": "auxiliary (pairs unknown)"}
#: Order of the stages in the provenance table (others follow alphabetically).
STAGE_ORDER = ("pipeline", "classes", "neighbors", "retrieve", "filter", "train", "export", "eval", "ablate",
               "report")
#: Errors a malformed input file can raise while a section is built: the section says so, the report goes on.
_READ_ERRORS = (NeighborLTError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


class ReportConfig(BaseModel):
    """Options of ``neighborlt report``."""

    model_config = ConfigDict(extra="forbid")

    out: Path | None = Field(None, description="output folder for index.html and report.md (default RUN/report)")
    baseline: Path | None = Field(None, description="run directory of the baseline to compare with "
                                                    "(default RUN/baseline, written by `neighborlt run`)")
    title: str | None = Field(None, description="page title (default: 'neighborlt report: <run folder>')")
    max_sheets: int = Field(40, ge=0, description="embed at most this many contact sheets (kept and rejected)")
    max_class_rows: int = Field(60, ge=1, description="per-class tables list every class up to this many classes, "
                                                      "else the worst and best ones")
    dpi: int = Field(100, ge=50, le=300, description="resolution of the figures")


@dataclass
class ReportResult:
    """What :func:`run_report` wrote: the two files and, per section, whether its inputs were there."""

    html: Path
    markdown: Path
    sections: dict[str, bool]


# --------------------------------------------------------------------------------------------- content model
# A section is a list of blocks; blocks hold plain text (escaped when rendered) and PNG bytes, so that the HTML and
# the markdown renderers share one content and no file string ever reaches the output unescaped.


@dataclass
class _Figure:
    png: bytes
    caption: str
    name: str  # file stem under figures/ for the markdown
    alt: str = ""


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] | None = None  # right-align these columns
    caption: str = ""


@dataclass
class _Missing:
    what: str
    command: str


@dataclass
class _Para:
    text: str
    kind: str = "p"  # p | note | warn


@dataclass
class _Details:
    summary: str
    text: str


@dataclass
class _Cards:
    cards: list[tuple[str, str, str]]  # label, value, sub-line


@dataclass
class _Heading:
    text: str


@dataclass
class _Gallery:
    """Figures side by side (contact sheets of one class), under a heading."""

    title: str
    figures: list[_Figure]
    key: str = ""  # the class the sheets belong to


_Block = _Figure | _Table | _Missing | _Para | _Details | _Cards | _Heading | _Gallery


@dataclass
class _Section:
    key: str
    title: str
    available: bool = True
    blocks: list[_Block] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- helpers


def _pct(v: Any, digits: int = 1) -> str:
    """A percentage for tables ("n/a" for None / NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _delta(a: Any, b: Any) -> str:
    """``a - b`` in points with a sign ("n/a" when either is missing)."""
    if a is None or b is None:
        return "n/a"
    return f"{float(a) - float(b):+.1f}"


def _mpl(text: Any, limit: int = 28) -> str:
    """A file string made safe for a matplotlib label: ``$`` escaped (no mathtext), shortened, one line."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float], dpi: int) -> bytes:
    """Render ``draw(fig)`` on a fresh Agg figure and return the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a ``.jsonl`` file and the number of unreadable lines."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def _read_per_class_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of ``per_class.csv`` with numbers parsed (accuracy None when empty)."""
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            acc = (r.get("accuracy") or "").strip()
            out.append({"index": int(r["index"]), "name": str(r["name"]), "train_count": int(r["train_count"]),
                        "shot": str(r.get("shot") or ""), "n_test": int(r.get("n_test") or 0),
                        "accuracy": float(acc) if acc else None})
    return out


def _png_of_file(path: Path, max_width: int = 1400) -> bytes:
    """A PNG re-encoding of an image file (any format PIL reads), at most ``max_width`` wide.

    Raises:
        OSError / ValueError: the file is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        img = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _safe_stem(name: str) -> str:
    """A file-name stem from arbitrary text (figures/ in the markdown)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60] or "figure"


def _method_label(model: dict[str, Any] | None, has_aux: bool) -> str:
    """The method's label from what trained (``train/model.json``: loss, λs, aux_weight, M), never the requested
    config."""
    if not model:
        return "method"
    from .pipeline import trained_loss_label

    label = trained_loss_label(model).replace("neighbor_silencing", "neighbor silencing", 1)
    return f"{label}{' + auxiliary classes' if has_aux else ''}"


def _baseline_label(train_cfg: dict[str, Any] | None, model: dict[str, Any] | None = None) -> str:
    """The baseline's label: its loss as trained (``baseline/train/model.json``), the config for older models."""
    if not train_cfg:
        return "baseline"
    trained = (model or {}).get("loss") or train_cfg.get("loss")
    loss = {"balanced_softmax": "Balanced-CE"}.get(str(trained), str(trained))
    no_aux = ("aux_manifest" in train_cfg and train_cfg["aux_manifest"] is None) or train_cfg.get("use_aux") == "none"
    return f"{loss}{', no auxiliary data' if no_aux else ''}"


def _maybe_json(path: Path) -> Any | None:
    """``read_json(path)`` or None when the file is absent."""
    return read_json(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------- the run's inputs


class _Inputs:
    """Lazy access to the run's files (each read at most once)."""

    def __init__(self, run: RunDir, baseline: Path) -> None:
        self.run = run
        self.root = run.root
        self.baseline = baseline
        self._cache: dict[str, Any] = {}

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def json(self, rel: str, base: Path | None = None) -> Any | None:
        root = self.root if base is None else base
        return self.get(f"{root}:{rel}", lambda: _maybe_json(root / rel))

    @property
    def classes(self) -> dict[str, Any] | None:
        return self.json("classes.json")

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self.json("eval/metrics.json")

    @property
    def baseline_metrics(self) -> dict[str, Any] | None:
        return self.json("eval/metrics.json", self.baseline)

    @property
    def train_cfg(self) -> dict[str, Any] | None:
        return self.json("records/train.config.json")

    @property
    def baseline_train_cfg(self) -> dict[str, Any] | None:
        return self.json("records/train.config.json", self.baseline)

    @property
    def model(self) -> dict[str, Any] | None:
        return self.json("train/model.json")

    @property
    def where(self) -> dict[str, Any] | None:
        return self.json("eval/where.json")

    @property
    def funnel(self) -> dict[str, Any] | None:
        return self.json("filter/funnel.json")

    def num_aux(self) -> int | None:
        m = self.model
        if not isinstance(m, dict):
            return None
        return int(m["num_classes"]) - int(m["num_target_classes"])


# --------------------------------------------------------------------------------------------- sections


def _section_profile(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("profile", "Class-frequency profile")
    doc = inp.classes
    if doc is None:
        sec.available = False
        sec.blocks.append(_Missing("RUN/classes.json", "neighborlt classes RUN --protocol NAME (or --dataset PATH)"))
        return sec
    rows = sorted(doc["classes"], key=lambda r: (-int(r["train_count"]), int(r["index"])))
    th = doc.get("thresholds") or {"many": MANY_SHOT, "few": FEW_SHOT}
    counts = [int(r["train_count"]) for r in rows]
    shots = [str(r.get("shot", "")) for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        x = list(range(len(rows)))
        ax.bar(x, [max(c, 0.8) for c in counts], width=0.85 if len(rows) < 200 else 1.0,
               color=[SHOT_COLOURS.get(s, "0.5") for s in shots], linewidth=0)
        ax.set_yscale("log")
        for name, t in (("many", th.get("many")), ("few", th.get("few"))):
            if t:
                ax.axhline(t, color="0.4", lw=0.8, ls="--")
                ax.text(len(rows) - 0.45, t, f"{name} threshold {t}", va="bottom", ha="right", fontsize=8,
                        color="0.3")
        if len(rows) <= 40:
            ax.set_xticks(x)
            ax.set_xticklabels([_mpl(r["name"], 18) for r in rows], rotation=45 if len(rows) > 6 else 0,
                               ha="right" if len(rows) > 6 else "center", fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(rows)} classes, most to fewest training images")
        ax.set_ylabel("training images (log scale)")
        from matplotlib.patches import Patch

        present = [s for s in SPLITS if s in shots]
        ax.legend(handles=[Patch(color=SHOT_COLOURS[s], label=f"{s} ({shots.count(s)} classes)") for s in present],
                  loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(present), fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlim(-0.6, len(rows) - 0.4)

    total = sum(counts) or 1
    n_aux = inp.num_aux()
    nonzero = [c for c in counts if c > 0]
    ratio = f"{max(nonzero) / min(nonzero):.0f}" if nonzero else "n/a"
    sec.blocks.append(_Para(
        f"{len(rows)} target classes of {doc.get('dataset', 'the dataset')}, {total} training images, "
        f"imbalance ratio {ratio} (most / fewest). Splits by training images: many > {th.get('many')}, "
        f"medium {th.get('few')}..{th.get('many')}, few < {th.get('few')}."
        + (f" The joint model adds {n_aux} auxiliary classes." if n_aux else "")))
    sec.blocks.append(_Figure(_figure_png(draw, (9.0, 3.8), cfg.dpi),
                              "Training images per target class (log scale), coloured by split.", "profile",
                              "bar chart of training images per class"))
    table = _Table(["split", "classes", "training images", "share of images"], [], [False, True, True, True])
    for s in SPLITS:
        n = sum(1 for x in shots if x == s)
        imgs = sum(c for c, x in zip(counts, shots) if x == s)
        table.rows.append([s, str(n), str(imgs), f"{100.0 * imgs / total:.1f}%"])
    sec.blocks.append(table)
    return sec


def _section_splits(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("splits", "Accuracy by split: method against baseline")
    m = inp.metrics
    if m is None:
        sec.available = False
        sec.blocks.append(_Missing("RUN/eval/metrics.json", "neighborlt eval RUN"))
        return sec
    b = inp.baseline_metrics
    mlabel = _method_label(_try(lambda: inp.model), bool(inp.num_aux()))
    blabel = _baseline_label(inp.baseline_train_cfg, _try(lambda: inp.json("train/model.json", inp.baseline)))
    keys = ("overall", "many", "medium", "few")
    series = [(blabel, b, "#9a9a9a"), (mlabel, m, "#1f77b4")] if b is not None else [(mlabel, m, "#1f77b4")]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / len(series)
        for j, (label, met, colour) in enumerate(series):
            for i, k in enumerate(keys):
                x = i - 0.4 + width * (j + 0.5)
                v = met.get(k)
                if v is None:
                    ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=8, color="0.4")
                    continue
                ax.bar(x, v, width=width * 0.92, color=colour, label=_mpl(label, 60) if i == 0 else None)
                ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys)
        ax.set_ylim(0, 105)
        ax.set_ylabel("top-1 accuracy (%)")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    sec.blocks.append(_Para(
        f"Top-1 accuracy (%) of the direct classifier on {m.get('n_test')} test images of {m.get('num_classes')} "
        "target classes; a split's accuracy is the mean per-class accuracy of its classes."
        + ("" if m.get("max_test_per_class") is None else
           f" Quick check: at most {m.get('max_test_per_class')} test images per class.")))
    if b is None:
        sec.blocks.append(_Missing("RUN/baseline/eval/metrics.json (the baseline)",
                                   "neighborlt run RUN (trains the Balanced-CE baseline into RUN/baseline)"))
    sec.blocks.append(_Figure(_figure_png(draw, (8.0, 3.8), cfg.dpi),
                              "Overall / many / medium / few top-1 accuracy"
                              + (" of the baseline (grey) and the method (blue)." if b is not None else "."),
                              "splits", "grouped bar chart of accuracy by split"))
    rows = []
    for k in (*keys, "balanced_accuracy", "harmonic_mean"):
        label = k.replace("_", " ")
        rows.append([label] + ([_pct(b.get(k)), _pct(m.get(k)), _delta(m.get(k), b.get(k))] if b is not None
                               else [_pct(m.get(k))]))
    wm = m.get("worst_class") or {}
    wb = (b or {}).get("worst_class") or {}
    worst = (lambda w: f"{_pct(w.get('accuracy'))} ({w.get('name')})" if w else "n/a")
    rows.append(["worst class"] + ([worst(wb), worst(wm), _delta(wm.get("accuracy"), wb.get("accuracy"))]
                                   if b is not None else [worst(wm)]))
    headers = ["metric", blabel, mlabel, "Δ (points)"] if b is not None else ["metric", mlabel]
    sec.blocks.append(_Table(headers, rows, [False] + [True] * (len(headers) - 1)))
    return sec


def _section_per_class(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("per_class", "Per-class accuracy against training images")
    path = inp.root / "eval" / "per_class.csv"
    if not path.is_file():
        sec.available = False
        sec.blocks.append(_Missing("RUN/eval/per_class.csv", "neighborlt eval RUN"))
        return sec
    rows = _read_per_class_csv(path)
    bpath = inp.baseline / "eval" / "per_class.csv"
    base = {r["index"]: r for r in _read_per_class_csv(bpath)} if bpath.is_file() else {}
    th = (inp.metrics or {}).get("thresholds") or (inp.classes or {}).get("thresholds") or {"many": MANY_SHOT, "few": FEW_SHOT}

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            br = base.get(r["index"])
            if br and br["accuracy"] is not None and r["accuracy"] is not None:
                x = max(r["train_count"], 1)
                ax.plot([x, x], [br["accuracy"], r["accuracy"]], color="0.75", lw=0.8, zorder=1)
        if base:
            pts = [r for r in base.values() if r["accuracy"] is not None]
            ax.scatter([max(r["train_count"], 1) for r in pts], [r["accuracy"] for r in pts], s=22,
                       facecolors="none", edgecolors="0.45", label="baseline", zorder=2)
        for s in SPLITS:
            pts = [r for r in rows if r["shot"] == s and r["accuracy"] is not None]
            if pts:
                ax.scatter([max(r["train_count"], 1) for r in pts], [r["accuracy"] for r in pts], s=22,
                           color=SHOT_COLOURS[s], label=f"method, {s}", zorder=3)
        if len(rows) <= 12:
            for r in rows:
                if r["accuracy"] is not None:
                    ax.annotate(_mpl(r["name"], 16), (max(r["train_count"], 1), r["accuracy"]), fontsize=7,
                                xytext=(4, 3), textcoords="offset points", color="0.25")
        ax.set_xscale("log")
        for t in (th.get("few"), th.get("many")):
            if t:
                ax.axvline(t, color="0.7", lw=0.8, ls="--")
        ax.set_ylim(-3, 103)
        ax.set_xlabel("training images (log scale; 0 shown at 1)")
        ax.set_ylabel("top-1 accuracy (%)")
        if any(r["accuracy"] is not None for r in rows):
            ax.legend(loc="best", fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    sec.blocks.append(_Figure(_figure_png(draw, (8.0, 4.2), cfg.dpi),
                              "Per-class top-1 accuracy against training images: the method coloured by split"
                              + ("; the baseline as grey rings, joined to the method by a line per class." if base
                                 else "."), "per_class", "scatter plot of per-class accuracy"))
    ordered = sorted(rows, key=lambda r: (-r["train_count"], r["index"]))
    shown, note = ordered, ""
    if len(rows) > cfg.max_class_rows:
        evaluable = sorted((r for r in rows if r["accuracy"] is not None), key=lambda r: (r["accuracy"], r["index"]))
        k = max(1, cfg.max_class_rows // 2)
        shown = evaluable[:k] + evaluable[-k:] if len(evaluable) > 2 * k else evaluable
        note = (f"{len(rows)} classes: the {k} worst and {k} best by the method's accuracy; every class is in "
                "RUN/eval/per_class.csv.")
    headers = ["class", "split", "training images", "test images"] + (["baseline", "method", "Δ"] if base
                                                                       else ["accuracy"])
    table = _Table(headers, [], [False, False, True, True] + [True] * (3 if base else 1), caption=note)
    for r in shown:
        br = base.get(r["index"])
        cells = [r["name"], r["shot"], str(r["train_count"]), str(r["n_test"])]
        if base:
            ba = br["accuracy"] if br else None
            cells += [_pct(ba), _pct(r["accuracy"]), _delta(r["accuracy"], ba)]
        else:
            cells.append(_pct(r["accuracy"]))
        table.rows.append(cells)
    sec.blocks.append(table)
    return sec


def _section_where(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("where", "Where the target test images go")
    doc = inp.where
    if doc is None:
        sec.available = False
        if inp.model is not None and not inp.num_aux():
            sec.blocks.append(_Para("The trained model has no auxiliary classes (trained with --use-aux none), so "
                                    "every test image goes to a target class.", "note"))
        else:
            sec.blocks.append(_Missing("RUN/eval/where.json",
                                       "neighborlt eval RUN (after training with auxiliary classes)"))
        return sec
    if not doc.get("available", True):
        sec.available = False
        sec.blocks.append(_Para(f"Not measured: {doc.get('reason', 'unknown reason')}", "warn"))
        return sec
    known = bool(doc.get("pairs_known"))
    kinds = ["correct", "other_target", "paired_aux", "unpaired_aux"] if known else ["correct", "other_target", "aux"]
    groups: list[tuple[str, dict[str, Any]]] = [(f"all ({doc.get('n_test')})", doc["share"])]
    for s in SPLITS:
        sh = (doc.get("per_split") or {}).get(s)
        if sh and sh.get("correct") is not None:
            groups.append((s, sh))
    share = doc["share"]
    sec.blocks.append(_Para(
        f"Top-1 of the joint model over all {doc.get('num_outputs')} outputs ({doc.get('num_target')} targets + "
        f"{int(doc.get('num_outputs', 0)) - int(doc.get('num_target', 0))} auxiliary classes) on "
        f"{doc.get('n_test')} target test images: {_pct(share.get('aux'))}% go to an auxiliary class"
        + (f", {_pct(share.get('paired_aux'))}% to a neighbour paired with the image's own class "
           f"({doc.get('num_pairs')} pairs; {doc.get('pairs_source', '')})." if known
           else "; the neighbour pairs are unknown, so paired and unpaired are not told apart.")
        + " The direct classifier drops the auxiliary rows, so these images are then ranked among the targets only."))

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ys = list(range(len(groups)))[::-1]
        for y, (_, sh) in zip(ys, groups):
            left = 0.0
            for k in kinds:
                v = float(sh.get(k) or 0.0)
                ax.barh(y, v, left=left, color=WHERE_COLOURS[k], height=0.6,
                        label=WHERE_LABELS[k] if y == ys[0] else None)
                if v >= 6:
                    ax.text(left + v / 2, y, f"{v:.0f}%", ha="center", va="center", fontsize=8, color="white")
                left += v
        ax.set_yticks(ys)
        ax.set_yticklabels([g for g, _ in groups])
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of target test images (%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)

    sec.blocks.append(_Figure(_figure_png(draw, (8.0, 1.2 + 0.55 * len(groups)), cfg.dpi),
                              "Where the joint model's top-1 falls, for all target test images and per split.",
                              "where", "stacked bar chart of where test images go"))
    headers = ["images", "n"] + [WHERE_LABELS[k] for k in kinds]
    table = _Table(headers, [], [False, True] + [True] * len(kinds),
                   caption="The joint model (all outputs, before export), not the direct classifier of the headline "
                   "accuracy: the share (%) of each group's target test images whose top-1 is correct, another "
                   "target, or an auxiliary class.")
    counts = {s: sum(r["n_test"] for r in doc.get("per_class", []) if r.get("shot") == s) for s in SPLITS}
    for g, sh in groups:
        n = str(doc.get("n_test")) if g.startswith("all") else str(counts.get(g, ""))
        table.rows.append([g.split(" (")[0], n] + [_pct(sh.get(k)) for k in kinds])
    sec.blocks.append(table)
    if known:
        sec.blocks.append(_Para(f"Mean softmax probability on the true class's paired auxiliary classes: "
                                f"{_pct(doc.get('paired_mass'), 3) if doc.get('paired_mass') is not None else 'n/a'};"
                                f" mean logit margin of the true class over its strongest paired neighbour: "
                                f"{_pct(doc.get('margin'), 2)}.", "note"))
    per_class = [r for r in doc.get("per_class", []) if r.get("n_test")]
    if per_class and len(per_class) <= cfg.max_class_rows:
        pk = [k for k in kinds if k != "aux"]
        t2 = _Table(["class", "split", "test images"] + [WHERE_LABELS[k] for k in pk], [],
                    [False, False, True] + [True] * len(pk), caption="Per class (%).")
        for r in per_class:
            t2.rows.append([str(r.get("name") or r.get("index")), str(r.get("shot") or ""), str(r["n_test"])]
                           + [_pct(r.get(k)) for k in pk])
        sec.blocks.append(t2)
    return sec


def _sheet_files(root: Path) -> list[tuple[str, str, Path]]:
    """``(class, kind, path)`` of ``RUN/filter/sheets/*.png`` (kind kept / rejected / other)."""
    d = root / "filter" / "sheets"
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.png")):
        stem = p.stem
        cls, _, kind = stem.rpartition("_")
        if kind not in ("kept", "rejected") or not cls:
            cls, kind = stem, "other"
        out.append((cls, kind, p))
    return out


def _section_funnel(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("funnel", "Acquisition funnel and contact sheets")
    doc = inp.funnel
    sheets = _sheet_files(inp.root)
    if doc is None and not sheets:
        sec.available = False
        sec.blocks.append(_Missing("RUN/filter/funnel.json and RUN/filter/sheets/",
                                   "neighborlt retrieve RUN, then neighborlt filter RUN"))
        return sec
    per_class_order: list[str] = []
    if doc is None:
        sec.blocks.append(_Missing("RUN/filter/funnel.json", "neighborlt filter RUN"))
    else:
        stages = [str(s) for s in doc.get("stages") or list((doc.get("total") or {}).keys())]
        total = doc.get("total") or {}
        first = total.get(stages[0]) if stages else None
        sec.blocks.append(_Para(
            f"Auxiliary images left after each stage of retrieval and filtering ({' → '.join(stages)}), over "
            f"{len(doc.get('per_class') or [])} auxiliary classes."))

        def draw(fig: Any) -> None:
            ax = fig.add_subplot(1, 1, 1)
            vals = [float(total.get(s) or 0) for s in stages]
            ys = list(range(len(stages)))[::-1]
            ax.barh(ys, vals, color=["#1f77b4" if s != "kept" else "#2ca02c" for s in stages], height=0.65)
            top = max(vals) if vals else 1.0
            for y, v in zip(ys, vals):
                ax.text(v + top * 0.01, y, f"{int(v)}", va="center", fontsize=8)
            ax.set_yticks(ys)
            ax.set_yticklabels([_mpl(s, 20) for s in stages])
            ax.set_xlim(0, top * 1.12 or 1)
            ax.set_xlabel("auxiliary images")
            ax.spines[["top", "right"]].set_visible(False)

        if stages:
            sec.blocks.append(_Figure(_figure_png(draw, (8.0, 0.8 + 0.38 * len(stages)), cfg.dpi),
                                      "Images left after each stage, all auxiliary classes together.", "funnel",
                                      "horizontal bar chart of the acquisition funnel"))
        table = _Table(["stage", "images", "% of first stage", "dropped here"], [], [False, True, True, True])
        prev = None
        for s in stages:
            v = total.get(s)
            share = f"{100.0 * float(v) / float(first):.1f}%" if v is not None and first else "n/a"
            dropped = str(int(prev) - int(v)) if prev is not None and v is not None else ""
            table.rows.append([s, "n/a" if v is None else str(v), share, dropped])
            prev = v if v is not None else prev
        sec.blocks.append(table)
        pcs = doc.get("per_class") or []
        per_class_order = [str(r.get("name")) for r in pcs]
        if pcs:
            shown = pcs[: cfg.max_class_rows]
            t2 = _Table(["auxiliary class", "neighbour of"] + stages, [], [False, False] + [True] * len(stages),
                        caption="" if len(shown) == len(pcs) else
                        f"The first {len(shown)} of {len(pcs)} classes; all are in RUN/filter/funnel.json.")
            for r in shown:
                parents = r.get("parents") or []
                t2.rows.append([str(r.get("name")), ", ".join(str(p) for p in parents)]
                               + ["" if r.get(s) is None else str(r.get(s)) for s in stages])
            sec.blocks.append(t2)
        rules = doc.get("rules")
        if isinstance(rules, dict) and rules:
            sec.blocks.append(_Details(f"Filter rules ({len(rules)} settings, RUN/filter/funnel.json)",
                                       json.dumps(rules, indent=2, ensure_ascii=False)))
    if not sheets:
        sec.blocks.append(_Missing("RUN/filter/sheets/*.png (contact sheets)", "neighborlt filter RUN"))
        return sec
    # sheet files are named by class slug: map each back to its funnel class (name, order) where one matches
    by_name = {n: (i, n) for i, n in enumerate(per_class_order)}
    from .filter import sheet_stem  # the filter names the sheets; one function, so the two never drift apart

    by_slug = {sheet_stem(n): (i, n) for i, n in reversed(list(enumerate(per_class_order)))}
    kind_rank = {"kept": 0, "rejected": 1, "other": 2}
    sheets = [(by_name.get(c) or by_slug.get(c) or (len(by_name), c), c, k, p) for c, k, p in sheets]
    sheets.sort(key=lambda t: (t[0][0], t[1], kind_rank[t[2]]))
    sec.blocks.append(_Heading("Contact sheets"))
    sec.blocks.append(_Para("Kept and rejected auxiliary images per class, as the filter stage drew them.", "note"))
    funnel_rows = {str(r.get("name")): r for r in ((doc or {}).get("per_class") or [])}
    embedded = 0
    gallery: _Gallery | None = None
    for (_, cls), _stem, kind, path in sheets:
        if embedded >= cfg.max_sheets:
            sec.blocks.append(_Para(f"{len(sheets) - embedded} more contact sheets are in RUN/filter/sheets/ "
                                    f"(--max-sheets {cfg.max_sheets}).", "note"))
            break
        try:
            png = _png_of_file(path)
        except (OSError, ValueError) as e:
            sec.blocks.append(_Para(f"{path.name}: not a readable image ({type(e).__name__}); skipped.", "warn"))
            continue
        if gallery is None or gallery.key != cls:
            row = funnel_rows.get(cls)
            kept = row.get("kept") if row else None
            first = row.get(doc["stages"][0]) if row and doc and doc.get("stages") else None
            title = cls + (f" ({kept} kept of {first})" if kept is not None and first is not None else "")
            gallery = _Gallery(title, [], key=cls)
            sec.blocks.append(gallery)
        what = {"kept": "kept", "rejected": "rejected", "other": "contact sheet"}[kind]
        gallery.figures.append(_Figure(png, what if kind != "other" else path.name, f"sheet_{_safe_stem(path.stem)}",
                                       f"{what} images of {cls}"))
        embedded += 1
    return sec


def _section_coverage(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("coverage", "Coverage: auxiliary classes per target")
    after_filter = inp.json("filter/coverage.json")
    after_retrieve = inp.json("retrieve/coverage.json")
    doc = after_filter or after_retrieve
    if doc is None:
        sec.available = False
        sec.blocks.append(_Missing("RUN/retrieve/coverage.json", "neighborlt retrieve RUN (then neighborlt filter RUN)"))
        return sec
    for d in (after_retrieve, after_filter):
        if d and d.get("warning"):
            sec.blocks.append(_Para(str(d["warning"]), "warn"))
    retrieved = {str(r.get("name")): r.get("matched") or {} for r in (after_retrieve or {}).get("targets", [])}
    sec.blocks.append(_Para(
        "For each target: the auxiliary names the neighbour search proposed, the auxiliary classes that got images "
        + ("(images after retrieve → kept by the filter)" if after_filter else "(images after retrieve)")
        + ", and the proposed names no image matched. A target without a kept auxiliary class has no silenced pair."))
    rows = doc.get("targets") or []
    table = _Table(["target", "proposed", "matched (images)", "unmatched"], [],
                   caption="" if len(rows) <= cfg.max_class_rows else
                   f"The first {cfg.max_class_rows} of {len(rows)} targets; all are in RUN/"
                   f"{'filter' if after_filter else 'retrieve'}/coverage.json.")
    for r in rows[: cfg.max_class_rows]:
        name = str(r.get("name"))
        got = r.get("matched") or {}
        if after_filter:
            before = retrieved.get(name, {})
            cells = [f"{n} ({before.get(n, '?')} → {got.get(n, 0)})" for n in dict.fromkeys([*before, *got])]
        else:
            cells = [f"{n} ({k})" for n, k in got.items()]
        table.rows.append([name, ", ".join(str(x) for x in r.get("proposed") or []) or "–",
                           ", ".join(cells) or "none", ", ".join(str(x) for x in r.get("unmatched") or []) or "–"])
    sec.blocks.append(table)
    return sec


def _section_viz(inp: _Inputs, cfg: ReportConfig) -> _Section:
    """The figures ``neighborlt viz RUN`` drew (``RUN/viz/*.png``), each with its caption of what to look for."""
    from .viz import viz_figures

    sec = _Section("viz", "Why: feature views")
    figures = viz_figures(inp.root)
    if not figures:  # optional (UMAP takes minutes on a CPU): a pointer, not a missing input
        sec.blocks.append(_Para("No figures yet: neighborlt viz RUN draws a UMAP of the most-confused head/tail "
                                "pairs, PCA-RGB maps of ViT patch tokens and the samples per class, then neighborlt "
                                "report RUN shows them here."))
        return sec
    for path, caption in figures:
        try:
            png = _png_of_file(path)
        except (OSError, ValueError) as e:
            sec.blocks.append(_Para(f"{path.name}: not a readable image ({type(e).__name__}); skipped.", "warn"))
            continue
        sec.blocks.append(_Figure(png, caption, f"viz_{_safe_stem(path.stem)}", path.stem.replace("_", " ")))
    return sec


def _curve_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, bad = _read_jsonl(path)
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in rows:
        if isinstance(r.get("epoch"), (int, float)):
            by_epoch[int(r["epoch"])] = r  # a resumed run may repeat an epoch: keep the last row
    return [by_epoch[e] for e in sorted(by_epoch)], bad


def _section_curves(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("curves", "Training curves")
    path = inp.root / "train" / "log.jsonl"
    if not path.is_file():
        sec.available = False
        sec.blocks.append(_Missing("RUN/train/log.jsonl", "neighborlt train RUN"))
        return sec
    rows, bad = _curve_rows(path)
    if not rows:
        sec.available = False
        sec.blocks.append(_Para(f"{path.name} has no epoch rows yet (training has not finished an epoch).", "warn"))
        return sec
    bpath = inp.baseline / "train" / "log.jsonl"
    brows = _curve_rows(bpath)[0] if bpath.is_file() else []
    tested = [r for r in rows if isinstance(r.get("test"), dict)]
    has_test = len(tested) > 1  # one evaluation (eval_every: 0, the last epoch) is a sentence, not a curve
    panels = 3 if has_test else 2

    def num(r: dict[str, Any], k: str) -> float:
        v = r.get(k)
        return float(v) if isinstance(v, (int, float)) else float("nan")

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, panels)
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [num(r, "loss") for r in rows], marker="o", ms=3, color="#1f77b4", label="method")
        if brows:
            axes[0].plot([r["epoch"] for r in brows], [num(r, "loss") for r in brows], ls="--", color="0.5",
                         label="baseline")
            axes[0].legend(fontsize=8, frameon=False)
        axes[0].set_title("training loss", fontsize=10)
        axes[1].plot(ep, [num(r, "lr") for r in rows], color="#8c564b")
        axes[1].set_title("learning rate", fontsize=10)
        if has_test:
            ax = axes[2]
            for k, colour in (("overall", "black"), *((s, SHOT_COLOURS[s]) for s in SPLITS)):
                pts = [(r["epoch"], r["test"].get(k)) for r in rows
                       if isinstance(r.get("test"), dict) and r["test"].get(k) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colour, label=k)
            ax.set_ylim(0, 100)
            ax.set_title("test top-1 (%)", fontsize=10)
            ax.legend(fontsize=7, frameon=False)
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.spines[["top", "right"]].set_visible(False)

    last = rows[-1]
    time_s = sum(num(r, "time_s") for r in rows if isinstance(r.get("time_s"), (int, float)))
    sec.blocks.append(_Para(
        f"{len(rows)} epochs logged (of {last.get('epochs', len(rows))}), {time_s:.{1 if time_s < 10 else 0}f} s of "
        f"training; final loss "
        f"{num(last, 'loss'):.4f}." + (f" {bad} unreadable line(s) in log.jsonl were skipped." if bad else "")
        + (f" Test top-1 was measured once, after epoch {tested[0]['epoch']} (eval_every: 0): "
           + ", ".join(f"{k} {_pct(tested[0]['test'].get(k))}%" for k in ("overall", *SPLITS)
                       if tested[0]["test"].get(k) is not None) + "." if len(tested) == 1 else "")))
    sec.blocks.append(_Figure(_figure_png(draw, (10.0, 3.2), cfg.dpi),
                              "Per-epoch training loss" + (" (baseline dashed)" if brows else "")
                              + ", learning rate" + (" and test accuracy when evaluated." if has_test else "."),
                              "curves", "training curves"))
    if has_test:
        t = _Table(["epoch", "loss", "lr", "overall", "many", "medium", "few"], [], [True] * 7,
                   caption="Epochs with a test evaluation.")
        for r in rows:
            if isinstance(r.get("test"), dict):
                t.rows.append([str(r["epoch"]), f"{num(r, 'loss'):.4f}", f"{num(r, 'lr'):.4g}"]
                              + [_pct(r["test"].get(k)) for k in ("overall", *SPLITS)])
        if len(t.rows) > 30:
            t.rows = t.rows[-30:]
            t.caption = "The last 30 epochs with a test evaluation."
        sec.blocks.append(t)
    return sec


def _stage_names(records: Path) -> list[str]:
    names = {p.name[: -len(".config.json")] for p in records.glob("*.config.json")}
    return sorted(names, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))


def _section_provenance(inp: _Inputs, cfg: ReportConfig) -> _Section:
    sec = _Section("provenance", "Config and provenance")
    records = inp.root / "records"
    stages = _stage_names(records) if records.is_dir() else []
    if not stages:
        sec.available = False
        sec.blocks.append(_Missing("RUN/records/*.config.json", "any stage, e.g. neighborlt classes RUN"))
        return sec
    table = _Table(["stage", "finished", "seed", "git commit", "neighborlt", "torch", "python"], [])
    newest_env: dict[str, Any] | None = None
    for s in stages:
        env = _maybe_json(records / f"{s}.env.json") or {}
        done = _maybe_json(records / f"{s}.done.json") or {}
        if isinstance(done.get("time"), (int, float)):
            finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(done["time"]))
        else:  # a stage without a done marker (pipeline, report): when its record was written
            finished = str(env.get("time", "")).replace("T", " ")[:16] + " (recorded)" if env.get("time") else ""
        pk = env.get("packages") or {}
        seed = env.get("seed")
        table.rows.append([s, finished, "–" if seed is None else str(seed), str(env.get("git_commit") or "n/a"),
                           str(pk.get("neighborlt", "")), str(pk.get("torch", "")), str(env.get("python", ""))])
        if env and s != "report":
            newest_env = env
    sec.blocks.append(_Para("Every stage writes its resolved config and environment to RUN/records/; a stage with "
                            "the same config is skipped on a re-run."))
    sec.blocks.append(table)
    if newest_env:
        pk = newest_env.get("packages") or {}
        extra = [["platform", str(newest_env.get("platform", ""))], ["devices", ", ".join(
            str(d) for d in newest_env.get("devices") or [])], ["cuda", str(newest_env.get("cuda"))]]
        sec.blocks.append(_Table(["package", "version"], [[str(k), str(v)] for k, v in pk.items()] + extra,
                                 caption="Environment of the last stage before the report."))
    for s in stages:
        text = json.dumps(_maybe_json(records / f"{s}.config.json"), indent=2, ensure_ascii=False)
        sec.blocks.append(_Details(f"{s} config (records/{s}.config.json)", text))
    btrain = inp.baseline / "records" / "train.config.json"
    if btrain.is_file():
        sec.blocks.append(_Details("baseline train config (baseline/records/train.config.json)",
                                   json.dumps(read_json(btrain), indent=2, ensure_ascii=False)))
    return sec


SECTIONS: tuple[tuple[str, Callable[[_Inputs, ReportConfig], _Section]], ...] = (
    ("profile", _section_profile),
    ("splits", _section_splits),
    ("per_class", _section_per_class),
    ("where", _section_where),
    ("coverage", _section_coverage),
    ("funnel", _section_funnel),
    ("curves", _section_curves),
    ("viz", _section_viz),
    ("provenance", _section_provenance),
)
_TITLES = {"profile": "Class-frequency profile", "splits": "Accuracy by split: method against baseline",
           "per_class": "Per-class accuracy against training images", "where": "Where the target test images go",
           "funnel": "Acquisition funnel and contact sheets", "curves": "Training curves",
           "coverage": "Coverage: auxiliary classes per target", "viz": "Why: feature views",
           "provenance": "Config and provenance"}


def _build(key: str, fn: Callable[[_Inputs, ReportConfig], _Section], inp: _Inputs, cfg: ReportConfig) -> _Section:
    """One section; a malformed input file becomes a warning in that section, never a crash."""
    try:
        return fn(inp, cfg)
    except _READ_ERRORS as e:
        logger.warning("report: section %s: %s", key, e)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _Section(key, _TITLES[key], False,
                        [_Para(f"Could not read this section's input ({type(e).__name__}: {msg}); re-run the stage "
                               "that writes it.", "warn")])


def _try(get: Callable[[], Any]) -> Any:
    """``get()``, or None when its file is malformed (its section already says so)."""
    try:
        return get()
    except _READ_ERRORS:
        return None


def _summary(inp: _Inputs, sections: list[_Section]) -> _Section:
    sec = _Section("summary", "Summary")
    cards: list[tuple[str, str, str]] = []
    m, b = _try(lambda: inp.metrics), _try(lambda: inp.baseline_metrics)
    if m is not None:
        for k in ("overall", "many", "medium", "few"):
            v = m.get(k)
            if v is None and k != "overall":
                continue
            sub = "method"
            if b is not None:
                sub = f"baseline {_pct(b.get(k))}, Δ {_delta(v, b.get(k))}"
            cards.append((f"{k} top-1", f"{_pct(v)}%" if v is not None else "n/a", sub))
    w = _try(lambda: inp.where)
    w = w if isinstance(w, dict) and w.get("available", True) else None
    if w is not None and w.get("share"):
        if w.get("pairs_known"):
            cards.append(("to paired aux", f"{_pct(w['share'].get('paired_aux'))}%",
                          f"{_pct(w['share'].get('aux'))}% to any auxiliary class"))
        else:
            cards.append(("to auxiliary", f"{_pct(w['share'].get('aux'))}%", "joint model, top-1"))
    if cards:
        sec.blocks.append(_Cards(cards))
    if w is not None and w.get("share"):
        sec.blocks.append(_Para(
            "The top-1 cards are the direct classifier (the exported model: target classes only). "
            + ("'To paired aux' is the share of target test images that the joint model (targets + auxiliary "
               "outputs, before export) puts on an auxiliary class paired with the image's own class: the confusion "
               "the silencing loss allows; the direct classifier ranks those images among the targets."
               if w.get("pairs_known") else "'To auxiliary' is the share of target test images that the joint model "
               "(targets + auxiliary outputs, before export) puts on an auxiliary class.")
            + " See 'Where the target test images go'.", "note"))
    for warning in _try(lambda: coverage_warnings(inp.root)) or []:
        sec.blocks.append(_Para(warning, "warn"))
    facts = []
    c = _try(lambda: inp.classes)
    if isinstance(c, dict):
        th = c.get("thresholds") or {}
        shots = [str(r.get("shot")) for r in c.get("classes", [])]
        facts.append(f"{len(shots)} target classes of {c.get('dataset', 'the dataset')} ("
                     + ", ".join(f"{shots.count(s)} {s}" for s in SPLITS)
                     + f"; many > {th.get('many')}, few < {th.get('few')} training images)")
    n_aux = _try(inp.num_aux)
    if n_aux is not None:
        facts.append(f"{n_aux} auxiliary classes in the joint model")
    t = _try(lambda: inp.train_cfg)
    trained = _try(lambda: inp.model)
    if isinstance(t, dict):
        from .pipeline import trained_loss_label

        loss = trained_loss_label(trained) if isinstance(trained, dict) else "(not trained yet)"
        facts.append(f"{t.get('model')} at {t.get('image_size')} px, {t.get('epochs')} epochs, loss {loss}"
                     f", seed {t.get('seed')}")
    if facts:
        sec.blocks.append(_Para("; ".join(facts) + "."))
    if m is None:
        sec.blocks.append(_Para("No evaluation yet: run `neighborlt eval RUN` for the headline numbers.", "note"))
    missing = [s.title for s in sections if not s.available]
    if missing:
        sec.blocks.append(_Para("Not available yet: " + "; ".join(missing) + " (each section says which command "
                                "makes it).", "note"))
    return sec


# --------------------------------------------------------------------------------------------- rendering

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dfe3ea; --soft: #f5f7fa; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 64px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header .meta { color: var(--muted); font-size: 13px; margin: 0 0 12px; word-break: break-all; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; margin: 14px 0; }
nav ol { margin: 0; padding-left: 20px; columns: 2; }
nav a { color: var(--accent); text-decoration: none; }
nav .na { color: var(--muted); font-size: 12px; }
section { margin-top: 34px; padding-top: 6px; border-top: 1px solid var(--line); }
h2 { font-size: 20px; margin: 10px 0 10px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
p { margin: 8px 0; max-width: 900px; }
p.note { color: var(--muted); font-size: 13.5px; }
p.warn, .missing { background: #fff6e5; border: 1px solid #f0d9a8; border-radius: 6px; padding: 8px 12px; }
.missing code, p code { background: #eef1f5; padding: 1px 5px; border-radius: 4px; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0 14px; }
.card { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--soft); }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card .value { font-size: 26px; font-weight: 600; }
.card .sub { font-size: 12.5px; color: var(--muted); }
figure { margin: 14px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
.tablewrap { overflow-x: auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12.5px; padding-top: 4px; }
details { margin: 6px 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px; }
summary { cursor: pointer; font-size: 14px; }
pre { font-size: 12px; background: var(--soft); padding: 10px; overflow-x: auto; border-radius: 4px; }
.gallery h4 { font-size: 14.5px; margin: 18px 0 4px; }
.gallery .row { display: flex; flex-wrap: wrap; gap: 14px; }
.gallery figure { flex: 1 1 380px; margin: 4px 0 8px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_block(b: _Block) -> str:
    if isinstance(b, _Para):
        cls = "" if b.kind == "p" else f' class="{b.kind}"'
        return f"<p{cls}>{_e(b.text)}</p>"
    if isinstance(b, _Missing):
        return (f'<div class="missing">Not available: <strong>{_e(b.what)}</strong> is missing. Make it with '
                f"<code>{_e(b.command)}</code>.</div>")
    if isinstance(b, _Heading):
        return f"<h3>{_e(b.text)}</h3>"
    if isinstance(b, _Figure):
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(b.alt or b.caption)}">'
                f"<figcaption>{_e(b.caption)}</figcaption></figure>")
    if isinstance(b, _Table):
        num = b.numeric or [False] * len(b.headers)
        head = "".join(f'<th{" class=num" if n else ""}>{_e(h)}</th>' for h, n in zip(b.headers, num))
        body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{_e(c)}</td>' for c, n in zip(r, num))
                       + "</tr>" for r in b.rows)
        cap = f"<caption>{_e(b.caption)}</caption>" if b.caption else ""
        return f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(b, _Gallery):
        return (f'<div class="gallery"><h4>{_e(b.title)}</h4><div class="row">'
                + "".join(_html_block(f) for f in b.figures) + "</div></div>")
    if isinstance(b, _Details):
        return f"<details><summary>{_e(b.summary)}</summary><pre>{_e(b.text)}</pre></details>"
    if isinstance(b, _Cards):
        return '<div class="cards">' + "".join(
            f'<div class="card"><div class="label">{_e(lab)}</div><div class="value">{_e(v)}</div>'
            f'<div class="sub">{_e(sub)}</div></div>' for lab, v, sub in b.cards) + "</div>"
    raise TypeError(f"unknown block {type(b).__name__}")


def render_html(title: str, subtitle: str, sections: Sequence[_Section]) -> str:
    """The self-contained page (inline CSS and images, no script, no external reference)."""
    toc = "".join(
        f'<li><a href="#{s.key}">{_e(s.title)}</a>{"" if s.available else " <span class=na>(not available)</span>"}'
        "</li>" for s in sections if s.key != "summary")
    body = []
    for s in sections:
        inner = "\n".join(_html_block(b) for b in s.blocks)
        if s.key == "summary":
            body.append(f'<section id="summary" style="border-top:0;margin-top:0">{inner}</section>'
                        f"<nav><ol>{toc}</ol></nav>")
        else:
            body.append(f'<section id="{s.key}"><h2>{_e(s.title)}</h2>\n{inner}</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header><h1>{_e(title)}</h1><p class="meta">{_e(subtitle)}</p></header>\n'
        + "\n".join(body)
        + f"\n<footer>Written by neighborlt report from the files in {_e(subtitle)}.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def _md(text: Any) -> str:
    """Text for a markdown cell or paragraph: HTML-escaped (markdown renders entities), no pipes or newlines."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def render_markdown(title: str, subtitle: str, sections: Sequence[_Section], figure_dir: str = "figures") -> str:
    """The markdown twin of the page; figures are linked from ``figure_dir`` (written by :func:`run_report`)."""
    lines = [f"# {_md(title)}", "", f"Run: `{_md(subtitle).replace('`', '')}`", ""]
    for s in sections:
        if s.key != "summary":
            lines += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, _Para):
                lines += [("> " if b.kind != "p" else "") + _md(b.text), ""]
            elif isinstance(b, _Missing):
                lines += [f"> Not available: {_md(b.what)} is missing. Make it with `{b.command.replace('`', '')}`.",
                          ""]
            elif isinstance(b, _Heading):
                lines += [f"### {_md(b.text)}", ""]
            elif isinstance(b, _Figure):
                lines += [f"![{_md(b.alt or b.caption)}]({figure_dir}/{b.name}.png)", "", f"*{_md(b.caption)}*", ""]
            elif isinstance(b, _Table):
                num = b.numeric or [False] * len(b.headers)
                lines.append("| " + " | ".join(_md(h) for h in b.headers) + " |")
                lines.append("|" + "|".join("---:" if n else "---" for n in num) + "|")
                lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in b.rows]
                lines += ([""] + [_md(b.caption)] if b.caption else []) + [""]
            elif isinstance(b, _Gallery):
                lines += [f"#### {_md(b.title)}", ""]
                for f in b.figures:
                    lines += [f"![{_md(f.alt)}]({figure_dir}/{f.name}.png)", "", f"*{_md(f.caption)}*", ""]
            elif isinstance(b, _Details):
                lines += [f"<details><summary>{_md(b.summary)}</summary>", "", "```json"]
                lines += [b.text.replace("```", "'''"), "```", "", "</details>", ""]
            elif isinstance(b, _Cards):
                lines += ["| " + " | ".join(_md(lab) for lab, _, _ in b.cards) + " |",
                          "|" + "---:|" * len(b.cards),
                          "| " + " | ".join(f"**{_md(v)}** ({_md(sub)})" for _, v, sub in b.cards) + " |", ""]
    return "\n".join(lines).rstrip() + "\n"


def _figures(sections: Iterable[_Section]) -> Iterable[_Figure]:
    for s in sections:
        for b in s.blocks:
            if isinstance(b, _Figure):
                yield b
            elif isinstance(b, _Gallery):
                yield from b.figures


# --------------------------------------------------------------------------------------------- stage


def run_report(cfg: ReportConfig, run_dir: str | os.PathLike[str] | RunDir) -> ReportResult:
    """Write ``RUN/report/index.html`` (self-contained) and ``RUN/report/report.md`` (+ ``figures/``) for a run.

    Reads only files earlier stages wrote; a section whose inputs are missing says which command makes them, and
    a malformed input file is a warning in its section. Always rewrites the report (it is cheap); records its
    config in ``RUN/records/report.config.json``.

    Args:
        cfg: the report options.
        run_dir: the run directory.

    Returns:
        The written paths and, per section key, whether its inputs were there.

    Raises:
        NeighborLTError: the run directory does not exist.
    """
    root = Path(run_dir.root if isinstance(run_dir, RunDir) else run_dir)
    if not root.is_dir():
        raise NeighborLTError(f"{root}: run directory not found; pass the folder of a run (e.g. runs/demo)")
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    out = Path(cfg.out) if cfg.out else run.path("report")
    baseline = Path(cfg.baseline) if cfg.baseline else run.path("baseline")
    run.record("report", cfg)
    inp = _Inputs(run, baseline)
    sections = [_build(key, fn, inp, cfg) for key, fn in SECTIONS]
    try:
        summary = _summary(inp, sections)
    except _READ_ERRORS as e:  # the sections already say what is wrong
        logger.warning("report: summary: %s", e)
        summary = _Section("summary", "Summary", True, [_Para("Some inputs could not be read; see below.", "warn")])
    sections.insert(0, summary)
    title = cfg.title or f"neighborlt report: {root.resolve().name}"
    subtitle = str(root.resolve())
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    names: set[str] = set()
    for f in _figures(sections):
        base, i = f.name, 1
        while f.name in names:
            i += 1
            f.name = f"{base}_{i}"
        names.add(f.name)
        atomic_write_bytes(fig_dir / f"{f.name}.png", f.png)
    if fig_dir.is_dir():
        for stale in fig_dir.glob("*.png"):
            if stale.stem not in names:
                stale.unlink()  # a figure of an earlier report that this one does not have
    html_path = atomic_write_text(out / "index.html", render_html(title, subtitle, sections))
    md_path = atomic_write_text(out / "report.md", render_markdown(title, subtitle, sections))
    logger.info("report: wrote %s and %s", html_path, md_path)
    return ReportResult(html=html_path, markdown=md_path, sections={s.key: s.available for s in sections[1:]})


# --------------------------------------------------------------------------------------------- ablation page


def _markdown_blocks(md: str) -> list[_Block]:
    """The blocks of a grid's markdown (``OUT/<grid>.md``): ``### `` headings, ``| `` tables (the ``|---|`` rule
    dropped; numeric-looking columns right-aligned), ``* `` bullets and paragraphs, all kept as plain text."""
    blocks: list[_Block] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            raw = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                raw.append(lines[i].strip())
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in raw]
            cells = [r for r in cells if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            if cells:
                head, body = cells[0], cells[1:]
                numeric = [bool(body) and all(re.fullmatch(r"[–\-+]?[\d.]+( ± [\d.]+)?|–|n/a", r[j]) is not None
                                              for r in body if j < len(r)) for j in range(len(head))]
                blocks.append(_Table(head, body, numeric))
            continue
        if line.startswith("#"):
            blocks.append(_Heading(line.lstrip("#").strip()))
        elif line.startswith(("* ", "- ")):
            blocks.append(_Para("• " + line[2:]))
        elif line:
            blocks.append(_Para(line))
        i += 1
    return blocks


def _provenance_section(out: Path, command: str) -> _Section:
    """The config of an experiment folder (``OUT/records/<command>.config.json``) and the versions it ran with."""
    cfg = _maybe_json(out / "records" / f"{command}.config.json") or {}
    prov = _Section("provenance", "Config and provenance")
    if cfg:
        env = _maybe_json(out / "records" / f"{command}.env.json") or {}
        pk = env.get("packages") or {}
        prov.blocks.append(_Table(["field", "value"], [
            ["git commit", str(env.get("git_commit") or "n/a")], ["recorded", str(env.get("time", ""))],
            ["python", str(env.get("python", ""))], ["platform", str(env.get("platform", ""))]]
            + [[f"package {k}", str(v)] for k, v in pk.items()]))
        prov.blocks.append(_Details(f"{command} config (records/{command}.config.json)",
                                    json.dumps(cfg, indent=2, ensure_ascii=False)))
    else:
        prov.available = False
        prov.blocks.append(_Missing(f"OUT/records/{command}.config.json", f"neighborlt {command} OUT"))
    return prov


def ablation_sections(out_dir: str | os.PathLike[str], grids: Sequence[str]) -> list[_Section]:
    """The sections of the ablation page: a summary, one section per grid (its table(s) from ``OUT/<grid>.md``
    and the plot ``OUT/<grid>.png`` inline), the runs, and the config with its provenance."""
    out = Path(out_dir)
    sections: list[_Section] = []
    cfg = _maybe_json(out / "records" / "ablate.config.json") or {}
    runs: dict[str, dict[str, Any]] = {}
    for grid in grids:
        sec = _Section(f"grid-{_safe_stem(grid)}", f"Grid {grid}")
        md_path, png_path = out / f"{grid}.md", out / f"{grid}.png"
        if md_path.is_file():
            sec.blocks += _markdown_blocks(md_path.read_text(encoding="utf-8"))
        else:
            sec.available = False
            sec.blocks.append(_Missing(f"OUT/{grid}.md", f"neighborlt ablate OUT --grid {grid}"))
        if png_path.is_file():
            try:
                sec.blocks.append(_Figure(_png_of_file(png_path), f"{grid}: top-1 accuracy (%) by split, mean ± std "
                                          "over seeds", f"ablate_{_safe_stem(grid)}", f"{grid} plot"))
            except (OSError, ValueError) as e:
                sec.blocks.append(_Para(f"{png_path.name}: cannot read the plot ({e})", "warn"))
        doc = _maybe_json(out / f"{grid}.json")
        for row in (doc or {}).get("rows", []) if isinstance(doc, dict) else []:
            r = runs.setdefault(str(row.get("run")), {"grids": [], "seeds": set(), "wall": row.get("wall_s_mean")})
            if grid not in r["grids"]:
                r["grids"].append(grid)
            r["seeds"].update(str(s) for s in (row.get("seeds") or {}))
        sections.append(sec)
    if runs:
        rows = [[name, ", ".join(r["grids"]), ", ".join(sorted(r["seeds"], key=lambda s: (len(s), s))),
                 f"{r['wall']:.0f}" if isinstance(r["wall"], (int, float)) and not math.isnan(r["wall"]) else "–",
                 f"runs/{name}/seed<S>/"] for name, r in sorted(runs.items())]
        sections.append(_Section("runs", "Runs", True, [
            _Para("Each distinct training run of the grids, trained once per seed (rows of several grids share it)."),
            _Table(["run", "grids", "seeds", "train s/run", "folder"], rows, [False, False, False, True, False])]))
    prov = _provenance_section(out, "ablate")
    sections.append(prov)
    facts = []
    if cfg:
        tr = cfg.get("train") or {}
        facts.append(f"protocol {cfg.get('protocol')}, model {tr.get('model', 'resnet32_cifar')}"
                     f"{' (frozen features)' if tr.get('frozen') else ''}, {tr.get('epochs', '?')} epochs, seeds "
                     f"{', '.join(map(str, cfg.get('seeds') or []))}, auxiliary relation {cfg.get('relation')}")
    facts.append(f"{len(grids)} grid{'s' if len(grids) != 1 else ''} ({', '.join(grids)}), {len(runs)} distinct runs")
    summary = _Section("summary", "Summary", True, [
        _Para("; ".join(facts) + "."),
        _Para("Top-1 accuracy (%) on the target classes, mean ± std over seeds; Δ is the paired same-seed difference "
              "to each grid's first row. The same tables are in OUT/<grid>.md and OUT/<grid>.json.", "note")])
    return [summary, *sections]


def write_ablation_page(out_dir: str | os.PathLike[str], grids: Sequence[str], *, title: str | None = None) -> Path:
    """Write ``OUT/index.html`` for ``neighborlt ablate``: self-contained like the run report (inline CSS and PNG
    images, no script or external reference, every file string escaped), with each grid's markdown tables as HTML
    tables, its plot, the runs and the config.

    Args:
        out_dir: the experiment folder (``OUT/<grid>.md``, ``.json``, ``.png``, ``records/ablate.*``).
        grids: the grids to show, in order.
        title: the page title (default ``neighborlt ablation: <folder name>``).

    Returns:
        The path of ``OUT/index.html``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise NeighborLTError(f"{out}: experiment folder not found; run `neighborlt ablate {out}` first")
    subtitle = str(out.resolve())
    page = render_html(title or f"neighborlt ablation: {out.resolve().name}", subtitle, ablation_sections(out, grids))
    marker = "<footer>Written by neighborlt report from"
    page = page.replace(marker, "<footer>Written by neighborlt ablate from")
    return atomic_write_text(out / "index.html", page)


def write_pilot_page(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``OUT/index.html`` for ``neighborlt pilot``: the tables of ``OUT/pilot.md``, the gap-vs-ratio plot
    ``OUT/pilot.png`` and the config, self-contained like the other pages."""
    out = Path(out_dir)
    if not out.is_dir():
        raise NeighborLTError(f"{out}: experiment folder not found; run `neighborlt pilot {out}` first")
    sec = _Section("pilot", "Head-tail gap by granularity")
    md_path, png_path = out / "pilot.md", out / "pilot.png"
    if md_path.is_file():
        sec.blocks += _markdown_blocks(md_path.read_text(encoding="utf-8"))
    else:
        sec.available = False
        sec.blocks.append(_Missing("OUT/pilot.md", "neighborlt pilot OUT"))
    if png_path.is_file():
        try:
            sec.blocks.append(_Figure(_png_of_file(png_path), "head − tail accuracy gap against the imbalance ratio, "
                                      "one line per number of superclasses (mean ± std over seeds)", "pilot_gap",
                                      "pilot plot"))
        except (OSError, ValueError) as e:
            sec.blocks.append(_Para(f"{png_path.name}: cannot read the plot ({e})", "warn"))
    groups = _maybe_json(out / "superclasses.json")
    if isinstance(groups, dict) and isinstance(groups.get("group_sizes"), dict):
        names = groups.get("group_names") or {}
        rows = [[str(names.get(g, g)), str(g), str(n)] for g, n in list(groups["group_sizes"].items())[:20]]
        sec.blocks.append(_Para(f"The dataset's classes fall into {groups.get('groups')} superclasses; the 20 largest "
                                "(OUT/superclasses.json lists all, and the classes of every sample):", "note"))
        sec.blocks.append(_Table(["superclass", "id", "classes"], rows, [False, False, True]))
    page = render_html(f"neighborlt pilot: {out.resolve().name}", str(out.resolve()),
                       [sec, _provenance_section(out, "pilot")])
    page = page.replace("<footer>Written by neighborlt report from", "<footer>Written by neighborlt pilot from")
    return atomic_write_text(out / "index.html", page)
