"""Disk cache of raw neighbour answers, keyed by (backend, model, prompt, class), written atomically.

One JSON file per answer under ``<root>/<key[:2]>/<key>.json`` so that concurrent workers never write the same
file and a crash loses at most the requests in flight. Secrets never enter the cache: the key and the record
hold only the backend name, model id, prompt text and class name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..paths import cache_dir
from ..rundir import atomic_write_json

logger = logging.getLogger(__name__)

CACHE_SCHEMA = 1


def answer_key(backend: str, model: str | None, prompt: str, class_name: str) -> str:
    """sha256 (hex, 32 digits) of the canonical JSON of (backend, model, prompt, class)."""
    blob = json.dumps([CACHE_SCHEMA, backend, model, prompt, class_name], ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def default_cache_root() -> Path:
    """``<cache_dir()>/neighbors/answers`` (``$NEIGHBORLT_CACHE`` or ``~/.cache/neighborlt``)."""
    return cache_dir() / "neighbors" / "answers"


class AnswerCache:
    """Raw answers on disk; ``get`` returns None for a missing or unreadable entry (it is simply re-asked)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad cache key {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable cached answer (%s); asking again", p, e)
            return None
        if not isinstance(rec, dict) or rec.get("key") != key or not isinstance(rec.get("text"), str):
            logger.warning("%s: malformed cached answer; asking again", p)
            return None
        return rec

    def put(self, key: str, record: dict[str, Any]) -> Path:
        return atomic_write_json(self.path(key), {"key": key, "schema": CACHE_SCHEMA, **record})

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None
