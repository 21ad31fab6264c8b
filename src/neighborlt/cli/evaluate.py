"""CLI for evaluation and the direct classifier: ``neighborlt eval``, ``neighborlt export``, ``neighborlt predict``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import FEW_SHOT, MANY_SHOT
from ._common import build_config, default_help

logger = logging.getLogger(__name__)


def _eh(field: str, text: str) -> str:
    from ..evaluate import EvalConfig

    return default_help(EvalConfig, field, text)


def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads RUN/export or RUN/train, writes RUN/eval).")],
    predictions: Annotated[Path | None, typer.Option(
        "--predictions", "-p",
        help="Evaluate a .npz/.csv of labels + predictions (or logits) instead of running the model.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help=_eh("model", "export: direct classifier (L rows); train: full L+K model; crt: re-trained "
                                     "classifier."))] = None,
    many: Annotated[int | None, typer.Option(
        "--many", help=f"Many-shot: more than this many training images (default: the run's, else {MANY_SHOT}).")] = None,
    few: Annotated[int | None, typer.Option(
        "--few", help=f"Few-shot: fewer than this many training images (default: the run's, else {FEW_SHOT}).")] = None,
    max_test_per_class: Annotated[int | None, typer.Option(
        "--max-test-per-class", help="Run the model on at most N test images per class (quick checks).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help=_eh("batch_size", "Inference batch size."))]
    = None,
    device: Annotated[str | None, typer.Option("--device", help=_eh("device", "Torch device: auto, cpu, cuda[:N]."))]
    = None,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Offline datasets folder [default: the one recorded in split.json].")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/eval).")] = None,
) -> None:
    """Write metrics.json, per_class.csv, report.md and per_class.png for a run."""
    from ..errors import ConfigError
    from ..evaluate import EvalConfig, run_eval

    given = {"predictions": predictions, "model": model, "many": many, "few": few, "batch_size": batch_size,
             "max_test_per_class": max_test_per_class, "device": device, "data_dir": data_dir, "out": out}
    cfg = build_config(EvalConfig, **{k: v for k, v in given.items() if v is not None})  # defaults: EvalConfig's
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory not found; pass an existing run directory")
    run_eval(cfg, run_dir)
    out_dir = Path(out) if out else run_dir / "eval"
    typer.echo((out_dir / "report.md").read_text(encoding="utf-8").rstrip())
    typer.echo(f"wrote {out_dir}")


def export_cmd(
    run_dir: Annotated[Path, typer.Argument(
        help="Run directory with train/model.safetensors and train/model.json.")],
    force: Annotated[bool, typer.Option("--force", help="Re-export even when RUN/export is up to date.")] = False,
) -> None:
    """Write RUN/export: the trained model with only the L target classifier rows (direct classifier)."""
    from ..export import export_direct, read_model_info

    out = export_direct(run_dir, force=force)
    info = read_model_info(out)
    dropped = len(info.get("direct_classifier", {}).get("dropped_classes", []))
    typer.echo(f"{out}: {info['num_classes']} target classes kept, {dropped} auxiliary classes dropped")


def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(
        help="Run directory (uses RUN/export, else RUN/train with its auxiliary rows masked) or a model folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (decoded in memory; no cache is written).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes per image.")] = 5,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the predictions (.json or .csv).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inference batch size.")] = 64,
    device: Annotated[str, typer.Option("--device", help="Torch device: auto, cpu, cuda[:N].")] = "auto",
) -> None:
    """Print the top-k target classes of each image with the exported direct classifier (Python:
    ``neighborlt.load(RUN).predict(images, top_k)``)."""
    import csv
    import io

    from ..errors import ConfigError
    from ..export import predict_images
    from ..rundir import atomic_write_json, atomic_write_text

    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise ConfigError(f"--output {output}: use a .json or .csv file name")
    rows = predict_images(run_dir, images, top_k=top_k, batch_size=batch_size, device=device)
    for r in rows:
        tops = ", ".join(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top"])
        typer.echo(f"{r['path']}\t{tops}")
    if output is not None:
        if output.suffix.lower() == ".json":
            atomic_write_json(output, {"schema": 1, "predictions": rows})
        else:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path", "rank", "index", "name", "probability"])
            for r in rows:
                for rank, t in enumerate(r["top"], start=1):
                    w.writerow([r["path"], rank, t["index"], t["name"], f"{t['probability']:.6f}"])
            atomic_write_text(output, buf.getvalue())
        typer.echo(f"wrote {output}")


def register(app: typer.Typer) -> None:
    """Mount ``eval``, ``export`` and ``predict`` on the root app."""
    app.command("eval")(eval_cmd)
    app.command("export")(export_cmd)
    app.command("predict")(predict_cmd)

