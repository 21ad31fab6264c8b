"""Coverage: which target classes got auxiliary classes, after retrieve and after the filter, and what to try when some
did not.

A target without an auxiliary class after ``retrieve`` has no image for any name proposed for it; a target without one
after ``filter`` has no silenced pair (the neighbor-silencing loss treats it as Balanced Softmax does). Each stage
writes ``RUN/<stage>/coverage.json`` (per target: the proposed names, the matched ones with image counts, the unmatched
ones; the uncovered targets; one warning line) and logs the warning once; ``summary.md`` and the report show it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .neighbors.parse import name_key
from .rundir import atomic_write_json, read_json

logger = logging.getLogger(__name__)

MAX_NAMED = 20  # targets named in a warning line (all of them are in coverage.json)
#: what to try, by the stage after which targets are uncovered
ADVICE = {
    "retrieve": ("try another neighbour backend (neighbors.backend: openai, or embedding), the pool's vocabulary "
                 "(neighbors: {backend: embedding, vocabulary: 'pool:<your pool>', relevance_threshold: 0.4}), or a bigger pool"),
    "filter": ("try a lower band (filter.gamma_low, or band_mode: quantile), another neighbour backend or the pool's "
               "vocabulary (neighbors: {backend: embedding, vocabulary: 'pool:<your pool>', relevance_threshold: 0.4}), or a bigger pool"),
}


def _maybe(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _targets(root: Path) -> list[str]:
    doc = _maybe(root / "classes.json") or {}
    return [str(c["name"]) for c in doc.get("classes", [])]


def _proposed(root: Path) -> tuple[dict[str, list[str]], set[str]]:
    """Target -> the names proposed for it, and the targets that were asked for none (split ratio 0)."""
    doc = _maybe(root / "neighbors.json") or {}
    rows = [t for t in doc.get("targets", []) if isinstance(t, dict)]
    return ({str(t.get("name")): [str(x) for x in t.get("found") or []] for t in rows},
            {str(t.get("name")) for t in rows if t.get("asked") == 0})


def _retrieved(root: Path) -> list[dict[str, Any]]:
    """One entry per auxiliary class of the retrieve manifest: name, parents, the proposed names it stands for
    (``query``), and its images with status ``ok`` (read column-wise, one row per class)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = root / "retrieve" / "manifest.parquet"
    if not path.is_file():
        return []
    t = pq.read_table(path, columns=["name", "parents", "query", "status"])
    names = np.asarray(t["name"].to_numpy(zero_copy_only=False), dtype=object)
    if not len(names):
        return []
    uniq, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    ok = np.asarray(pc.equal(t["status"], "ok").to_numpy(zero_copy_only=False), dtype=bool)
    counts = np.bincount(inverse, weights=ok, minlength=len(uniq)).astype(int)
    order = np.argsort(first)  # manifest order
    parents = t["parents"].take(first[order]).to_pylist()
    queries = t["query"].take(first[order]).to_pylist()
    return [{"name": str(uniq[k]), "parents": list(parents[n] or []), "query": str(queries[n] or ""),
             "images": int(counts[k])} for n, k in enumerate(order)]


def coverage(root: str | Path, stage: str) -> dict[str, Any]:
    """Per-target coverage after ``stage`` (``retrieve`` or ``filter``) from the run directory's files.

    Returns:
        ``{"schema": 1, "stage", "targets": [{"name", "proposed", "matched": {name: images}, "unmatched"}],
        "uncovered": [target names], "warning": str | None}``; ``matched`` counts the ``ok`` images after
        retrieve and the kept images after the filter.
    """
    root = Path(root)
    targets = _targets(root)
    proposed, not_asked = _proposed(root)
    classes = _retrieved(root)
    if stage == "filter":
        funnel = _maybe(root / "filter" / "funnel.json") or {}
        kept = {str(c["name"]): int(c.get("kept", 0)) for c in funnel.get("per_class", [])}
        for c in classes:
            c["images"] = kept.get(c["name"], 0)
    rows = []
    for t in targets:
        mine = [c for c in classes if t in c["parents"]]
        matched = {c["name"]: c["images"] for c in mine if c["images"] > 0}
        reached = {name_key(x) for c in mine if c["images"] > 0
                   for x in [c["name"], *c["query"].split(", ")] if name_key(x)}
        names = proposed.get(t, [])
        rows.append({"name": t, "proposed": names, "matched": matched,
                     "unmatched": [n for n in names if name_key(n) not in reached]})
    uncovered = [r["name"] for r in rows if not r["matched"] and r["name"] not in not_asked]
    warning = None
    if uncovered:
        what = ("no auxiliary class (no image for any name proposed for them)" if stage == "retrieve" else
                "no auxiliary class left after the filter, so no silenced pair")
        shown = ", ".join(uncovered[:MAX_NAMED]) + (f" and {len(uncovered) - MAX_NAMED} more ({stage}/coverage.json)"
                                                      if len(uncovered) > MAX_NAMED else "")
        warning = (f"coverage after {stage}: {len(uncovered)} of {len(rows)} targets have {what}: {shown}; "
                   f"{ADVICE.get(stage, ADVICE['retrieve'])}")
    return {"schema": 1, "stage": stage, "targets": rows, "uncovered": uncovered, "warning": warning}


def write_coverage(root: str | Path, stage: str) -> dict[str, Any]:
    """:func:`coverage`, written to ``RUN/<stage>/coverage.json``; logs its warning (one line) when targets are
    uncovered."""
    doc = coverage(root, stage)
    atomic_write_json(Path(root) / stage / "coverage.json", doc)
    if doc["warning"]:
        logger.warning("%s", doc["warning"])
    return doc


def coverage_warnings(root: str | Path) -> list[str]:
    """The warnings of the finished stages (retrieve, then filter), for ``summary.md`` and the report."""
    out = []
    for stage in ("retrieve", "filter"):
        doc = _maybe(Path(root) / stage / "coverage.json")
        if doc and doc.get("warning"):
            out.append(str(doc["warning"]))
    return out


def coverage_markdown(root: str | Path) -> str:
    """The ``summary.md`` lines of the coverage warnings ("" when every target is covered)."""
    warnings = coverage_warnings(root)
    if not warnings:
        return ""
    return "\n## Coverage\n\n" + "".join(f"**Warning**: {w}\n\n" for w in warnings) + \
        "Per target (proposed, matched, unmatched names): the report's coverage section, or RUN/filter/coverage.json.\n"


__all__ = ["ADVICE", "coverage", "coverage_markdown", "coverage_warnings", "write_coverage"]
