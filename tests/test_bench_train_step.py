"""Smoke test of bench/train_step.py on a tiny setting: one row per (model, size, threads) with both memory
formats, printed and returned."""

from __future__ import annotations

import pytest
import torch
from bench_helpers import load_bench


def test_train_step_bench_measures_both_formats(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        rows = load_bench("train_step").main(["--models", "resnet8_cifar", "--sizes", "16", "--threads", "1",
                                              "--batch", "4", "--classes", "7", "--steps", "2", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)  # the bench sets the process's thread count; later tests keep theirs
    assert [(r["model"], r["px"], r["threads"]) for r in rows] == [("resnet8_cifar", 16, 1)]
    assert rows[0]["nchw"] > 0 and rows[0]["channels_last"] > 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet8_cifar | 16 | 1 |")]
    assert len(printed) == 1 and printed[0].endswith("x |")
