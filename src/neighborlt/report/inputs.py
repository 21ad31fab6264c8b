"""The run's files as the report reads them: :class:`RunInputs` (each file read at most once) and the readers of
the CSV / JSONL files the stages write."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NeighborLTError
from ..rundir import RunDir, read_json

#: The shot splits of the target classes, in the order the report shows them.
SPLITS = ("many", "medium", "few")
#: Errors a malformed input file can raise while a section is built: the section says so, the report goes on.
READ_ERRORS = (NeighborLTError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def try_read(get: Callable[[], Any]) -> Any:
    """``get()``, or None when its file is malformed (its section already says so)."""
    try:
        return get()
    except READ_ERRORS:
        return None


def maybe_json(path: Path) -> Any | None:
    """``read_json(path)`` or None when the file is absent."""
    return read_json(path) if path.is_file() else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
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


def read_per_class_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of ``per_class.csv`` with numbers parsed (accuracy None when empty)."""
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            acc = (r.get("accuracy") or "").strip()
            out.append({"index": int(r["index"]), "name": str(r["name"]), "train_count": int(r["train_count"]),
                        "shot": str(r.get("shot") or ""), "n_test": int(r.get("n_test") or 0),
                        "accuracy": float(acc) if acc else None})
    return out


def read_epochs(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The epoch rows of a training ``log.jsonl``, one per epoch in order, and the number of unreadable lines."""
    rows, bad = read_jsonl(path)
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in rows:
        if isinstance(r.get("epoch"), (int, float)):
            by_epoch[int(r["epoch"])] = r  # a resumed run may repeat an epoch: keep the last row
    return [by_epoch[e] for e in sorted(by_epoch)], bad


def epoch_value(row: dict[str, Any], key: str) -> float:
    """A number of an epoch row of ``log.jsonl`` (NaN when absent or not a number)."""
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else float("nan")


class RunInputs:
    """Lazy access to the run's files (each read at most once) and to the baseline run's."""

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
        """``RUN/<rel>`` (or ``<base>/<rel>``) parsed, None when absent."""
        root = self.root if base is None else base
        return self.get(f"{root}:{rel}", lambda: maybe_json(root / rel))

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
        """The joint model's auxiliary classes (None before training)."""
        m = self.model
        if not isinstance(m, dict):
            return None
        return int(m["num_classes"]) - int(m["num_target_classes"])
