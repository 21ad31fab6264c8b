"""The filter's caption rule: an image is kept only when its caption names its class, by the name or a synonym.

The synonyms are the forms the retrieve stage matched with (``RUN/retrieve/stats.json`` ``source.forms``: the name
and the other lemmas of the WordNet synset it came from); a run without them matches the name alone. Captions are
matched by :class:`~neighborlt.retrieve.sources.NameMatcher`, once per distinct caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..retrieve.sources import NameMatcher
from ..rundir import read_json


def name_forms(root: Path) -> dict[str, list[str]]:
    """Auxiliary name -> its forms (name first, then synonyms) as recorded by the retrieve stage; {} when none."""
    path = root / "retrieve" / "stats.json"
    if not path.is_file():
        return {}
    forms = (read_json(path).get("source") or {}).get("forms") or {}
    return {str(k): [str(x) for x in v] for k, v in forms.items() if isinstance(v, list)}


def caption_names_class(names: Sequence[str], captions: Sequence[str], forms: dict[str, list[str]]) -> list[bool]:
    """For each row (its class name and caption): does the caption name the class, by its name or a synonym?"""
    matcher = NameMatcher((n, forms.get(n) or [n]) for n in dict.fromkeys(names))
    return [n in matcher.match(c or "") for n, c in zip(names, captions)]


__all__ = ["caption_names_class", "name_forms"]
