"""Stage 2, neighbour category search: for every target class, names of visually similar categories that are
not target classes, from an LLM (``openai``) or offline (``wordnet``, ``embedding``, ``taxonomy``, ``file``).

Public API::

    run_neighbors(cfg, run_dir) -> NeighborsResult      # RUN/classes.json -> RUN/neighbors.json
    search(targets, cfg) -> dict                        # the same document, in memory
    parse_answer(text) -> ParseResult; normalise_name(name); name_key(name); is_safe_name(name)
    neighbours_per_shot(split_ratio, totals, per_class, max_per_class) -> {"many": n, "medium": n, "few": n}
    BACKENDS (registry), NeighborsConfig, TargetClass, AnswerCache
"""

from . import offline, openai_backend, wordnet  # noqa: F401 - register the backends
from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass, TransientError
from .cache import AnswerCache, answer_key
from .openai_backend import DEFAULT_PROMPT
from .parse import ParseResult, is_safe_name, name_key, normalise_name, parse_answer
from .plan import neighbours_per_shot, parse_split_ratio, resolve_ratio
from .search import NeighborSearchError, NeighborsResult, load_targets, run_neighbors, search

__all__ = [
    "BACKENDS", "DEFAULT_PROMPT", "AnswerCache", "NeighborBackend", "NeighborSearchError", "NeighborsConfig",
    "NeighborsResult", "ParseResult", "RawAnswer", "TargetClass", "TransientError", "answer_key", "is_safe_name",
    "load_targets", "name_key", "neighbours_per_shot", "normalise_name", "parse_answer", "parse_split_ratio",
    "resolve_ratio", "run_neighbors", "search",
]
