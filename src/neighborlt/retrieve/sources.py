"""Retrieval sources: where the candidate images of every auxiliary class name come from (``SOURCES`` registry).

A source is a function ``source(cfg, ctx) -> Iterator[dict]`` yielding candidate rows (see :data:`CANDIDATE_FIELDS`)
for the auxiliary names in ``ctx.names``. Sources only *propose*: the stage decides what is downloaded, copied or
referenced, and the filter stage what is kept.

* ``local``: a captioned local pool. Without ``--pool`` it is the auxiliary pool of the run's split-neighbour protocol
  (``split.json``), its images captioned with their class names and synonyms and *referenced* (never copied);
  ``--match names`` pairs a pool class with the auxiliary names (and their parents) of ``neighbors.json`` whose
  normalised form equals the class's name, id or a synonym (:func:`neighborlt.neighbors.parse.name_key`, the one
  normaliser); ``--match wordnet`` uses the protocol's sibling relation instead. With ``--pool DIR`` a folder tree
  ``DIR/<class name>/*.jpg`` (the folder name is the caption); with ``--pool FILE.csv|.parquet`` rows of
  ``path,caption`` (an image is a candidate of every auxiliary name its caption contains).
  A name matches together with its synonyms (``neighbors.json``'s ``synonyms``: the other lemmas of the WordNet
  synset the name came from), so captions that say *sneaker* reach the proposed *gym shoe*; the ``matched`` column
  records the form that matched. Captions are matched by :class:`NameMatcher`, once per distinct caption and in
  time linear in its words (not once per row and name).
* ``urls``: a CSV / Parquet of ``name,url,caption`` (the user's own URL lists). Names that are not auxiliary classes
  of ``neighbors.json`` are reported and skipped.
* ``web``: image search (``ddgs``: ``DDGS().images(query, max_results=N)``), title as caption, with back-off on
  rate limits; an engine that answers nothing is reported, since ddgs reports some refusals only as "no results".
* ``knn``: a clip-retrieval ``back`` service the user hosts (``POST <url>/knn-service`` with a text query returns
  ``url``, ``caption``, ``similarity``).

Names are hostile text: they are only compared and sent as query strings, never used as paths.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..neighbors.parse import name_key
from ..registry import Registry

logger = logging.getLogger(__name__)

SOURCES: Registry[Callable[..., Iterator[dict[str, Any]]]] = Registry("retrieve source")
#: search engines of the ``web`` source (tests register a local stand-in)
WEB_ENGINES: Registry[Callable[..., Any]] = Registry("web image search engine")

#: columns of every candidate row (``RUN/retrieve/candidates.parquet``)
CANDIDATE_FIELDS = ("uid", "name", "parents", "query", "url", "location", "path", "pool_index", "caption", "source",
                    "similarity", "matched")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class AuxName:
    """One auxiliary class name to find images for, the target classes that proposed it, and its synonyms (the
    other lemmas of its WordNet synset, when the name came from WordNet)."""

    name: str
    parents: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)

    @property
    def forms(self) -> list[str]:
        """The name, then its synonyms: every form a caption may use for this class."""
        return list(dict.fromkeys([self.name, *self.synonyms]))


@dataclass
class SourceContext:
    """What a source may read: the auxiliary names, the run directory and (lazily) the run's protocol."""

    names: list[AuxName]
    root: Path
    load_protocol: Callable[[], Any]
    stats: dict[str, Any] = field(default_factory=dict)  # the source's own figures (unmatched names, refusals, ...)


def candidate(name: str, parents: list[str], *, url: str, location: str, source: str, caption: str = "",
              path: str = "", pool_index: int = -1, query: str = "", similarity: float = float("nan"),
              matched: str = "") -> dict[str, Any]:
    """A candidate row; ``uid`` is a stable hash of (source, name, url) so re-runs and resumes agree on it."""
    uid = hashlib.sha256(f"{source}\x00{name}\x00{url}".encode()).hexdigest()[:20]
    return {"uid": uid, "name": name, "parents": list(parents), "query": query or name, "url": url,
            "location": location, "path": path, "pool_index": int(pool_index), "caption": caption, "source": source,
            "similarity": float(similarity), "matched": matched}


def _keys(*names: str) -> set[str]:
    return {k for k in (name_key(n) for n in names if isinstance(n, str)) if k}


_WORD_RE = re.compile(r"[\w']+")


def caption_words(text: str) -> list[str]:
    """The lower-case words of a caption (underscores and hyphens split words), as names are matched."""
    return _WORD_RE.findall((text or "").lower().replace("_", " ").replace("-", " "))


