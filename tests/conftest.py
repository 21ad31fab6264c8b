"""Shared fixtures: the offline data directory, a per-session cache and one tiny finished pipeline run
(``tiny_run``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from neighborlt.cores import available_cores
from neighborlt.data.archives import MARKER
from neighborlt.paths import cache_dir, resolve_data_dir

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # one intra-op thread per xdist worker (and per process a test starts): `make test` runs a worker per core and one
    # more, and OpenMP threads spinning on an oversubscribed CPU slow small convolutions several times over
    os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Test files, heaviest first (from the `--durations` a clean-clone `make test` printed, on 2 cores). xdist hands
#: whole files to its workers in collection order (`--dist loadfile --no-loadscope-reorder`; each worker starts with
#: two), so the long files start first and the workers end together instead of one running a long file alone at the
#: end. The second file reads no dataset archive: on a fresh clone the first worker extracts CIFAR-10 (60,000 files)
#: for test_pipeline, and the second has work of its own meanwhile instead of waiting for that extraction's lock.
#: A file not listed runs after these, in its usual order.
HEAVY_FIRST = (
    "test_pipeline.py", "test_pilot.py", "test_ablate_extras.py", "test_retrieve_download.py", "test_viz.py",
    "test_report.py", "test_filter.py", "test_pretrain.py", "test_data_protocol.py", "test_configs.py",
    "test_features.py", "test_ddp.py", "test_resume.py", "test_silencing_grid.py", "test_stage_keys.py",
    "test_train.py", "test_coverage.py", "test_data_readers.py", "test_evaluate.py", "test_options.py",
    "test_pairings.py", "test_bench_loss_scaling.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (what `make test` passes) starts one worker more than there are cores. Many tests wait on something
    (the subprocesses they start, a local server, a kill -9 and its resume, another worker's extraction lock): in a
    run with a fresh cache and a worker per core, a test's wall time exceeded its CPU time (its own and its
    children's) by 80 s in all, out of 2 x 345 s. A third worker on 2 cores fills those waits: in one checkout, 5 min
    11 s and 4 min 51 s with three workers, 5 min 44 s to 6 min 8 s in three runs with two, 5 min 20 s with four.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own rule reads it
    return available_cores() + 1


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


#: A fresh clone extracts the two dataset archives (170,000 files) into RAM instead of the disk: on this project's
#: 2-core machines the same extraction onto ext4 took 23 s to 113 s of CPU (user + system), depending on what the
#: disk had deleted before; into tmpfs 19 s to 21 s, three times out of three. The folder lives for one test session.
_RAM_ROOT = Path("/dev/shm")
_RAM_NEEDS = 3 << 30  # the two extracted archives take 0.7 GB; leave the machine room for the tests themselves
_RAM_ENV = "NEIGHBORLT_TEST_EXTRACTED"  # set by the controller, read by the xdist workers it starts


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or _RAM_ENV in os.environ:
        return  # an xdist worker: its controller chose
    extracted = cache_dir() / "extracted"
    if any(extracted.glob(f"*/{MARKER}")):
        return  # extracted by an earlier session or `make demo`: reuse it
    try:
        _sweep_ram_folders()
        st = os.statvfs(_RAM_ROOT)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < _RAM_NEEDS or not os.access(_RAM_ROOT, os.W_OK):
        return
    os.environ[_RAM_ENV] = tempfile.mkdtemp(prefix=f"neighborlt-tests-{os.getpid()}-", dir=_RAM_ROOT)


def _sweep_ram_folders() -> None:
    """Remove the RAM folders of earlier sessions that were killed before `pytest_unconfigure` (their pid is gone):
    a killed session would otherwise hold 0.7 GB of memory until the next boot."""
    for folder in _RAM_ROOT.glob("neighborlt-tests-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)  # (another user's folder stays: not ours to remove)
        except PermissionError:
            pass  # another user's live session


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _RAM_ENV in os.environ:
        shutil.rmtree(os.environ.pop(_RAM_ENV), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A fresh cache per test session (feature caches, neighbour answers, ...), except for the expensive and
    content-keyed parts: extracted archives and decoded arrays are shared with the persistent cache
    (``$NEIGHBORLT_CACHE``, which ``make test`` sets to ``.cache/``, else ``~/.cache/neighborlt``) so a session does
    not re-extract 170k files. Where that cache holds no extracted archive yet (a fresh clone), archives are extracted
    into a RAM folder for the session instead (``pytest_configure``). Tests never reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    persistent = cache_dir()
    session = tmp_path_factory.mktemp("nlt-cache")
    ram = os.environ.get(_RAM_ENV)
    for shared in ("extracted", "arrays"):
        target = Path(ram) if shared == "extracted" and ram else persistent / shared
        target.mkdir(parents=True, exist_ok=True)
        (session / shared).symlink_to(target, target_is_directory=True)
    os.environ["NEIGHBORLT_CACHE"] = str(session)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline datasets (``../shared/data`` or ``$NEIGHBORLT_DATA``); tests needing them skip loudly if absent."""
    d = resolve_data_dir()
    if not (d / "cifar10.tar.gz").exists():
        pytest.skip(f"offline datasets not found in {d}; set NEIGHBORLT_DATA to the folder holding cifar10.tar.gz")
    return d


def _shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test session's folder that every xdist worker sees (each worker's own base folder is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


#: The tiny finished pipeline run that test_viz and test_report read: CIFAR-10 protocol with 5 targets (n_max 40,
#: imbalance 10) and three pool classes, each some target's neighbour (15,000 pool rows, not 25,000: every stage lists
#: the pool); a 2-block ViT with 4-px patches (the viz's PCA-RGB needs patch tokens), two epochs with the test
#: accuracy after each (the report's training curves), method + Balanced-CE baseline, two classes' contact sheets.
TINY_RUN_TRAIN = {"model": "vit_pico_patch4_32", "image_size": 32, "epochs": 2, "batch_size": 16,
                  "warmup_epochs": 0, "optimizer": "adamw", "lr": 1e-3, "eval_every": 1, "threads": 1}
TINY_RUN_FILTER = {"caption": False, "band": False, "leak": False, "dedup": False, "sheets": 2, "sheet_images": 8}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """One build of that run per test session, shared by the xdist workers (the first to ask builds it under a file
    lock; the others wait and reuse it). Read-only: a test that writes into the run works on a copy
    (``shutil.copytree``)."""
    import fcntl

    from neighborlt.pipeline import PipelineConfig, run_pipeline

    root = _shared_tmp(tmp_path_factory) / "tiny_run"
    run, done = root / "run", root / "built"
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or its process dies)
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that an earlier worker did not finish
            root.mkdir(parents=True)
            # neighbours from a file (what WordNet finds among the pool classes, without loading WordNet: not under
            # test here)
            mapping = root / "neighbours.json"
            mapping.write_text('{"cat": ["dog"], "automobile": ["truck"], "deer": ["horse"]}')
            cfg = PipelineConfig(data_dir=str(data_dir), protocol_overrides={"n_max": 40, "imbalance_ratio": 10,
                                                                             "pool": ["dog", "horse", "truck"]},
                                 train=TINY_RUN_TRAIN, aux_cap=8, max_test_per_class=10, filter=TINY_RUN_FILTER,
                                 neighbors={"backend": "file", "mapping_file": str(mapping)})
            run_pipeline(cfg, run, progress=False)
            done.touch()  # only after the whole run: a worker that dies mid-build leaves no marker
    return run

