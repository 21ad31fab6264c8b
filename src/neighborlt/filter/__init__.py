"""Stage 4 (``filter``): caption rule, feature band, leak guard, de-duplication and caps on the retrieved images;
writes ``RUN/filter/aux_manifest.parquet``, the one file training reads auxiliary images from."""

from __future__ import annotations

from .config import FilterConfig
from .sheets import sheet_stem
from .stage import FUNNEL, FilterResult, run_filter

__all__ = ["FUNNEL", "FilterConfig", "FilterResult", "run_filter", "sheet_stem"]
