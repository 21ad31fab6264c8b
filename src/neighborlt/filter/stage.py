"""Stage 4 (``filter``): keep the retrieved images that are clean, relevant and leak-free.

Rules, in funnel order (each can be switched off, :class:`~neighborlt.filter.config.FilterConfig`):

1. ``downloaded``: the retrieve manifest says ``ok``.
2. ``caption``: the caption names the image's class (normalised auxiliary name or a synonym, whole words).
3. ``band``: γ1 < cos(feature, prototype of a parent target) < γ2, the best parent when there are several
   (prototype = the mean L2-normalised feature of the target's training images), or per-class quantiles.
4. ``leak``: not an exact (SHA-256) or near duplicate (feature cosine ≥ ``leak_threshold``) of a target test image.
5. ``dedup``: not an exact duplicate of an earlier kept image, nor a near duplicate of one of its own class.
6. ``cap``: at most ``max_per_class`` images per class (most similar to the parent first).
7. ``kept``: classes with fewer than ``min_per_class`` images are dropped whole.

Writes ``RUN/filter/aux_manifest.parquet`` (the kept images: what training reads), ``decisions.parquet`` (every
candidate with the rule that rejected it), ``funnel.json`` (counts per rule, overall and per class) and contact
sheets ``sheets/<class>_kept.png`` / ``_rejected.png``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..coverage import write_coverage
from ..data import manifest as mf
from ..errors import ConfigError
from ..rundir import RunDir, atomic_write_json
from .caption import apply_caption_rule
from .config import FilterConfig

logger = logging.getLogger(__name__)

STAGE = "filter"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same inputs (2: the one key rule)
FUNNEL = ("candidates", "downloaded", "caption", "band", "leak", "dedup", "cap", "kept")
AUX_SCHEMA_EXTRA = ("class_index", "parent", "similarity", "leak_similarity")


class FilterResult(BaseModel):
    """What :func:`run_filter` produced."""

    model_config = ConfigDict(extra="forbid")

    aux_manifest: str  # RUN/filter/aux_manifest.parquet
    funnel: dict[str, int]  # images left after each rule (FUNNEL order)
    classes: int  # auxiliary classes with kept images
    dropped_classes: list[str]  # classes with fewer than min_per_class images
    skipped: bool = False


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_BLOCK = 4096  # candidate rows per block when reading the (memory-mapped) features


def _unit(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def center_features(candidates: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the mean feature of the target training images from both sets (``FilterConfig.center``).

    Pooled CNN features (post-ReLU) share one large common direction, so raw cosines of unrelated images are
    high and barely below those of true neighbours; centering removes it (measured in ``bench/filter_band.py``).
    """
    mu = np.asarray(targets, dtype=np.float32).mean(axis=0, keepdims=True)
    return np.asarray(candidates, dtype=np.float32) - mu, np.asarray(targets, dtype=np.float32) - mu


