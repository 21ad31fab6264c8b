"""Feature extraction images/s of the filter stage's models (``neighborlt.train.features._extract``, the loop the
filter and the frozen-feature protocol use), on the CPU and on a GPU in bf16 when one is there.

    .venv/bin/python bench/feature_throughput.py                       # offline model, CPU, real Tiny-ImageNet images
    python3 bench/feature_throughput.py --synthetic 20000 --device cuda --models efficientnet_lite0 \\
        vit_base_patch14_dinov2 --sizes 64 224                         # on a lent GPU (random pixels, random ViT init)

Random pixels and a randomly initialised ViT time the same arithmetic as real ones (the weights' values do not
change the work). Decoding is not timed: the images are decoded once (``neighborlt.data.as_array``) before.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--n", type=int, default=2000, help="real Tiny-ImageNet images (CPU default)")
    ap.add_argument("--synthetic", type=int, default=0, help="N random images instead of real ones")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    from neighborlt.train.features import _extract
    from neighborlt.train.models import create_model, model_normalization

    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device.startswith("cuda") else
             f", {torch.get_num_threads()} threads"))
    print("| model | px | precision | images | batch | s | images/s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        if args.synthetic:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, size=(args.synthetic, size, size, 3), dtype=np.uint8)
        else:
            from neighborlt.data import as_array, load_dataset

            ds = load_dataset("tiny-imagenet", "train")
            images = as_array(ds.subset(np.arange(0, len(ds), max(1, len(ds) // args.n))[: args.n]), size)
        for name in args.models:
            init = "pretrained" if name == "efficientnet_lite0" else "random"
            model = create_model(name, num_classes=1, init=init, image_size=size).eval().to(args.device)
            bf16 = args.device.startswith("cuda") and not args.fp32
            norm = model_normalization(name)
            _extract(model, images[: args.batch_size], args.batch_size, args.device, norm, bf16=bf16)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _extract(model, images, args.batch_size, args.device, norm, bf16=bf16)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"| {name} | {size} | {'bf16' if bf16 else 'fp32'} | {len(images)} | {args.batch_size} | "
                  f"{dt:.2f} | {len(images) / dt:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
