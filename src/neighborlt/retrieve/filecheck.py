"""The retrieve stage's check of the local image files it references (the manifest's ``file`` rows: a local captioned
pool's images, for example): status, SHA-256 and size of each file, remembered across runs.

Reading every file of a pool again is most of a local retrieval's time: an ablation grid retrieves from the same pool
once per setting, and a re-run after an edit does it again. :class:`CheckCache` keeps each ``ok`` result in a SQLite
file in the cache folder (``<cache>/retrieve/local_files.sqlite``), keyed by the path and its ``stat`` signature
(size, modification and change times in ns, inode, device), taken before the file is read: a file rewritten since,
even to the same size, has another signature and is read again. A file changed less than :data:`RACY_S` seconds
before it was read is not remembered either: file times come from a coarse clock, so a second write within the same
tick would keep the signature (git's "racily clean" entries); it is remembered by a later run. Files that could not
be read or decoded are never remembered (they are checked again next time). The cache is safe to delete; one that
cannot be opened or read is named in a warning and the files are read as if it were empty.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

CACHE_FILE = Path("retrieve") / "local_files.sqlite"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS checks (path TEXT PRIMARY KEY, sig TEXT NOT NULL, sha256 TEXT NOT NULL, "
           "width INTEGER NOT NULL, height INTEGER NOT NULL)")
_BATCH = 500  # paths per SELECT (SQLite's default limit of bound parameters is 999 before 3.32)
#: a file whose last change is this recent when it is read is not remembered (see the module's docstring)
RACY_S = 1.0


def check_local_file(path: str) -> dict[str, Any]:
    """Status, SHA-256 and size of one referenced image file (``status`` ``missing`` / ``not_image`` with a reason)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        return {"status": "missing", "error": f"cannot read {p}: {e.strerror or e}"}
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return {"status": "not_image", "error": f"{p.name}: not a readable image ({type(e).__name__})"}
    return {"status": "ok", "sha256": hashlib.sha256(data).hexdigest(), "width": int(w), "height": int(h)}


def _check_block(paths: list[str]) -> list[dict[str, Any]]:
    return [check_local_file(p) for p in paths]


#: files checked in worker processes from this many on (threads below: no start-up cost)
PROCESS_MIN_FILES = 20_000


def check_files(paths: list[str]) -> list[dict[str, Any]]:
    """:func:`check_local_file` of each path, in blocks of 1,024: worker processes for many files (reading, hashing
    and header parsing hold the GIL), threads for fewer."""
    blocks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
    workers = max(1, min(8, os.cpu_count() or 1))
    if len(paths) >= PROCESS_MIN_FILES and workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            return [info for res in ex.map(_check_block, blocks) for info in res]
    with ThreadPoolExecutor(workers) as ex:  # a block per task: a future per row cost more than the check
        return [info for res in ex.map(_check_block, blocks) for info in res]


class Signature(NamedTuple):
    """A file's ``stat`` signature (``text``, what the cache compares) and when it was taken."""

    text: str
    changed_ns: int  # the later of the file's modification and change times
    taken_ns: int  # when stat was called (before the file is read)

    @property
    def racy(self) -> bool:
        """Changed too shortly before it was read for the signature to tell a later write apart."""
        return self.changed_ns > self.taken_ns - int(RACY_S * 1e9)


def signature(path: str) -> Signature | None:
    """The ``stat`` signature of a file (None when it cannot be stat'ed: it is then read, and reported missing)."""
    now = time.time_ns()
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Signature(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}",
                     max(st.st_mtime_ns, st.st_ctime_ns), now)


class CheckCache:
    """Remembered :func:`check_local_file` results of unchanged files (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=120)  # another process writing its results: wait, do not fail
            db.execute(_SCHEMA)
            db.commit()
            self._db = db
        except (OSError, sqlite3.Error) as e:
            self._disable(e)

    @classmethod
    def default(cls) -> CheckCache:
        from ..paths import cache_dir

        return cls(cache_dir() / CACHE_FILE)

    def _disable(self, e: Exception) -> None:
        logger.warning("%s: file-check cache unusable (%s); reading every referenced file (delete the file to reset "
                       "it)", self.path, e)
        if self._db is not None:
            self._db.close()
        self._db = None

    def lookup(self, sigs: dict[str, Signature | None]) -> dict[str, dict[str, Any]]:
        """The remembered results of the paths whose signature (``sigs``: path -> :func:`signature`) is unchanged."""
        found: dict[str, dict[str, Any]] = {}
        if self._db is None:
            return found
        now = {p: s.text for p, s in sigs.items() if s is not None}
        paths = list(now)
        try:
            for i in range(0, len(paths), _BATCH):
                part = paths[i:i + _BATCH]
                rows = self._db.execute(f"SELECT path, sig, sha256, width, height FROM checks WHERE path IN "
                                        f"({','.join('?' * len(part))})", part)
                for path, sig, sha, w, h in rows:
                    if sig == now[path]:
                        found[path] = {"status": "ok", "sha256": sha, "width": int(w), "height": int(h)}
        except sqlite3.Error as e:
            self._disable(e)
            return {}
        return found

    def store(self, results: Iterable[tuple[str, Signature | None, dict[str, Any]]]) -> None:
        """Remember ``(path, signature taken before the read, result)`` for the ``ok`` results of files that were not
        changed just before (:attr:`Signature.racy`), in one transaction."""
        if self._db is None:
            return
        rows = [(p, s.text, r["sha256"], r["width"], r["height"]) for p, s, r in results
                if s is not None and not s.racy and r.get("status") == "ok"]
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            self._disable(e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> CheckCache:  # noqa: PYI034 - typing.Self needs Python 3.11 (requires-python: 3.10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CACHE_FILE", "PROCESS_MIN_FILES", "RACY_S", "CheckCache", "Signature", "check_files", "check_local_file",
           "signature"]
