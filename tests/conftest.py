"""Shared fixtures: the offline data directory and a temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neighborlt.paths import resolve_data_dir


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh cache per test session (feature caches, neighbour answers, ...), except for the expensive and
    content-keyed parts: extracted archives and decoded arrays are shared with the persistent cache
    (``$NEIGHBORLT_CACHE``, which ``make test`` sets to ``.cache/``, else ``~/.cache/neighborlt``) so a session does
    not re-extract 160k files. Tests never reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    persistent = Path(os.environ.get("NEIGHBORLT_CACHE") or Path.home() / ".cache" / "neighborlt").resolve()
    session = tmp_path_factory.mktemp("nlt-cache")
    for shared in ("extracted", "arrays"):
        (persistent / shared).mkdir(parents=True, exist_ok=True)
        (session / shared).symlink_to(persistent / shared, target_is_directory=True)
    os.environ["NEIGHBORLT_CACHE"] = str(session)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline datasets (``../shared/data`` or ``$NEIGHBORLT_DATA``); tests needing them skip loudly if absent."""
    d = resolve_data_dir()
    if not (d / "cifar10.tar.gz").exists():
        pytest.skip(f"offline datasets not found in {d}; set NEIGHBORLT_DATA to the folder holding cifar10.tar.gz")
    return d
