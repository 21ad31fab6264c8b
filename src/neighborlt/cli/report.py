"""CLI for the run report: ``neighborlt report RUN [--out DIR]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import build_config


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads what earlier stages wrote).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/report).")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="Baseline run directory to compare with (default RUN/baseline).")] = None,
    title: Annotated[str | None, typer.Option("--title", help="Page title.")] = None,
    max_sheets: Annotated[int, typer.Option("--max-sheets", help="Embed at most this many contact sheets.")] = 40,
) -> None:
    """Write RUN/report/index.html (self-contained: inline images and CSS, no script) and RUN/report/report.md."""
    from ..report import ReportConfig, run_report

    cfg = build_config(ReportConfig, out=out, baseline=baseline, title=title, max_sheets=max_sheets)
    res = run_report(cfg, run_dir)
    missing = [k for k, ok in res.sections.items() if not ok]
    if missing:
        typer.echo(f"sections without their inputs: {', '.join(missing)} (the page says which command makes them)")
    typer.echo(f"wrote {res.html}")
    typer.echo(f"wrote {res.markdown}")


def register(app: typer.Typer) -> None:
    """Mount ``report`` on the root app."""
    app.command("report")(report_cmd)
