"""The sections of the experiment pages (``neighborlt ablate`` / ``pilot``: ``OUT/index.html``): the tables of their
markdown files, their plots, and the config they ran with."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .blocks import Block, Details, Figure, Heading, Missing, Para, Section, Table, png_of_file, safe_stem
from .inputs import maybe_json


def markdown_blocks(md: str) -> list[Block]:
    """The blocks of a grid's markdown (``OUT/<grid>.md``): ``### `` headings, ``| `` tables (the ``|---|`` rule
    dropped; numeric-looking columns right-aligned), ``* `` bullets and paragraphs, all kept as plain text."""
    blocks: list[Block] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            raw = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                raw.append(lines[i].strip())
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in raw]
            cells = [r for r in cells if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            if cells:
                head, body = cells[0], cells[1:]
                numeric = [bool(body) and all(re.fullmatch(r"[–\-+]?[\d.]+( ± [\d.]+)?|–|n/a", r[j]) is not None
                                              for r in body if j < len(r)) for j in range(len(head))]
                blocks.append(Table(head, body, numeric))
            continue
        if line.startswith("#"):
            blocks.append(Heading(line.lstrip("#").strip()))
        elif line.startswith(("* ", "- ")):
            blocks.append(Para("• " + line[2:]))
        elif line:
            blocks.append(Para(line))
        i += 1
    return blocks


def provenance_section(out: Path, command: str) -> Section:
    """The config of an experiment folder (``OUT/records/<command>.config.json``) and the versions it ran with."""
    cfg = maybe_json(out / "records" / f"{command}.config.json") or {}
    prov = Section("provenance", "Config and provenance")
    if cfg:
        env = maybe_json(out / "records" / f"{command}.env.json") or {}
        pk = env.get("packages") or {}
        prov.blocks.append(Table(["field", "value"], [
            ["git commit", str(env.get("git_commit") or "n/a")], ["recorded", str(env.get("time", ""))],
            ["python", str(env.get("python", ""))], ["platform", str(env.get("platform", ""))]]
            + [[f"package {k}", str(v)] for k, v in pk.items()]))
        prov.blocks.append(Details(f"{command} config (records/{command}.config.json)",
                                   json.dumps(cfg, indent=2, ensure_ascii=False)))
    else:
        prov.available = False
        prov.blocks.append(Missing(f"OUT/records/{command}.config.json", f"neighborlt {command} OUT"))
    return prov


def ablation_sections(out_dir: str | os.PathLike[str], grids: Sequence[str]) -> list[Section]:
    """The sections of the ablation page: a summary, one section per grid (its table(s) from ``OUT/<grid>.md``
    and the plot ``OUT/<grid>.png`` inline), the runs, and the config with its provenance."""
    out = Path(out_dir)
    cfg = maybe_json(out / "records" / "ablate.config.json") or {}
    sections = [_grid_section(out, grid) for grid in grids]
    runs = _grid_runs(out, grids)
    if runs:
        rows = [[name, ", ".join(r["grids"]), ", ".join(sorted(r["seeds"], key=lambda s: (len(s), s))),
                 f"{r['wall']:.0f}" if isinstance(r["wall"], (int, float)) and not math.isnan(r["wall"]) else "–",
                 f"runs/{name}/seed<S>/"] for name, r in sorted(runs.items())]
        sections.append(Section("runs", "Runs", True, [
            Para("Each distinct training run of the grids, trained once per seed (rows of several grids share it)."),
            Table(["run", "grids", "seeds", "train s/run", "folder"], rows, [False, False, False, True, False])]))
    sections.append(provenance_section(out, "ablate"))
    facts = []
    if cfg:
        tr = cfg.get("train") or {}
        facts.append(f"protocol {cfg.get('protocol')}, model {tr.get('model', 'resnet32_cifar')}"
                     f"{' (frozen features)' if tr.get('frozen') else ''}, {tr.get('epochs', '?')} epochs, seeds "
                     f"{', '.join(map(str, cfg.get('seeds') or []))}, auxiliary relation {cfg.get('relation')}")
    facts.append(f"{len(grids)} grid{'s' if len(grids) != 1 else ''} ({', '.join(grids)}), {len(runs)} distinct runs")
    summary = Section("summary", "Summary", True, [
        Para("; ".join(facts) + "."),
        Para("Top-1 accuracy (%) on the target classes, mean ± std over seeds; Δ is the paired same-seed difference "
             "to each grid's first row. The same tables are in OUT/<grid>.md and OUT/<grid>.json.", "note")])
    return [summary, *sections]


def _grid_section(out: Path, grid: str) -> Section:
    """One grid: the tables of ``OUT/<grid>.md`` and its plot ``OUT/<grid>.png``."""
    sec = Section(f"grid-{safe_stem(grid)}", f"Grid {grid}")
    md_path, png_path = out / f"{grid}.md", out / f"{grid}.png"
    if md_path.is_file():
        sec.blocks += markdown_blocks(md_path.read_text(encoding="utf-8"))
    else:
        sec.available = False
        sec.blocks.append(Missing(f"OUT/{grid}.md", f"neighborlt ablate OUT --grid {grid}"))
    if png_path.is_file():
        try:
            sec.blocks.append(Figure(png_of_file(png_path), f"{grid}: top-1 accuracy (%) by split, mean ± std "
                                     "over seeds", f"ablate_{safe_stem(grid)}", f"{grid} plot"))
        except (OSError, ValueError) as e:
            sec.blocks.append(Para(f"{png_path.name}: cannot read the plot ({e})", "warn"))
    return sec


def _grid_runs(out: Path, grids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The distinct training runs of the grids (``OUT/<grid>.json`` rows): run name -> its grids, seeds and wall
    time."""
    runs: dict[str, dict[str, Any]] = {}
    for grid in grids:
        doc = maybe_json(out / f"{grid}.json")
        for row in (doc or {}).get("rows", []) if isinstance(doc, dict) else []:
            r = runs.setdefault(str(row.get("run")), {"grids": [], "seeds": set(), "wall": row.get("wall_s_mean")})
            if grid not in r["grids"]:
                r["grids"].append(grid)
            r["seeds"].update(str(s) for s in (row.get("seeds") or {}))
    return runs


