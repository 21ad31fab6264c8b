"""The filter's contact sheets: ``RUN/filter/sheets/<stem>_kept.png`` and ``<stem>_rejected.png``, a grid of drafted
thumbnails per class, each rejected image labelled with the rule that dropped it. The report finds a class's sheets
by :func:`sheet_stem`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .candidates import Candidates

logger = logging.getLogger(__name__)

_TILE, _PAD, _COLS, _HEAD = 96, 4, 8, 22  # a grid of drafted thumbnails drawn with PIL (matplotlib: 3 s a sheet)


def sheet_stem(name: str) -> str:
    """The file-name stem of a class's contact sheets (``sheets/<stem>_kept.png`` / ``<stem>_rejected.png``); the
    report finds a class's sheets by it."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60] or "class"


def write_contact_sheets(c: Candidates, folder: Path, pool: Any, root: Path, *, classes: int, images: int) -> None:
    """Kept and rejected sheets of the first ``classes`` classes that have rejections (other than failed
    downloads), else the first classes; at most ``images`` downloaded images per sheet, in manifest order.

    Args:
        c: the candidates after every rule.
        folder: where the sheets go (created).
        pool: the protocol's pool (for ``pool`` rows).
        root: the run directory (shard paths are relative to it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    per = c.by_class(list(range(len(c))))
    with_rejections = [n for n, idx in per.items()
                       if any(c.decision[i] and c.decision[i] != "downloaded" for i in idx)]
    names = (with_rejections + [n for n in per if n not in with_rejections])[:classes]
    for name in names:
        for kind in ("kept", "rejected"):
            _sheet(c, per[name], name, kind, folder, pool, root, images)


def _sheet(c: Candidates, rows: list[int], name: str, kind: str, folder: Path, pool: Any, root: Path,
           images: int) -> None:
    from PIL import Image, ImageDraw

    from ..data.auxiliary import rows_image_set
    from ..data.pixels import decode
    from ..rundir import atomic_output

    tile, pad, cols, head = _TILE, _PAD, _COLS, _HEAD
    wanted = [i for i in rows if (not c.decision[i]) == (kind == "kept")]
    idx = [i for i in wanted if c.status[i] == "ok"][:images]
    label_h = 14 if kind == "rejected" else 0  # the rule that dropped each image, under it
    nrow = max(1, (len(idx) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, head + nrow * (tile + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), f"{name}: {kind} ({len(wanted)})", fill="black")
    if idx:
        refs = rows_image_set(c.rows(idx), pool, root, size=64)
        for n, i in enumerate(idx):
            x = pad + (n % cols) * (tile + pad)
            y = head + (n // cols) * (tile + label_h + pad)
            try:  # a drafted thumbnail, as the report shows it
                sheet.paste(Image.fromarray(decode(refs.ref(n), tile, policy="center", crop_pct=1.0)), (x, y))
            except Exception as e:  # noqa: BLE001 - a broken image is shown as a blank tile
                logger.debug("contact sheet: %s", e)
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline="#999")
            if label_h:
                draw.text((x + 2, y + tile + 1), str(c.decision[i])[:16], fill="#b00")
    with atomic_output(folder / f"{sheet_stem(name)}_{kind}.png") as tmp:
        sheet.save(tmp, format="PNG")


__all__ = ["sheet_stem", "write_contact_sheets"]
