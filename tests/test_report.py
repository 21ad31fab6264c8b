"""The run report (``neighborlt report``): a real small run (conftest ``tiny_run``: the pipeline on a tiny CIFAR-10
protocol, with a synthetic acquisition funnel and contact sheets), the self-contained page, escaping, missing inputs,
where the test images go, and the page rendered in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neighborlt.errors import NeighborLTError
from neighborlt.evaluate import where_predictions
from neighborlt.report import ReportConfig, run_report

HOSTILE = '<script>alert("x")</script>'
HOSTILE_TARGET = "cat $\\alpha$ <b>&"  # a target class name with mathtext and HTML in it
STAGES = ["candidates", "downloaded", "caption", "band", "leak", "dedup", "cap", "kept"]


def _write_funnel(run: Path) -> None:
    """A funnel.json in the retrieve/filter schema and contact sheets, with a hostile class name (replacing what the
    pipeline's filter stage wrote, so that the page's content is known)."""
    rng = np.random.default_rng(0)
    sheets = run / "filter" / "sheets"
    shutil.rmtree(sheets, ignore_errors=True)
    sheets.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(["lynx", HOSTILE, "brig"]):
        row, v = {"name": name, "parents": ["cat" if i != 2 else "airplane"]}, 120 - 10 * i
        for s in STAGES:
            row[s] = v
            v = int(v * 0.8)
        rows.append(row)
    doc = {"schema": 1, "stages": STAGES, "total": {s: sum(r[s] for r in rows) for s in STAGES}, "per_class": rows,
           "rules": {"band": [0.25, 0.75], "cap": 50, "caption": f"names {HOSTILE}"}}
    (run / "filter" / "funnel.json").write_text(json.dumps(doc))
    for stem in ("lynx_kept", "lynx_rejected", "script_alert_x_script_kept", "script_alert_x_script_rejected",
                 "<b>stray_kept"):  # the filter stage's file names (class slugs), and one that matches no class
        Image.fromarray(rng.integers(0, 255, (60, 200, 3), dtype=np.uint8)).save(sheets / f"{stem}.png")


@pytest.fixture(scope="module")
def report_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A copy of the session's tiny finished pipeline run (conftest ``tiny_run``: method + baseline, training curves
    with test accuracy, where.json) with a synthetic funnel, and a hostile target class name in classes.json /
    per_class.csv."""
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("report_run") / "run"))
    shutil.copytree(run / "report", run / "pipeline_report")  # the page run_pipeline wrote, on the real funnel
    from neighborlt.viz import VizConfig, run_viz

    drawn = run_viz(VizConfig(figures=["samples_per_class"], data_dir=str(data_dir)), run)  # the viz section's input
    assert set(drawn.figures) == {"samples_per_class"}, drawn.skipped
    _write_funnel(run)
    classes = json.loads((run / "classes.json").read_text())
    classes["classes"][0]["name"] = HOSTILE_TARGET
    (run / "classes.json").write_text(json.dumps(classes))
    csv_path = run / "eval" / "per_class.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")
    first[1] = '"' + HOSTILE_TARGET + '"'
    csv_path.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    return run


@pytest.fixture(scope="module")
def report(report_run: Path) -> Path:
    res = run_report(ReportConfig(), report_run)
    assert res.html == report_run / "report" / "index.html" and res.markdown.is_file()
    assert all(res.sections.values()), res.sections  # every input exists in this run
    return res.html


