"""Neighbour-search throughput: 8,142 synthetic class names (iNaturalist-18 size) against the local
chat-completions server at concurrency 1 and 32, a fully cached replay, and the WordNet backend on 8,142 real
WordNet leaf noun synsets below organism.n.01. Prints the figures; asserts nothing.

The server (tests/servers/chat_server.py) runs in its own process and sleeps ``--latency`` seconds per request to
emulate an LLM; every answer is cached on disk (one atomic JSON file per class) as in a real run.

    .venv/bin/python bench/neighbors_throughput.py [--n 8142] [--latency 0.02] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neighborlt.neighbors import NeighborsConfig, TargetClass, search

ROOT = Path(__file__).resolve().parents[1]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "servers" / "chat_server.py"), "--port", "0",
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"chat server did not start: {line!r}")
    return proc, line.split()[1]


def bench_openai(n: int, latency: float, concurrencies: list[int], limit_c1: int | None) -> None:
    names = [f"synthetic class {i:05d}" for i in range(n)]
    proc, url = start_server(latency)
    try:
        for c in concurrencies:
            m = n if (c > 1 or not limit_c1) else min(n, limit_c1)
            targets = [TargetClass(i, nm) for i, nm in enumerate(names[:m])]
            with tempfile.TemporaryDirectory() as cache:
                cfg = NeighborsConfig(backend="openai", model="bench", base_url=url, concurrency=c, cache_dir=cache,
                                      per_class=5, max_retries=3, backoff_s=0.05)
                t = time.perf_counter()
                doc = search(targets, cfg)
                dt = time.perf_counter() - t
                ok = sum(1 for r in doc["targets"] if len(r["found"]) == 5)
                print(f"openai  concurrency={c:3d}  classes={m}  latency={latency * 1000:.0f} ms/request  "
                      f"{dt:8.2f} s  {m / dt:8.1f} classes/s  (requests {doc['stats']['requests']}, "
                      f"retries {doc['stats']['retries']}, complete answers {ok}/{m})", flush=True)
                if c == concurrencies[-1]:
                    t = time.perf_counter()
                    doc = search(targets, cfg)
                    dt = time.perf_counter() - t
                    print(f"openai  cached replay          classes={m}  {dt:8.2f} s  {m / dt:8.1f} classes/s  "
                          f"(requests {doc['stats']['requests']}, cached {doc['stats']['cached']})", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_wordnet(n: int) -> None:
    from neighborlt.neighbors.wordnet import get_wordnet, synset_name

    t = time.perf_counter()
    w = get_wordnet()
    load = time.perf_counter() - t
    organism = w.synsets("organism", pos="n")[0]
    seen: dict[int, object] = {}
    stack = [organism]
    while stack:
        for h in stack.pop().hyponyms():
            if h.offset() not in seen:
                seen[h.offset()] = h
                stack.append(h)
    # leaf synsets (species-like, as in iNaturalist), spread over the tree
    leaves = sorted(o for o, s in seen.items() if not s.hyponyms())
    step = max(1, len(leaves) // n)
    offs = leaves[::step][:n]
    targets = [TargetClass(i, synset_name(seen[o]), wnid=f"n{o:08d}") for i, o in enumerate(offs)]
    with tempfile.TemporaryDirectory() as cache:
        cfg = NeighborsConfig(backend="wordnet", cache_dir=cache, per_class=5)
        t = time.perf_counter()
        doc = search(targets, cfg)
        dt = time.perf_counter() - t
    ok = sum(1 for r in doc["targets"] if r["found"])
    print(f"wordnet classes={len(targets)} (leaves spread over organism.n.01)  {dt:8.2f} s  "
          f"{len(targets) / dt:8.1f} "
          f"classes/s  (+{load:.1f} s WordNet load; {ok} classes got neighbours, "
          f"{doc['stats']['auxiliary_classes']} auxiliary classes)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8142)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the server sleeps per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--limit-c1", type=int, default=None, help="classes for the concurrency-1 run (default all)")
    ap.add_argument("--skip-wordnet", action="store_true")
    ap.add_argument("--skip-openai", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_openai:
        bench_openai(args.n, args.latency, args.concurrency, args.limit_c1)
    if not args.skip_wordnet:
        bench_wordnet(args.n)


if __name__ == "__main__":
    main()
