"""Forward+backward time and peak memory of NeighborSilencingCE against BalancedSoftmaxCE.

Setting (issue 5): batch B = 512, C in {1000, 10000, 28522} classes = L targets + 5 auxiliary neighbours per
target (L = C // 6; the remaining classes are auxiliary), lambda_s = 0.1, labels uniform over all C classes.
A third row, ``naive``, is the straightforward implementation that materialises a log(lambda)-masked copy of
the adjusted logits per batch and runs ``F.cross_entropy`` on it (what the fused autograd function avoids).

Time: the median (and min) of ``--reps`` forward+backward steps per loss after warm-up, run in blocks of 5
consecutive steps that rotate over the losses. On CPU, glibc's malloc by default returns freed B x C buffers to
the OS and page-faults them in again on the next step, depending on its adaptive thresholds; that swings the
medians between runs (Balanced Softmax at C = 1,000: 1.1 to 1.5 ms on an idle machine). ``--malloc steady``
re-runs the script with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised so that freed buffers are
reused (the steady state of a long training loop), which times the arithmetic alone. Peak memory: on CPU
the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over one step, in a
fresh process per (C, loss) (a child forked, before any step ran, from one subprocess per C that imported torch)
with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident set;
on CUDA ``torch.cuda.max_memory_allocated`` over one step. Both count the step's own buffers above the inputs.

Usage::

    .venv/bin/python bench/loss_scaling.py                       # CPU (and CUDA when present)
    .venv/bin/python bench/loss_scaling.py --threads 2 --reps 30 --device cpu
    .venv/bin/python bench/loss_scaling.py --malloc steady --reps 100 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

# glibc malloc tunables: buffers up to 1 GiB come from the heap and the heap is never trimmed below 4 GiB
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def _reexec_steady(args: list[str]) -> None:
    """Replace this process by the script run again with :data:`STEADY_MALLOC` in its environment (glibc reads the
    tunables at start-up); a no-op once they are set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != STEADY_MALLOC["MALLOC_MMAP_THRESHOLD_"]:
        script = os.path.abspath(__file__)
        os.execve(sys.executable, [sys.executable, script, *args], {**os.environ, **STEADY_MALLOC})


if __name__ == "__main__" and ("--malloc=steady" in sys.argv or "--malloc steady" in " ".join(sys.argv)):
    _reexec_steady(sys.argv[1:])  # before torch is imported: the re-executed script would import it again (seconds)

import numpy as np
import torch
import torch.nn.functional as F

from neighborlt.losses import BalancedSoftmaxCE, NeighborSilencingCE

LOSS_NAMES = ("balanced_softmax", "neighbor_silencing", "naive")


