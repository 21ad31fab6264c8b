"""Shared fixtures: the offline data directory and a temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neighborlt.paths import resolve_data_dir

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # one intra-op thread per xdist worker (and per process a test starts): `make test` runs one worker per core, and
    # OpenMP threads spinning on an oversubscribed CPU slow small convolutions several times over
    os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Test files, heaviest first (from the `--durations` a clean-clone `make test` printed, on 2 cores). xdist hands
#: whole files to its workers in collection order (`--dist loadfile --no-loadscope-reorder`; each worker starts with
#: two), so the long files start first and the two workers end together instead of one running a long file alone at
#: the end. The second and fourth files read no dataset archive: on a fresh clone the first worker extracts CIFAR-10
#: (60,000 files; 7 s to 52 s on this disk, mostly system time) for test_pipeline, and the second worker has work of
#: its own meanwhile instead of waiting for that extraction's lock. A file not listed runs after these, in its usual order.
HEAVY_FIRST = (
    "test_pipeline.py", "test_pilot.py", "test_ablate_extras.py", "test_retrieve_download.py", "test_viz.py",
    "test_report.py", "test_filter.py", "test_pretrain.py", "test_data_protocol.py", "test_configs.py",
    "test_features.py", "test_ddp.py", "test_resume.py", "test_silencing_grid.py", "test_stage_keys.py",
    "test_train.py", "test_coverage.py", "test_data_readers.py", "test_evaluate.py", "test_options.py",
    "test_pairings.py", "test_bench_loss_scaling.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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
