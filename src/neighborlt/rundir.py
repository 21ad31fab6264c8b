"""Run-directory plumbing: atomic writes, the run record (config, versions, seed, git commit),
JSONL logs and stage completion markers so every stage is resumable and idempotent."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import NeighborLTError

RECORDED_PACKAGES = ("neighborlt", "torch", "torchvision", "timm", "numpy", "pydantic", "openai", "wn")


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` tells it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp file name in ``path``'s folder; on success it replaces ``path`` (``os.replace``), on any error
    it is removed, so readers see the old file or the whole new one, never a part (Parquet writers, numpy, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600: follow the umask like any other new file
            os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory (fsynced) and ``os.replace``."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert pydantic models, paths, numpy scalars/arrays and tuples to plain JSON values."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and math.isnan(obj):  # NaN is not JSON: write null
        return None
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one JSON line (``row`` with a ``time`` stamp) to a log such as ``train/log.jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable({"time": time.time(), **row})) + "\n")


def truncate_jsonl(path: str | os.PathLike[str], last_epoch: int) -> None:
    """Drop the rows of a per-epoch log after ``last_epoch`` (epochs a resumed run trains again), atomically."""
    path = Path(path)
    if not path.exists():
        return
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("epoch", 0) <= last_epoch]
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line :class:`NeighborLTError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeighborLTError(f"{path}: file not found (did the previous stage run?)") from None
    except json.JSONDecodeError as e:
        raise NeighborLTError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); delete the file and re-run") from None


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (first 16 hex digits)."""
    blob = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The git commit of the neighborlt checkout (``+dirty`` when modified), or None. Asked once per process (two
    git subprocesses; a pipeline records a dozen stages): the code a process runs is the code it imported."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    return {name: _package_version(name) for name in RECORDED_PACKAGES + tuple(extra)}


