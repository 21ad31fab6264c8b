"""The image manifests' shared vocabulary: the retrieve manifest (one row per candidate image,
``RUN/retrieve/manifest.parquet``), its Parquet IO, and where a row's image lives (:func:`image_ref`: a ``file``, a
``shard`` member, or a ``pool`` row), which the filter's and the targets manifest (:mod:`neighborlt.data.targets`)
share.

Columns (see docs/architecture.md): ``uid``, ``name`` (auxiliary class), ``parents`` (target names that proposed
it), ``query``, ``url`` (or ``pool://<class id>/<index>`` / ``file://`` for referenced local images), ``location``
(``pool`` | ``file`` | ``shard``), ``path`` (the local file, or the tar shard of a download), ``pool_index``,
``offset`` / ``size`` (the image bytes inside the shard), ``caption``, ``source``, ``similarity`` (the kNN service's,
else NaN), ``status`` (``ok`` or a short failure code), ``error`` (a human reason), ``sha256``, ``width``,
``height``, ``matched`` (local pools: the form of the name that the caption or pool class matched, the name itself or
one of its synonyms; empty for other sources).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..rundir import atomic_output
from .base import ShardMember

SCHEMA = pa.schema([
    ("uid", pa.string()), ("name", pa.string()), ("parents", pa.list_(pa.string())), ("query", pa.string()),
    ("url", pa.string()), ("location", pa.string()), ("path", pa.string()), ("pool_index", pa.int64()),
    ("offset", pa.int64()), ("size", pa.int64()), ("caption", pa.string()), ("source", pa.string()),
    ("similarity", pa.float64()), ("status", pa.string()), ("error", pa.string()), ("sha256", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()),
    ("matched", pa.string()),  # the form of the name the caption / pool class matched (a synonym, or the name)
])
DEFAULTS: dict[str, Any] = {"parents": [], "query": "", "path": "", "pool_index": -1, "offset": -1, "size": -1,
                            "caption": "", "similarity": float("nan"), "status": "pending", "error": "", "sha256": "",
                            "width": 0, "height": 0, "location": "url", "matched": ""}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows (dicts; missing columns take :data:`DEFAULTS`) as a table of ``schema`` (extra keys are kept as
    additional columns only when the schema names them)."""
    cols = {}
    for f in schema:
        default = DEFAULTS.get(f.name, "")
        values = [r.get(f.name) for r in rows]
        if None in values:  # (one C-level scan; the per-cell default only where a value is missing)
            values = [default if v is None else v for v in values]
        cols[f.name] = pa.array(values, type=f.type)
    return pa.table(cols, schema=schema)


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a Parquet file atomically (temp file in the same folder, then ``os.replace``)."""
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(path: str | os.PathLike[str], required: tuple[str, ...] = ("uid", "name", "status"),
               what: str = "manifest") -> pa.Table:
    """Read a manifest-like Parquet file; one clear line when it is missing, unreadable or lacks columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
        raise DataError(f"{path}: not a readable Parquet {what} ({e})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: {what} lacks the columns {', '.join(missing)}; re-run the stage that wrote it")
    return table


def image_ref(row: dict[str, Any], root: Path, shards: dict[str, Path] | None = None) -> Path | ShardMember | None:
    """Where a manifest row's image lives: a file path, a :class:`ShardMember`, or None (pool images are looked up
    in the protocol's pool by ``pool_index``). ``shards``: a cache of shard paths that the caller keeps across rows,
    so the members of one shard share one ``Path`` (millions of members, thousands of shards)."""
    return _ref(row.get("location"), row.get("path"), row.get("offset"), row.get("size"), root, shards)


def _ref(loc: Any, path: Any, offset: Any, size: Any, root: Path,
         shards: dict[str, Path] | None = None) -> Path | ShardMember | None:
    if loc == "shard":
        shard = shards.get(path) if shards is not None else None
        if shard is None:
            p = Path(path)
            shard = p if p.is_absolute() else root / p
            if shards is not None:
                shards[path] = shard
        return ShardMember(shard, int(offset), int(size))
    if loc == "file":
        return Path(path)
    return None


def image_refs(table: pa.Table, root: Path, source: str | os.PathLike[str] = "manifest") -> list[Path | ShardMember]:
    """:func:`image_ref` of every row of a table whose rows are all ``file`` or ``shard`` rows, read column by column
    (no dict per row).

    Raises:
        DataError: a row without a file or shard location (``source`` names the file in the message).
    """
    cols = [table[c].to_pylist() for c in ("location", "path", "offset", "size")]
    out: list[Path | ShardMember] = []
    shards: dict[str, Path] = {}
    for i, (loc, path, offset, size) in enumerate(zip(*cols)):
        ref = _ref(loc, path, offset, size, root, shards) if path else None
        if ref is None:
            raise DataError(f"{source}: row {i} has no image location (location {loc!r}, path {path!r}); re-run the "
                            "stage that wrote it")
        out.append(ref)
    return out


__all__ = ["DEFAULTS", "SCHEMA", "image_ref", "image_refs", "read_table", "to_table", "write_table"]
