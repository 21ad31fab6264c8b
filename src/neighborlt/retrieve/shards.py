"""WebDataset tar shards in img2dataset's layout, written so a crash never leaves a half shard visible.

Layout of ``SHARD_DIR``::

    00000.tar            <key>.jpg  <key>.txt (caption)  <key>.json (uid, name, url, caption, sha256, width, height)
    00000.parquet        one row per row assigned to the shard, failures included (see SHARD_SCHEMA)
    00000_stats.json     written last: counts, status histogram, timings; marks the shard complete

A shard is written under temp names (``.00000.tar.tmp``, ``.00000.parquet.tmp``) and renamed with
``os.replace`` only when complete: the tar first, the parquet index next, the stats file last. Only shards
with a stats file are read (:func:`load_shard_index`); :func:`clean_shard_dir` removes temp files and shards
without a stats file that a killed run left behind. ``offset``/``size`` in the index are the byte range of
the ``.jpg`` member's data inside the tar, so :func:`read_image_bytes` needs a single seek.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..rundir import atomic_write_json

SHARD_SCHEMA = pa.schema([
    ("uid", pa.string()),  # the row's stable id
    ("key", pa.string()),  # tar member key of the stored bytes (own for ok, the stored copy's for duplicate)
    ("status", pa.string()),  # "ok", "duplicate" or a failure code
    ("error", pa.string()),  # human reason ("" when ok)
    ("sha256", pa.string()),  # sha256 of the stored JPEG bytes
    ("width", pa.int32()),  # stored image size in pixels
    ("height", pa.int32()),
    ("orig_width", pa.int32()),  # downloaded image size in pixels
    ("orig_height", pa.int32()),
    ("shard", pa.string()),  # tar file name holding the bytes ("00000.tar"); for failures the assigned shard
    ("offset", pa.int64()),  # byte offset of the .jpg member data in that tar
    ("size", pa.int64()),  # byte length of the .jpg member data
    ("url", pa.string()),
    ("name", pa.string()),  # class name the row was retrieved for
    ("duplicate_of", pa.string()),  # uid of the stored copy (status "duplicate")
])
_SHARD_RE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")
OK_STATUSES = ("ok", "duplicate")
_NUL = bytes(tarfile.BLOCKSIZE * 2)
_ZERO8 = b"0000000\0"
# a USTAR header after the checksum field: type "0" (regular file), no link name, magic + version, no owner
# names, no device numbers (a regular file's are empty), no prefix, padding to 512 bytes
_TAIL = (b"0" + bytes(100) + tarfile.POSIX_MAGIC).ljust(512 - 148 - 8, b"\0")
_TAIL_SUM = sum(b"        ") + sum(_TAIL)  # the checksum counts its own field as 8 spaces


def shard_stem(shard_id: int) -> str:
    """``7`` -> ``"00007"``."""
    return f"{shard_id:05d}"


def complete_shard_ids(shard_dir: str | os.PathLike[str]) -> list[int]:
    """Ids of the shards whose stats file exists (the complete ones), ascending."""
    d = Path(shard_dir)
    if not d.is_dir():
        return []
    ids = []
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m.group(2) == "_stats.json" and (d / f"{m.group(1)}.parquet").exists():
            ids.append(int(m.group(1)))
    return sorted(ids)


def clean_shard_dir(shard_dir: str | os.PathLike[str]) -> list[str]:
    """Remove temp files and incomplete shards (no stats file) a killed run left; returns the removed names."""
    d = Path(shard_dir)
    if not d.is_dir():
        return []
    complete = set(complete_shard_ids(d))
    removed = []
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        stale_tmp = p.name.startswith(".") and ".tmp" in p.name and p.is_file()
        if stale_tmp or (m and int(m.group(1)) not in complete):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def next_shard_id(shard_dir: str | os.PathLike[str]) -> int:
    """One more than the largest shard id present (complete or not)."""
    d = Path(shard_dir)
    ids = [int(m.group(1)) for p in d.iterdir() if (m := _SHARD_RE.match(p.name))] if d.is_dir() else []
    return max(ids) + 1 if ids else 0


def read_image_bytes(shard_path: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """The stored JPEG bytes at ``offset``/``size`` of a shard tar (one seek, one read).

    Args:
        shard_path: path of the ``.tar`` file.
        offset: ``offset`` column of the index row.
        size: ``size`` column of the index row.

    Returns:
        The bytes of the ``<key>.jpg`` member.
    """
    with open(shard_path, "rb") as f:
        f.seek(int(offset))
        data = f.read(int(size))
    if len(data) != int(size):
        raise OSError(f"{shard_path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def load_shard_index(shard_dir: str | os.PathLike[str]) -> pa.Table:
    """The concatenated index of every complete shard (those with a stats file), in shard order.

    A uid retried in a later run appears once per attempt; :func:`latest_per_uid` keeps the newest.

    Args:
        shard_dir: the shard directory.

    Returns:
        A table with :data:`SHARD_SCHEMA` (empty when there is no complete shard).
    """
    tables = [pq.read_table(Path(shard_dir) / f"{shard_stem(i)}.parquet", schema=SHARD_SCHEMA)
              for i in complete_shard_ids(shard_dir)]
    if not tables:
        return SHARD_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def latest_per_uid(table: pa.Table) -> pa.Table:
    """Keep the last row of every uid (later shards are newer), sorted by uid."""
    last: dict[str, int] = {}
    for i, uid in enumerate(table.column("uid").to_pylist()):
        last[uid] = i
    order = sorted(last)
    return table.take(pa.array([last[u] for u in order], type=pa.int64()))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def ustar_header(name: str, size: int, mtime: int, mode: int = 0o444) -> bytes:
    """The 512-byte USTAR header of a regular file, byte for byte what :meth:`tarfile.TarInfo.tobuf` builds for
    ``TarInfo(name)`` with this size, mtime and mode (uid/gid 0, no owner names), at a fraction of its cost.

    Args:
        name: member name, ASCII, at most 100 characters (shard keys are).
        size: data length in bytes (< 8 GiB).
        mtime: modification time, seconds.
        mode: permission bits.

    Returns:
        The header block.
    """
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8 ** 11 or not 0 <= mtime < 8 ** 11:
        info = tarfile.TarInfo(name)  # the general case (long names, huge members): tarfile's own encoder
        info.size, info.mtime, info.mode = size, mtime, mode
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = b"".join((raw.ljust(100, b"\0"), b"%07o\0" % (mode & 0o7777), _ZERO8, _ZERO8, b"%011o\0" % size,
                     b"%011o\0" % mtime))
    chksum = sum(head) + _TAIL_SUM
    return head + b"%06o\0 " % chksum + _TAIL


class ShardWriter:
    """Write one shard: call :meth:`add` per row, then :meth:`commit` (or :meth:`abort`).

    Args:
        shard_dir: the shard directory (created).
        shard_id: this shard's number (file stem ``%05d``).
        key_digits: digits of the in-shard row number in keys (key = stem + row number).
    """

    def __init__(self, shard_dir: str | os.PathLike[str], shard_id: int, key_digits: int = 4) -> None:
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_id = shard_id
        self.stem = shard_stem(shard_id)
        self.tar_name = f"{self.stem}.tar"
        self.key_digits = key_digits
        self._tmp_tar = self.dir / f".{self.stem}.tar.tmp"
        self._tmp_parquet = self.dir / f".{self.stem}.parquet.tmp"
        self._file = open(self._tmp_tar, "wb", buffering=1 << 20)  # noqa: SIM115 - closed by commit()/abort()
        self._offset = 0  # bytes written to the tar so far
        self.rows: list[dict[str, Any]] = []
        self.start_time = time.time()
        self.mtime = int(self.start_time)

    def __len__(self) -> int:
        return len(self.rows)

    def _add_member(self, name: str, data: bytes) -> int:
        """Append a USTAR member (the bytes ``tarfile`` writes); returns its data offset."""
        header = ustar_header(name, len(data), self.mtime)
        pad = -len(data) % tarfile.BLOCKSIZE
        self._file.write(header)
        self._file.write(data)
        if pad:
            self._file.write(_NUL[:pad])
        start = self._offset + len(header)
        self._offset = start + len(data) + pad
        return start

    def _close_tar(self) -> None:
        """The end-of-archive blocks and the padding to a whole record, as :meth:`tarfile.TarFile.close` writes."""
        self._file.write(_NUL[:2 * tarfile.BLOCKSIZE])
        self._offset += 2 * tarfile.BLOCKSIZE
        rest = -self._offset % tarfile.RECORDSIZE
        self._file.write(bytes(rest))
        self._offset += rest

    def add(self, *, uid: str, status: str, error: str = "", url: str = "", name: str = "", caption: str = "",
            jpeg: bytes | None = None, sha256: str | None = None, width: int | None = None, height: int | None = None,
            orig_width: int | None = None, orig_height: int | None = None,
            stored: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add one row; ``jpeg`` (status ok) is written to the tar with its caption and metadata.

        Args:
            uid: the row's stable id.
            status: ``"ok"``, ``"duplicate"`` or a failure code.
            error: human-readable reason.
            url: the URL fetched.
            name: the class name.
            caption: the caption (``<key>.txt``).
            jpeg: the stored bytes (status ok only).
            sha256: sha256 of ``jpeg`` (or of the stored copy for a duplicate).
            width: stored width.
            height: stored height.
            orig_width: downloaded width.
            orig_height: downloaded height.
            stored: for a duplicate, the index row of the stored copy (its shard/key/offset/size/uid are used).

        Returns:
            The index row added.
        """
        row: dict[str, Any] = {f: None for f in SHARD_SCHEMA.names}
        row.update(uid=uid, status=status, error=error, url=url, name=name, shard=self.tar_name, sha256=sha256,
                   width=width, height=height, orig_width=orig_width, orig_height=orig_height)
        if jpeg is not None:
            key = f"{self.stem}{len(self.rows):0{self.key_digits}d}"
            meta = {"uid": uid, "key": key, "name": name, "url": url, "caption": caption, "sha256": sha256,
                    "width": width, "height": height, "original_width": orig_width, "original_height": orig_height}
            row["offset"] = self._add_member(f"{key}.jpg", jpeg)
            row["size"] = len(jpeg)
            row["key"] = key
            self._add_member(f"{key}.txt", caption.encode("utf-8"))
            self._add_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        elif stored is not None:
            for f in ("shard", "key", "offset", "size", "sha256", "width", "height"):
                row[f] = stored.get(f)
            row["duplicate_of"] = stored.get("uid")
        self.rows.append(row)
        return row

    def commit(self, **extra_stats: Any) -> dict[str, Any]:
        """Finish the tar, write the index and then the stats file; returns the stats."""
        self._close_tar()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        table = pa.Table.from_pylist(self.rows, schema=SHARD_SCHEMA)
        pq.write_table(table, self._tmp_parquet)
        _fsync_file(self._tmp_parquet)
        tar_path, parquet_path = self.dir / self.tar_name, self.dir / f"{self.stem}.parquet"
        os.replace(self._tmp_tar, tar_path)
        os.replace(self._tmp_parquet, parquet_path)
        hist: dict[str, int] = {}
        for r in self.rows:
            hist[r["status"]] = hist.get(r["status"], 0) + 1
        end = time.time()
        stats = {
            "schema": 1, "shard": self.stem, "count": len(self.rows), "successes": hist.get("ok", 0),
            "duplicates": hist.get("duplicate", 0),
            "failed": len(self.rows) - hist.get("ok", 0) - hist.get("duplicate", 0),
            "status_dict": dict(sorted(hist.items())), "tar_bytes": tar_path.stat().st_size,
            "start_time": self.start_time, "end_time": end, "duration": round(end - self.start_time, 4),
            **extra_stats,
        }
        atomic_write_json(self.dir / f"{self.stem}_stats.json", stats)
        return stats

    def abort(self) -> None:
        """Drop the shard's temp files."""
        try:
            self._file.close()
        except OSError:
            pass
        for p in (self._tmp_tar, self._tmp_parquet):
            p.unlink(missing_ok=True)


def iter_tar_members(shard_path: str | os.PathLike[str]) -> Iterable[tuple[str, int, int]]:
    """``(name, data_offset, size)`` of every member of a tar (for checks and tools)."""
    with tarfile.open(shard_path) as tf:
        for m in tf:
            yield m.name, m.offset_data, m.size
