"""Smoke test of bench/loss_scaling.py on a tiny problem: it runs (also re-executed with the steady malloc
settings), checks the fused loss against the naive one, and writes every figure it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_helpers import ROOT

SCRIPT = ROOT / "bench" / "loss_scaling.py"


def test_loss_scaling_smoke(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch", "16", "--classes", "60", "--reps", "5",
                           "--warmup", "1", "--device", "cpu", "--malloc", "steady", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "malloc steady" in proc.stdout and "min-of-steps wall ratios" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["C"] for r in rows] == [60]  # one size: each C costs a peak-memory subprocess (3 forked children)
    for r in rows:
        assert set(r["median_ms"]) == {"balanced_softmax", "neighbor_silencing", "naive"}
        assert all(v > 0 for v in r["median_ms"].values()) and r["ratio_ns"] > 0
        assert all(v >= 0 for v in r["peak_mib"].values())
