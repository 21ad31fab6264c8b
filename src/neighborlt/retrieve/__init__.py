"""Stage 3 (``retrieve``): candidate images for every auxiliary name, from a source (``SOURCES``: local, urls, web,
knn), downloaded safely and resumably into WebDataset shards or referenced locally; writes
``RUN/retrieve/candidates.parquet``, ``manifest.parquet`` and ``stats.json``."""

from __future__ import annotations

from .config import RetrieveConfig
from .download import DownloadOptions
from .sources import SOURCES, WEB_ENGINES
from .stage import IMG2DATASET_COMMAND, RetrieveResult, aux_names, run_retrieve

__all__ = ["IMG2DATASET_COMMAND", "SOURCES", "WEB_ENGINES", "DownloadOptions", "RetrieveConfig", "RetrieveResult",
           "aux_names", "run_retrieve"]
