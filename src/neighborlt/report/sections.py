"""The sections of the run report, one function each: ``(RunInputs, ReportConfig) -> Section``.

Each section is built only from files the earlier stages wrote; when its inputs are missing it says which command
makes them (``available`` False), and a malformed input file is a warning in that section, never a crash
(:func:`build_sections`). The summary on top is built last, from the same inputs and the sections' availability.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..coverage import coverage_warnings
from ..defaults import FEW_SHOT, MANY_SHOT
from ..rundir import read_json
from .blocks import (
    Block,
    Cards,
    Details,
    Figure,
    Gallery,
    Heading,
    Missing,
    Para,
    Section,
    Table,
    delta,
    pct,
    png_of_file,
    safe_stem,
)
from .config import ReportConfig
from .figures import WHERE_LABELS, curves_png, funnel_png, per_class_png, profile_png, splits_png, where_png
from .inputs import READ_ERRORS, SPLITS, RunInputs, epoch_value, maybe_json, read_epochs, read_per_class_csv, try_read

logger = logging.getLogger(__name__)

#: Order of the stages in the provenance table (others follow alphabetically).
STAGE_ORDER = ("pipeline", "classes", "neighbors", "retrieve", "filter", "train", "export", "eval", "ablate",
               "report")


# --------------------------------------------------------------------------------------------- labels


def _method_label(model: dict[str, Any] | None, has_aux: bool) -> str:
    """The method's label from what trained (``train/model.json``: loss, λs, aux_weight, M), never the requested
    config."""
    if not model:
        return "method"
    from ..pipeline import trained_loss_label

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


def _section_profile(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Training images per target class (``classes.json``): the imbalance, a bar chart and the splits."""
    sec = Section("profile", "Class-frequency profile")
    doc = inp.classes
    if doc is None:
        return sec.missing("RUN/classes.json", "neighborlt classes RUN --protocol NAME (or --dataset PATH)")
    rows = sorted(doc["classes"], key=lambda r: (-int(r["train_count"]), int(r["index"])))
    th = doc.get("thresholds") or {"many": MANY_SHOT, "few": FEW_SHOT}
    counts = [int(r["train_count"]) for r in rows]
    shots = [str(r.get("shot", "")) for r in rows]
    total = sum(counts) or 1
    n_aux = inp.num_aux()
    nonzero = [c for c in counts if c > 0]
    ratio = f"{max(nonzero) / min(nonzero):.0f}" if nonzero else "n/a"
    sec.blocks.append(Para(
        f"{len(rows)} target classes of {doc.get('dataset', 'the dataset')}, {total} training images, "
        f"imbalance ratio {ratio} (most / fewest). Splits by training images: many > {th.get('many')}, "
        f"medium {th.get('few')}..{th.get('many')}, few < {th.get('few')}."
        + (f" The joint model adds {n_aux} auxiliary classes." if n_aux else "")))
    sec.blocks.append(Figure(profile_png(rows, counts, shots, th, cfg.dpi),
                             "Training images per target class (log scale), coloured by split.", "profile",
                             "bar chart of training images per class"))
    table = Table(["split", "classes", "training images", "share of images"], [], [False, True, True, True])
    for s in SPLITS:
        n = sum(1 for x in shots if x == s)
        imgs = sum(c for c, x in zip(counts, shots) if x == s)
        table.rows.append([s, str(n), str(imgs), f"{100.0 * imgs / total:.1f}%"])
    sec.blocks.append(table)
    return sec