@functools.cache
def _package_version(name: str) -> str | None:
    """One package's installed version (None: not installed), looked up once per process (each lookup scans the
    installed distributions)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_record(seed: int | None = None) -> dict[str, Any]:
    """Versions, git commit, platform, device and seed for ``env.json``."""
    rec: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "seed": seed,
        "argv": sys.argv,
    }
    try:
        import torch

        rec["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        rec["devices"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else ["cpu"]
        )
        rec["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return rec


@dataclass(frozen=True)
class StageKey:
    """A stage's completion key, from the one rule every stage follows (:meth:`RunDir.stage_key`): the stage's key
    fields (the options that change its outputs), the sha256 of every input file it reads and the stage's version.
    Any change of one of them changes :attr:`key`, so the stage runs again, and so does every stage that reads its
    outputs (their bytes change)."""

    stage: str
    version: int
    fields: Any  # the key fields, as JSON values
    inputs: dict[str, str | None] = field(default_factory=dict)  # input file (relative to RUN) -> sha256 (None: absent)

    @property
    def key(self) -> str:
        return config_hash({"stage": self.stage, "version": self.version, "fields": self.fields,
                            "inputs": self.inputs})

    def __str__(self) -> str:
        return self.key


def _diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the key fields that differ between two JSON values (a changed list is one name)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_fields(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "options"]


def change_reason(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str | None:
    """Why a stage's completion record ``new`` differs from ``old`` (records as :meth:`RunDir.mark_done` writes them;
    None when they hold the same key): ``not run before``, the key fields that changed (``epochs changed``), the input
    files that changed (``split.json changed``), ``stage version changed``."""
    if new is None or (old is not None and old.get("key") == new.get("key")):
        return None
    if old is None:
        return "not run before"
    if "fields" not in old or "fields" not in new:
        return "finished by an older version of neighborlt" if "fields" not in old else "key changed"
    reasons: list[str] = []
    if old.get("version") != new.get("version"):
        reasons.append("stage version changed")
    names = _diff_fields(old.get("fields"), new.get("fields"))
    if names:
        reasons.append(", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "") + " changed")
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    changed = [k for k in new_in if old_in.get(k) != new_in[k]] + [k for k in old_in if k not in new_in]
    if changed:
        reasons.append(", ".join(changed) + " changed")
    return "; ".join(reasons) or "key changed"


class RunDir:
    """One run directory holding every stage's files.

    Layout (each stage writes only its own files; see docs/architecture.md)::

        RUN/classes.json  split.json  neighbors.json  train/  export/  eval/  logs/*.jsonl
        RUN/records/<stage>.config.json  RUN/records/<stage>.env.json  RUN/records/<stage>.done.json
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def record(self, stage: str, config: Any, seed: int | None = None) -> None:
        """Write the resolved config and environment (versions, git commit, seed) of a stage."""
        atomic_write_json(self.path("records", f"{stage}.config.json"), config)
        atomic_write_json(self.path("records", f"{stage}.env.json"), environment_record(seed))

    def stage_key(self, stage: str, fields: Any, inputs: Iterable[str | os.PathLike[str]] = (), *,
                  version: int = 1) -> StageKey:
        """The completion key of ``stage`` (the one rule of every stage): its key ``fields`` (options that change
        its outputs; execution-only options left out), the sha256 of each input file it reads (``inputs``: paths,
        relative to the run directory or absolute; a missing file counts as absent) and its ``version`` (raised
        when a stage's code changes what it writes)."""
        hashes: dict[str, str | None] = {}
        for item in inputs:
            p = Path(item)
            p = p if p.is_absolute() else self.root / p
            try:
                label = str(p.relative_to(self.root))
            except ValueError:
                label = str(p)
            hashes[label] = file_sha256(p) if p.is_file() else None
        return StageKey(stage, int(version), to_jsonable(fields), hashes)

    def done_record(self, stage: str) -> dict[str, Any] | None:
        """``records/<stage>.done.json`` (None when the stage has not finished, or the record is unreadable)."""
        p = self.path("records", f"{stage}.done.json")
        try:
            rec = read_json(p) if p.is_file() else None
        except NeighborLTError:
            return None
        return rec if isinstance(rec, dict) else None

    def done_key(self, stage: str) -> str | None:
        rec = self.done_record(stage)
        return rec.get("key") if rec else None

    def is_done(self, stage: str, key: str | StageKey, *outputs: str | os.PathLike[str]) -> bool:
        """True when ``stage`` finished with the same key (so it can be skipped) and its ``outputs`` (paths relative
        to the run directory) are all still there."""
        return self.done_key(stage) == str(key) and all((self.root / o).is_file() for o in outputs)

    def stale_reason(self, stage: str, key: StageKey) -> str | None:
        """Why ``stage`` must run with ``key`` (None when it finished with that key): ``not run before``, the key
        fields that changed (``epochs changed``), the input files that changed (``split.json changed``)."""
        return change_reason(self.done_record(stage), {"key": key.key, "version": key.version, "fields": key.fields,
                                                        "inputs": key.inputs})

    def mark_done(self, stage: str, key: str | StageKey, **stats: Any) -> None:
        """Write ``records/<stage>.done.json``: the key (and with a :class:`StageKey` its fields, input hashes and
        version, so that a later run can say what changed) and ``stats``."""
        rec: dict[str, Any] = {"key": str(key), "time": time.time()}
        if isinstance(key, StageKey):
            rec.update(version=key.version, fields=key.fields, inputs=key.inputs)
        atomic_write_json(self.path("records", f"{stage}.done.json"), {**rec, **stats})

    def clear_done(self, stage: str) -> None:
        """Forget that ``stage`` finished (before its outputs are replaced, so a crash midway never leaves a marker
        next to half-new outputs)."""
        self.path("records", f"{stage}.done.json").unlink(missing_ok=True)

    def log(self, stage: str, **event: Any) -> None:
        """Append one JSON line to ``logs/<stage>.jsonl``."""
        append_jsonl(self.path("logs", f"{stage}.jsonl"), event)

    def read_log(self, stage: str) -> Iterator[dict[str, Any]]:
        p = self.path("logs", f"{stage}.jsonl")
        if p.exists():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait: bool) -> Iterator[bool]:
    """Hold ``RUN/.lock`` (an advisory ``flock``, released by the OS if the process dies) while a run trains, so that
    several ``ablate`` / ``pilot`` processes can work through one folder; yields False when another holds it and ``wait`` is
    False. Where ``fcntl`` is missing (Windows) it always yields True: run one process per folder there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
