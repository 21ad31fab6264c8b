"""The data path at scale: ``train.data_mode`` cache vs stream vs torchvision ``ImageFolder`` + ``DataLoader``, on an
ImageNet-shaped long-tailed JPEG folder and on web-sized images in retrieve-style tar shards.

    .venv/bin/python bench/data_scale.py                      # N = 200 and 4N, 2 workers, S = 224
    .venv/bin/python bench/data_scale.py --n 1000 --workers 4 --keep runs/data_scale
    .venv/bin/python bench/data_scale.py --keep runs/data_scale_data    # then: neighborlt run bench/data_scale_run.yaml

Data (built once under ``--keep`` or a temporary folder, from the offline Tiny-ImageNet archive):

- ``imagenet``: an ImageFolder ``train/<wnid>/*.jpg`` (+ ``test/``) of ``--classes`` classes, long-tailed (ratio
  ``--ratio``), every 64-px image upscaled (bicubic) to a shorter side of 300-420 px at an aspect of 3:4-4:3, with
  mild Gaussian noise (sigma 3), JPEG quality 90: the shape of ImageNet-LT's images.
- ``web``: the same classes with the longer side 800-1100 px, in tar shards as ``neighborlt retrieve`` writes them
  (read by :class:`~neighborlt.data.base.ShardMember` offsets).
- ``aux-pool``: ``pool.csv`` (``path,caption``) of ``--pool-per-class`` ImageNet-shaped images of each pool class of
  ``examples/own_dataset`` (the WordNet neighbours of its targets, which are this bench's first classes): the
  auxiliary pool of ``bench/data_scale_run.yaml``, the whole pipeline in stream mode at S = 224.

Per set and size (N, 4N), each method in its own process (peak memory: the PSS of that process and its loader workers,
sampled every 0.2 s; PSS shares each shared page among the processes mapping it, so torch's libraries count once):

- ``cache``: ``ImageSetDataset`` in cache mode (decode all to a squashed ``[N, S, S, 3]`` array in a fresh cache,
  then the cache-mode train transform: RandomResizedCrop of the squashed image, flip, ToTensor, Normalize); a
  loader per epoch, as the engine makes them.
- ``stream``: ``ImageSetDataset`` in stream mode (per-sample decode in the workers, draft-aware RandomResizedCrop
  from the full image, flip, uint8 batches; normalisation in the main process, where the device would be);
  persistent workers.
- ``torchvision``: ``ImageFolder`` (for shards: the same bytes read by offset, decoded by PIL) with
  ``RandomResizedCrop(S, bicubic)``, flip, ``ToTensor``, ``Normalize``; persistent workers.

Printed: time to the first training batch (including the folder scan), extra disk, epoch images/s (whole epochs after
the first: at least two and at least ``--min-seconds``, so a small N is not timed on a few batches), peak memory, and
the projection to the paper's 4.2M images (ImageNet-LT's 116k + 4.1M auxiliary images, Appendix B.2): the cache's
decode time and disk, and an epoch at the measured rate. Then feature extraction
images/s (eval view, a small timm model, random weights) stream vs cache, decoding included. Timings depend on the
machine's load: state it with the figures.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import numpy as np

PAPER_IMAGES = 4_200_000  # ImageNet-LT 116k + 4.1M auxiliary images (paper, Appendix B.2)


# ---------------------------------------------------------------------------------------------------- data


def _example() -> Any:
    """``examples/own_dataset/make_example.py``: its ``TARGETS`` and their WordNet neighbours ``POOL``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "own_dataset" / "make_example.py"
    spec = importlib.util.spec_from_file_location("make_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(classes: int, per_class: int, pool_per_class: int, data_dir: str | None
            ) -> tuple[list[str], list[list[Path]], list[tuple[str, str, list[Path]]]]:
    """``classes`` Tiny-ImageNet training classes (the own-dataset example's targets first, then the archive's order
    without its pool classes) with up to ``per_class`` of their 64-px JPEGs, and the example's pool classes
    ``(wnid, caption, pool_per_class JPEGs)``: the auxiliary pool of ``bench/data_scale_run.yaml``."""
    from neighborlt.data import load_dataset

    s = load_dataset("tiny-imagenet", "train", data_dir)
    ex = _example()
    by_name = {n: i for i, n in enumerate(s.class_names)}
    first = [by_name[n] for n in ex.TARGETS]
    skip = set(first) | {by_name[n] for n in ex.POOL}
    order = (first + [c for c in range(len(s.class_names)) if c not in skip])[:classes]

    def files(c: int, n: int) -> list[Path]:
        return [Path(s.paths[i]) for i in np.flatnonzero(s.labels == c)[:n]]

    pool = []
    for name in ex.POOL:
        cid = s.class_ids[by_name[name]]
        words = ", ".join(s.synonyms.get(cid, [name]))
        pool.append((cid, f"a photo of a {words}", files(by_name[name], pool_per_class)))
    return [s.class_ids[c] for c in order], [files(c, per_class) for c in order], pool


