"""Feature extraction images/s: the chunked DataLoader path (``neighborlt.train.features.extract_model_features``,
what the filter, cRT and frozen-feature evaluation run) against the loop it replaced (decoded array, normalise on
the device, one ``[N, D]`` array saved at the end), on the CPU and, in bf16, on a GPU when one is there.

    .venv/bin/python bench/feature_throughput.py                       # offline model, CPU, real Tiny-ImageNet images
    python3 bench/feature_throughput.py --synthetic 20000 --device cuda --models efficientnet_lite0 \\
        vit_base_patch14_dinov2 --sizes 64 224 --workers 8             # on a lent GPU (random pixels, random ViT init)

Both paths start from the same decoded array (``neighborlt.data.as_array``, built before timing) and end with the
features on disk; the chunked path's figure includes its DataLoader workers, the per-chunk atomic writes and the
merge. ``--modes stream`` adds the stream view (each JPEG decoded, resized and centre-cropped in the loader:
decoding is timed there, and not in the old loop's figure). Each chunked run writes into a fresh folder, so nothing is served from the cache. Random pixels and a
randomly initialised ViT time the same arithmetic as real ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def old_extract(model, images: np.ndarray, batch_size: int, device: str, normalization, bf16: bool) -> np.ndarray:
    """The extraction loop of ``neighborlt.train.features`` before the chunked path (commit 4c991a1): batches of
    the decoded uint8 array, normalised on the device, into one in-memory ``[N, D]`` array."""
    import torch

    mean, std = normalization
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = np.empty((len(images), model.num_features), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)
            x = (batch.permute(0, 3, 1, 2).float().div_(255.0) - m) / s
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                f = model.forward_features(x)
            out[start:start + len(batch)] = f.float().cpu().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--n", type=int, default=1024, help="real Tiny-ImageNet images (CPU default)")
    ap.add_argument("--synthetic", type=int, default=0, help="N random images instead of real ones")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk (0: the library default)")
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1], help="DataLoader workers of the chunked path")
    ap.add_argument("--modes", nargs="+", default=["cache"], choices=["cache", "stream"],
                    help="views of the chunked path (stream decodes every image in the loader: decoding timed)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the old and the chunked runs this many times")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from neighborlt.data import as_array
    from neighborlt.data.base import ImageSet
    from neighborlt.train.features import CHUNK_ROWS
    from neighborlt.train.models import create_model, model_normalization

    cuda = args.device.startswith("cuda")
    bf16 = cuda and not args.fp32
    rows = args.chunk_rows or CHUNK_ROWS
    load = os.getloadavg()
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if cuda else f", {torch.get_num_threads()} threads")
          + f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min), chunk rows {rows}")
    print("| model | px | precision | images | batch | path | workers | s | images/s | vs old |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        if args.synthetic:
            rng = np.random.default_rng(0)
            arr = rng.integers(0, 256, size=(args.synthetic, size, size, 3), dtype=np.uint8)
            image_set = ImageSet(class_names=["x"], labels=np.zeros(len(arr), np.int64), array=arr)
        else:
            from neighborlt.data import load_dataset

            ds = load_dataset("tiny-imagenet", "train")
            image_set = ds.subset(np.arange(0, len(ds), max(1, len(ds) // args.n))[: args.n])
        images = as_array(image_set, size)  # decoded once, before any timing, for both paths
        for name in args.models:
            init = "pretrained" if name == "efficientnet_lite0" else "random"
            model = create_model(name, num_classes=1, init=init, image_size=size).eval().to(args.device)
            norm = model_normalization(name)
            old_extract(model, images[: args.batch_size], args.batch_size, args.device, norm, bf16)  # warm-up
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    _compare(args, model, name, init, image_set, images, size, norm, bf16, rows, Path(tmp))
    print(f"load average after: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _compare(args: argparse.Namespace, model, name: str, init: str, image_set, images: np.ndarray, size: int,
             norm, bf16: bool, rows: int, tmp: Path) -> None:
    """One old run, then one chunked run per worker count (each into a fresh folder, so nothing is cached)."""
    import torch

    from neighborlt.train.features import extract_model_features

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    feats = old_extract(model, images, args.batch_size, args.device, norm, bf16)
    np.save(tmp / "old.npy", feats)
    old = time.perf_counter() - t0
    n, prec = len(images), "bf16" if bf16 else "fp32"
    print(f"| {name} | {size} | {prec} | {n} | {args.batch_size} | old (array, one save) | - | {old:.2f} | "
          f"{n / old:,.0f} | 1.00 |", flush=True)
    for mode in args.modes:
        for w in args.workers:
            t0 = time.perf_counter()
            new = extract_model_features(model, name, image_set, size, init=init, folder=tmp / f"{mode}-w{w}",
                                         batch_size=args.batch_size, device=args.device, bf16=bf16, num_workers=w,
                                         chunk_rows=rows, data_mode=mode)
            dt = time.perf_counter() - t0
            diff = f" (max diff {float(np.abs(np.asarray(new) - feats).max()):.1e})" if mode == "cache" else ""
            print(f"| {name} | {size} | {prec} | {n} | {args.batch_size} | chunked DataLoader, {mode} | {w} | "
                  f"{dt:.2f} | {n / dt:,.0f} | {old / dt:.2f}{diff} |", flush=True)


if __name__ == "__main__":
    main()