def pilot_sections(out_dir: str | os.PathLike[str]) -> list[Section]:
    """The sections of the pilot page: the tables of ``OUT/pilot.md``, the gap-vs-ratio plot ``OUT/pilot.png``, the
    largest superclasses, and the config with its provenance."""
    out = Path(out_dir)
    sec = Section("pilot", "Head-tail gap by granularity")
    md_path, png_path = out / "pilot.md", out / "pilot.png"
    if md_path.is_file():
        sec.blocks += markdown_blocks(md_path.read_text(encoding="utf-8"))
    else:
        sec.available = False
        sec.blocks.append(Missing("OUT/pilot.md", "neighborlt pilot OUT"))
    if png_path.is_file():
        try:
            sec.blocks.append(Figure(png_of_file(png_path), "head − tail accuracy gap against the imbalance ratio, "
                                     "one line per number of superclasses (mean ± std over seeds)", "pilot_gap",
                                     "pilot plot"))
        except (OSError, ValueError) as e:
            sec.blocks.append(Para(f"{png_path.name}: cannot read the plot ({e})", "warn"))
    groups = maybe_json(out / "superclasses.json")
    if isinstance(groups, dict) and isinstance(groups.get("group_sizes"), dict):
        names = groups.get("group_names") or {}
        rows = [[str(names.get(g, g)), str(g), str(n)] for g, n in list(groups["group_sizes"].items())[:20]]
        sec.blocks.append(Para(f"The dataset's classes fall into {groups.get('groups')} superclasses; the 20 largest "
                               "(OUT/superclasses.json lists all, and the classes of every sample):", "note"))
        sec.blocks.append(Table(["superclass", "id", "classes"], rows, [False, False, True]))
    return [sec, provenance_section(out, "pilot")]