def problem(c: int, per_target: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Long-tailed target counts (500 -> 5), auxiliary counts 50, and (target, auxiliary) pairs."""
    n_target = c // (per_target + 1)
    pairs = np.stack([np.repeat(np.arange(n_target), per_target), n_target + np.arange(n_target * per_target)], 1)
    counts = np.concatenate([np.geomspace(500, 5, n_target).round(), np.full(c - n_target, 50.0)])
    return counts, pairs


class NaiveNeighborSilencing(torch.nn.Module):
    """Reference implementation: CE on a copy of ``z + log n`` with ``log lambda`` added at the neighbour entries."""

    def __init__(self, counts: np.ndarray, pairs: np.ndarray, lambda_s: float) -> None:
        super().__init__()
        fused = NeighborSilencingCE(counts, neighbor_pairs=pairs, lambda_s=lambda_s)
        self.register_buffer("log_counts", fused.log_counts.float())
        self.register_buffer("index", fused.neighbor_index[:, 1:])
        self.register_buffer("mask", fused.neighbor_logw[:, 1:].float())  # log λs at neighbours, 0 on padding

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = logits + self.log_counts
        a = a.scatter_add(1, self.index[target], self.mask[target])  # the weighted copy of the logits
        return F.cross_entropy(a, target)


def build(name: str, counts: np.ndarray, pairs: np.ndarray, lambda_s: float, device: str) -> torch.nn.Module:
    if name == "balanced_softmax":
        loss: torch.nn.Module = BalancedSoftmaxCE(counts)
    elif name == "neighbor_silencing":
        loss = NeighborSilencingCE(counts, neighbor_pairs=pairs, lambda_s=lambda_s)
    else:
        loss = NaiveNeighborSilencing(counts, pairs, lambda_s)
    return loss.to(device)


def inputs(b: int, c: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    return z, y


def step_fn(loss: torch.nn.Module, z: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        z.grad = None
        loss(z, y).backward()

    return step


def time_losses(b: int, c: int, lambda_s: float, device: str, reps: int, warmup: int, block: int = 5
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Block-interleaved timing of one forward+backward step per loss.

    Returns:
        (wall seconds, process CPU seconds) per step and loss. On a shared CPU the CPU time is the robust
        figure: it leaves out the time the process waited for a core.
    """
    counts, pairs = problem(c)
    z, y = inputs(b, c, device)
    losses = {n: build(n, counts, pairs, lambda_s, device) for n in LOSS_NAMES}
    with torch.no_grad():  # the fused and the naive implementation compute the same loss
        fused, naive = losses["neighbor_silencing"](z, y).item(), losses["naive"](z, y).item()
    if not np.isclose(fused, naive, rtol=1e-5):
        raise SystemExit(f"C={c}: fused loss {fused} differs from the naive one {naive}")
    steps = {n: step_fn(loss, z, y) for n, loss in losses.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for s in steps.values():
            s()
    sync()
    times: dict[str, list[float]] = {n: [] for n in LOSS_NAMES}
    cpu: dict[str, list[float]] = {n: [] for n in LOSS_NAMES}
    # blocks of `block` consecutive steps per loss, the blocks rotating over the losses: each loss runs in its
    # own steady state (allocator, caches) while slow drifts of a shared machine's load hit all losses alike
    for r in range(0, reps, block):
        for n, s in steps.items():
            s()  # re-warm after the other losses
            sync()
            for _ in range(min(block, reps - r)):
                t0, c0 = time.perf_counter(), time.process_time()
                s()
                sync()
                times[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    return times, cpu


def _rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        status = f.read()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
            int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))  # type: ignore[union-attr]


def peak_memory_here(name: str, b: int, c: int, lambda_s: float, device: str) -> float:
    """Peak extra memory (MiB) of one forward+backward step above the inputs, measured in this process."""
    counts, pairs = problem(c)
    z, y = inputs(b, c, device)
    step = step_fn(build(name, counts, pairs, lambda_s, device), z, y)
    step()  # warm-up: one-time allocations (grad buffer layout, kernels)
    z.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    _, rss0 = _rss_kib()
    step()
    hwm, _ = _rss_kib()
    return (hwm - rss0) / 1024


def peak_memory_forked(names: list[str], b: int, c: int, lambda_s: float) -> dict[str, float]:
    """:func:`peak_memory_here` (CPU) of each loss in its own child forked from this process: every child starts
    from the state after the imports, so no earlier step leaves resident buffers (one torch import for all)."""
    out: dict[str, float] = {}
    for name in names:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, exit without running the parent's code
            code = 1
            try:
                os.close(r)
                os.write(w, repr(peak_memory_here(name, b, c, lambda_s, "cpu")).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not text:
            raise SystemExit(f"C={c}: the peak-memory child of {name} failed (wait status {status})")
        out[name] = float(text)
    return out


def peak_memory(names: list[str], b: int, c: int, lambda_s: float, device: str, threads: int) -> dict[str, float]:
    """Peak extra memory (MiB) of one step per loss: on CPU each in a fresh process (:func:`peak_memory_forked`, in
    a subprocess that has run no step) so earlier steps leave no resident buffers."""
    if device.startswith("cuda"):
        return {n: peak_memory_here(n, b, c, lambda_s, device) for n in names}
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    code = (f"import torch, sys, json; torch.set_num_threads({threads}); "
            f"sys.path.insert(0, {os.path.dirname(__file__)!r}); import loss_scaling as m; "
            f"print(json.dumps(m.peak_memory_forked({list(names)!r}, {b}, {c}, {lambda_s})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 10000, 28522])
    ap.add_argument("--lambda-s", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, plus CUDA when available")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--malloc", choices=["default", "steady"], default="default",
                    help="steady: re-run with glibc malloc thresholds raised so freed buffers are reused (see above)")
    args = ap.parse_args(argv)
    if args.malloc == "steady":  # run as a script, this happened above before torch's import (any spelling aside)
        _reexec_steady(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            ap.error("--device cuda but torch.cuda.is_available() is False")
        devices.remove("cuda")

    rows = []
    header = (f"{'device':<22} {'C':>6} | {'wall Bal ms':>11} {'NS ms':>8} {'NS/Bal':>7} {'naive/Bal':>9} | "
              f"{'CPU Bal ms':>10} {'NS ms':>8} {'NS/Bal':>7} {'naive/Bal':>9} | {'Bal MiB':>7} {'NS MiB':>7} "
              f"{'naive MiB':>9}")
    print(f"B={args.batch}, 5 auxiliary neighbours per target, lambda_s={args.lambda_s}, torch {torch.__version__}, "
          f"CPU threads {args.threads}, malloc {args.malloc}; medians of {args.reps} forward+backward steps "
          "(blocks of 5, rotating); "
          f"wall = elapsed, CPU = process CPU time; MiB = peak extra memory of one step")
    print(header)
    print("-" * len(header))
    for device in devices:
        dev_name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x{args.threads}"
        for c in args.classes:
            wall, cpu = time_losses(args.batch, c, args.lambda_s, device, args.reps, args.warmup)
            med = {n: statistics.median(t) * 1e3 for n, t in wall.items()}
            cmed = {n: statistics.median(t) * 1e3 for n, t in cpu.items()}
            mins = {n: min(t) * 1e3 for n, t in wall.items()}
            mem = peak_memory(list(LOSS_NAMES), args.batch, c, args.lambda_s, device, args.threads)
            row = {"device": dev_name, "C": c, "B": args.batch, "median_ms": med, "min_ms": mins,
                   "cpu_median_ms": cmed, "peak_mib": mem,
                   "ratio_ns": med["neighbor_silencing"] / med["balanced_softmax"],
                   "ratio_naive": med["naive"] / med["balanced_softmax"],
                   "cpu_ratio_ns": cmed["neighbor_silencing"] / cmed["balanced_softmax"],
                   "cpu_ratio_naive": cmed["naive"] / cmed["balanced_softmax"]}
            rows.append(row)
            print(f"{dev_name:<22} {c:>6} | {med['balanced_softmax']:>11.2f} {med['neighbor_silencing']:>8.2f} "
                  f"{row['ratio_ns']:>6.2f}x {row['ratio_naive']:>8.2f}x | {cmed['balanced_softmax']:>10.2f} "
                  f"{cmed['neighbor_silencing']:>8.2f} {row['cpu_ratio_ns']:>6.2f}x {row['cpu_ratio_naive']:>8.2f}x | "
                  f"{mem['balanced_softmax']:>7.1f} {mem['neighbor_silencing']:>7.1f} {mem['naive']:>9.1f}",
                  flush=True)
    print("min-of-steps wall ratios NS/Bal: " + ", ".join(
        f"{r['device']} C={r['C']}: {r['min_ms']['neighbor_silencing'] / r['min_ms']['balanced_softmax']:.2f}x"
        for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
