"""Shared fixtures: the offline data directory and a temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neighborlt.paths import resolve_data_dir


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches go to a session temp dir unless NEIGHBORLT_CACHE is set (CI may point it somewhere reusable)."""
    if not os.environ.get("NEIGHBORLT_CACHE"):
        os.environ["NEIGHBORLT_CACHE"] = str(tmp_path_factory.mktemp("nlt-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline datasets (``../shared/data`` or ``$NEIGHBORLT_DATA``); tests needing them skip loudly if absent."""
    d = resolve_data_dir()
    if not (d / "cifar10.tar.gz").exists():
        pytest.skip(f"offline datasets not found in {d}; set NEIGHBORLT_DATA to the folder holding cifar10.tar.gz")
    return d
