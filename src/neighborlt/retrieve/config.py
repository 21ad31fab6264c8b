"""Options of stage 3 (``retrieve``): which source proposes images for the auxiliary names and how they are
downloaded (``download``: :class:`~neighborlt.retrieve.download.DownloadOptions`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .download import DownloadOptions

#: fields that change how the stage runs, not what it produces (left out of its completion key)
EXECUTION_FIELDS = frozenset({"force", "retry_failed", "data_dir"})
#: download options that change how fast, not what is written (the shards are the same for any process/thread count)
DOWNLOAD_EXECUTION_FIELDS = frozenset({"processes", "threads"})


class RetrieveConfig(BaseModel):
    """Options of ``neighborlt retrieve``.

    Example:
        >>> RetrieveConfig(source="urls", urls_file="urls.csv").download.max_redirects
        5
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "local"  # retrieve.SOURCES name: local | urls | web | knn
    neighbors: str | None = None  # neighbors.json path; None: RUN/neighbors.json
    match: Literal["names", "wordnet"] = "names"  # local protocol pool: pool classes named in neighbors.json, or the
    #   protocol's WordNet sibling relation (names then come from split.json, neighbors.json is not needed)
    pool: str | None = None  # local source: a folder tree <class name>/*.jpg or a CSV/Parquet of path,caption;
    #   None: the auxiliary pool of the run's split-neighbour protocol
    pool_per_class: int | None = Field(None, ge=1)  # local source: at most N candidates per auxiliary class (the
    #   first N in pool order); None: every image of the class
    urls_file: str | None = None  # urls source: CSV / Parquet with columns name,url,caption
    per_name: int = Field(100, ge=1)  # web / knn: candidates asked per auxiliary name
    query_suffix: str = ""  # web / knn: appended to every query (e.g. "photo")
    web_engine: str = "ddgs"  # retrieve.WEB_ENGINES name
    safesearch: Literal["on", "moderate", "off"] = "moderate"  # ddgs safesearch
    region: str = "wt-wt"  # ddgs region
    knn_url: str | None = None  # knn source: base URL of a clip-retrieval `back` service you host
    knn_index: str = "laion5B-L-14"  # knn source: indice_name of that service
    search_timeout: float = Field(20.0, gt=0)  # seconds per search request
    search_retries: int = Field(4, ge=0)  # retries of a rate-limited / timed-out search (exponential back-off)
    search_backoff_s: float = Field(2.0, ge=0)  # first back-off delay, doubled each retry
    search_delay_s: float = Field(1.0, ge=0)  # pause between web searches (be polite to the engine)
    download: DownloadOptions = Field(default_factory=DownloadOptions)  # fetch rules for URL candidates
    retry_failed: bool = False  # fetch again candidates that failed in an earlier run (ok ones never are)
    export_img2dataset: str | None = None  # write the URL candidates in img2dataset's input format and stop
    import_img2dataset: str | None = None  # read an img2dataset webdataset output folder back as the downloads
    data_dir: str | None = None  # offline data folder (protocol pools); None: paths.resolve_data_dir()
    force: bool = False  # redo the stage even when a finished one with the same options exists

    def key_fields(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={**dict.fromkeys(EXECUTION_FIELDS, True),
                                                      "download": set(DOWNLOAD_EXECUTION_FIELDS)})


__all__ = ["RetrieveConfig"]
