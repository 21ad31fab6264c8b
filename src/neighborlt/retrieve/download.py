"""The concurrent, resumable downloader: rows of URLs -> validated JPEGs in WebDataset shards.

:func:`download` fetches rows in a thread pool (guarded, time-limited :func:`fetch.fetch`, then
:func:`images.process_image`; both spend their time in socket waits or in Pillow code that releases the GIL),
and the calling thread alone writes the shards, so shard assignment and de-duplication need no locks.

Resuming: the complete shards' indexes are read first. Rows whose newest result is ``ok`` or ``duplicate`` are
never fetched again; failed rows are retried only with ``retry_failed=True`` (the new result goes into a new
shard and wins); rows in no complete shard (a killed run's unfinished shard) are fetched. Exact duplicates by
SHA-256 of the stored bytes are stored once, also across runs.
"""

from __future__ import annotations

import fcntl
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataError, NeighborLTError
from .fetch import DEFAULT_USER_AGENT, fetch
from .guard import Resolver
from .images import ImageRefused, ProcessedImage, process_image
from .shards import OK_STATUSES, ShardWriter, clean_shard_dir, latest_per_uid, load_shard_index, next_shard_id

Progress = Callable[[int, dict[str, Any]], None]


class DownloadOptions(BaseModel):
    """Options of :func:`download` (limits per URL, image rules, concurrency, shard size)."""

    model_config = ConfigDict(extra="forbid")

    threads: int = Field(32, ge=1, le=1024)  # concurrent downloads (threads)
    connect_timeout: float = Field(10.0, gt=0)  # seconds to open a TCP/TLS connection
    read_timeout: float = Field(10.0, gt=0)  # seconds one socket read may wait for data
    total_timeout: float = Field(30.0, gt=0)  # seconds for a whole fetch, redirects included (hard deadline)
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)  # bytes: largest accepted download
    max_redirects: int = Field(5, ge=0)  # redirects followed at most
    min_side: int = Field(32, ge=1)  # pixels: smallest accepted shorter side of the original
    max_aspect: float = Field(5.0, ge=1.0)  # largest accepted ratio longer side / shorter side
    max_side: int = Field(512, ge=8)  # pixels: longer side of the stored image at most (no upscaling)
    max_pixels: int = Field(40_000_000, ge=1)  # pixels: largest accepted width*height (decompression-bomb guard)
    jpeg_quality: int = Field(90, ge=1, le=95)  # JPEG quality of the stored images
    honor_robots: bool = True  # refuse responses whose X-Robots-Tag says noai / noimageai
    allow_hosts: list[str] = Field(default_factory=list)  # hosts/IPs/CIDRs exempt from the private-address guard
    user_agent: str = DEFAULT_USER_AGENT  # User-Agent header (its product token is matched in X-Robots-Tag)
    shard_size: int = Field(1000, ge=1)  # rows per shard (failures included)


