"""The report's content model: a page is a list of sections, a section a list of blocks.

Blocks hold plain text and PNG bytes only; this module renders each one to HTML (:func:`html_block`) and to markdown
(:func:`markdown_block`), escaping every string, so that the page and its markdown twin share one content and no
file string (a class name above all) ever reaches the output unescaped. The small formatting helpers the sections
share (percentages, matplotlib-safe labels, PNG figures) live here too.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------- blocks


@dataclass
class Figure:
    """A PNG figure, inline in the page and written to ``figures/<name>.png`` for the markdown."""

    png: bytes
    caption: str
    name: str  # file stem under figures/ for the markdown
    alt: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] | None = None  # right-align these columns
    caption: str = ""


@dataclass
class Missing:
    """An input file that is not there, and the command that makes it."""

    what: str
    command: str


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | note | warn


@dataclass
class Details:
    """A folded block of preformatted text (a config as JSON)."""

    summary: str
    text: str


@dataclass
class Cards:
    cards: list[tuple[str, str, str]]  # label, value, sub-line


@dataclass
class Heading:
    text: str


@dataclass
class Gallery:
    """Figures side by side (contact sheets of one class), under a heading."""

    title: str
    figures: list[Figure]
    key: str = ""  # the class the sheets belong to


Block = Figure | Table | Missing | Para | Details | Cards | Heading | Gallery


@dataclass
class Section:
    """One section of a page: ``available`` is False when its inputs are missing (the table of contents says so)."""

    key: str
    title: str
    available: bool = True
    blocks: list[Block] = field(default_factory=list)

    def missing(self, what: str, command: str) -> Section:
        """Mark the section unavailable with the :class:`Missing` note (the file and the command that makes it)."""
        self.available = False
        self.blocks.append(Missing(what, command))
        return self


# --------------------------------------------------------------------------------------------- formatting


def pct(v: Any, digits: int = 1) -> str:
    """A percentage for tables ("n/a" for None / NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def delta(a: Any, b: Any) -> str:
    """``a - b`` in points with a sign ("n/a" when either is missing)."""
    if a is None or b is None:
        return "n/a"
    return f"{float(a) - float(b):+.1f}"


def mpl_text(text: Any, limit: int = 28) -> str:
    """A file string made safe for a matplotlib label: ``$`` escaped (no mathtext), shortened, one line."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def safe_stem(name: str) -> str:
    """A file-name stem from arbitrary text (figures/ in the markdown)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60] or "figure"


# --------------------------------------------------------------------------------------------- images


def figure_png(draw: Callable[[Any], None], size: tuple[float, float], dpi: int) -> bytes:
    """Render ``draw(fig)`` on a fresh Agg figure and return the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=dpi)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def png_of_file(path: Path, max_width: int = 1400) -> bytes:
    """A PNG re-encoding of an image file (any format PIL reads), at most ``max_width`` wide.

    Raises:
        OSError / ValueError: the file is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        img = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- rendering


def escape(text: Any) -> str:
    """Text for HTML content or an attribute value."""
    return html.escape(str(text), quote=True)


def md_text(text: Any) -> str:
    """Text for a markdown cell or paragraph: HTML-escaped (markdown renders entities), no pipes or newlines."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def html_block(b: Block) -> str:
    """One block as HTML (figures inline as ``data:image/png;base64``)."""
    e = escape
    if isinstance(b, Para):
        cls = "" if b.kind == "p" else f' class="{b.kind}"'
        return f"<p{cls}>{e(b.text)}</p>"
    if isinstance(b, Missing):
        return (f'<div class="missing">Not available: <strong>{e(b.what)}</strong> is missing. Make it with '
                f"<code>{e(b.command)}</code>.</div>")
    if isinstance(b, Heading):
        return f"<h3>{e(b.text)}</h3>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.alt or b.caption)}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>")
    if isinstance(b, Table):
        num = b.numeric or [False] * len(b.headers)
        head = "".join(f'<th{" class=num" if n else ""}>{e(h)}</th>' for h, n in zip(b.headers, num))
        body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{e(c)}</td>' for c, n in zip(r, num))
                       + "</tr>" for r in b.rows)
        cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
        return f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(b, Gallery):
        return (f'<div class="gallery"><h4>{e(b.title)}</h4><div class="row">'
                + "".join(html_block(f) for f in b.figures) + "</div></div>")
    if isinstance(b, Details):
        return f"<details><summary>{e(b.summary)}</summary><pre>{e(b.text)}</pre></details>"
    if isinstance(b, Cards):
        return '<div class="cards">' + "".join(
            f'<div class="card"><div class="label">{e(lab)}</div><div class="value">{e(v)}</div>'
            f'<div class="sub">{e(sub)}</div></div>' for lab, v, sub in b.cards) + "</div>"
    raise TypeError(f"unknown block {type(b).__name__}")


def markdown_block(b: Block, figure_dir: str = "figures") -> list[str]:
    """One block as markdown lines (each block ends with a blank line); figures link ``figure_dir/<name>.png``."""
    m = md_text
    if isinstance(b, Para):
        return [("> " if b.kind != "p" else "") + m(b.text), ""]
    if isinstance(b, Missing):
        return [f"> Not available: {m(b.what)} is missing. Make it with `{b.command.replace('`', '')}`.", ""]
    if isinstance(b, Heading):
        return [f"### {m(b.text)}", ""]
    if isinstance(b, Figure):
        return [f"![{m(b.alt or b.caption)}]({figure_dir}/{b.name}.png)", "", f"*{m(b.caption)}*", ""]
    if isinstance(b, Table):
        num = b.numeric or [False] * len(b.headers)
        lines = ["| " + " | ".join(m(h) for h in b.headers) + " |",
                 "|" + "|".join("---:" if n else "---" for n in num) + "|"]
        lines += ["| " + " | ".join(m(c) for c in r) + " |" for r in b.rows]
        return lines + ([""] + [m(b.caption)] if b.caption else []) + [""]
    if isinstance(b, Gallery):
        lines = [f"#### {m(b.title)}", ""]
        for f in b.figures:
            lines += [f"![{m(f.alt)}]({figure_dir}/{f.name}.png)", "", f"*{m(f.caption)}*", ""]
        return lines
    if isinstance(b, Details):
        return [f"<details><summary>{m(b.summary)}</summary>", "", "```json",
                b.text.replace("```", "'''"), "```", "", "</details>", ""]
    if isinstance(b, Cards):
        return ["| " + " | ".join(m(lab) for lab, _, _ in b.cards) + " |",
                "|" + "---:|" * len(b.cards),
                "| " + " | ".join(f"**{m(v)}** ({m(sub)})" for _, v, sub in b.cards) + " |", ""]
    raise TypeError(f"unknown block {type(b).__name__}")