def _upscale(src: Path, seed: int, short: tuple[int, int], long_side: bool) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = int(rng.integers(short[0], short[1] + 1))
    aspect = float(rng.uniform(3 / 4, 4 / 3))
    with Image.open(src) as im:
        im = im.convert("RGB")
        if long_side:  # ``side`` is the longer side
            w, h = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
        else:  # ``side`` is the shorter side
            w, h = (round(side * aspect), side) if aspect >= 1 else (side, round(side / aspect))
        big = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    big = np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_one(job: tuple[str, int, bool, str]) -> None:
    src, seed, web, dst = job
    data = _upscale(Path(src), seed, (800, 1100) if web else (300, 420), long_side=web)
    Path(dst).write_bytes(data)


def long_tail(n: int, classes: int, ratio: float) -> list[int]:
    """Images per class (head first) summing to about ``n``, ``ratio`` = head / tail."""
    w = ratio ** (-np.arange(classes) / max(1, classes - 1))
    return [max(1, round(x)) for x in n * w / w.sum()]


def build_sets(root: Path, n4: int, classes: int, ratio: float, workers: int, data_dir: str | None,
               test_per_class: int = 4, pool_per_class: int = 0) -> dict[str, Any]:
    """Generate 4N ImageNet-shaped and 4N web-sized JPEGs once (``root/pool``), the N / 4N views of them, and an
    ImageNet-shaped captioned auxiliary pool (``root/aux-pool/pool.csv``, ``pool_per_class`` images per class)."""
    counts = long_tail(n4, classes, ratio)
    wnids, files, aux = _source(classes, max(counts) + test_per_class, pool_per_class, data_dir)
    marker = root / "built.json"
    want = {"n4": n4, "classes": classes, "ratio": ratio, "counts": counts, "pool_per_class": pool_per_class,
            "targets": wnids}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return json.loads((root / "sets.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    rows: list[tuple[str, int, int, str]] = []  # (kind, class, k, path)
    for kind in ("imagenet", "web"):
        for c, wnid in enumerate(wnids):
            for k in range(counts[c] + test_per_class):
                src = files[c][k % len(files[c])]
                dst = root / "pool" / kind / wnid / f"{k:05d}.jpg"
                dst.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((str(src), (kind == "web") * 10**7 + c * 10**5 + k, kind == "web", str(dst)))
                rows.append((kind, c, k, str(dst)))
    pool_rows = []
    for wnid, caption, srcs in aux:
        for k, src in enumerate(srcs):
            dst = root / "aux-pool" / "images" / f"{wnid}_{k:05d}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(src), 2 * 10**7 + len(pool_rows), False, str(dst)))
            pool_rows.append({"path": f"images/{dst.name}", "caption": caption})
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        pool.map(_make_one, jobs, chunksize=16)
    print(f"generated {len(jobs)} JPEGs in {time.perf_counter() - t0:.1f} s")
    sets: dict[str, Any] = {}
    for tag, frac in (("N", 4), ("4N", 1)):
        keep = {(c, k) for c in range(classes) for k in range(counts[c]) if k % frac == 0}
        folder = root / f"imagenet-{tag}"
        for c, wnid in enumerate(wnids):
            for split, ks in (("train", [k for k in range(counts[c]) if (c, k) in keep]),
                              ("test", range(counts[c], counts[c] + test_per_class))):
                d = folder / split / wnid
                d.mkdir(parents=True, exist_ok=True)
                for k in ks:
                    os.link(root / "pool" / "imagenet" / wnid / f"{k:05d}.jpg", d / f"{k:05d}.jpg")
        shard_dir = root / f"web-{tag}" / "retrieve" / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        members, labels = [], []
        items = [(c, k) for c in range(classes) for k in range(counts[c]) if (c, k) in keep]
        order = np.random.default_rng(0).permutation(len(items))
        per_shard = 1000
        for s0 in range(0, len(items), per_shard):
            tar_path = shard_dir / f"{s0 // per_shard:06d}.tar"
            with tarfile.open(tar_path, "w") as tar:
                for j in order[s0:s0 + per_shard]:
                    c, k = items[j]
                    tar.add(root / "pool" / "web" / wnids[c] / f"{k:05d}.jpg", arcname=f"{c:04d}{k:05d}.jpg")
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    members.append([str(tar_path), m.offset_data, m.size])
                    labels.append(int(m.name[:4]))
        sets[tag] = {"imagenet": str(folder / "train"), "web": members, "web_labels": labels,
                     "images": len(items)}
    sets["wnids"] = wnids
    if pool_rows:
        with open(root / "aux-pool" / "pool.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["path", "caption"])
            w.writeheader()
            w.writerows(pool_rows)
        sets["aux_pool"] = str(root / "aux-pool" / "pool.csv")
    (root / "sets.json").write_text(json.dumps(sets))
    marker.write_text(json.dumps(want))
    return sets


# ---------------------------------------------------------------------------------------------------- measuring


def _image_set(sets: dict[str, Any], tag: str, kind: str) -> Any:
    from neighborlt.data import ImageSet, ShardMember, read_image_folder

    if kind == "imagenet":
        return read_image_folder(sets[tag]["imagenet"])
    refs = [ShardMember(Path(p), o, n) for p, o, n in sets[tag]["web"]]
    return ImageSet(class_names=list(sets["wnids"]), labels=sets[tag]["web_labels"], paths=refs, source="shards")


class _ShardFolder:
    """torchvision-style dataset over shard members: PIL decodes the full image, then the torchvision transform."""

    def __init__(self, image_set: Any, transform: Any) -> None:
        self.refs, self.labels, self.transform = image_set.paths, image_set.labels, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(io.BytesIO(self.refs[i].read_bytes())) as im:
            img = im.convert("RGB")
        return self.transform(img), int(self.labels[i])


def _tree_pss() -> int:
    """Proportional set size of this process and its children (loader workers), in bytes: each shared page (torch's
    libraries, the forked interpreter) counts once across them, where adding their RSS would count it per process."""
    pids = [str(os.getpid())]
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            pids += task.read_text().split()
        except OSError:  # a thread that just ended (the loader's, the sampler's own)
            pass
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:  # a worker that just exited
            pass
    return total


class _PeakPss:
    """The peak of :func:`_tree_pss` while the ``with`` block runs, sampled every 0.2 s by a thread."""

    def __enter__(self) -> Self:
        import threading

        self.peak, self._done = _tree_pss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, _tree_pss())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_pss())


def _measure(method: str, sets: dict[str, Any], tag: str, kind: str, size: int, workers: int, batch: int,
             cache: str, min_seconds: float) -> dict[str, Any]:
    """One (method, set, size) in this process: first batch, extra disk, epoch images/s, peak memory (PSS)."""
    with _PeakPss() as mem:
        out = _measure_in(method, sets, tag, kind, size, workers, batch, cache, min_seconds)
    return {**out, "peak_pss_mib": mem.peak / 2**20}


def _measure_in(method: str, sets: dict[str, Any], tag: str, kind: str, size: int, workers: int, batch: int,
                cache: str, min_seconds: float) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    os.environ["NEIGHBORLT_CACHE"] = cache
    from torchvision import datasets
    from torchvision import transforms as T

    from neighborlt.data import read_image_folder
    from neighborlt.train.data import ImageSetDataset, build_transform, default_normalization
    from neighborlt.train.samplers import build_sampler

    default_normalization(), read_image_folder  # imports (timm) are a process's start-up, not the data path's
    t0 = time.perf_counter()
    if method == "torchvision":

        tf = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        ds: Any = datasets.ImageFolder(sets[tag]["imagenet"], tf) if kind == "imagenet" else \
            _ShardFolder(_image_set(sets, tag, kind), tf)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0, drop_last=False)

        def epoch(e: int) -> Any:
            return iter(loader)
        n = len(ds)
    else:
        image_set = _image_set(sets, tag, kind)
        n = len(image_set)
        sampler = build_sampler("random", image_set.labels, seed=0)
        if method == "cache":
            ds = ImageSetDataset(image_set, build_transform(size, train=True), size)

            def epoch(e: int) -> Any:
                idx = sampler.rank_indices(e)
                batches = [idx[i:i + batch].tolist() for i in range(0, len(idx), batch)]
                return iter(DataLoader(ds, batch_sampler=batches, num_workers=workers))
        else:
            ds = ImageSetDataset(image_set, None, size, mode="stream", train=True, seed=0)

            def epoch(e: int) -> Any:
                idx = sampler.rank_indices(e)
                batches = [idx[i:i + batch].tolist() for i in range(0, len(idx), batch)]
                for x, y in ds.train_batches(batches, e, num_workers=workers):
                    yield ds.normalize(x), y
    it = epoch(0)
    next(it)
    first = time.perf_counter() - t0
    for _ in it:
        pass
    t1 = time.perf_counter()
    seen, e = 0, 1
    while e <= 2 or (time.perf_counter() - t1 < min_seconds and e <= 50):  # whole epochs after the first
        for x, _y in epoch(e):
            seen += len(x)
        e += 1
    rate = seen / (time.perf_counter() - t1)
    disk = sum(p.stat().st_size for p in Path(cache, "arrays").glob("*.npy")) if method == "cache" else 0
    return {"method": method, "set": kind, "size": tag, "images": n, "first_batch_s": first, "disk_bytes": disk,
            "epoch_img_s": rate}