def _section_splits(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Overall / many / medium / few top-1 of the method (``eval/metrics.json``) against the baseline's."""
    sec = Section("splits", "Accuracy by split: method against baseline")
    m = inp.metrics
    if m is None:
        return sec.missing("RUN/eval/metrics.json", "neighborlt eval RUN")
    b = inp.baseline_metrics
    mlabel = _method_label(try_read(lambda: inp.model), bool(inp.num_aux()))
    blabel = _baseline_label(inp.baseline_train_cfg, try_read(lambda: inp.json("train/model.json", inp.baseline)))
    keys = ("overall", "many", "medium", "few")
    series = [(blabel, b, "#9a9a9a"), (mlabel, m, "#1f77b4")] if b is not None else [(mlabel, m, "#1f77b4")]
    sec.blocks.append(Para(
        f"Top-1 accuracy (%) of the direct classifier on {m.get('n_test')} test images of {m.get('num_classes')} "
        "target classes; a split's accuracy is the mean per-class accuracy of its classes."
        + ("" if m.get("max_test_per_class") is None else
           f" Quick check: at most {m.get('max_test_per_class')} test images per class.")))
    if b is None:
        sec.blocks.append(Missing("RUN/baseline/eval/metrics.json (the baseline)",
                                  "neighborlt run RUN (trains the Balanced-CE baseline into RUN/baseline)"))
    sec.blocks.append(Figure(splits_png(series, keys, cfg.dpi),
                             "Overall / many / medium / few top-1 accuracy"
                             + (" of the baseline (grey) and the method (blue)." if b is not None else "."),
                             "splits", "grouped bar chart of accuracy by split"))
    rows = []
    for k in (*keys, "balanced_accuracy", "harmonic_mean"):
        label = k.replace("_", " ")
        rows.append([label] + ([pct(b.get(k)), pct(m.get(k)), delta(m.get(k), b.get(k))] if b is not None
                               else [pct(m.get(k))]))
    wm = m.get("worst_class") or {}
    wb = (b or {}).get("worst_class") or {}
    worst = (lambda w: f"{pct(w.get('accuracy'))} ({w.get('name')})" if w else "n/a")
    rows.append(["worst class"] + ([worst(wb), worst(wm), delta(wm.get("accuracy"), wb.get("accuracy"))]
                                   if b is not None else [worst(wm)]))
    headers = ["metric", blabel, mlabel, "Δ (points)"] if b is not None else ["metric", mlabel]
    sec.blocks.append(Table(headers, rows, [False] + [True] * (len(headers) - 1)))
    return sec


def _section_per_class(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Per-class accuracy against training images (``eval/per_class.csv``, the baseline's when present)."""
    sec = Section("per_class", "Per-class accuracy against training images")
    path = inp.root / "eval" / "per_class.csv"
    if not path.is_file():
        return sec.missing("RUN/eval/per_class.csv", "neighborlt eval RUN")
    rows = read_per_class_csv(path)
    bpath = inp.baseline / "eval" / "per_class.csv"
    base = {r["index"]: r for r in read_per_class_csv(bpath)} if bpath.is_file() else {}
    th = ((inp.metrics or {}).get("thresholds") or (inp.classes or {}).get("thresholds")
          or {"many": MANY_SHOT, "few": FEW_SHOT})

    sec.blocks.append(Figure(per_class_png(rows, base, th, cfg.dpi),
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
    table = Table(headers, [], [False, False, True, True] + [True] * (3 if base else 1), caption=note)
    for r in shown:
        br = base.get(r["index"])
        cells = [r["name"], r["shot"], str(r["train_count"]), str(r["n_test"])]
        if base:
            ba = br["accuracy"] if br else None
            cells += [pct(ba), pct(r["accuracy"]), delta(r["accuracy"], ba)]
        else:
            cells.append(pct(r["accuracy"]))
        table.rows.append(cells)
    sec.blocks.append(table)
    return sec


def _section_where(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Where the joint model puts the target test images (``eval/where.json``): correct, another target,
    a paired or an unpaired auxiliary class."""
    sec = Section("where", "Where the target test images go")
    doc = inp.where
    if doc is None:
        sec.available = False
        if inp.model is not None and not inp.num_aux():
            sec.blocks.append(Para("The trained model has no auxiliary classes (trained with --use-aux none), so "
                                   "every test image goes to a target class.", "note"))
        else:
            sec.blocks.append(Missing("RUN/eval/where.json",
                                      "neighborlt eval RUN (after training with auxiliary classes)"))
        return sec
    if not doc.get("available", True):
        sec.available = False
        sec.blocks.append(Para(f"Not measured: {doc.get('reason', 'unknown reason')}", "warn"))
        return sec
    known = bool(doc.get("pairs_known"))
    kinds = ["correct", "other_target", "paired_aux", "unpaired_aux"] if known else ["correct", "other_target", "aux"]
    groups: list[tuple[str, dict[str, Any]]] = [(f"all ({doc.get('n_test')})", doc["share"])]
    for s in SPLITS:
        sh = (doc.get("per_split") or {}).get(s)
        if sh and sh.get("correct") is not None:
            groups.append((s, sh))
    share = doc["share"]
    sec.blocks.append(Para(
        f"Top-1 of the joint model over all {doc.get('num_outputs')} outputs ({doc.get('num_target')} targets + "
        f"{int(doc.get('num_outputs', 0)) - int(doc.get('num_target', 0))} auxiliary classes) on "
        f"{doc.get('n_test')} target test images: {pct(share.get('aux'))}% go to an auxiliary class"
        + (f", {pct(share.get('paired_aux'))}% to a neighbour paired with the image's own class "
           f"({doc.get('num_pairs')} pairs; {doc.get('pairs_source', '')})." if known
           else "; the neighbour pairs are unknown, so paired and unpaired are not told apart.")
        + " The direct classifier drops the auxiliary rows, so these images are then ranked among the targets only."))
    sec.blocks.append(Figure(where_png(groups, kinds, cfg.dpi),
                             "Where the joint model's top-1 falls, for all target test images and per split.",
                             "where", "stacked bar chart of where test images go"))
    headers = ["images", "n"] + [WHERE_LABELS[k] for k in kinds]
    table = Table(headers, [], [False, True] + [True] * len(kinds),
                  caption="The joint model (all outputs, before export), not the direct classifier of the headline "
                  "accuracy: the share (%) of each group's target test images whose top-1 is correct, another "
                  "target, or an auxiliary class.")
    counts = {s: sum(r["n_test"] for r in doc.get("per_class", []) if r.get("shot") == s) for s in SPLITS}
    for g, sh in groups:
        n = str(doc.get("n_test")) if g.startswith("all") else str(counts.get(g, ""))
        table.rows.append([g.split(" (")[0], n] + [pct(sh.get(k)) for k in kinds])
    sec.blocks.append(table)
    if known:
        sec.blocks.append(Para(f"Mean softmax probability on the true class's paired auxiliary classes: "
                               f"{pct(doc.get('paired_mass'), 3) if doc.get('paired_mass') is not None else 'n/a'};"
                               f" mean logit margin of the true class over its strongest paired neighbour: "
                               f"{pct(doc.get('margin'), 2)}.", "note"))
    per_class = [r for r in doc.get("per_class", []) if r.get("n_test")]
    if per_class and len(per_class) <= cfg.max_class_rows:
        pk = [k for k in kinds if k != "aux"]
        t2 = Table(["class", "split", "test images"] + [WHERE_LABELS[k] for k in pk], [],
                   [False, False, True] + [True] * len(pk), caption="Per class (%).")
        for r in per_class:
            t2.rows.append([str(r.get("name") or r.get("index")), str(r.get("shot") or ""), str(r["n_test"])]
                           + [pct(r.get(k)) for k in pk])
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


def _section_funnel(inp: RunInputs, cfg: ReportConfig) -> Section:
    """The acquisition funnel (``filter/funnel.json``), then the contact sheets (``filter/sheets/*.png``)."""
    sec = Section("funnel", "Acquisition funnel and contact sheets")
    doc = inp.funnel
    sheets = _sheet_files(inp.root)
    if doc is None and not sheets:
        return sec.missing("RUN/filter/funnel.json and RUN/filter/sheets/",
                                  "neighborlt retrieve RUN, then neighborlt filter RUN")
    if doc is None:
        sec.blocks.append(Missing("RUN/filter/funnel.json", "neighborlt filter RUN"))
    else:
        sec.blocks += _funnel_blocks(doc, cfg)
    if not sheets:
        sec.blocks.append(Missing("RUN/filter/sheets/*.png (contact sheets)", "neighborlt filter RUN"))
    else:
        sec.blocks += _sheet_blocks(sheets, doc, cfg)
    return sec


def _funnel_blocks(doc: dict[str, Any], cfg: ReportConfig) -> list[Block]:
    """The images left after each stage: a bar chart and a table of all classes together, a table per class, and
    the filter's rules."""
    blocks: list[Block] = []
    stages = [str(s) for s in doc.get("stages") or list((doc.get("total") or {}).keys())]
    total = doc.get("total") or {}
    first = total.get(stages[0]) if stages else None
    blocks.append(Para(
        f"Auxiliary images left after each stage of retrieval and filtering ({' → '.join(stages)}), over "
        f"{len(doc.get('per_class') or [])} auxiliary classes."))

    if stages:
        blocks.append(Figure(funnel_png(stages, total, cfg.dpi),
                             "Images left after each stage, all auxiliary classes together.", "funnel",
                             "horizontal bar chart of the acquisition funnel"))
    table = Table(["stage", "images", "% of first stage", "dropped here"], [], [False, True, True, True])
    prev = None
    for s in stages:
        v = total.get(s)
        share = f"{100.0 * float(v) / float(first):.1f}%" if v is not None and first else "n/a"
        dropped = str(int(prev) - int(v)) if prev is not None and v is not None else ""
        table.rows.append([s, "n/a" if v is None else str(v), share, dropped])
        prev = v if v is not None else prev
    blocks.append(table)
    pcs = doc.get("per_class") or []
    if pcs:
        shown = pcs[: cfg.max_class_rows]
        t2 = Table(["auxiliary class", "neighbour of"] + stages, [], [False, False] + [True] * len(stages),
                   caption="" if len(shown) == len(pcs) else
                   f"The first {len(shown)} of {len(pcs)} classes; all are in RUN/filter/funnel.json.")
        for r in shown:
            parents = r.get("parents") or []
            t2.rows.append([str(r.get("name")), ", ".join(str(p) for p in parents)]
                           + ["" if r.get(s) is None else str(r.get(s)) for s in stages])
        blocks.append(t2)
    rules = doc.get("rules")
    if isinstance(rules, dict) and rules:
        blocks.append(Details(f"Filter rules ({len(rules)} settings, RUN/filter/funnel.json)",
                              json.dumps(rules, indent=2, ensure_ascii=False)))
    return blocks


def _sheet_blocks(sheets: list[tuple[str, str, Path]], doc: dict[str, Any] | None, cfg: ReportConfig) -> list[Block]:
    """The contact sheets, one gallery per class in the funnel's class order (kept, then rejected), at most
    ``cfg.max_sheets`` of them."""
    from ..filter import sheet_stem  # the filter names the sheets; one function, so the two never drift apart

    # sheet files are named by class slug: map each back to its funnel class (name, order) where one matches
    per_class_order = [str(r.get("name")) for r in (doc or {}).get("per_class") or []]
    by_name = {n: (i, n) for i, n in enumerate(per_class_order)}
    by_slug = {sheet_stem(n): (i, n) for i, n in reversed(list(enumerate(per_class_order)))}
    kind_rank = {"kept": 0, "rejected": 1, "other": 2}
    ordered = [(by_name.get(c) or by_slug.get(c) or (len(by_name), c), c, k, p) for c, k, p in sheets]
    ordered.sort(key=lambda t: (t[0][0], t[1], kind_rank[t[2]]))
    blocks: list[Block] = [Heading("Contact sheets"),
                           Para("Kept and rejected auxiliary images per class, as the filter stage drew them.", "note")]
    funnel_rows = {str(r.get("name")): r for r in ((doc or {}).get("per_class") or [])}
    embedded = 0
    gallery: Gallery | None = None
    for (_, cls), _stem, kind, path in ordered:
        if embedded >= cfg.max_sheets:
            blocks.append(Para(f"{len(ordered) - embedded} more contact sheets are in RUN/filter/sheets/ "
                               f"(--max-sheets {cfg.max_sheets}).", "note"))
            break
        try:
            png = png_of_file(path)
        except (OSError, ValueError) as e:
            blocks.append(Para(f"{path.name}: not a readable image ({type(e).__name__}); skipped.", "warn"))
            continue
        if gallery is None or gallery.key != cls:
            row = funnel_rows.get(cls)
            kept = row.get("kept") if row else None
            first = row.get(doc["stages"][0]) if row and doc and doc.get("stages") else None
            title = cls + (f" ({kept} kept of {first})" if kept is not None and first is not None else "")
            gallery = Gallery(title, [], key=cls)
            blocks.append(gallery)
        what = {"kept": "kept", "rejected": "rejected", "other": "contact sheet"}[kind]
        gallery.figures.append(Figure(png, what if kind != "other" else path.name, f"sheet_{safe_stem(path.stem)}",
                                      f"{what} images of {cls}"))
        embedded += 1
    return blocks


def _section_coverage(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Per target: the proposed auxiliary names, the matched ones with their images and the unmatched ones
    (``filter/coverage.json``, else ``retrieve/coverage.json``)."""
    sec = Section("coverage", "Coverage: auxiliary classes per target")
    after_filter = inp.json("filter/coverage.json")
    after_retrieve = inp.json("retrieve/coverage.json")
    doc = after_filter or after_retrieve
    if doc is None:
        return sec.missing("RUN/retrieve/coverage.json", "neighborlt retrieve RUN (then neighborlt filter RUN)")
    for d in (after_retrieve, after_filter):
        if d and d.get("warning"):
            sec.blocks.append(Para(str(d["warning"]), "warn"))
    retrieved = {str(r.get("name")): r.get("matched") or {} for r in (after_retrieve or {}).get("targets", [])}
    sec.blocks.append(Para(
        "For each target: the auxiliary names the neighbour search proposed, the auxiliary classes that got images "
        + ("(images after retrieve → kept by the filter)" if after_filter else "(images after retrieve)")
        + ", and the proposed names no image matched. A target without a kept auxiliary class has no silenced pair."))
    rows = doc.get("targets") or []
    table = Table(["target", "proposed", "matched (images)", "unmatched"], [],
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


def _section_viz(inp: RunInputs, cfg: ReportConfig) -> Section:
    """The figures ``neighborlt viz RUN`` drew (``RUN/viz/*.png``), each with its caption of what to look for."""
    from ..viz import viz_figures

    sec = Section("viz", "Why: feature views")
    figures = viz_figures(inp.root)
    if not figures:  # optional (UMAP takes minutes on a CPU): a pointer, not a missing input
        sec.blocks.append(Para("No figures yet: neighborlt viz RUN draws a UMAP of the most-confused head/tail "
                               "pairs, PCA-RGB maps of ViT patch tokens and the samples per class, then neighborlt "
                               "report RUN shows them here."))
        return sec
    for path, caption in figures:
        try:
            png = png_of_file(path)
        except (OSError, ValueError) as e:
            sec.blocks.append(Para(f"{path.name}: not a readable image ({type(e).__name__}); skipped.", "warn"))
            continue
        sec.blocks.append(Figure(png, caption, f"viz_{safe_stem(path.stem)}", path.stem.replace("_", " ")))
    return sec


def _section_curves(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Per-epoch loss, learning rate and test accuracy (``train/log.jsonl``, the baseline's dashed)."""
    sec = Section("curves", "Training curves")
    path = inp.root / "train" / "log.jsonl"
    if not path.is_file():
        return sec.missing("RUN/train/log.jsonl", "neighborlt train RUN")
    rows, bad = read_epochs(path)
    if not rows:
        sec.available = False
        sec.blocks.append(Para(f"{path.name} has no epoch rows yet (training has not finished an epoch).", "warn"))
        return sec
    bpath = inp.baseline / "train" / "log.jsonl"
    brows = read_epochs(bpath)[0] if bpath.is_file() else []
    tested = [r for r in rows if isinstance(r.get("test"), dict)]
    has_test = len(tested) > 1  # one evaluation (eval_every: 0, the last epoch) is a sentence, not a curve
    last = rows[-1]
    time_s = sum(epoch_value(r, "time_s") for r in rows if isinstance(r.get("time_s"), (int, float)))
    sec.blocks.append(Para(
        f"{len(rows)} epochs logged (of {last.get('epochs', len(rows))}), {time_s:.{1 if time_s < 10 else 0}f} s of "
        f"training; final loss "
        f"{epoch_value(last, 'loss'):.4f}." + (f" {bad} unreadable line(s) in log.jsonl were skipped." if bad else "")
        + (f" Test top-1 was measured once, after epoch {tested[0]['epoch']} (eval_every: 0): "
           + ", ".join(f"{k} {pct(tested[0]['test'].get(k))}%" for k in ("overall", *SPLITS)
                       if tested[0]["test"].get(k) is not None) + "." if len(tested) == 1 else "")))
    sec.blocks.append(Figure(curves_png(rows, brows, has_test, cfg.dpi),
                             "Per-epoch training loss" + (" (baseline dashed)" if brows else "")
                             + ", learning rate" + (" and test accuracy when evaluated." if has_test else "."),
                             "curves", "training curves"))
    if has_test:
        t = Table(["epoch", "loss", "lr", "overall", "many", "medium", "few"], [], [True] * 7,
                  caption="Epochs with a test evaluation.")
        for r in rows:
            if isinstance(r.get("test"), dict):
                t.rows.append([str(r["epoch"]), f"{epoch_value(r, 'loss'):.4f}", f"{epoch_value(r, 'lr'):.4g}"]
                              + [pct(r["test"].get(k)) for k in ("overall", *SPLITS)])
        if len(t.rows) > 30:
            t.rows = t.rows[-30:]
            t.caption = "The last 30 epochs with a test evaluation."
        sec.blocks.append(t)
    return sec


def _stage_names(records: Path) -> list[str]:
    names = {p.name[: -len(".config.json")] for p in records.glob("*.config.json")}
    return sorted(names, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))


def _section_provenance(inp: RunInputs, cfg: ReportConfig) -> Section:
    """Per stage: when it finished, its seed and versions (``records/*.env.json`` / ``*.done.json``), and
    each resolved config."""
    sec = Section("provenance", "Config and provenance")
    records = inp.root / "records"
    stages = _stage_names(records) if records.is_dir() else []
    if not stages:
        return sec.missing("RUN/records/*.config.json", "any stage, e.g. neighborlt classes RUN")
    table = Table(["stage", "finished", "seed", "git commit", "neighborlt", "torch", "python"], [])
    newest_env: dict[str, Any] | None = None
    for s in stages:
        env = maybe_json(records / f"{s}.env.json") or {}
        done = maybe_json(records / f"{s}.done.json") or {}
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
    sec.blocks.append(Para("Every stage writes its resolved config and environment to RUN/records/; a stage with "
                           "the same config is skipped on a re-run."))
    sec.blocks.append(table)
    if newest_env:
        pk = newest_env.get("packages") or {}
        extra = [["platform", str(newest_env.get("platform", ""))], ["devices", ", ".join(
            str(d) for d in newest_env.get("devices") or [])], ["cuda", str(newest_env.get("cuda"))]]
        sec.blocks.append(Table(["package", "version"], [[str(k), str(v)] for k, v in pk.items()] + extra,
                                caption="Environment of the last stage before the report."))
    for s in stages:
        text = json.dumps(maybe_json(records / f"{s}.config.json"), indent=2, ensure_ascii=False)
        sec.blocks.append(Details(f"{s} config (records/{s}.config.json)", text))
    btrain = inp.baseline / "records" / "train.config.json"
    if btrain.is_file():
        sec.blocks.append(Details("baseline train config (baseline/records/train.config.json)",
                                  json.dumps(read_json(btrain), indent=2, ensure_ascii=False)))
    return sec


SECTIONS: tuple[tuple[str, Callable[[RunInputs, ReportConfig], Section]], ...] = (
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


def _build(key: str, fn: Callable[[RunInputs, ReportConfig], Section], inp: RunInputs, cfg: ReportConfig) -> Section:
    """One section; a malformed input file becomes a warning in that section, never a crash."""
    try:
        return fn(inp, cfg)
    except READ_ERRORS as e:
        logger.warning("report: section %s: %s", key, e)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Section(key, _TITLES[key], False,
                       [Para(f"Could not read this section's input ({type(e).__name__}: {msg}); re-run the stage "
                             "that writes it.", "warn")])


def _summary(inp: RunInputs, sections: list[Section]) -> Section:
    """The top of the page: headline cards (method against baseline, where the test images go), the coverage
    warnings, the run's facts and which sections are not available yet."""
    sec = Section("summary", "Summary")
    m = try_read(lambda: inp.metrics)
    w = try_read(lambda: inp.where)
    w = w if isinstance(w, dict) and w.get("available", True) and w.get("share") else None
    cards = _headline_cards(m, try_read(lambda: inp.baseline_metrics), w)
    if cards:
        sec.blocks.append(Cards(cards))
    if w is not None:
        sec.blocks.append(Para(
            "The top-1 cards are the direct classifier (the exported model: target classes only). "
            + ("'To paired aux' is the share of target test images that the joint model (targets + auxiliary "
               "outputs, before export) puts on an auxiliary class paired with the image's own class: the confusion "
               "the silencing loss allows; the direct classifier ranks those images among the targets."
               if w.get("pairs_known") else "'To auxiliary' is the share of target test images that the joint model "
               "(targets + auxiliary outputs, before export) puts on an auxiliary class.")
            + " See 'Where the target test images go'.", "note"))
    for warning in try_read(lambda: coverage_warnings(inp.root)) or []:
        sec.blocks.append(Para(warning, "warn"))
    facts = _run_facts(inp)
    if facts:
        sec.blocks.append(Para("; ".join(facts) + "."))
    if m is None:
        sec.blocks.append(Para("No evaluation yet: run `neighborlt eval RUN` for the headline numbers.", "note"))
    missing = [s.title for s in sections if not s.available]
    if missing:
        sec.blocks.append(Para("Not available yet: " + "; ".join(missing) + " (each section says which command "
                               "makes it).", "note"))
    return sec


def _headline_cards(m: dict[str, Any] | None, b: dict[str, Any] | None,
                    w: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """``(label, value, sub-line)`` of the top-1 accuracies (against the baseline's) and of the share of test images
    the joint model puts on an auxiliary class."""
    cards: list[tuple[str, str, str]] = []
    if m is not None:
        for k in ("overall", "many", "medium", "few"):
            v = m.get(k)
            if v is None and k != "overall":
                continue
            sub = "method"
            if b is not None:
                sub = f"baseline {pct(b.get(k))}, Δ {delta(v, b.get(k))}"
            cards.append((f"{k} top-1", f"{pct(v)}%" if v is not None else "n/a", sub))
    if w is not None:
        if w.get("pairs_known"):
            cards.append(("to paired aux", f"{pct(w['share'].get('paired_aux'))}%",
                          f"{pct(w['share'].get('aux'))}% to any auxiliary class"))
        else:
            cards.append(("to auxiliary", f"{pct(w['share'].get('aux'))}%", "joint model, top-1"))
    return cards


def _run_facts(inp: RunInputs) -> list[str]:
    """The run in a sentence: its classes and splits, the joint model's auxiliary classes and what trained."""
    facts = []
    c = try_read(lambda: inp.classes)
    if isinstance(c, dict):
        th = c.get("thresholds") or {}
        shots = [str(r.get("shot")) for r in c.get("classes", [])]
        facts.append(f"{len(shots)} target classes of {c.get('dataset', 'the dataset')} ("
                     + ", ".join(f"{shots.count(s)} {s}" for s in SPLITS)
                     + f"; many > {th.get('many')}, few < {th.get('few')} training images)")
    n_aux = try_read(inp.num_aux)
    if n_aux is not None:
        facts.append(f"{n_aux} auxiliary classes in the joint model")
    t = try_read(lambda: inp.train_cfg)
    trained = try_read(lambda: inp.model)
    if isinstance(t, dict):
        from ..pipeline import trained_loss_label

        loss = trained_loss_label(trained) if isinstance(trained, dict) else "(not trained yet)"
        facts.append(f"{t.get('model')} at {t.get('image_size')} px, {t.get('epochs')} epochs, loss {loss}"
                     f", seed {t.get('seed')}")
    return facts


def build_sections(inp: RunInputs, cfg: ReportConfig) -> list[Section]:
    """Every section of the run report, the summary first; a malformed input file is a warning in its section (and
    the summary says only what it could read)."""
    sections = [_build(key, fn, inp, cfg) for key, fn in SECTIONS]
    try:
        summary = _summary(inp, sections)
    except READ_ERRORS as e:  # the sections already say what is wrong
        logger.warning("report: summary: %s", e)
        summary = Section("summary", "Summary", True, [Para("Some inputs could not be read; see below.", "warn")])
    return [summary, *sections]
