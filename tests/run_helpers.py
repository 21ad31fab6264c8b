"""Helpers of the tests that check what a re-run writes again (file times, not callbacks that fire either way)."""

from __future__ import annotations

from pathlib import Path


def train_mtimes(out: Path) -> dict[str, int]:
    """mtimes of every grid run's weights, model.json and completion marker (a re-train rewrites all three)."""
    files = [*out.glob("runs/*/seed*/train/model.safetensors"), *out.glob("runs/*/seed*/train/model.json"),
             *out.glob("runs/*/seed*/records/train.done.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def mtimes(root: Path, *names: str) -> dict[str, int]:
    """mtimes of ``names`` (paths relative to ``root``) that exist."""
    return {n: (root / n).stat().st_mtime_ns for n in names if (root / n).is_file()}


def run_cli(args: list[str]) -> int:
    """``neighborlt ARGS`` in this process (no second torch import): its exit status."""
    from neighborlt.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
