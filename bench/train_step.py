"""Training step images/s (forward + backward + optimizer step) of the fine-tuning models, NCHW against
``--channels-last`` (``TrainConfig.channels_last``), per thread count.

    .venv/bin/python bench/train_step.py                                     # EfficientNet-Lite0 64 px, ResNet-8 32 px
    .venv/bin/python bench/train_step.py --models efficientnet_lite0 --sizes 64 --threads 1 2 --steps 20

The step is the engine's: the model from ``create_model`` (offline pretrained weights for EfficientNet-Lite0),
channels-last applied to the weights only (as the engine does: inputs stay NCHW), AdamW, cross-entropy over
``--classes`` outputs, random pixels (the values do not change the work). The median of ``--steps`` timed steps
after ``--warmup`` untimed ones; data loading and augmentation are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time


def step_rate(model_name: str, size: int, threads: int, channels_last: bool, *, batch: int, classes: int,
              steps: int, warmup: int) -> float:
    """Median images/s of one training step."""
    import torch

    from neighborlt.train.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    init = "pretrained" if model_name == "efficientnet_lite0" else "random"
    model = create_model(model_name, num_classes=classes, init=init, image_size=size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, classes, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, float | int | str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet8_cifar"])
    ap.add_argument("--sizes", nargs="+", type=int, default=None,
                    help="input sides in px (default: 64 for efficientnet_lite0, 32 for the CIFAR ResNets)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=186, help="outputs (Tiny-ImageNet-LT-neighbours: 100 + 86)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    print(f"torch {torch.__version__}, CPU, batch {args.batch}, {args.classes} classes, median of {args.steps} steps")
    print("| model | px | threads | NCHW images/s | channels-last images/s | speed-up |")
    print("|---|---|---|---|---|---|")
    rows: list[dict[str, float | int | str]] = []
    for name in args.models:
        for size in args.sizes or [64 if name == "efficientnet_lite0" else 32]:
            for threads in args.threads:
                kw = {"batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup}
                nchw = step_rate(name, size, threads, False, **kw)
                nhwc = step_rate(name, size, threads, True, **kw)
                rows.append({"model": name, "px": size, "threads": threads, "nchw": nchw, "channels_last": nhwc})
                print(f"| {name} | {size} | {threads} | {nchw:.0f} | {nhwc:.0f} | {nhwc / nchw:.2f}x |", flush=True)
    return rows


if __name__ == "__main__":
    main()