def _features(method: str, sets: dict[str, Any], tag: str, size: int, workers: int, batch: int, model_name: str,
              cache: str, limit: int) -> dict[str, Any]:
    """Feature extraction images/s over the eval view (decoding included): stream vs the cache."""
    import timm
    import torch

    torch.set_num_threads(1)
    os.environ["NEIGHBORLT_CACHE"] = cache
    from neighborlt.train.data import default_normalization, eval_loader, normalize_uint8

    default_normalization()

    image_set = _image_set(sets, tag, "imagenet")
    image_set = image_set.subset(np.arange(min(limit, len(image_set))))
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    t0 = time.perf_counter()
    loader = eval_loader(image_set, size, batch, workers, mode=method)  # type: ignore[arg-type]
    mean, std = loader.dataset.normalization  # type: ignore[attr-defined]
    n = 0
    with torch.inference_mode():
        for x, _y in loader:
            if x.dtype == torch.uint8:
                x = normalize_uint8(x, mean, std)
            model(x)
            n += len(x)
    return {"method": method, "images": n, "img_s": n / (time.perf_counter() - t0)}


_REFS_CODE = """
import json, sys, tracemalloc
from pathlib import Path
import numpy as np, pyarrow as pa
from neighborlt.data.manifest import image_refs
rows = int(sys.argv[1])
i = np.arange(rows)
shards = pa.array([f"retrieve/shards/{k:06d}.tar" for k in range((rows + 999) // 1000)])
table = pa.table({"location": pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array(["shard"])),
                  "path": pa.DictionaryArray.from_arrays(pa.array((i // 1000).astype(np.int32)), shards),
                  "offset": pa.array(512 + 40_960 * (i % 1000)), "size": pa.array(np.full(rows, 40_000))})
tracemalloc.start()
refs = image_refs(table, Path("/run"))
held, peak = tracemalloc.get_traced_memory()
print(json.dumps({"rows": len(refs), "bytes": held, "peak_bytes": peak}))
"""


