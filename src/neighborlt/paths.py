"""Where data and caches live: ``--data-dir``, else ``NEIGHBORLT_DATA``, else ``../shared/data``, else
``~/.cache/neighborlt``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "NEIGHBORLT_DATA"
ENV_CACHE = "NEIGHBORLT_CACHE"


def _shared_candidates() -> list[Path]:
    """``../shared/data`` relative to the working directory and to the source checkout."""
    here = Path(__file__).resolve()
    cands = [Path.cwd() / ".." / "shared" / "data"]
    for parent in here.parents[:5]:
        cands.append(parent.parent / "shared" / "data")
    return cands


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory by precedence: argument, ``$NEIGHBORLT_DATA``, ``../shared/data``, cache."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser().resolve()
    for cand in _shared_candidates():
        if cand.is_dir():
            return cand.resolve()
    return cache_dir()


def data_search_paths(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """All places a dataset is looked for, in order (used for 'where it looked' in errors)."""
    out = [resolve_data_dir(data_dir)]
    if cache_dir() not in out:
        out.append(cache_dir())
    return out


def cache_dir() -> Path:
    """Cache for extracted archives, decoded arrays and features (``$NEIGHBORLT_CACHE`` or
    ``~/.cache/neighborlt``)."""
    env = os.environ.get(ENV_CACHE)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "neighborlt"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
