# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extracted archives, decoded arrays and feature caches (reused between runs; safe to delete).
export NEIGHBORLT_CACHE ?= $(CURDIR)/.cache

.PHONY: demo test install lint clean bench-llm

# constraints.txt pins the environment the test suite was run with, so a fresh machine installs what was tested.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# umap-learn's kNN library (pynndescent) compiles ~40 numba kernels when it is first imported (20 to 30 s of CPU on 2
	@# cores) and caches them in the venv: compile them now, once, not in the first `neighborlt viz` or `make test`
	$(PY) -c "import umap"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neighborlt demo --run-dir runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

# Neighbour search against a real LLM server (llama_cpp.server + SmolLM2-135M-Instruct on 127.0.0.1, offline):
# bench/llm_neighbors.py. The LLM lives in its own virtualenv, built once (llama-cpp-python compiles llama.cpp:
# ~10 min on 2 cores). More options: make bench-llm BENCH_LLM_ARGS="--tiny-targets 100 --variants paper".
LLM_VENV ?= runs/llm_venv
$(LLM_VENV)/.installed: | $(STAMP)
	$(PY) bench/llm_neighbors.py --llm-venv $(LLM_VENV) --install-only
	touch $@

bench-llm: $(STAMP) $(LLM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) bench/llm_neighbors.py --llm-venv $(LLM_VENV) $(BENCH_LLM_ARGS)