@functools.lru_cache(maxsize=1 << 16)
def _word_forms(word: str) -> tuple[str, ...]:
    """The word and its singular readings that are WordNet nouns ("shoes" -> shoes, shoe; "wolves" -> wolf)."""
    from ..neighbors import parse

    if not word.isalpha():  # numbers, "o'clock": nothing to fold
        return (word,)
    nouns = parse._load_nouns()  # the one WordNet noun list, loaded once
    out = [word, parse.singular(word)]
    for old, new in parse._SUFFIXES:  # "shoes" is itself a WordNet noun, "shoe" too
        if word.endswith(old) and len(word) > len(old) + 1 and word[: -len(old)] + new in nouns:
            out.append(word[: -len(old)] + new)
    return tuple(dict.fromkeys(out))


class NameMatcher:
    """Which labels a caption mentions, and by which form: each label has forms (a name and its synonyms), each
    form matches as whole words of the caption, its last word singular or plural ("two golden retrievers").

    Matching looks up the caption's word n-grams in one table (time linear in the caption's words, whatever the
    number of names) and is done once per distinct caption. The first form of a label (its name) wins over later
    ones (synonyms) when a caption contains several.

    Example:
        >>> m = NameMatcher([("gym shoe", ["gym shoe", "sneaker"])])
        >>> m.match("white sneakers on a shelf")
        {'gym shoe': 'sneaker'}
    """

    def __init__(self, labelled_forms: Iterable[tuple[str, Iterable[str]]], cache_size: int = 1 << 18) -> None:
        self._table: dict[tuple[str, ...], list[tuple[str, str, int]]] = {}
        self._longest = 0
        self._firsts: set[str] = set()
        self._lasts: set[str] = set()
        for label, forms in labelled_forms:
            for rank, form in enumerate(dict.fromkeys(forms)):
                k = name_key(form) if isinstance(form, str) else None
                words = tuple(caption_words(k or ""))
                if not words:
                    continue
                self._table.setdefault(words, []).append((label, form, rank))
                self._longest = max(self._longest, len(words))
                self._firsts.add(words[0])  # a word that starts no key is skipped at once
                self._lasts.add(words[-1])
        self._cache: dict[str, dict[str, str]] = {}
        self._cache_size = cache_size

    def match(self, caption: str) -> dict[str, str]:
        """label -> the form that the caption mentions (labels in the order of their first form's position)."""
        caption = caption or ""
        hit = self._cache.get(caption)
        if hit is not None:
            return hit
        words = caption_words(caption)
        best: dict[str, tuple[int, str]] = {}
        firsts, lasts, table = self._firsts, self._lasts, self._table
        for i, first in enumerate(words):
            single = _word_forms(first) if first not in firsts else None  # a one-word key may be a plural
            if single is not None and not any(f in firsts for f in single):
                continue
            for n in range(1, min(self._longest, len(words) - i) + 1):
                head = tuple(words[i:i + n - 1])
                for last in _word_forms(words[i + n - 1]):  # the last word singular or plural, as name_key folds it
                    if last not in lasts:
                        continue
                    for label, form, rank in table.get((*head, last), ()):
                        if label not in best or rank < best[label][0]:
                            best[label] = (rank, form)
        out = {label: form for label, (_, form) in best.items()}
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[caption] = out
        return out


def caption_mentions(caption: str, keys: set[str]) -> bool:
    """True when a normalised key occurs in the caption as whole words (see :class:`NameMatcher`)."""
    return bool(NameMatcher([("", keys)], cache_size=1).match(caption))


# --------------------------------------------------------------------------------------------------------------
# local
# --------------------------------------------------------------------------------------------------------------


