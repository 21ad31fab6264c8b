"""Stage 3 (``retrieve``): candidate images for every auxiliary name of ``neighbors.json``, fetched or referenced.

``run_retrieve`` asks a source (:data:`~neighborlt.retrieve.sources.SOURCES`) for candidates, writes them to
``RUN/retrieve/candidates.parquet``, downloads the URL candidates into WebDataset shards (``RUN/retrieve/shards/``,
resumable: finished shards are never fetched again) or references local ones, and writes
``RUN/retrieve/manifest.parquet`` (one row per candidate, :mod:`neighborlt.data.manifest`) and
``RUN/retrieve/stats.json`` (per-name status counts and the source's own figures). A re-run with the same options
and inputs is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..coverage import write_coverage
from ..data import manifest as mf
from ..errors import ConfigError, DataError
from ..rundir import RunDir, StageKey, atomic_write_json, config_hash, read_json
from .config import RetrieveConfig
from .filecheck import CheckCache, check_files, signature
from .sources import SOURCES, AuxName, SourceContext, candidate

logger = logging.getLogger(__name__)

STAGE = "retrieve"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same inputs (2: the one key rule)


class RetrieveResult(BaseModel):
    """What :func:`run_retrieve` produced."""

    model_config = ConfigDict(extra="forbid")

    manifest: str | None  # RUN/retrieve/manifest.parquet (None after --export-img2dataset)
    candidates: int  # candidate rows
    status: dict[str, int]  # rows per status (ok, timeout, not_image, ...)
    names: int  # auxiliary names asked for
    names_with_images: int  # names with at least one ok image
    exported: str | None = None  # the img2dataset input file written by --export-img2dataset
    skipped: bool = False  # True when a finished run with the same options was found


def aux_names(doc: Any, path: Path) -> list[AuxName]:
    """Auxiliary names and their parents from a parsed ``neighbors.json`` (its ``auxiliary`` list, plus names that
    only appear in ``targets[].found``), in file order."""
    if not isinstance(doc, dict) or not isinstance(doc.get("auxiliary", []), list):
        raise DataError(f"{path}: expected a JSON object with an 'auxiliary' list; re-run `neighborlt neighbors`")
    out: dict[str, list[str]] = {}
    synonyms: dict[str, list[str]] = {}
    for k, entry in enumerate(doc.get("auxiliary") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{path}: auxiliary[{k}] needs a string 'name'")
        parents = entry.get("parents") or []
        if not isinstance(parents, list):
            raise DataError(f"{path}: auxiliary[{k}].parents must be a list of target names")
        lst = out.setdefault(entry["name"], [])
        lst += [str(p) for p in parents if str(p) not in lst]
        syn = entry.get("synonyms") or []
        if isinstance(syn, list):  # WordNet provenance: the other lemmas of the name's synset
            synonyms.setdefault(entry["name"], [str(x) for x in syn if isinstance(x, str)])
    for k, t in enumerate(doc.get("targets") or []):
        if not isinstance(t, dict):
            raise DataError(f"{path}: targets[{k}] must be an object")
        for name in t.get("found") or []:
            lst = out.setdefault(str(name), [])
            parent = str(t.get("name", ""))
            if parent and parent not in lst:
                lst.append(parent)
    return [AuxName(n, p, synonyms.get(n, [])) for n, p in out.items()]


def _inputs_key(cfg: RetrieveConfig, rd: RunDir, npath: Path, *, candidates: bool = False) -> StageKey:
    """The stage key (:meth:`RunDir.stage_key`: options, input files, version); ``candidates=True``: only what decides
    the candidate list (not the download rules), so a re-run after a crash or with other download options does not
    ask the source again."""
    fields = cfg.key_fields()
    if candidates:
        fields = {k: v for k, v in fields.items() if k not in ("download", "export_img2dataset")}
    files: list[Path] = [npath, rd.path("split.json"), rd.path("targets.parquet")]
    for label, value in (("urls_file", cfg.urls_file), ("pool", cfg.pool), ("import", cfg.import_img2dataset)):
        if value:
            p = Path(value)
            if p.is_file():
                files.append(p.resolve())
            elif p.is_dir():
                fields = {**fields, f"{label}_listing": config_hash(sorted(
                    (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*")
                    if f.is_file()))}
    return rd.stage_key(f"{STAGE}.candidates" if candidates else STAGE, fields, files, version=STAGE_VERSION)


def run_retrieve(cfg: RetrieveConfig, run_dir: RunDir | str | os.PathLike[str]) -> RetrieveResult:
    """Find, fetch and index candidate images for every auxiliary name (see the module docstring).

    Args:
        cfg: the stage options.
        run_dir: the run directory (``neighbors.json``; ``split.json`` for the protocol pool).

    Returns:
        A :class:`RetrieveResult`.

    Raises:
        ConfigError: missing inputs or options (each names the file or option and the fix).
        DataError: malformed inputs.

    Example:
        >>> run_retrieve(RetrieveConfig(source="local"), "runs/demo").status  # doctest: +SKIP
        {'ok': 25000}
    """
    SOURCES.get(cfg.source)  # unknown source: one line listing the known ones, before anything else
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    npath = Path(cfg.neighbors) if cfg.neighbors else root / "neighbors.json"
    needs_names = not (cfg.source == "local" and cfg.pool is None and cfg.match == "wordnet")
    if needs_names and not npath.is_file():  # checked before RunDir(), which would create a mistyped folder
        raise ConfigError(f"{npath}: not found; run `neighborlt neighbors {root}` first")
    if not needs_names and not (root / "split.json").is_file():
        raise ConfigError(f"{root / 'split.json'}: not found; run `neighborlt classes {root}` first")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    out = rd.path(STAGE)
    if cfg.match == "wordnet" and (cfg.source != "local" or cfg.pool is not None):
        raise ConfigError("--match wordnet uses the protocol's sibling relation: it needs --source local without --pool")
    key = _inputs_key(cfg, rd, npath)
    manifest_path = out / "manifest.parquet"
    if not cfg.force and not cfg.retry_failed and rd.is_done(STAGE, key, "retrieve/manifest.parquet",
                                                             "retrieve/stats.json"):
        logger.info("retrieve: finished with the same options and inputs in %s; skipping", out)
        return _result(mf.read_table(manifest_path), read_json(out / "stats.json"), skipped=True)
    logger.debug("retrieve: running (%s)", "--force" if cfg.force else "--retry-failed" if cfg.retry_failed
                else rd.stale_reason(STAGE, key))
    rd.record(STAGE, cfg)

    names = aux_names(read_json(npath), npath) if needs_names else []

    @functools.lru_cache(maxsize=1)  # the source and the local references share one build of the protocol
    def load_protocol() -> Any:
        from ..data import load_targets

        return load_targets(rd.root, data_dir=cfg.data_dir)

    ctx = SourceContext(names=names, root=rd.root, load_protocol=load_protocol)
    cand_key = _inputs_key(cfg, rd, npath, candidates=True).key
    cand_path, cand_doc = out / "candidates.parquet", out / "candidates.json"
    previous = read_json(cand_doc) if cand_doc.is_file() and cand_path.is_file() and not cfg.force else {}
    if previous.get("key") == cand_key:  # the source was asked already (web / kNN queries are not repeated)
        rows = mf.read_table(cand_path).to_pylist()
        ctx.stats = dict(previous.get("source_stats") or {})
        logger.info("retrieve: %d candidates from %s (same options and inputs; the source is not asked again)",
                    len(rows), cand_path)
    else:
        if cfg.import_img2dataset:
            rows = _import_img2dataset(Path(cfg.import_img2dataset), names, ctx)
        else:
            rows = list(SOURCES.get(cfg.source)(cfg, ctx))
        mf.write_table(mf.to_table(rows), cand_path)
        atomic_write_json(cand_doc, {"schema": 1, "key": cand_key, "rows": len(rows), "source_stats": ctx.stats})
    if cfg.match == "wordnet":
        ctx.names = [AuxName(n, p) for n, p in {r["name"]: r["parents"] for r in rows}.items()]
    logger.info("retrieve (%s): %d candidates for %d names", cfg.source, len(rows), len(ctx.names))

    if cfg.export_img2dataset:
        path = export_img2dataset(rows, Path(cfg.export_img2dataset))
        rd.log(STAGE, event="exported", path=str(path), rows=sum(r["location"] == "url" for r in rows))
        return RetrieveResult(manifest=None, candidates=len(rows), status={}, names=len(ctx.names),
                              names_with_images=0, exported=str(path))

    # imported img2dataset rows are final (its failures keep its error; nothing is fetched again here)
    url_rows = [] if cfg.import_img2dataset else [r for r in rows if r["location"] == "url"]
    if url_rows:
        _download(cfg, rd, url_rows)
    _reference_local([r for r in rows if r["location"] in ("pool", "file")], load_protocol)

    stats = _stats(rows, ctx)
    table = mf.to_table(rows)
    mf.write_table(table, manifest_path)
    atomic_write_json(out / "stats.json", stats)
    write_coverage(rd.root, STAGE)  # retrieve/coverage.json; one warning naming the targets without images
    rd.log(STAGE, event="done", candidates=len(rows), status=stats["status"])
    rd.mark_done(STAGE, key, candidates=len(rows), status=stats["status"])
    ok_names = stats["names_with_images"]
    if ctx.names and ok_names == 0:
        logger.warning("retrieve: no auxiliary name got a single image; check %s", out / "stats.json")
    return _result(table, stats)


def _result(table: Any, stats: dict[str, Any], skipped: bool = False) -> RetrieveResult:
    return RetrieveResult(manifest=str(stats.get("manifest", "")) or None, candidates=table.num_rows,
                          status=dict(stats["status"]), names=int(stats["names"]),
                          names_with_images=int(stats["names_with_images"]), skipped=skipped)


def _stats(rows: list[dict[str, Any]], ctx: SourceContext) -> dict[str, Any]:
    per_name: dict[str, Counter] = {a.name: Counter() for a in ctx.names}
    for r in rows:
        per_name.setdefault(r["name"], Counter())[r["status"]] += 1
    status = Counter(r["status"] for r in rows)
    return {"schema": 1, "manifest": "retrieve/manifest.parquet", "candidates": len(rows), "status": dict(status),
            "names": len(per_name), "names_with_images": sum(1 for c in per_name.values() if c.get("ok")),
            "per_name": {n: dict(c) for n, c in per_name.items()}, "source": ctx.stats}


# --------------------------------------------------------------------------------------------------------------
# downloads and local references
# --------------------------------------------------------------------------------------------------------------


def _download(cfg: RetrieveConfig, rd: RunDir, url_rows: list[dict[str, Any]]) -> None:
    from .download import download

    shard_dir = rd.path(STAGE, "shards")
    index = download([{k: r[k] for k in ("uid", "url", "name", "caption")} for r in url_rows], shard_dir,
                     cfg.download, retry_failed=cfg.retry_failed)
    by_uid = {r["uid"]: r for r in index.to_pylist()}
    for r in url_rows:
        res = by_uid.get(r["uid"])
        if res is None:  # pragma: no cover - the downloader returns every row it was given
            r.update(status="missing", error="not in the download index")
            continue
        r.update(status=res["status"], error=res.get("error") or "", sha256=res.get("sha256") or "",
                 width=int(res.get("width") or 0), height=int(res.get("height") or 0))
        if res.get("shard") and int(res.get("offset") if res.get("offset") is not None else -1) >= 0:
            shard = Path(res["shard"])
            shard = shard if shard.is_absolute() else shard_dir / shard
            r.update(location="shard", path=os.path.relpath(shard, rd.root), offset=int(res["offset"]),
                     size=int(res["size"]))


def _reference_local(rows: list[dict[str, Any]], load_protocol: Any) -> None:
    """Status, SHA-256 and size of referenced local images (pool rows of an array-backed pool hash the pixels).

    Each distinct file is read once (an image that is a candidate of several names too), and not at all when it is
    unchanged since an earlier check (:class:`~neighborlt.retrieve.filecheck.CheckCache`).
    """
    if not rows:
        return
    pool = load_protocol().pool if any(r["location"] == "pool" for r in rows) else None
    files: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["location"] == "pool" and pool is not None and pool.array is not None:
            a = pool.array[r["pool_index"]]
            r.update(status="ok", sha256=hashlib.sha256(a.tobytes()).hexdigest(), height=int(a.shape[0]),
                     width=int(a.shape[1]))
        else:
            files.setdefault(str(r["path"]), []).append(r)
    if not files:
        return
    with CheckCache.default() as cache:
        sigs = {path: signature(path) for path in files}  # before any read: a file changed meanwhile is read again
        known = cache.lookup(sigs)
        todo = [path for path in files if path not in known]
        if known:
            logger.info("retrieve: %d of %d referenced files unchanged since their last check (%s)", len(known),
                        len(files), cache.path)
        checked = dict(zip(todo, check_files(todo)))
        cache.store((path, sigs[path], info) for path, info in checked.items())
    for path, info in (known | checked).items():
        for r in files[path]:
            r.update(info)



# --------------------------------------------------------------------------------------------------------------
# img2dataset interchange
# --------------------------------------------------------------------------------------------------------------

#: the img2dataset command that downloads an exported list into a folder --import-img2dataset reads back
IMG2DATASET_COMMAND = ("img2dataset --url_list {file} --input_format parquet --url_col url --caption_col caption "
                       "--save_additional_columns '[\"name\",\"uid\"]' --output_format webdataset "
                       "--output_folder OUT_DIR --image_size 512 --resize_mode keep_ratio_largest "
                       "--resize_only_if_bigger True --min_image_size 32 --max_aspect_ratio 5 "
                       "--max_image_area 40000000 --encode_quality 90 --processes_count 16 --thread_count 64")


def export_img2dataset(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the URL candidates of ``rows`` as the parquet list img2dataset reads (:data:`IMG2DATASET_COMMAND`)."""
    import pyarrow as pa

    url_rows = [r for r in rows if r["location"] == "url"]
    if not url_rows:
        raise ConfigError("--export-img2dataset: this source has no URL candidates (local images are referenced)")
    table = pa.table({"url": [r["url"] for r in url_rows], "caption": [r["caption"] for r in url_rows],
                      "name": [r["name"] for r in url_rows], "uid": [r["uid"] for r in url_rows]})
    mf.write_table(table, path)
    logger.info("wrote %d URLs to %s; download them with:\n  %s\nthen: neighborlt retrieve RUN --import-img2dataset "
                "OUT_DIR", table.num_rows, path, IMG2DATASET_COMMAND.format(file=path))
    return path