def _max_cos(a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each row of unit ``a``: the largest cosine to a row of unit ``b`` and its index (chunked matmul)."""
    best = np.full(len(a), -np.inf, dtype=np.float32)
    arg = np.zeros(len(a), dtype=np.int64)
    for s in range(0, len(b), chunk):
        sim = a @ b[s:s + chunk].T
        j = sim.argmax(axis=1)
        v = sim[np.arange(len(a)), j]
        better = v > best
        best[better], arg[better] = v[better], j[better] + s
    return best, arg


def image_sha256(image_set: Any, i: int) -> str:
    """SHA-256 of what a sample is stored as: the file bytes, or the array row (as the retrieve stage hashes)."""
    if image_set.array is not None:
        return hashlib.sha256(np.ascontiguousarray(image_set.array[i]).tobytes()).hexdigest()
    from ..data.base import ShardMember

    p = image_set.paths[i]
    return hashlib.sha256(p.read_bytes() if isinstance(p, ShardMember) else Path(p).read_bytes()).hexdigest()


def run_filter(cfg: FilterConfig, run_dir: RunDir | str | os.PathLike[str]) -> FilterResult:
    """Apply the filter rules to ``RUN/retrieve/manifest.parquet`` and write the auxiliary manifest.

    Args:
        cfg: the stage options.
        run_dir: the run directory (``split.json``, ``retrieve/manifest.parquet``).

    Returns:
        A :class:`FilterResult`.

    Raises:
        ConfigError: the retrieve manifest or split is missing (the message names the command that makes it).

    Example:
        >>> run_filter(FilterConfig.keep_all(), "runs/demo").funnel["kept"]  # doctest: +SKIP
        25000
    """
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    src = root / "retrieve" / "manifest.parquet"
    if not src.is_file():  # checked before RunDir(), which would create a mistyped folder
        raise ConfigError(f"{src}: not found; run `neighborlt retrieve {root}` first")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    if not rd.path("split.json").is_file():
        raise ConfigError(f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first")
    out = rd.path(STAGE)
    key = rd.stage_key(STAGE, cfg.key_fields(), [src, "split.json", "targets.parquet", "classes.json"],
                       version=STAGE_VERSION)
    aux_path = out / "aux_manifest.parquet"
    if not cfg.force and rd.is_done(STAGE, key, "filter/aux_manifest.parquet", "filter/funnel.json"):
        from ..rundir import read_json

        doc = read_json(out / "funnel.json")
        logger.info("filter: finished with the same options and manifest in %s; skipping", out)
        return FilterResult(aux_manifest=str(aux_path), funnel=doc["total"], classes=doc["classes"],
                            dropped_classes=doc["dropped_classes"], skipped=True)
    logger.debug("filter: running (%s)", "--force" if cfg.force else rd.stale_reason(STAGE, key))
    rd.record(STAGE, cfg)
    rows = mf.read_table(src).to_pylist()
    decision = ["" for _ in rows]  # "" = still in; else the rule that rejected it
    sim = np.full(len(rows), np.nan, dtype=np.float32)
    leak_sim = np.full(len(rows), np.nan, dtype=np.float32)
    parent = ["" for _ in rows]

    def reject(i: int, rule: str) -> None:
        if not decision[i]:
            decision[i] = rule

    for i, r in enumerate(rows):
        if r["status"] != "ok":
            reject(i, "downloaded")
    if cfg.caption:  # the name or a synonym (filter/caption.py), once per distinct caption
        for i in apply_caption_rule(rows, [not d for d in decision], rd.root):
            reject(i, "caption")

    protocol = None
    live = [i for i in range(len(rows)) if not decision[i]]
    feats = None
    if cfg.needs_features and live:
        from ..data import load_targets

        protocol = load_targets(rd.root, data_dir=cfg.data_dir)
        feats = _features(cfg, protocol, [rows[i] for i in live], rd.root)  # memory-mapped: read in row blocks

    if cfg.band and live and feats is not None:
        tt = protocol.target_train
        fc, ft = feats["candidates"], feats["target_train"]
        mu = None
        if cfg.center:  # center_features, one block of candidates at a time
            mu = np.asarray(ft, dtype=np.float32).mean(axis=0, keepdims=True)
            ft = np.asarray(ft, dtype=np.float32) - mu
        proto = _unit(_prototypes(ft, tt.labels, tt.num_classes))
        by_name = {n: k for k, n in enumerate(tt.class_names)}
        for start in range(0, len(live), _BLOCK):
            block = np.asarray(fc[start:start + _BLOCK], dtype=np.float32)
            s_blk = _unit(block - mu if mu is not None else block) @ proto.T  # [block, L]
            for n in range(start, start + len(block)):
                i = live[n]
                ps = [by_name[p] for p in rows[i]["parents"] if p in by_name]
                if not ps:
                    sim[i] = np.nan
                    continue
                j = max(ps, key=lambda k: s_blk[n - start, k])
                sim[i], parent[i] = s_blk[n - start, j], tt.class_names[j]
        if cfg.band_mode == "absolute":
            for i in live:
                if not (cfg.gamma_low < sim[i] < cfg.gamma_high):  # NaN (no known parent) is rejected too
                    reject(i, "band")
        else:
            by_class: dict[str, list[int]] = {}
            for i in live:
                by_class.setdefault(rows[i]["name"], []).append(i)
            for idx in by_class.values():
                v = sim[idx]
                lo, hi = np.nanquantile(v, cfg.quantile_low), np.nanquantile(v, cfg.quantile_high)
                for i in idx:  # keep (q_low, q_high]: quantile_low = 0.1 drops the least similar tenth
                    above = sim[i] > lo if cfg.quantile_low > 0 else sim[i] >= lo
                    if np.isnan(sim[i]) or not (above and sim[i] <= hi):
                        reject(i, "band")
    if cfg.leak and live and feats is not None:
        test = protocol.target_test
        test_sha = {image_sha256(test, i) for i in range(len(test))}
        fc, tt_unit = feats["candidates"], _unit(feats["target_test"])
        best = np.concatenate([_max_cos(_unit(fc[s:s + _BLOCK]), tt_unit)[0] for s in range(0, len(live), _BLOCK)])
        for n, i in enumerate(live):
            leak_sim[i] = best[n]
            if decision[i]:
                continue
            if rows[i]["sha256"] in test_sha or best[n] >= cfg.leak_threshold:
                reject(i, "leak")
    if cfg.dedup and live:
        seen_sha: set[str] = set()
        # per class: the unit features of its kept images in a growing buffer, so each candidate costs one
        # mat-vec against its class's kept images (no re-gathering or re-normalising of the kept set per candidate)
        kept_unit: dict[str, list] = {}  # class -> [buffer [cap, D], number kept]
        pos = {i: n for n, i in enumerate(live)}
        for i in live:
            if decision[i]:
                continue
            sha = rows[i]["sha256"]
            if sha and sha in seen_sha:
                reject(i, "dedup")
                continue
            if feats is not None:
                u = _unit(feats["candidates"][pos[i]:pos[i] + 1])[0]
                slot = kept_unit.get(rows[i]["name"])
                if slot is not None and float((slot[0][:slot[1]] @ u).max()) >= cfg.dedup_threshold:
                    reject(i, "dedup")
                    continue
                if slot is None:
                    slot = kept_unit[rows[i]["name"]] = [np.empty((16, u.shape[0]), np.float32), 0]
                elif slot[1] == len(slot[0]):
                    slot[0] = np.concatenate([slot[0], np.empty_like(slot[0])])
                slot[0][slot[1]] = u
                slot[1] += 1
            seen_sha.add(sha)
    if cfg.max_per_class is not None:
        by_class = {}
        for i in range(len(rows)):
            if not decision[i]:
                by_class.setdefault(rows[i]["name"], []).append(i)
        for idx in by_class.values():
            order = sorted(idx, key=lambda i: -np.nan_to_num(sim[i], nan=-2.0)) if cfg.band else idx
            for i in order[cfg.max_per_class:]:
                reject(i, "cap")
    counts = Counter(rows[i]["name"] for i in range(len(rows)) if not decision[i])
    dropped = [n for n in dict.fromkeys(r["name"] for r in rows) if 0 < counts.get(n, 0) < cfg.min_per_class]
    for i in range(len(rows)):
        if not decision[i] and rows[i]["name"] in dropped:
            reject(i, "kept")

    # ---- outputs -------------------------------------------------------------------------------------------
    class_index: dict[str, int] = {}
    for i, r in enumerate(rows):
        if not decision[i]:
            class_index.setdefault(r["name"], len(class_index))
    kept_rows = []
    for i, r in enumerate(rows):
        if not decision[i]:
            kept_rows.append({**r, "class_index": class_index[r["name"]], "parent": parent[i],
                              "band_similarity": float(sim[i]), "leak_similarity": float(leak_sim[i])})
    import pyarrow as pa

    aux_schema = mf.SCHEMA.append(pa.field("class_index", pa.int64())).append(pa.field("parent", pa.string())) \
        .append(pa.field("band_similarity", pa.float32())).append(pa.field("leak_similarity", pa.float32()))
    mf.write_table(mf.to_table(kept_rows, aux_schema), aux_path)
    dec_schema = mf.SCHEMA.append(pa.field("decision", pa.string())).append(pa.field("parent", pa.string())) \
        .append(pa.field("band_similarity", pa.float32())).append(pa.field("leak_similarity", pa.float32()))
    mf.write_table(mf.to_table([{**r, "decision": decision[i] or "kept", "parent": parent[i],
                                 "band_similarity": float(sim[i]), "leak_similarity": float(leak_sim[i])}
                                for i, r in enumerate(rows)], dec_schema), out / "decisions.parquet")
    funnel = _funnel(rows, decision, cfg, dropped, len(class_index))
    funnel["pair_density"] = _density(kept_rows, protocol, rd)
    atomic_write_json(out / "funnel.json", funnel)
    if cfg.sheets:
        _contact_sheets(cfg, rd, rows, decision, protocol)
    write_coverage(rd.root, STAGE)  # filter/coverage.json; one warning naming the targets without a silenced pair
    rd.log(STAGE, event="done", funnel=funnel["total"], classes=len(class_index), dropped_classes=dropped)
    rd.mark_done(STAGE, key, funnel=funnel["total"])
    logger.info("filter: %s", " -> ".join(f"{s} {funnel['total'][s]}" for s in FUNNEL))
    return FilterResult(aux_manifest=str(aux_path), funnel=funnel["total"], classes=len(class_index),
                        dropped_classes=dropped)


def _funnel(rows: list[dict[str, Any]], decision: list[str], cfg: FilterConfig, dropped: list[str],
            n_classes: int) -> dict[str, Any]:
    """Images left after each rule, overall and per class (a rejected image counts up to the rule before it)."""
    stage_of = {s: k for k, s in enumerate(FUNNEL)}

    def left(idx: list[int]) -> dict[str, int]:
        out = {"candidates": len(idx)}
        for s in FUNNEL[1:]:
            out[s] = sum(1 for i in idx if not decision[i] or stage_of[decision[i]] > stage_of[s])
        return out

    per: dict[str, list[int]] = {}
    parents: dict[str, list[str]] = {}
    for i, r in enumerate(rows):
        per.setdefault(r["name"], []).append(i)
        parents.setdefault(r["name"], list(r["parents"]))
    return {"schema": 1, "stages": list(FUNNEL), "total": left(list(range(len(rows)))),
            "per_class": [{"name": n, "parents": parents[n], **left(idx)} for n, idx in per.items()],
            "rules": cfg.key_fields(), "classes": n_classes, "dropped_classes": dropped}


def _density(kept: list[dict[str, Any]], protocol: Any, rd: RunDir) -> dict[str, Any]:
    """:func:`~neighborlt.data.auxiliary.pair_density` of the kept classes (targets named in ``classes.json``)."""
    from ..data.auxiliary import pair_density
    from ..rundir import read_json

    targets = [c["name"] for c in read_json(rd.path("classes.json"))["classes"]] if rd.path("classes.json").is_file() \
        else list(protocol.target_train.class_names) if protocol is not None else []
    index = {n: i for i, n in enumerate(targets)}
    K = len({r["class_index"] for r in kept})
    pairs = sorted({(index[p], len(targets) + r["class_index"]) for r in kept for p in r["parents"] if p in index})
    return pair_density(np.array(pairs, dtype=np.int64), len(targets), K)


def _prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    from ..data.auxiliary import class_prototypes

    return class_prototypes(features, labels, num_classes)


def _features(cfg: FilterConfig, protocol: Any, rows: list[dict[str, Any]], root: Path) -> dict[str, np.ndarray]:
    """Features of the candidates, the target training images (prototypes) and the target test images (leaks),
    extracted in resumable chunks and cached by content (:func:`neighborlt.train.features.extract_features`); under
    torchrun each rank computes its own chunks. The arrays are memory-mapped: read them a block of rows at a time."""
    from ..data.auxiliary import rows_image_set
    from ..train.features import extract_features

    dev = _device(cfg.device)

    def ext(image_set: Any) -> np.ndarray:
        try:
            return extract_features(cfg.feature_model, cfg.feature_init, image_set, cfg.feature_image_size,
                                    batch_size=cfg.batch_size, device=dev, distributed=True)
        except ConfigError as e:
            raise ConfigError(f"filter --feature-model {cfg.feature_model}: {e}") from None

    cand = rows_image_set(rows, protocol.pool, root, size=cfg.feature_image_size)
    out = {"candidates": ext(cand)}
    if cfg.band:
        out["target_train"] = ext(protocol.target_train)
    if cfg.leak:
        out["target_test"] = ext(protocol.target_test)
    return out


def sheet_stem(name: str) -> str:
    """The file-name stem of a class's contact sheets (``sheets/<stem>_kept.png`` / ``<stem>_rejected.png``); the
    report finds a class's sheets by it."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60] or "class"


def _contact_sheets(cfg: FilterConfig, rd: RunDir, rows: list[dict[str, Any]], decision: list[str],
                    protocol: Any) -> None:
    """``sheets/<class>_kept.png`` and ``_rejected.png`` (each image labelled with the rule that dropped it) for the
    first ``cfg.sheets`` classes that have rejections, else the first classes."""
    from PIL import Image, ImageDraw

    from ..data.auxiliary import rows_image_set
    from ..data.pixels import decode
    from ..rundir import atomic_output

    if protocol is None:
        from ..data import load_targets

        protocol = load_targets(rd.root, data_dir=cfg.data_dir)
    folder = rd.path(STAGE, "sheets")
    folder.mkdir(parents=True, exist_ok=True)
    per: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        per.setdefault(r["name"], []).append(i)
    with_rejections = [n for n, idx in per.items() if any(decision[i] and decision[i] != "downloaded" for i in idx)]
    names = (with_rejections + [n for n in per if n not in with_rejections])[: cfg.sheets]
    tile, pad, cols, head = 96, 4, 8, 22  # a grid of drafted thumbnails drawn with PIL (matplotlib: 3 s a sheet)
    for name in names:
        for kind in ("kept", "rejected"):
            idx = [i for i in per[name] if (not decision[i]) == (kind == "kept") and rows[i]["status"] == "ok"]
            idx = idx[: cfg.sheet_images]
            label_h = 14 if kind == "rejected" else 0  # the rule that dropped each image, under it
            nrow = max(1, (len(idx) + cols - 1) // cols)
            sheet = Image.new("RGB", (cols * (tile + pad) + pad, head + nrow * (tile + label_h + pad) + pad), "white")
            draw = ImageDraw.Draw(sheet)
            total = sum((not decision[i]) == (kind == "kept") for i in per[name])
            draw.text((pad, 5), f"{name}: {kind} ({total})", fill="black")
            if idx:
                images = rows_image_set([rows[i] for i in idx], protocol.pool, rd.root, size=64)
                for n, i in enumerate(idx):
                    x = pad + (n % cols) * (tile + pad)
                    y = head + (n // cols) * (tile + label_h + pad)
                    try:  # a drafted thumbnail, as the report shows it
                        sheet.paste(Image.fromarray(decode(images.ref(n), tile, policy="center", crop_pct=1.0)), (x, y))
                    except Exception as e:  # noqa: BLE001 - a broken image is shown as a blank tile
                        logger.debug("contact sheet: %s", e)
                        draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline="#999")
                    if label_h:
                        draw.text((x + 2, y + tile + 1), str(decision[i])[:16], fill="#b00")
            with atomic_output(folder / f"{sheet_stem(name)}_{kind}.png") as tmp:
                sheet.save(tmp, format="PNG")


__all__ = ["FUNNEL", "FilterResult", "image_sha256", "run_filter"]
