"""The filter's one candidates table: the retrieve manifest's rows in manifest order, with the columns the rules read
and the ones they write.

Every rule (:mod:`neighborlt.filter.rules`) narrows the same :class:`Candidates`: it sets ``decision`` (the first
rule that rejects a row names it; a row never comes back) and annotates ``parent``, ``similarity`` and
``leak_similarity``. The stage writes the table twice at the end: every row with its decision
(``decisions.parquet``) and the rows still in, numbered by class (``aux_manifest.parquet``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..data import manifest as mf

#: columns the filter appends to the retrieve manifest's (:data:`neighborlt.data.manifest.SCHEMA`)
ANNOTATIONS = (("parent", pa.string()), ("band_similarity", pa.float32()), ("leak_similarity", pa.float32()))


def conform(table: pa.Table, schema: pa.Schema = mf.SCHEMA) -> pa.Table:
    """``table`` with exactly the columns of ``schema``, in its order and types, one chunk each; a missing column or
    cell takes :data:`~neighborlt.data.manifest.DEFAULTS` (as :func:`~neighborlt.data.manifest.to_table` fills
    rows), extra columns are dropped."""
    cols = {}
    for f in schema:
        default = mf.DEFAULTS.get(f.name, "")
        if f.name not in table.column_names:
            cols[f.name] = pa.array([default] * table.num_rows, type=f.type)
            continue
        col = table.column(f.name)
        if col.null_count:
            col = pa.array([default if v is None else v for v in col.to_pylist()], type=f.type)
        cols[f.name] = col.cast(f.type).combine_chunks()
    return pa.table(cols, schema=schema)


@dataclass
class Candidates:
    """One row per retrieved image, in manifest order; the rules narrow it and annotate it."""

    table: pa.Table  # the retrieve manifest, conformed to data.manifest.SCHEMA
    name: list[str]  # the auxiliary class of each row
    parents: list[list[str]]  # the targets that proposed the class
    status: list[str]  # the retrieve status ("ok" = the image is there)
    caption: list[str]
    sha256: list[str]
    decision: list[str]  # "" while the row is in, else the rule (a FUNNEL stage) that rejected it
    parent: list[str]  # band: the parent target whose prototype is nearest ("" until computed)
    similarity: np.ndarray  # band: cosine to that prototype (NaN until computed, or without a known parent)
    leak_similarity: np.ndarray  # leak: the largest cosine to a target test image (NaN until computed)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Candidates:
        """The retrieve manifest at ``path`` (one clear line when it is unreadable), every row still in."""
        table = conform(mf.read_table(path))
        n = table.num_rows
        return cls(table=table, name=table.column("name").to_pylist(), parents=table.column("parents").to_pylist(),
                   status=table.column("status").to_pylist(), caption=table.column("caption").to_pylist(),
                   sha256=table.column("sha256").to_pylist(), decision=[""] * n, parent=[""] * n,
                   similarity=np.full(n, np.nan, dtype=np.float32),
                   leak_similarity=np.full(n, np.nan, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.decision)

    def live(self) -> list[int]:
        """The rows no rule has rejected, in manifest order."""
        return [i for i, d in enumerate(self.decision) if not d]

    def reject(self, i: int, rule: str) -> None:
        """Row ``i`` leaves at ``rule``, unless an earlier rule already rejected it."""
        if not self.decision[i]:
            self.decision[i] = rule

    def by_class(self, idx: list[int]) -> dict[str, list[int]]:
        """``idx`` grouped by class, classes in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i in idx:
            out.setdefault(self.name[i], []).append(i)
        return out

    def rows(self, idx: list[int]) -> list[dict[str, Any]]:
        """The manifest rows of ``idx`` as dicts (where their images live: for image sets)."""
        return self.table.take(pa.array(idx, type=pa.int64())).to_pylist()

    def class_index(self) -> dict[str, int]:
        """Each class with rows still in -> its index among them (order of first appearance): the manifest's
        ``class_index``."""
        out: dict[str, int] = {}
        for i in self.live():
            out.setdefault(self.name[i], len(out))
        return out

    def _annotated(self, table: pa.Table, idx: np.ndarray | None) -> pa.Table:
        cols = {"parent": self.parent, "band_similarity": self.similarity, "leak_similarity": self.leak_similarity}
        for name, typ in ANNOTATIONS:
            col = cols[name]
            values = col if idx is None else col[idx] if isinstance(col, np.ndarray) else [col[i] for i in idx]
            table = table.append_column(pa.field(name, typ), pa.array(values, type=typ))
        return table

    def decisions_table(self) -> pa.Table:
        """Every row with the rule that rejected it (``kept`` for the rows still in) and its annotations."""
        dec = pa.array([d or "kept" for d in self.decision], type=pa.string())
        return self._annotated(self.table.append_column(pa.field("decision", pa.string()), dec), None)

    def kept_table(self) -> pa.Table:
        """The rows still in, with ``class_index`` (:meth:`class_index`) and their annotations: the auxiliary
        manifest."""
        live = np.asarray(self.live(), dtype=np.int64)
        index = self.class_index()
        table = self.table.take(pa.array(live)).combine_chunks()
        table = table.append_column(pa.field("class_index", pa.int64()),
                                    pa.array([index[self.name[i]] for i in live], type=pa.int64()))
        return self._annotated(table, live)


__all__ = ["ANNOTATIONS", "Candidates", "conform"]
