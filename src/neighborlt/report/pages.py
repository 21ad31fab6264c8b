"""The pages: the run report (``RUN/report/index.html`` and its markdown twin ``report.md`` with ``figures/``) and
the experiment pages of ``neighborlt ablate`` / ``pilot`` (``OUT/index.html``), each written atomically.

A page has no script and no external reference: figures are inline ``data:image/png;base64`` images, the CSS is
inline, and every string read from a file is escaped (:mod:`neighborlt.report.blocks`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeighborLTError
from ..rundir import RunDir, atomic_write_bytes, atomic_write_text
from .blocks import Figure, Gallery, Section, escape, html_block, markdown_block, md_text
from .config import ReportConfig
from .experiments import ablation_sections, pilot_sections
from .inputs import RunInputs
from .sections import build_sections

logger = logging.getLogger(__name__)

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dfe3ea; --soft: #f5f7fa; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 64px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header .meta { color: var(--muted); font-size: 13px; margin: 0 0 12px; word-break: break-all; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; margin: 14px 0; }
nav ol { margin: 0; padding-left: 20px; columns: 2; }
nav a { color: var(--accent); text-decoration: none; }
nav .na { color: var(--muted); font-size: 12px; }
section { margin-top: 34px; padding-top: 6px; border-top: 1px solid var(--line); }
h2 { font-size: 20px; margin: 10px 0 10px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
p { margin: 8px 0; max-width: 900px; }
p.note { color: var(--muted); font-size: 13.5px; }
p.warn, .missing { background: #fff6e5; border: 1px solid #f0d9a8; border-radius: 6px; padding: 8px 12px; }
.missing code, p code { background: #eef1f5; padding: 1px 5px; border-radius: 4px; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0 14px; }
.card { flex: 1 1 150px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--soft); }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card .value { font-size: 26px; font-weight: 600; }
.card .sub { font-size: 12.5px; color: var(--muted); }
figure { margin: 14px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
.tablewrap { overflow-x: auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12.5px; padding-top: 4px; }
details { margin: 6px 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px; }
summary { cursor: pointer; font-size: 14px; }
pre { font-size: 12px; background: var(--soft); padding: 10px; overflow-x: auto; border-radius: 4px; }
.gallery h4 { font-size: 14.5px; margin: 18px 0 4px; }
.gallery .row { display: flex; flex-wrap: wrap; gap: 14px; }
.gallery figure { flex: 1 1 380px; margin: 4px 0 8px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


# --------------------------------------------------------------------------------------------- rendering


def render_html(title: str, subtitle: str, sections: Sequence[Section], *, writer: str = "report") -> str:
    """The self-contained page (inline CSS and images, no script, no external reference); the footer names the
    ``neighborlt <writer>`` command that wrote it."""
    e = escape
    toc = "".join(
        f'<li><a href="#{s.key}">{e(s.title)}</a>{"" if s.available else " <span class=na>(not available)</span>"}'
        "</li>" for s in sections if s.key != "summary")
    body = []
    for s in sections:
        inner = "\n".join(html_block(b) for b in s.blocks)
        if s.key == "summary":
            body.append(f'<section id="summary" style="border-top:0;margin-top:0">{inner}</section>'
                        f"<nav><ol>{toc}</ol></nav>")
        else:
            body.append(f'<section id="{s.key}"><h2>{e(s.title)}</h2>\n{inner}</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header><h1>{e(title)}</h1><p class="meta">{e(subtitle)}</p></header>\n'
        + "\n".join(body)
        + f"\n<footer>Written by neighborlt {writer} from the files in {e(subtitle)}.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def render_markdown(title: str, subtitle: str, sections: Sequence[Section], figure_dir: str = "figures") -> str:
    """The markdown twin of the page; figures are linked from ``figure_dir`` (written by :func:`run_report`)."""
    lines = [f"# {md_text(title)}", "", f"Run: `{md_text(subtitle).replace('`', '')}`", ""]
    for s in sections:
        if s.key != "summary":
            lines += [f"## {md_text(s.title)}", ""]
        for b in s.blocks:
            lines += markdown_block(b, figure_dir)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- the run report


@dataclass
class ReportResult:
    """What :func:`run_report` wrote: the two files and, per section, whether its inputs were there."""

    html: Path
    markdown: Path
    sections: dict[str, bool]


def run_report(cfg: ReportConfig, run_dir: str | os.PathLike[str] | RunDir) -> ReportResult:
    """Write ``RUN/report/index.html`` (self-contained) and ``RUN/report/report.md`` (+ ``figures/``) for a run.

    Reads only files earlier stages wrote; a section whose inputs are missing says which command makes them, and
    a malformed input file is a warning in its section. Always rewrites the report (it is cheap); records its
    config in ``RUN/records/report.config.json``.

    Args:
        cfg: the report options.
        run_dir: the run directory.

    Returns:
        The written paths and, per section key, whether its inputs were there.

    Raises:
        NeighborLTError: the run directory does not exist.
    """
    root = Path(run_dir.root if isinstance(run_dir, RunDir) else run_dir)
    if not root.is_dir():
        raise NeighborLTError(f"{root}: run directory not found; pass the folder of a run (e.g. runs/demo)")
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    out = Path(cfg.out) if cfg.out else run.path("report")
    baseline = Path(cfg.baseline) if cfg.baseline else run.path("baseline")
    run.record("report", cfg)
    sections = build_sections(RunInputs(run, baseline), cfg)
    title = cfg.title or f"neighborlt report: {root.resolve().name}"
    subtitle = str(root.resolve())
    out.mkdir(parents=True, exist_ok=True)
    _write_figures(out / "figures", sections)
    html_path = atomic_write_text(out / "index.html", render_html(title, subtitle, sections))
    md_path = atomic_write_text(out / "report.md", render_markdown(title, subtitle, sections))
    logger.info("report: wrote %s and %s", html_path, md_path)
    return ReportResult(html=html_path, markdown=md_path, sections={s.key: s.available for s in sections[1:]})


def _figures(sections: Iterable[Section]) -> Iterable[Figure]:
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                yield b
            elif isinstance(b, Gallery):
                yield from b.figures


def _write_figures(fig_dir: Path, sections: Iterable[Section]) -> None:
    """Each figure as ``fig_dir/<name>.png`` for the markdown (a repeated name gets ``_2``, ``_3``...); the
    figures of an earlier report that this one does not have are removed."""
    names: set[str] = set()
    for f in _figures(sections):
        base, i = f.name, 1
        while f.name in names:
            i += 1
            f.name = f"{base}_{i}"
        names.add(f.name)
        atomic_write_bytes(fig_dir / f"{f.name}.png", f.png)
    if fig_dir.is_dir():
        for stale in fig_dir.glob("*.png"):
            if stale.stem not in names:
                stale.unlink()


# --------------------------------------------------------------------------------------------- experiment pages


def write_ablation_page(out_dir: str | os.PathLike[str], grids: Sequence[str], *, title: str | None = None) -> Path:
    """Write ``OUT/index.html`` for ``neighborlt ablate``: self-contained like the run report (inline CSS and PNG
    images, no script or external reference, every file string escaped), with each grid's markdown tables as HTML
    tables, its plot, the runs and the config.

    Args:
        out_dir: the experiment folder (``OUT/<grid>.md``, ``.json``, ``.png``, ``records/ablate.*``).
        grids: the grids to show, in order.
        title: the page title (default ``neighborlt ablation: <folder name>``).

    Returns:
        The path of ``OUT/index.html``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise NeighborLTError(f"{out}: experiment folder not found; run `neighborlt ablate {out}` first")
    page = render_html(title or f"neighborlt ablation: {out.resolve().name}", str(out.resolve()),
                       ablation_sections(out, grids), writer="ablate")
    return atomic_write_text(out / "index.html", page)


def write_pilot_page(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``OUT/index.html`` for ``neighborlt pilot``: the tables of ``OUT/pilot.md``, the gap-vs-ratio plot
    ``OUT/pilot.png`` and the config, self-contained like the other pages."""
    out = Path(out_dir)
    if not out.is_dir():
        raise NeighborLTError(f"{out}: experiment folder not found; run `neighborlt pilot {out}` first")
    page = render_html(f"neighborlt pilot: {out.resolve().name}", str(out.resolve()), pilot_sections(out),
                       writer="pilot")
    return atomic_write_text(out / "index.html", page)