def _tar_members(tar_path: Path) -> dict[str, tuple[int, int]]:
    """``key -> (offset, size)`` of the image member of every sample in an img2dataset tar shard."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            stem, _, ext = m.name.rpartition(".")
            if m.isfile() and ext.lower() in ("jpg", "jpeg", "png", "webp"):
                out[Path(stem).name] = (m.offset_data, m.size)
    return out


def _import_img2dataset(folder: Path, names: list[AuxName], ctx: SourceContext) -> list[dict[str, Any]]:
    """Rows of an img2dataset webdataset output folder (complete shards only: those with a ``_stats.json``)."""
    import pyarrow.parquet as pq

    from ..neighbors.parse import name_key

    if not folder.is_dir():
        raise ConfigError(f"--import-img2dataset {folder}: not a folder")
    by_key = {name_key(a.name): a for a in names if name_key(a.name)}
    rows: list[dict[str, Any]] = []
    unknown: Counter = Counter()
    shards = sorted(folder.glob("*_stats.json"))
    if not shards:
        raise DataError(f"{folder}: no finished img2dataset shard (*_stats.json); is this its --output_folder?")
    for stats in shards:
        stem = stats.name[: -len("_stats.json")]
        pq_path, tar_path = folder / f"{stem}.parquet", folder / f"{stem}.tar"
        if not pq_path.is_file():
            raise DataError(f"{pq_path}: missing (img2dataset writes it beside {stats.name})")
        table = pq.read_table(pq_path)
        if "name" not in table.column_names:
            raise DataError(f"{pq_path}: no 'name' column; run img2dataset with --save_additional_columns "
                            "'[\"name\",\"uid\"]' on a list from --export-img2dataset")
        members = _tar_members(tar_path) if tar_path.is_file() else {}
        for r in table.to_pylist():
            aux = by_key.get(name_key(str(r.get("name") or "")) or "")
            if aux is None:
                unknown[str(r.get("name"))] += 1
                continue
            row = candidate(aux.name, aux.parents, url=str(r.get("url") or ""), location="url", source="img2dataset",
                            caption=str(r.get("caption") or ""))
            if r.get("uid"):
                row["uid"] = str(r["uid"])
            key = str(r.get("key") or "")
            if r.get("status") == "success" and key in members:
                off, size = members[key]
                with open(tar_path, "rb") as f:  # img2dataset hashes the original bytes; we hash what is stored
                    f.seek(off)
                    sha = hashlib.sha256(f.read(size)).hexdigest()
                row.update(status="ok", location="shard", path=str(tar_path.resolve()), offset=off, size=size,
                           sha256=sha, width=int(r.get("width") or 0), height=int(r.get("height") or 0))
            else:
                row.update(status="failed", error=str(r.get("error_message") or "not downloaded by img2dataset")[:300])
            rows.append(row)
    if unknown:
        logger.warning("%s: %d rows name classes that are not auxiliary classes of neighbors.json (e.g. %r); skipped",
                       folder, sum(unknown.values()), next(iter(unknown)))
    ctx.stats["unknown_names"] = dict(unknown)
    return rows


__all__ = ["IMG2DATASET_COMMAND", "RetrieveResult", "aux_names", "export_img2dataset", "run_retrieve"]
