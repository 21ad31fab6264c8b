"""The run report: one self-contained HTML page (``RUN/report/index.html``) and its markdown twin
(``RUN/report/report.md``) built only from files the earlier stages wrote.

Sections, each shown when its inputs exist (otherwise the section names the command that makes them):

* summary: the headline numbers (method against baseline, where the test images go);
* class-frequency profile (``classes.json``);
* many / medium / few / overall accuracy, method (``eval/metrics.json``) against the baseline
  (``baseline/eval/metrics.json``, written by ``neighborlt run`` / ``demo``);
* per-class accuracy against training images (``eval/per_class.csv``, the baseline's when present);
* where the target test images go under the joint model (``eval/where.json``, see
  :func:`neighborlt.evaluate.where_predictions`);
* the acquisition funnel (``filter/funnel.json``) and contact sheets (``filter/sheets/<class>_kept.png`` /
  ``<class>_rejected.png``);
* coverage: per target, the proposed auxiliary names, the matched ones with image counts and the unmatched ones
  (``filter/coverage.json`` / ``retrieve/coverage.json``, :mod:`neighborlt.coverage`), with the warning that names the
  targets without an auxiliary class or a silenced pair;
* training curves (``train/log.jsonl``, the baseline's when present);
* feature views (``viz/*.png``, drawn by ``neighborlt viz``);
* config and provenance (``records/*.config.json`` / ``*.env.json`` / ``*.done.json``).

The page has no script and no external reference: figures are inline ``data:image/png;base64`` images (matplotlib,
Agg), the CSS is inline. Every string read from a file (class names above all) is escaped; matplotlib labels have
their ``$`` escaped so that a class name is never parsed as mathtext. The markdown file links the same figures,
written next to it in ``figures/``.

The package: :mod:`.config` (the options), :mod:`.inputs` (the run's files, each read once), :mod:`.blocks` (the
content model and its escaped HTML / markdown rendering), :mod:`.sections` (one function per section of the run
report), :mod:`.experiments` (the sections of the ``ablate`` / ``pilot`` pages) and :mod:`.pages` (the pages,
rendered and written atomically).
"""

from .config import ReportConfig
from .experiments import ablation_sections
from .pages import ReportResult, render_html, render_markdown, run_report, write_ablation_page, write_pilot_page

__all__ = ["ReportConfig", "ReportResult", "ablation_sections", "render_html", "render_markdown", "run_report",
           "write_ablation_page", "write_pilot_page"]
