"""Referencing a local CSV pool: rows per second of ``neighborlt retrieve --source local --pool pool.csv``.

Generates (once, kept in ``--workdir``) a pool of ``--rows`` small JPEG files in folders of 1,000 and ``pool.csv``
(``path,caption``; one caption in ``--distinct-share`` is unique, the others repeat a few hundred templates), and a
``neighbors.json`` of ``--names`` auxiliary names (WordNet-like synonyms on some), ``--matching`` of which occur in
the captions; then times ``run_retrieve`` (caption matching, candidate rows, the check of every referenced file:
status, SHA-256, size; the manifest) in a fresh run directory and prints rows/s. Then it retrieves again into a
second run directory, as an ablation's next setting or a re-run after an edit does: the files are unchanged, so their
checks come from the cache (``retrieve/local_files.sqlite`` in a cache folder of its own, emptied first).

    .venv/bin/python bench/local_pool.py                          # 100,000 files
    .venv/bin/python bench/local_pool.py --rows 20000 --profile   # where the time goes (cProfile, top 15 by own time)
    # the code before a change, on the same files:
    git worktree add /tmp/old HEAD~N && PYTHONPATH=/tmp/old/src .venv/bin/python bench/local_pool.py

Timings depend on the machine's load (printed with the figures) and on the page cache (the first run after
generating reads files the generator just wrote); the CPU seconds it also prints (this process and its worker
processes) do not depend on the load as much.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path


def _pool(workdir: Path, rows: int, names: list[str], distinct_share: float, seed: int) -> Path:
    """The pool files and ``pool.csv`` (regenerated only when the row count differs)."""
    csv_path = workdir / "pool.csv"
    stamp = workdir / "pool.json"
    want = {"rows": rows, "names": names, "distinct_share": distinct_share, "seed": seed}
    if csv_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return csv_path
    from PIL import Image

    if (workdir / "images").exists():
        shutil.rmtree(workdir / "images")
    rng = random.Random(seed)
    variants = []
    for k in range(64):  # distinct small JPEGs, written round-robin (the files are what is read, not decoded)
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (k * 4 % 256, k * 17 % 256, 90)).save(buf, "JPEG", quality=85)
        variants.append(buf.getvalue())
    templates = ["a photo of a {}", "two {}s on a table", "{} in the wild", "close-up of a {}, outdoors",
                 "an old picture of a {} and a dog", "stock image: {}"]
    fillers = ["house", "street", "tree", "person", "car park", "river bank", "kitchen", "mountain"]
    t0 = time.perf_counter()
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(rows):
            folder = workdir / "images" / f"{i // 1000:04d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True, exist_ok=True)
            rel = f"images/{i // 1000:04d}/{i:07d}.jpg"
            data = variants[i % len(variants)]
            (workdir / rel).write_bytes(data[:-2] + i.to_bytes(4, "little") + data[-2:])  # unique bytes per file
            subject = names[i % len(names)] if rng.random() < 0.5 else rng.choice(fillers)
            caption = rng.choice(templates).format(subject)
            if rng.random() < distinct_share:
                caption += f" #{i}"
            w.writerow([rel, caption])
    stamp.write_text(json.dumps(want))
    print(f"generated {rows:,} files + {csv_path.name} in {time.perf_counter() - t0:.1f} s")
    return csv_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="pool images (files and CSV rows)")
    ap.add_argument("--names", type=int, default=200, help="auxiliary names in neighbors.json")
    ap.add_argument("--matching", type=int, default=40, help="how many of them occur in the captions")
    ap.add_argument("--distinct-share", type=float, default=0.5, help="share of captions that are unique")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "neighborlt-bench-local-pool")
    ap.add_argument("--profile", action="store_true", help="print the top 15 functions by own time")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from neighborlt.retrieve import RetrieveConfig, run_retrieve

    words = ["wolf", "lynx", "fox", "otter", "badger", "heron", "sneaker", "kettle", "canoe", "tram"]
    all_names = [f"{w} {k}" if k else w for k in range(a.names // len(words) + 1) for w in words][: a.names]
    matching = all_names[: a.matching]
    a.workdir.mkdir(parents=True, exist_ok=True)
    csv_path = _pool(a.workdir, a.rows, matching, a.distinct_share, a.seed)
    cache = a.workdir / "cache"  # the file-check cache starts empty: the first run reads every file
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["NEIGHBORLT_CACHE"] = str(cache)
    aux = [{"name": n, "parents": [f"target {i % 20}"], **({"synonyms": [f"{n} shoe"]} if i % 3 == 0 else {})}
           for i, n in enumerate(all_names)]
    runs = [a.workdir / "run", a.workdir / "run_again"]
    for run in runs:
        if run.exists():
            shutil.rmtree(run)
        run.mkdir()
        (run / "neighbors.json").write_text(json.dumps({"schema": 1, "auxiliary": aux, "targets": []}))
    cfg = RetrieveConfig(source="local", pool=str(csv_path))
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    import resource

    def cpu() -> float:  # user + system seconds of this process and its finished workers
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    res = run_retrieve(cfg, runs[0])
    dt, cpu_s = time.perf_counter() - t0, cpu() - c0
    c1, t1 = cpu(), time.perf_counter()
    again = run_retrieve(cfg, runs[1])
    dt2, cpu2 = time.perf_counter() - t1, cpu() - c1
    if again.status != res.status:
        raise SystemExit(f"the second retrieval differs: {again.status} vs {res.status}")
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    load = os.getloadavg()
    print(f"pool rows {a.rows:,}, candidates {res.candidates:,} ({res.status}), names {len(all_names)} "
          f"({a.matching} in captions)")
    print(f"retrieve: {dt:.1f} s = {a.rows / dt:,.0f} pool rows/s ({res.candidates / dt:,.0f} candidates/s); "
          f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"CPU: {cpu_s:.1f} s (user + system, workers included) = {1000 * cpu_s / a.rows:.2f} ms per pool row; "
          f"{a.rows / cpu_s:,.0f} rows per CPU second (what one free core would do with warm file caches; "
          "start-up such as importing torch for the run record included)")
    print(f"again, into a second run directory (unchanged files: checks from the cache): {dt2:.1f} s = "
          f"{a.rows / dt2:,.0f} pool rows/s; CPU {cpu2:.1f} s = {1000 * cpu2 / a.rows:.2f} ms per pool row")


if __name__ == "__main__":
    main()