def _refs_memory(rows: int) -> dict[str, Any]:
    """Memory of the references of a ``rows``-member auxiliary manifest (1,000 members per shard), as
    :func:`~neighborlt.data.manifest.image_refs` builds them for training, in a fresh interpreter: the Python
    allocations they hold, and the peak while they are built (``tracemalloc``, exact; an RSS difference reads the
    peak, or less where freed heap is reused)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _REFS_CODE, str(rows)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh forked process (its own memory and cache), its result returned."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def run() -> None:
        try:
            q.put(fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            q.put({"error": f"{type(e).__name__}: {e}"})

    p = ctx.Process(target=run)
    p.start()
    out = q.get()
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


# ---------------------------------------------------------------------------------------------------- report


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"


def _dur(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="N: training images of the small size (4N is the large)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=10.0, help="imbalance ratio of the long tail")
    ap.add_argument("--size", type=int, default=224, help="S: training side in pixels")
    ap.add_argument("--workers", type=int, default=2, help="loader workers (every method)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--feature-model", default="mobilenetv3_small_050", help="timm model (random weights)")
    ap.add_argument("--feature-images", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["cache", "stream", "torchvision"])
    ap.add_argument("--keep", default=None, help="build the data here and keep it (default: a temporary folder)")
    ap.add_argument("--data-dir", default=None, help="folder holding tiny-imagenet-200.tar.gz")
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="epoch images/s: whole epochs after the first, at least two and at least this long")
    ap.add_argument("--refs", type=int, default=1_000_000,
                    help="measure the memory of this many auxiliary references (projected to 4.2M; 0: skip)")
    ap.add_argument("--pool-per-class", type=int, default=30,
                    help="images per class of the auxiliary pool that bench/data_scale_run.yaml retrieves from")
    args = ap.parse_args(argv)

    import timm  # noqa: F401 - imported once here, inherited by every forked measuring process
    import torchvision  # noqa: F401

    from neighborlt.train.data import default_normalization

    default_normalization()
    tmp = tempfile.mkdtemp(prefix="nlt-data-scale-")
    root = Path(args.keep) if args.keep else Path(tmp) / "data"
    try:
        sets = build_sets(root, 4 * args.n, args.classes, args.ratio, args.workers, args.data_dir,
                          pool_per_class=args.pool_per_class)
        rows = []
        for kind in ("imagenet", "web"):
            for tag in ("N", "4N"):
                for method in args.methods:
                    cache = tempfile.mkdtemp(dir=tmp, prefix="cache-")
                    os.symlink(Path(os.environ.get("NEIGHBORLT_CACHE") or Path.home() / ".cache" / "neighborlt",
                                    "extracted").resolve(), Path(cache, "extracted"))
                    r = _in_child(_measure, method, sets, tag, kind, args.size, args.workers, args.batch, cache,
                                  args.min_seconds)
                    shutil.rmtree(cache, ignore_errors=True)
                    rows.append(r)
                    print(json.dumps(r))
        feats = []
        for method in ("cache", "stream"):
            cache = tempfile.mkdtemp(dir=tmp, prefix="cache-")
            feats.append(_in_child(_features, method, sets, "N", args.size, args.workers, args.batch,
                                   args.feature_model, cache, args.feature_images))
            shutil.rmtree(cache, ignore_errors=True)
        refs = _refs_memory(args.refs) if args.refs else None
        _print(rows, feats, args)
        if refs:
            per, peak = refs["bytes"] / refs["rows"], refs["peak_bytes"] / refs["rows"]
            print(f"\nWhat grows with N: the references of a {refs['rows']:,}-image auxiliary manifest hold "
                  f"{_mib(refs['bytes'])} ({per:.0f} bytes per image; {peak:.0f} at the peak while they are built), "
                  f"so {_mib(per * PAPER_IMAGES)} for {PAPER_IMAGES:,} images")
        return {"rows": rows, "features": feats, "refs": refs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print(rows: list[dict[str, Any]], feats: list[dict[str, Any]], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\nS = {args.size}, {args.workers} workers, batch {args.batch}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    by = {(r["method"], r["set"], r["size"]): r for r in rows}
    print("| set | images | method | first batch | extra disk | epoch img/s | peak memory (PSS) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {r['method']} | {r['first_batch_s']:.2f} s | {_mib(r['disk_bytes'])} | "
              f"{r['epoch_img_s']:.0f} | {r['peak_pss_mib']:.0f} MiB |")
    print("\nRatios (stream / torchvision, epoch images/s):")
    for kind in ("imagenet", "web"):
        for tag in ("N", "4N"):
            s, t = by.get(("stream", kind, tag)), by.get(("torchvision", kind, tag))
            if s and t:
                print(f"  {kind} {tag}: {s['epoch_img_s'] / t['epoch_img_s']:.2f}x")
    print(f"\nProjection to {PAPER_IMAGES:,} images (from the 4N imagenet-shaped rows):")
    print("| method | first batch | extra disk | one pass over all images |")
    print("|---|---|---|---|")
    for method in args.methods:
        r = by.get((method, "imagenet", "4N"))
        if not r:
            continue
        per = PAPER_IMAGES / r["images"]
        first = r["first_batch_s"] * per if method == "cache" else r["first_batch_s"]
        note = "" if method == "cache" else " (measured, flat in N)"
        print(f"| {method} | {_dur(first)}{note} | {_mib(r['disk_bytes'] * per)} | "
              f"{_dur(PAPER_IMAGES / r['epoch_img_s'])} |")
    if feats:
        f = {x["method"]: x for x in feats}
        print(f"\nFeature extraction ({args.feature_model}, random weights, eval view, decoding included, "
              f"{f['stream']['images']} images): cache {f['cache']['img_s']:.0f} img/s (decode all first), "
              f"stream {f['stream']['img_s']:.0f} img/s")


if __name__ == "__main__":
    main()
