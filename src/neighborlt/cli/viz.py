"""CLI for the figures: ``neighborlt viz RUN [--figure umap --figure pca_rgb --figure samples_per_class]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..viz import FIGURES, VizConfig
from ._common import build_config


def _h(field: str, text: str) -> str:
    f = VizConfig.model_fields[field]
    default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
    return f"{text} (default: {default})"


def viz_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained and evaluated run directory (writes viz/).")],
    figure: Annotated[list[str] | None, typer.Option(
        "--figure", help=_h("figures", f"Figure to draw: {' | '.join(FIGURES)}; repeatable."))] = None,
    pairs: Annotated[int | None, typer.Option(
        "--pairs", help=_h("pairs", "Most-confused head/tail pairs in the UMAP."))] = None,
    per_class: Annotated[int | None, typer.Option(
        "--per-class", help=_h("per_class", "Images per shown class."))] = None,
    pca_images: Annotated[int | None, typer.Option(
        "--pca-images", help=_h("pca_images", "Tail-class test images in the PCA-RGB figure."))] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help=_h("batch_size", "Images per inference batch."))] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=_h("seed", "UMAP random state."))] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Offline data folder.")] = None,
) -> None:
    """Draw the paper's figures for a run: UMAP of confused head/tail pairs (Fig. 2/9), PCA-RGB of ViT patch tokens
    (Fig. 5), samples per class with and without auxiliary data (Fig. 7); PNGs under RUN/viz/."""
    from ..errors import ConfigError
    from ..viz import run_viz

    fields = {k: v for k, v in {"figures": figure, "pairs": pairs, "per_class": per_class, "pca_images": pca_images,
                                "batch_size": batch_size, "seed": seed, "data_dir": data_dir}.items() if v is not None}
    cfg = build_config(VizConfig, repeated={"figures": "--figure"}, **fields)
    result = run_viz(cfg, run_dir)
    for name, path in result.figures.items():
        typer.echo(f"{path} ({result.seconds[name]:.1f} s)")
    for name, why in result.skipped.items():
        typer.echo(f"{name}: skipped: {why}", err=True)
    if not result.figures:
        raise ConfigError("; ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "no figure drawn")


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt viz``."""
    app.command("viz")(viz_cmd)
