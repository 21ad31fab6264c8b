"""The options of ``neighborlt report``."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ReportConfig(BaseModel):
    """Options of ``neighborlt report``."""

    model_config = ConfigDict(extra="forbid")

    out: Path | None = Field(None, description="output folder for index.html and report.md (default RUN/report)")
    baseline: Path | None = Field(None, description="run directory of the baseline to compare with "
                                                    "(default RUN/baseline, written by `neighborlt run`)")
    title: str | None = Field(None, description="page title (default: 'neighborlt report: <run folder>')")
    max_sheets: int = Field(40, ge=0, description="embed at most this many contact sheets (kept and rejected)")
    max_class_rows: int = Field(60, ge=1, description="per-class tables list every class up to this many classes, "
                                                      "else the worst and best ones")
    dpi: int = Field(100, ge=50, le=300, description="resolution of the figures")