@SOURCES.register("local", downloads=False)
def local_source(cfg: Any, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    """Candidates from a local pool (the protocol's pool, a folder tree or a ``path,caption`` table); at most
    ``cfg.pool_per_class`` per auxiliary class, the first ones in pool order."""
    if cfg.pool is None:
        rows = _protocol_pool(cfg, ctx)
    else:
        path = Path(cfg.pool)
        if path.is_dir():
            rows = _folder_pool(path, ctx)
        elif path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
            rows = _table_pool(path, ctx)
        else:
            raise ConfigError(f"--pool {path}: not found, or not a folder / .csv / .parquet file")
    cap = cfg.pool_per_class
    if cap is None:
        yield from rows
        return
    taken: dict[str, int] = {}
    for r in rows:
        taken[r["name"]] = taken.get(r["name"], 0) + 1
        if taken[r["name"]] <= cap:
            yield r


def _protocol_pool(cfg: Any, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    protocol = ctx.load_protocol()
    pool = protocol.pool
    if pool is None or pool.num_classes == 0:
        raise ConfigError(f"{ctx.root / 'split.json'}: this run has no auxiliary pool; pass --pool DIR|FILE, or "
                          "--source urls/web/knn")
    tt = protocol.target_train
    links: list[tuple[int, int, str]] = []  # (target index, pool class index, proposed name)
    matched_form: dict[int, str] = {}  # pool class index -> the form of the proposed name that matched it
    if cfg.match == "wordnet":
        pool_index = {cid: j for j, cid in enumerate(pool.class_ids)}
        for i, cid in enumerate(tt.class_ids):
            links += [(i, pool_index[p], pool.class_names[pool_index[p]]) for p in protocol.siblings.get(cid, [])
                      if p in pool_index]
    else:
        target_by_key: dict[str, int] = {}
        for i, (cid, nm) in enumerate(zip(tt.class_ids, tt.class_names)):
            for k in _keys(nm, cid, *tt.synonyms.get(cid, [])):
                target_by_key.setdefault(k, i)
        pool_by_key: dict[str, int] = {}
        for j, (cid, nm) in enumerate(zip(pool.class_ids, pool.class_names)):
            for k in _keys(nm, cid, *pool.synonyms.get(cid, [])):
                pool_by_key.setdefault(k, j)
        unmatched, bad_parents = [], []
        for aux in ctx.names:
            j, form = None, ""
            for form in aux.forms:  # the name first, then its synonyms
                k = name_key(form)
                j = pool_by_key.get(k) if k else None
                if j is not None:
                    break
            if j is None:
                unmatched.append(aux.name)
                continue
            matched_form.setdefault(j, form)
            for parent in aux.parents:
                pk = name_key(parent)
                i = target_by_key.get(pk) if pk else None
                if i is None:
                    bad_parents.append(parent)
                    continue
                links.append((i, j, aux.name))
        ctx.stats["unmatched_names"] = unmatched
        _forms_stats(ctx)
        if bad_parents:
            logger.warning("neighbors.json: %d parents are not target classes (e.g. %r); ignored", len(bad_parents),
                           bad_parents[0])
            ctx.stats["unknown_parents"] = sorted(set(bad_parents))
    # one auxiliary class per pool class, in order of its first link; parents in link order
    order: list[int] = []
    parents: dict[int, list[str]] = {}
    queries: dict[int, list[str]] = {}
    for i, j, q in links:
        if j not in parents:
            order.append(j)
            parents[j], queries[j] = [], []
        if tt.class_names[i] not in parents[j]:
            parents[j].append(tt.class_names[i])
        if q not in queries[j]:
            queries[j].append(q)
    import numpy as np

    labels = np.asarray(pool.labels)
    for j in order:
        cid, nm = pool.class_ids[j], pool.class_names[j]
        caption = ", ".join(dict.fromkeys([nm, *pool.synonyms.get(cid, [])]))
        for idx in np.flatnonzero(labels == j).tolist():
            path = str(pool.paths[idx]) if pool.paths is not None else ""
            yield candidate(nm, parents[j], url=f"pool://{cid}/{idx}", location="pool", source="local",
                            caption=caption, path=path, pool_index=idx, query=", ".join(queries[j]),
                            matched=matched_form.get(j, nm))


def _forms_stats(ctx: SourceContext) -> None:
    """Record the forms every name is matched by (the filter's caption rule reads them from ``stats.json``)."""
    forms = {a.name: a.forms for a in ctx.names if a.synonyms}
    if forms:
        ctx.stats["forms"] = forms


def _folder_pool(root: Path, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    by_key: dict[str, tuple[AuxName, str]] = {}
    for rank in range(max((len(a.forms) for a in ctx.names), default=0)):  # names before synonyms
        for aux in ctx.names:
            if rank < len(aux.forms):
                k = name_key(aux.forms[rank])
                if k:
                    by_key.setdefault(k, (aux, aux.forms[rank]))
    matched: set[str] = set()
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        k = name_key(sub.name)
        hit = by_key.get(k) if k else None
        if hit is None:
            continue
        aux, form = hit
        matched.add(aux.name)
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                yield candidate(aux.name, aux.parents, url=f.resolve().as_uri(), location="file", source="local",
                                caption=sub.name, path=str(f.resolve()), matched=form)
    ctx.stats["unmatched_names"] = [a.name for a in ctx.names if a.name not in matched]
    _forms_stats(ctx)


def read_rows(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet file with the required columns (one clear line when a column is missing)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file
            raise DataError(f"{path}: cannot read as Parquet ({e})") from None
        rows = table.to_pylist()
        columns = table.column_names
    else:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                columns = reader.fieldnames or []
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read as UTF-8 CSV ({e})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: {what} needs the columns {', '.join(required)}; missing {', '.join(missing)} "
                        f"(found: {', '.join(map(str, columns)) or 'none'})")
    return rows


def _table_pool(path: Path, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    rows = read_rows(path, ("path", "caption"), "a local pool table")
    by_name = {a.name: a for a in ctx.names}
    matcher = NameMatcher((a.name, a.forms) for a in ctx.names)
    base = os.path.abspath(path.parent)
    matched: set[str] = set()
    for r in rows:
        cap = str(r.get("caption") or "")
        hits = matcher.match(cap)
        if not hits:
            continue
        p = os.path.normpath(os.path.join(base, os.path.expanduser(str(r["path"]))))  # no per-row file-system call
        url = "file://" + urllib.request.pathname2url(p)
        for name, form in hits.items():
            aux = by_name[name]
            matched.add(name)
            yield candidate(name, aux.parents, url=url, location="file", source="local", caption=cap, path=p,
                            matched=form)
    ctx.stats["unmatched_names"] = [a.name for a in ctx.names if a.name not in matched]
    _forms_stats(ctx)


# --------------------------------------------------------------------------------------------------------------
# urls
# --------------------------------------------------------------------------------------------------------------


@SOURCES.register("urls", downloads=True)
def urls_source(cfg: Any, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    """Candidates from the user's ``name,url,caption`` table; unknown names are reported, never trained on."""
    if not cfg.urls_file:
        raise ConfigError("--source urls needs --urls-file FILE.csv|.parquet with columns name,url,caption")
    path = Path(cfg.urls_file)
    if not path.is_file():
        raise ConfigError(f"--urls-file {path}: not found")
    rows = read_rows(path, ("name", "url"), "--urls-file")
    by_key = {name_key(a.name): a for a in ctx.names if name_key(a.name)}
    unknown: dict[str, int] = {}
    bad_urls = 0
    for r in rows:
        raw = str(r.get("name") or "")
        aux = by_key.get(name_key(raw) or "")
        if aux is None:
            unknown[raw] = unknown.get(raw, 0) + 1
            continue
        url = str(r.get("url") or "").strip()
        if not re.match(r"^https?://", url, re.IGNORECASE):
            bad_urls += 1
            continue
        yield candidate(aux.name, aux.parents, url=url, location="url", source="urls",
                        caption=str(r.get("caption") or ""))
    if unknown:
        logger.warning("%s: %d rows name %d classes that are not auxiliary classes of neighbors.json (e.g. %r); "
                       "they are skipped (listed in retrieve/stats.json)", path, sum(unknown.values()), len(unknown),
                       next(iter(unknown)))
    if bad_urls:
        logger.warning("%s: %d rows have no http(s) URL; skipped", path, bad_urls)
    ctx.stats["unknown_names"] = dict(sorted(unknown.items()))
    ctx.stats["bad_urls"] = bad_urls


# --------------------------------------------------------------------------------------------------------------
# web (ddgs) and knn (clip-retrieval back)
# --------------------------------------------------------------------------------------------------------------


@WEB_ENGINES.register("ddgs")
def ddgs_engine(cfg: Any) -> Callable[[str, int], list[dict[str, Any]]]:
    """``DDGS().images`` as ``search(query, n) -> [{"image", "title", "url", ...}]``; raises on refusals."""
    from ddgs import DDGS

    engine = DDGS(timeout=cfg.search_timeout)

    def search(query: str, n: int) -> list[dict[str, Any]]:
        return list(engine.images(query, max_results=n, safesearch=cfg.safesearch, region=cfg.region))

    return search


class SearchRefused(Exception):
    """The engine refused (rate limit, block): back off and retry."""


def _with_backoff(fn: Callable[[], Any], *, retries: int, base_s: float, what: str) -> Any:
    """Call ``fn`` and retry rate limits / time-outs with exponential back-off; the last failure propagates."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            kind = type(e).__name__
            transient = isinstance(e, (SearchRefused, TimeoutError, urllib.error.URLError)) or \
                kind in ("RatelimitException", "TimeoutException")
            if not transient or attempt == retries:
                raise
            delay = base_s * (2 ** attempt)
            logger.info("%s: %s (%s); retrying in %.1f s", what, kind, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@SOURCES.register("web", downloads=True)
def web_source(cfg: Any, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    """Image search per auxiliary name (``--web-engine``, default ddgs); titles become captions."""
    search = WEB_ENGINES.create(cfg.web_engine, cfg=cfg)
    empty, refused = [], {}
    for aux in ctx.names:
        query = aux.name + (f" {cfg.query_suffix}" if cfg.query_suffix else "")
        try:
            results = _with_backoff(lambda q=query: search(q, cfg.per_name), retries=cfg.search_retries,
                                    base_s=cfg.search_backoff_s, what=f"web search {query!r}")
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "DDGSException" and "no results" in str(e).lower():
                results = []
            else:
                refused[aux.name] = f"{type(e).__name__}: {e}"[:200]
                logger.warning("web search %r refused or failed after %d retries: %s", query, cfg.search_retries, e)
                continue
        results = [r for r in results or [] if isinstance(r, dict) and isinstance(r.get("image"), str)]
        if not results:
            empty.append(aux.name)
        for r in results[: cfg.per_name]:
            yield candidate(aux.name, aux.parents, url=r["image"], location="url", source="web", query=query,
                            caption=str(r.get("title") or ""))
        if cfg.search_delay_s:
            time.sleep(cfg.search_delay_s)
    ctx.stats["names_without_results"] = empty
    ctx.stats["refused"] = refused
    if ctx.names and len(empty) + len(refused) == len(ctx.names):
        logger.warning("web search returned no image for any of the %d names: the engine may be refusing this "
                       "machine (ddgs reports some refusals only as 'no results'); try again later or use --source "
                       "urls / knn", len(ctx.names))
    elif empty:
        logger.warning("web search returned no results for %d of %d names (e.g. %r)", len(empty), len(ctx.names),
                       empty[0])


@SOURCES.register("knn", downloads=True)
def knn_source(cfg: Any, ctx: SourceContext) -> Iterator[dict[str, Any]]:
    """Text queries to a clip-retrieval ``back`` service (``--knn-url``); its captions and similarities are kept."""
    if not cfg.knn_url:
        raise ConfigError("--source knn needs --knn-url http://HOST:PORT of a clip-retrieval back service "
                          "(see README: hosting a kNN index)")
    endpoint = cfg.knn_url.rstrip("/") + "/knn-service"
    empty, refused = [], {}
    for aux in ctx.names:
        query = aux.name + (f" {cfg.query_suffix}" if cfg.query_suffix else "")
        body = json.dumps({"text": query, "image": None, "image_url": None, "embedding_input": None,
                           "modality": "image", "num_images": cfg.per_name, "indice_name": cfg.knn_index,
                           "num_result_ids": cfg.per_name, "use_mclip": False, "deduplicate": True,
                           "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "",
                           "aesthetic_weight": "0.5"}).encode()

        def ask(body: bytes = body) -> Any:
            req = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=cfg.search_timeout) as resp:
                    return json.loads(resp.read(50_000_000))
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    raise SearchRefused(f"HTTP {e.code}") from None
                raise

        try:
            results = _with_backoff(ask, retries=cfg.search_retries, base_s=cfg.search_backoff_s,
                                    what=f"knn {query!r}")
        except Exception as e:  # noqa: BLE001
            refused[aux.name] = f"{type(e).__name__}: {e}"[:200]
            logger.warning("knn service %s failed for %r: %s", endpoint, query, e)
            continue
        rows = [r for r in (results if isinstance(results, list) else []) if isinstance(r, dict)
                and isinstance(r.get("url"), str)]
        if not rows:
            empty.append(aux.name)
        for r in rows[: cfg.per_name]:
            sim = r.get("similarity")
            yield candidate(aux.name, aux.parents, url=r["url"], location="url", source="knn", query=query,
                            caption=str(r.get("caption") or ""),
                            similarity=float(sim) if isinstance(sim, (int, float)) else float("nan"))
    ctx.stats["names_without_results"] = empty
    ctx.stats["refused"] = refused
    if refused and len(refused) == len(ctx.names):
        raise DataError(f"knn service {endpoint} failed for every name (e.g. {next(iter(refused.values()))}); "
                        "check --knn-url and that `clip-retrieval back` is running")


__all__ = ["CANDIDATE_FIELDS", "SOURCES", "WEB_ENGINES", "AuxName", "NameMatcher", "SourceContext", "candidate",
           "caption_mentions", "caption_words", "read_rows"]
