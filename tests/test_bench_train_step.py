"""Smoke test of bench/train_step.py on a tiny setting: it runs and prints one row per (model, size, threads) with
both memory formats."""

from __future__ import annotations

import subprocess
import sys

from bench_helpers import ROOT

SCRIPT = ROOT / "bench" / "train_step.py"


def test_train_step_bench_prints_both_formats() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet8_cifar", "--sizes", "16", "--threads", "1",
                           "--batch", "4", "--classes", "7", "--steps", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet8_cifar")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:3] == ["resnet8_cifar", "16", "1"]
    nchw, nhwc, ratio = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
    assert nchw > 0 and nhwc > 0 and abs(ratio - nhwc / nchw) < 0.05 * ratio + 0.01
