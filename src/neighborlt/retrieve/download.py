"""The parallel, resumable downloader: rows of URLs -> validated JPEGs in WebDataset shards.

Work is spread over ``processes`` worker processes (default: one per CPU core available), each running ``threads``
fetches at once (guarded, time-limited :func:`fetch.fetch`, then :func:`images.process_image`). With one process
the threads run in the calling process. The calling process alone assigns rows to shards and writes them, so shard
assignment and de-duplication need no locks, and the output does not depend on the process or thread count:

* the rows still to fetch are numbered in input order; row ``j`` goes to shard ``first + j // shard_size`` at
  position ``j % shard_size`` (its key), whichever process fetched it and whenever it finished;
* a finished result is appended to its shard's spool file (``.NNNNN.spool.tmp``, so memory stays flat while a slow
  row holds its shard open); a shard is written from the spool in row order once all its rows are in, and shards are
  committed in id order;
* exact duplicates (SHA-256 of the stored bytes) are stored once: a row whose bytes an earlier row (earlier shard or
  position, or an earlier run) already stored becomes ``duplicate`` and points at that copy.

Resuming: the complete shards' indexes are read first. Rows whose newest result is ``ok`` or ``duplicate`` are never
fetched again; failed rows are retried only with ``retry_failed=True`` (the new result goes into a new shard and
wins); rows in no complete shard (a killed run's unfinished shard) are fetched. A kill at any moment loses only the
shards not yet committed (see :mod:`neighborlt.retrieve.shards`).

Worker processes are forked (they inherit the options and resolver, nothing is re-imported); they receive
``(row number, url)`` batches over a pipe and send back results as they finish. A worker that dies stops the run
with one line; the committed shards stay.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from ..cores import available_cores
from ..errors import DataError, NeighborLTError
from .fetch import DEFAULT_USER_AGENT, fetch
from .guard import Resolver
from .images import ImageRefused, ProcessedImage, process_image
from .shards import (
    OK_STATUSES,
    ShardWriter,
    clean_shard_dir,
    latest_per_uid,
    load_shard_index,
    next_shard_id,
    shard_stem,
)

Progress = Callable[[int, dict[str, Any]], None]

#: rows fetched but not yet committed (held in open shards) at most, whatever the shard size: bounds the index rows
#: kept in memory and the work a kill can lose while a slow row holds the oldest shard open
MAX_OPEN_ROWS = 50_000


class DownloadOptions(BaseModel):
    """Options of :func:`download` (limits per URL, image rules, parallelism, shard size)."""

    model_config = ConfigDict(extra="forbid")

    processes: int = Field(0, ge=0, le=1024)  # worker processes (0: one per CPU core available); 1: threads only
    threads: int = Field(32, ge=1, le=1024)  # concurrent downloads (threads) per process
    connect_timeout: float = Field(10.0, gt=0)  # seconds to open a TCP/TLS connection
    read_timeout: float = Field(10.0, gt=0)  # seconds one socket read may wait for data
    total_timeout: float = Field(30.0, gt=0)  # seconds for a whole fetch, redirects included (hard deadline)
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)  # bytes: largest accepted download
    max_redirects: int = Field(5, ge=0)  # redirects followed at most
    min_side: int = Field(32, ge=1)  # pixels: smallest accepted shorter side of the original
    max_aspect: float = Field(5.0, ge=1.0)  # largest accepted ratio longer side / shorter side
    max_side: int = Field(512, ge=8)  # pixels: longer side of the stored image at most (no upscaling)
    max_pixels: int = Field(40_000_000, ge=1)  # pixels: largest accepted width*height (decompression-bomb guard)
    jpeg_quality: int = Field(90, ge=1, le=95)  # JPEG quality of the re-encoded images
    keep_fitting_jpeg: bool = True  # store an RGB JPEG that already fits every rule (and decodes) as downloaded,
    #   without re-encoding it (see images.process_image); False: re-encode every image at jpeg_quality
    honor_robots: bool = True  # refuse responses whose X-Robots-Tag says noai / noimageai
    allow_hosts: list[str] = Field(default_factory=list)  # hosts/IPs/CIDRs exempt from the private-address guard
    user_agent: str = DEFAULT_USER_AGENT  # User-Agent header (its product token is matched in X-Robots-Tag)
    shard_size: int = Field(1000, ge=1)  # rows per shard (failures included)

    def resolved_processes(self) -> int:
        """``processes``, with 0 resolved to :func:`available_cores`."""
        return self.processes or available_cores()


class _Result(NamedTuple):
    """One fetched and processed row, as a worker sends it back (``seq``: the row's number in this run)."""

    seq: int
    status: str
    error: str
    image: ProcessedImage | None
    fetch_s: float
    process_s: float
    nbytes: int


def _work(seq: int, url: str, opts: DownloadOptions, resolve: Resolver | None) -> _Result:
    """Fetch and process one URL (runs in a worker thread; never raises)."""
    fetch_s = process_s = 0.0
    nbytes = 0
    try:
        res = fetch(url, connect_timeout=opts.connect_timeout, read_timeout=opts.read_timeout,
                    total_timeout=opts.total_timeout, max_bytes=opts.max_bytes, max_redirects=opts.max_redirects,
                    honor_robots=opts.honor_robots, allow_hosts=opts.allow_hosts, user_agent=opts.user_agent,
                    resolve=resolve)
        fetch_s = res.elapsed
        if not res.ok or res.data is None:
            return _Result(seq, res.status, res.error, None, fetch_s, 0.0, 0)
        nbytes = len(res.data)
        t0 = time.perf_counter()
        try:
            img = process_image(res.data, min_side=opts.min_side, max_aspect=opts.max_aspect,
                                max_side=opts.max_side, max_pixels=opts.max_pixels, jpeg_quality=opts.jpeg_quality,
                                keep_fitting_jpeg=opts.keep_fitting_jpeg)
            return _Result(seq, "ok", "", img, fetch_s, time.perf_counter() - t0, nbytes)
        except ImageRefused as e:
            return _Result(seq, e.code, e.reason, None, fetch_s, time.perf_counter() - t0, nbytes)
    except Exception as e:  # noqa: BLE001 - one bad row must not stop the run
        return _Result(seq, "error", f"{e.__class__.__name__}: {e}", None, fetch_s, process_s, nbytes)


def _outcome(fut: Future[_Result], seq: int) -> _Result:
    """A finished :func:`_work` future's result; an error row if it raised anyway (so no row is ever lost)."""
    try:
        return fut.result()
    except BaseException as e:  # noqa: BLE001 - e.g. MemoryError in a worker thread
        return _Result(seq, "error", f"{e.__class__.__name__}: {e}", None, 0.0, 0.0, 0)


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

    def fileno(self) -> int:
        return self._f.fileno()

    def release(self) -> None:
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()


def download(rows: Iterable[Mapping[str, Any]], shard_dir: str | os.PathLike[str], opts: DownloadOptions | None = None,
             *, retry_failed: bool = False, progress: Progress | None = None,
             resolve: Resolver | None = None) -> pa.Table:
    """Download ``rows`` into WebDataset shards under ``shard_dir``; resumable and idempotent.

    The shards and their indexes are the same for the same rows and options whatever ``processes`` and ``threads``
    are (up to the timings in the stats files and the tar members' mtime).

    Args:
        rows: dicts with ``uid`` (stable id string), ``url``, ``name`` and ``caption``; streamed, a repeated
            uid is processed once.
        shard_dir: the shard directory (see :mod:`neighborlt.retrieve.shards` for the layout).
        opts: limits, image rules, parallelism (default :class:`DownloadOptions`).
        retry_failed: fetch again the rows whose newest result is a failure.
        progress: called as ``progress(n_done, index_row)`` for every row of this run, in row order, as its shard
            is committed.
        resolve: injectable DNS resolver ``fn(host, port) -> [ip, ...]`` (tests; inherited by the forked workers).

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
        del previous
        _Run(shard_dir, opts, stored_by_sha, next_shard_id(shard_dir), progress, resolve, lock).run(
            _todo(rows, latest_status, retry_failed))
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


# ----------------------------------------------------------------------------------------------------------------
# where the rows are fetched: threads in this process, or worker processes with threads
# ----------------------------------------------------------------------------------------------------------------


class _ThreadPool:
    """``threads`` fetches at once in this process."""

    def __init__(self, opts: DownloadOptions, resolve: Resolver | None) -> None:
        self.opts, self.resolve = opts, resolve
        self.capacity = 2 * opts.threads  # rows handed out and not yet back, at most (bounded read-ahead)
        self._ex = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="neighborlt-dl")
        self._done: queue.SimpleQueue[_Result] = queue.SimpleQueue()

    def submit(self, batch: list[tuple[int, str]]) -> None:
        for seq, url in batch:
            fut = self._ex.submit(_work, seq, url, self.opts, self.resolve)
            fut.add_done_callback(lambda f, seq=seq: self._done.put(_outcome(f, seq)))

    def results(self) -> list[_Result]:
        out = [self._done.get()]
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


def _worker_main(tasks: mpc.Connection, results: mpc.Connection, opts: DownloadOptions, resolve: Resolver | None,
                 inherited_fds: list[int]) -> None:
    """A forked worker process: fetch the ``(seq, url)`` batches read from ``tasks`` with ``opts.threads`` threads,
    send the results back on ``results`` in batches as they finish; ends after a ``None`` batch (or EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    done: queue.SimpleQueue[_Result | None] = queue.SimpleQueue()
    ex = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="neighborlt-dl")

    def read() -> None:
        try:
            while True:
                try:
                    batch = tasks.recv()
                except (EOFError, OSError):
                    batch = None
                if batch is None:
                    break
                for seq, url in batch:
                    fut = ex.submit(_work, seq, url, opts, resolve)
                    fut.add_done_callback(lambda f, seq=seq: done.put(_outcome(f, seq)))
        finally:
            ex.shutdown(wait=True)  # every result is queued before the end marker
            done.put(None)

    threading.Thread(target=read, name="neighborlt-dl-reader", daemon=True).start()
    ending = False
    while not ending:
        batch = [done.get()]
        while True:
            try:
                batch.append(done.get_nowait())
            except queue.Empty:
                break
        ending = batch[-1] is None
        out = [r for r in batch if r is not None]
        if out:
            try:
                results.send(out)
            except OSError:  # the parent is gone: nothing to deliver to
                os._exit(0)


class _ProcessPool:
    """``processes`` forked workers of ``threads`` threads each; rows go to the least busy one."""

    def __init__(self, processes: int, opts: DownloadOptions, resolve: Resolver | None,
                 inherited_fds: list[int]) -> None:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.per_worker = 2 * opts.threads
        self.capacity = processes * self.per_worker
        self.workers: list[tuple[Any, mpc.Connection, mpc.Connection]] = []
        self.busy: list[int] = []  # rows handed to each worker and not yet back
        self._batches: list[list[tuple[int, str]]] = []
        try:
            for _ in range(processes):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                # the child closes what is not its own: the lock, the parent's ends of its pipes and of earlier
                # workers' pipes (so a killed parent leaves every worker an EOF, and the lock free)
                theirs = [*inherited_fds, task_w.fileno(), res_r.fileno()]
                theirs += [c.fileno() for _, tw, rr in self.workers for c in (tw, rr)]
                proc = ctx.Process(target=_worker_main, args=(task_r, res_w, opts, resolve, theirs),
                                   name="neighborlt-download", daemon=True)
                proc.start()
                task_r.close()
                res_w.close()
                self.workers.append((proc, task_w, res_r))
                self.busy.append(0)
                self._batches.append([])
        except BaseException:
            self.close()
            raise

    def submit(self, batch: list[tuple[int, str]]) -> None:
        for item in batch:
            k = min(range(len(self.busy)), key=self.busy.__getitem__)
            self.busy[k] += 1
            self._batches[k].append(item)
        for k, b in enumerate(self._batches):
            if b:
                self.workers[k][1].send(b)
                self._batches[k] = []

    def results(self) -> list[_Result]:
        conns = {res_r: k for k, (_, _, res_r) in enumerate(self.workers)}
        sentinels = {proc.sentinel: k for k, (proc, _, _) in enumerate(self.workers)}
        while True:
            ready = mpc.wait([*conns, *sentinels])
            out: list[_Result] = []
            for obj in ready:
                if obj in conns:
                    k = conns[obj]  # type: ignore[index]
                    try:
                        got: list[_Result] = obj.recv()  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        self._died(k)
                    self.busy[k] -= len(got)
                    out += got
            if out:
                return out
            for obj in ready:  # a worker exited before it was told to, and had nothing more to send
                if obj in sentinels:
                    self._died(sentinels[obj])  # type: ignore[index]

    def _died(self, k: int) -> None:
        proc = self.workers[k][0]
        proc.join(1)
        raise NeighborLTError(f"download worker process {proc.pid} died (exit code {proc.exitcode}) with "
                              f"{self.busy[k]} rows in flight; the finished shards are kept: run the download "
                              "again to resume")

    def close(self) -> None:
        for _, task_w, _ in self.workers:
            try:
                task_w.send(None)
            except OSError:
                pass
        for proc, task_w, res_r in self.workers:
            proc.join(0.5)
            if proc.is_alive():  # still in a fetch, or the run failed: do not wait for its time-outs
                proc.terminate()
                proc.join(5)
            task_w.close()
            res_r.close()


# ----------------------------------------------------------------------------------------------------------------
# the writer: rows -> shards in a fixed order
# ----------------------------------------------------------------------------------------------------------------


class _OpenShard:
    """A shard whose rows are being fetched: results are kept in row order, image bytes in a spool file."""

    def __init__(self, shard_dir: Path, shard_id: int) -> None:
        self.shard_id = shard_id
        self.rows: list[Mapping[str, Any]] = []  # the input rows, in position order
        self.results: list[_Result | None] = []
        self.pending = 0
        self.full = False  # no more rows will be assigned
        self.spool_path = shard_dir / f".{shard_stem(shard_id)}.spool.tmp"
        self.spool = open(self.spool_path, "w+b")  # noqa: SIM115 - closed by close()
        self.spool_pos = 0
        self.where: dict[int, tuple[int, int]] = {}  # position -> (spool offset, length)

    def put(self, pos: int, res: _Result) -> None:
        if res.image is not None:
            n = len(res.image.jpeg)
            self.spool.write(res.image.jpeg)
            self.where[pos] = (self.spool_pos, n)
            self.spool_pos += n
            res = res._replace(image=res.image._replace(jpeg=b""))
        self.results[pos] = res
        self.pending -= 1

    def jpeg(self, pos: int) -> bytes:
        off, n = self.where[pos]
        return os.pread(self.spool.fileno(), n, off)

    def close(self) -> None:
        self.spool.close()
        self.spool_path.unlink(missing_ok=True)


class _Run:
    def __init__(self, shard_dir: Path, opts: DownloadOptions, stored_by_sha: dict[str, dict[str, Any]],
                 first_shard: int, progress: Progress | None, resolve: Resolver | None, lock: _Lock) -> None:
        self.shard_dir, self.opts, self.stored_by_sha = shard_dir, opts, stored_by_sha
        self.first_shard, self.progress, self.resolve, self.lock = first_shard, progress, resolve, lock
        self.key_digits = max(4, len(str(opts.shard_size - 1)))
        self.open: dict[int, _OpenShard] = {}
        self.next_commit = first_shard
        self.done = 0

    def run(self, todo: Iterator[Mapping[str, Any]]) -> None:
        opts = self.opts
        processes = opts.resolved_processes()
        max_open = max(2, -(-MAX_OPEN_ROWS // opts.shard_size))
        first = next(todo, None)
        if first is None:
            return
        pool: _ThreadPool | _ProcessPool = (_ThreadPool(opts, self.resolve) if processes == 1 else
                                            _ProcessPool(processes, opts, self.resolve, [self.lock.fileno()]))
        seq = 0
        in_flight = 0
        pending_row: Mapping[str, Any] | None = first
        try:
            while True:
                batch: list[tuple[int, str]] = []
                while pending_row is not None and in_flight + len(batch) < pool.capacity:
                    sid, pos = divmod(seq, opts.shard_size)
                    sid += self.first_shard
                    if sid not in self.open:
                        if len(self.open) >= max_open:
                            break  # a slow row holds the oldest shard: wait for it before reading further
                        self.open[sid] = _OpenShard(self.shard_dir, sid)
                    sh = self.open[sid]
                    sh.rows.append(pending_row)
                    sh.results.append(None)
                    sh.pending += 1
                    sh.full = len(sh.rows) >= opts.shard_size
                    batch.append((seq, str(pending_row["url"])))
                    seq += 1
                    pending_row = next(todo, None)
                if pending_row is None and self.open:
                    self.open[max(self.open)].full = True  # the stream ended: the last shard is complete as is
                if batch:
                    pool.submit(batch)
                    in_flight += len(batch)
                if not in_flight:
                    break
                for res in pool.results():
                    in_flight -= 1
                    sid, pos = divmod(res.seq, opts.shard_size)
                    self.open[sid + self.first_shard].put(pos, res)
                self._commit_ready()
            self._commit_ready()
        finally:
            pool.close()
            for sh in self.open.values():
                sh.close()

    def _commit_ready(self) -> None:
        while (sh := self.open.get(self.next_commit)) is not None and sh.full and not sh.pending:
            self._commit(sh)
            del self.open[self.next_commit]
            sh.close()
            self.next_commit += 1

    def _commit(self, sh: _OpenShard) -> None:
        writer = ShardWriter(self.shard_dir, sh.shard_id, self.key_digits)
        timing = {"fetch_seconds": 0.0, "process_seconds": 0.0, "bytes_downloaded": 0}
        sh.spool.flush()
        try:
            for pos, (row, res) in enumerate(zip(sh.rows, sh.results)):
                assert res is not None
                common = {"uid": str(row["uid"]), "url": str(row.get("url") or ""),
                          "name": str(row.get("name") or ""), "caption": str(row.get("caption") or "")}
                img = res.image
                if img is None:
                    out = writer.add(status=res.status, error=res.error, **common)
                elif img.sha256 in self.stored_by_sha:
                    first = self.stored_by_sha[img.sha256]
                    out = writer.add(status="duplicate", error=f"same bytes as uid {first['uid']}", stored=first,
                                     orig_width=img.orig_width, orig_height=img.orig_height, **common)
                else:
                    out = writer.add(status="ok", jpeg=sh.jpeg(pos), sha256=img.sha256, width=img.width,
                                     height=img.height, orig_width=img.orig_width, orig_height=img.orig_height,
                                     **common)
                    self.stored_by_sha[img.sha256] = out
                timing["fetch_seconds"] += res.fetch_s
                timing["process_seconds"] += res.process_s
                timing["bytes_downloaded"] += res.nbytes
                self.done += 1
                if self.progress is not None:
                    self.progress(self.done, out)
            writer.commit(processes=self.opts.resolved_processes(), threads=self.opts.threads,
                          **{k: round(v, 4) for k, v in timing.items()})
        except BaseException:
            writer.abort()
            raise