def _img_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_page_is_self_contained_and_images_are_png(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page.lower()  # no JavaScript; the hostile name only appears escaped
    for attr in re.findall(r"\b(?:src|href|action|srcset|poster)\s*=\s*\"([^\"]*)\"", page, flags=re.IGNORECASE):
        assert attr.startswith(("data:image/png;base64,", "#")), attr[:80]
    assert "url(" not in page and "@import" not in page and "<link" not in page.lower()
    sources = _img_sources(page)
    assert len(sources) == page.count("<img ") == 6 + 5 + 1  # 6 figures + 5 contact sheets + 1 viz figure
    for src in sources:
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            assert im.format == "PNG" and im.width > 10 and im.height > 10
    for heading in ("Class-frequency profile", "Accuracy by split", "Per-class accuracy", "Where the target test",
                    "Acquisition funnel", "Contact sheets", "Training curves", "Why: feature views",
                    "Config and provenance"):
        assert heading in page
    from neighborlt.viz import CAPTIONS

    assert html.escape(CAPTIONS["samples_per_class"]) in page  # the viz figure with what to look for
    assert "Balanced-CE, no auxiliary data" in page and "neighbor silencing" in page


def test_pipeline_report_on_the_real_funnel(report_run: Path) -> None:
    """The page ``run_pipeline`` wrote from the filter stage's own funnel.json and contact sheets."""
    page = (report_run / "pipeline_report" / "index.html").read_text(encoding="utf-8")
    funnel = json.loads((report_run / "filter" / "funnel.json").read_text())  # replaced by the synthetic one
    assert funnel["per_class"][0]["name"] == "lynx"
    assert "Acquisition funnel" in page and "Contact sheets" in page and "Not available" not in page
    sources = _img_sources(page)
    assert len(sources) >= 6 + 2
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_strings_are_escaped(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert HOSTILE not in page and html.escape(HOSTILE) in page
    assert HOSTILE_TARGET not in page and html.escape(HOSTILE_TARGET) in page
    assert f"{html.escape(HOSTILE)}: kept" not in page  # the sheet caption is the kind, the class is the heading
    assert f"<h4>{html.escape(HOSTILE)} (" in page  # its contact sheets are under its funnel name (kept of first)
    assert f"<h4>{html.escape('<b>stray')}</h4>" in page  # a sheet of no funnel class: its file name, escaped
    md = (report.parent / "report.md").read_text(encoding="utf-8")
    assert HOSTILE not in md and "&lt;script&gt;" in md
    assert html.escape(f"names {HOSTILE}".replace("\"", "\\\"")) in page  # the rules, JSON-quoted and escaped
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (report.parent / link).is_file(), link


def test_numbers_match_the_run_files(report_run: Path, report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    m = json.loads((report_run / "eval" / "metrics.json").read_text())
    b = json.loads((report_run / "baseline" / "eval" / "metrics.json").read_text())
    assert f"{m['overall']:.1f}%" in page and f"baseline {b['overall']:.1f}" in page
    where = json.loads((report_run / "eval" / "where.json").read_text())
    model = json.loads((report_run / "train" / "model.json").read_text())
    assert model["num_classes"] > model["num_target_classes"] and model["neighbor_pairs"]
    assert where["available"] and where["pairs_known"] and where["pairs_source"] == "model.json"
    assert where["num_pairs"] == len(model["neighbor_pairs"]) and where["num_outputs"] == model["num_classes"]
    assert sum(where["share"][k] for k in ("correct", "other_target", "paired_aux", "unpaired_aux")) == \
        pytest.approx(100.0)
    assert where["n_test"] == m["n_test"] == 50
    assert f"{where['share']['paired_aux']:.1f}%" in page


def test_where_predictions_matches_bench_confusion() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from neighbor_confusion import confusion
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(3)
    L, C, n = 4, 9, 400
    logits = rng.normal(size=(n, C))
    labels = rng.integers(0, L, n)
    pairs = np.array([[0, 4], [0, 5], [1, 6], [2, 7]])  # target 3 has no pair
    ref = confusion(logits, labels, L, pairs)
    got = where_predictions(logits, labels, L, pairs, train_counts=[200, 50, 10, 5])
    share = got["share"]
    assert share["aux"] == pytest.approx(ref["to aux"])
    assert share["paired_aux"] == pytest.approx(ref["to paired aux"])
    assert share["paired_aux"] + share["unpaired_aux"] == pytest.approx(share["aux"])
    assert share["correct"] == pytest.approx(100.0 * float((logits.argmax(1) == labels).mean()))
    assert got["paired_mass"] == pytest.approx(ref["paired mass"]) and got["margin"] == pytest.approx(ref["margin"])
    assert got["per_split"]["many"]["correct"] == pytest.approx(100.0 * float(
        (logits.argmax(1) == labels)[labels == 0].mean()))
    unknown = where_predictions(logits, labels, L, None)
    assert unknown["share"]["paired_aux"] is None and unknown["share"]["aux"] == pytest.approx(ref["to aux"])


def test_missing_and_malformed_inputs_name_their_commands(report_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "partial"
    run.mkdir()
    shutil.copyfile(report_run / "classes.json", run / "classes.json")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{not json")
    res = run_report(ReportConfig(), run)
    assert res.sections["profile"] and not any(v for k, v in res.sections.items() if k not in ("profile", "viz",
                                                                                               "provenance"))
    # viz is optional: without figures it says which command draws them
    page = res.html.read_text(encoding="utf-8")
    for command in ("neighborlt eval RUN", "neighborlt train RUN", "neighborlt retrieve RUN, then neighborlt filter RUN",
                    "neighborlt viz RUN"):
        assert html.escape(command) in page, command
    assert "invalid JSON" in page  # the malformed metrics file is named in its section
    assert _img_sources(page)  # the profile figure is still there
    with pytest.raises(NeighborLTError, match="run directory not found"):
        run_report(ReportConfig(), tmp_path / "nope")


def test_cli_report(report_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import typer
    from typer.testing import CliRunner

    from neighborlt.cli import _AREAS
    from neighborlt.cli.report import register

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that the command keeps its name
    register(app)
    out = tmp_path / "elsewhere"
    res = CliRunner().invoke(app, ["report", str(report_run), "--out", str(out), "--max-sheets", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "index.html").is_file() and (out / "report.md").is_file() and f"wrote {out / 'index.html'}" in res.output
    assert "more contact sheets are in RUN/filter/sheets/" in (out / "index.html").read_text(encoding="utf-8")
    bad = CliRunner().invoke(app, ["report", str(report_run), "--max-sheets", "-1"])
    assert bad.exit_code != 0 and "--max-sheets" in str(bad.exception or bad.output)
    if "report" in _AREAS:  # mounted on the console script (neighborlt.cli:main, in-process): the command works too
        from neighborlt.cli import main

        capsys.readouterr()
        try:
            main(["report", str(report_run), "--out", str(out)])
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
        assert str(out / "index.html") in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- headless Chromium

_CHECK = """<script>window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken', String(bad));
});</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("NEIGHBORLT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium not found but NEIGHBORLT_REQUIRE_CHROMIUM is set (apt-get install chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium); CI sets NEIGHBORLT_REQUIRE_CHROMIUM")
    return exe


def _run_chromium(exe: str, tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


def _render_check(exe: str, tmp: Path, page: Path) -> tuple[int, int, list[str]]:
    """(images, broken images, console lines) of ``page``: a copy of it with a load-time check appended is loaded
    with ``--dump-dom``; console messages of the unmodified page are read from Chromium's log."""
    probe = tmp / f"probe_{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    dom = _run_chromium(exe, tmp, probe, "--dump-dom").stdout
    m_img = re.search(r'data-images="(\d+)"', dom)
    m_bad = re.search(r'data-broken="(\d+)"', dom)
    assert m_img and m_bad, f"the load check did not run; DOM head: {dom[:300]!r}"
    log = _run_chromium(exe, tmp, page, "--dump-dom").stderr
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return int(m_img.group(1)), int(m_bad.group(1)), console


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    exe = _chromium()
    # the checks fail on a broken page: a bad image and a console error are both seen
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom")</script></body></html>')
    n, broken, console = _render_check(exe, tmp_path, bad)
    assert (n, broken) == (1, 1) and any("boom" in ln for ln in console)

    n, broken, console = _render_check(exe, tmp_path, report)
    assert n == len(_img_sources(report.read_text(encoding="utf-8"))) == 12
    assert broken == 0 and console == []

    shot = tmp_path / "report.png"
    proc = _run_chromium(exe, tmp_path, report, f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 2000)
        grey = np.asarray(im.convert("L"))
        assert (grey < 200).mean() > 0.02  # text, figures and tables, not a blank page
        assert len(im.getcolors(maxcolors=1 << 20) or []) > 50  # the coloured figures rendered
    keep = os.environ.get("NEIGHBORLT_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