def _work(row: Mapping[str, Any], opts: DownloadOptions, resolve: Resolver | None) -> dict[str, Any]:
    """Fetch and process one row (runs in a worker thread; never raises)."""
    out: dict[str, Any] = {"row": row, "status": "error", "error": "", "image": None, "fetch_s": 0.0,
                           "process_s": 0.0, "bytes": 0}
    try:
        res = fetch(str(row["url"]), connect_timeout=opts.connect_timeout, read_timeout=opts.read_timeout,
                    total_timeout=opts.total_timeout, max_bytes=opts.max_bytes, max_redirects=opts.max_redirects,
                    honor_robots=opts.honor_robots, allow_hosts=opts.allow_hosts, user_agent=opts.user_agent,
                    resolve=resolve)
        out["fetch_s"] = res.elapsed
        if not res.ok or res.data is None:
            out["status"], out["error"] = res.status, res.error
            return out
        out["bytes"] = len(res.data)
        t0 = time.perf_counter()
        try:
            out["image"] = process_image(res.data, min_side=opts.min_side, max_aspect=opts.max_aspect,
                                         max_side=opts.max_side, max_pixels=opts.max_pixels,
                                         jpeg_quality=opts.jpeg_quality)
            out["status"] = "ok"
        except ImageRefused as e:
            out["status"], out["error"] = e.code, e.reason
        out["process_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - one bad row must not stop the run
        out["status"], out["error"] = "error", f"{e.__class__.__name__}: {e}"
    return out


class _Lock:
    """An exclusive flock on ``SHARD_DIR/.lock`` so two runs never write one shard directory."""

    def __init__(self, shard_dir: Path) -> None:
        self.path = shard_dir / ".lock"
        self._f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise NeighborLTError(f"{shard_dir}: another download is writing to this directory; wait for it or "
                                  "use another directory") from None

    def release(self) -> None:
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()


def download(rows: Iterable[Mapping[str, Any]], shard_dir: str | os.PathLike[str], opts: DownloadOptions | None = None,
             *, retry_failed: bool = False, progress: Progress | None = None,
             resolve: Resolver | None = None) -> pa.Table:
    """Download ``rows`` into WebDataset shards under ``shard_dir``; resumable and idempotent.

    Args:
        rows: dicts with ``uid`` (stable id string), ``url``, ``name`` and ``caption``; streamed, a repeated
            uid is processed once.
        shard_dir: the shard directory (see :mod:`neighborlt.retrieve.shards` for the layout).
        opts: limits, image rules, concurrency (default :class:`DownloadOptions`).
        retry_failed: fetch again the rows whose newest result is a failure.
        progress: called as ``progress(n_done, index_row)`` after every row of this run.
        resolve: injectable DNS resolver ``fn(host, port) -> [ip, ...]`` (tests).

    Returns:
        The merged index of every row in ``shard_dir`` (newest result per uid, sorted by uid).
    """
    opts = opts or DownloadOptions()
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    lock = _Lock(shard_dir)
    try:
        clean_shard_dir(shard_dir)
        previous = load_shard_index(shard_dir)
        latest_status = dict(zip(previous.column("uid").to_pylist(), previous.column("status").to_pylist()))
        stored_by_sha: dict[str, dict[str, Any]] = {}
        for r in previous.filter(pc.equal(previous.column("status"), "ok")).to_pylist():
            stored_by_sha.setdefault(r["sha256"], r)
        _run(_todo(rows, latest_status, retry_failed), shard_dir, opts, stored_by_sha, next_shard_id(shard_dir),
             progress, resolve)
        return latest_per_uid(load_shard_index(shard_dir))
    finally:
        lock.release()


def _todo(rows: Iterable[Mapping[str, Any]], latest_status: dict[str, str],
          retry_failed: bool) -> Iterator[Mapping[str, Any]]:
    seen: set[str] = set()
    for n, r in enumerate(rows):
        if not r.get("uid") or not r.get("url"):
            raise DataError(f"download row {n}: needs a non-empty 'uid' and 'url' (got keys {sorted(r)})")
        uid = str(r["uid"])
        if uid in seen:
            continue
        seen.add(uid)
        prev = latest_status.get(uid)
        if prev is None or (retry_failed and prev not in OK_STATUSES):
            yield r


def _run(todo: Iterator[Mapping[str, Any]], shard_dir: Path, opts: DownloadOptions,
         stored_by_sha: dict[str, dict[str, Any]], shard_id: int, progress: Progress | None,
         resolve: Resolver | None) -> None:
    key_digits = max(4, len(str(opts.shard_size - 1)))
    writer: ShardWriter | None = None
    timing = {"fetch_seconds": 0.0, "process_seconds": 0.0, "bytes_downloaded": 0}
    done = 0

    def record(item: dict[str, Any]) -> None:
        nonlocal writer, shard_id, done
        if writer is None:
            writer = ShardWriter(shard_dir, shard_id, key_digits)
            shard_id += 1
        row = item["row"]
        common = {"uid": str(row["uid"]), "url": str(row.get("url") or ""), "name": str(row.get("name") or ""),
                  "caption": str(row.get("caption") or "")}
        img: ProcessedImage | None = item["image"]
        if img is None:
            out = writer.add(status=item["status"], error=item["error"], **common)
        elif img.sha256 in stored_by_sha:
            first = stored_by_sha[img.sha256]
            out = writer.add(status="duplicate", error=f"same bytes as uid {first['uid']}", stored=first,
                             orig_width=img.orig_width, orig_height=img.orig_height, **common)
        else:
            out = writer.add(status="ok", jpeg=img.jpeg, sha256=img.sha256, width=img.width, height=img.height,
                             orig_width=img.orig_width, orig_height=img.orig_height, **common)
            stored_by_sha[img.sha256] = out
        timing["fetch_seconds"] += item["fetch_s"]
        timing["process_seconds"] += item["process_s"]
        timing["bytes_downloaded"] += item["bytes"]
        done += 1
        if progress is not None:
            progress(done, out)
        if len(writer) >= opts.shard_size:
            commit()

    def commit() -> None:
        nonlocal writer
        if writer is not None:
            writer.commit(threads=opts.threads, **{k: round(v, 4) for k, v in timing.items()})
            writer = None
            timing.update(fetch_seconds=0.0, process_seconds=0.0, bytes_downloaded=0)

    ex = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="neighborlt-dl")
    results: queue.SimpleQueue[Future[dict[str, Any]]] = queue.SimpleQueue()
    in_flight = 0
    try:
        exhausted = False
        while True:
            while not exhausted and in_flight < 2 * opts.threads:  # bounded read-ahead of the row stream
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                    break
                ex.submit(_work, nxt, opts, resolve).add_done_callback(results.put)
                in_flight += 1
            if not in_flight:
                break
            record(results.get().result())
            in_flight -= 1
        commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
