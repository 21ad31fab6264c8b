"""CLI for acquisition: ``neighborlt retrieve RUN`` (stage 3) and ``neighborlt filter RUN`` (stage 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import build_config
from ._common import parse_key_values as _pairs


def _nested(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``--set a.b=1`` pairs as nested dicts (``{"a": {"b": 1}}``)."""
    out: dict[str, Any] = {}
    for k, v in _pairs(items, flag).items():
        cur = out
        *head, last = k.split(".")
        for part in head:
            cur = cur.setdefault(part, {})
        cur[last] = v
    return out


def retrieve_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads neighbors.json, writes retrieve/).")],
    source: Annotated[str | None, typer.Option(help="local | urls | web | knn.")] = None,
    match: Annotated[str | None, typer.Option(
        help="local protocol pool: names (pool classes named in neighbors.json) | wordnet (the sibling relation).")]
    = None,
    pool: Annotated[str | None, typer.Option(
        help="local: a folder <class name>/*.jpg or a CSV/Parquet of path,caption (default: the protocol's pool).")]
    = None,
    urls_file: Annotated[str | None, typer.Option(help="urls: CSV/Parquet with columns name,url,caption.")] = None,
    per_name: Annotated[int | None, typer.Option(help="web/knn: candidates per auxiliary name.")] = None,
    knn_url: Annotated[str | None, typer.Option(help="knn: base URL of a clip-retrieval back service.")] = None,
    knn_index: Annotated[str | None, typer.Option(help="knn: indice_name of that service.")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Host / IP / CIDR the address guard lets through (e.g. 127.0.0.1); repeatable.")] = None,
    threads: Annotated[int | None, typer.Option(help="Concurrent downloads per process.")] = None,
    processes: Annotated[int | None, typer.Option(
        help="Download worker processes (0: one per CPU core available, the default).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Fetch again the candidates that failed before.")] = False,
    export_img2dataset: Annotated[str | None, typer.Option(
        help="Write the URL candidates as an img2dataset input Parquet and stop.")] = None,
    import_img2dataset: Annotated[str | None, typer.Option(
        help="Read an img2dataset webdataset output folder as the downloads.")] = None,
    neighbors: Annotated[str | None, typer.Option(help="neighbors.json (default RUN/neighbors.json).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Offline data folder.")] = None,
    force: Annotated[bool, typer.Option(help="Redo the stage even if finished with the same options.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any RetrieveConfig field as key=value, nested with dots (download.max_bytes=1000000); "
                      "repeatable.")] = None,
) -> None:
    """Find, download (or reference) and index candidate images for every auxiliary name."""
    from ..retrieve import RetrieveConfig, run_retrieve

    given = {"source": source, "match": match, "pool": pool, "urls_file": urls_file, "per_name": per_name,
             "knn_url": knn_url, "knn_index": knn_index, "export_img2dataset": export_img2dataset,
             "import_img2dataset": import_img2dataset, "neighbors": neighbors, "data_dir": data_dir}
    fields: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    fields.update(retry_failed=retry_failed, force=force)
    extra = _nested(set_, "--set")
    download = dict(extra.pop("download", {}))
    if allow_host:
        download["allow_hosts"] = list(allow_host)
    if threads is not None:
        download["threads"] = threads
    if processes is not None:
        download["processes"] = processes
    if download:
        fields["download"] = download
    cfg = build_config(RetrieveConfig, **{**fields, **extra})
    res = run_retrieve(cfg, run_dir)
    if res.exported:
        typer.echo(f"wrote {res.exported}: {res.candidates} candidates in img2dataset's input format")
        return
    status = ", ".join(f"{k} {v}" for k, v in sorted(res.status.items(), key=lambda kv: -kv[1]))
    note = " (finished earlier; skipped)" if res.skipped else ""
    typer.echo(f"{run_dir}/retrieve/manifest.parquet: {res.candidates} candidates ({status}); "
               f"{res.names_with_images}/{res.names} names with images{note}")


def filter_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads retrieve/manifest.parquet, writes filter/).")],
    caption: Annotated[bool | None, typer.Option("--caption/--no-caption", help="Caption rule.")] = None,
    band: Annotated[bool | None, typer.Option("--band/--no-band", help="Feature band γ1 < cos < γ2.")] = None,
    gamma_low: Annotated[float | None, typer.Option(help="γ1.")] = None,
    gamma_high: Annotated[float | None, typer.Option(help="γ2.")] = None,
    band_mode: Annotated[str | None, typer.Option(help="absolute | quantile.")] = None,
    leak: Annotated[bool | None, typer.Option("--leak/--no-leak", help="Drop copies of target test images.")] = None,
    leak_threshold: Annotated[float | None, typer.Option(help="Feature cosine of a near duplicate.")] = None,
    dedup: Annotated[bool | None, typer.Option("--dedup/--no-dedup", help="Drop duplicates in the set.")] = None,
    max_per_class: Annotated[int | None, typer.Option(help="At most this many images per class.")] = None,
    min_per_class: Annotated[int | None, typer.Option(help="Drop classes with fewer images.")] = None,
    feature_model: Annotated[str | None, typer.Option(help="Feature model (efficientnet_lite0, a timm name).")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Offline data folder.")] = None,
    force: Annotated[bool, typer.Option(help="Redo the stage even if finished with the same options.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any FilterConfig field as key=value; repeatable.")] = None,
) -> None:
    """Keep the retrieved images that are relevant, clean and leak-free; writes filter/aux_manifest.parquet."""
    from ..filter import FUNNEL, FilterConfig, run_filter

    given = {"caption": caption, "band": band, "gamma_low": gamma_low, "gamma_high": gamma_high,
             "band_mode": band_mode, "leak": leak, "leak_threshold": leak_threshold, "dedup": dedup,
             "max_per_class": max_per_class, "min_per_class": min_per_class, "feature_model": feature_model,
             "device": device, "data_dir": data_dir}
    fields = {**{k: v for k, v in given.items() if v is not None}, "force": force, **_pairs(set_, "--set")}
    res = run_filter(build_config(FilterConfig, **fields), run_dir)
    typer.echo(" -> ".join(f"{s} {res.funnel[s]}" for s in FUNNEL))
    typer.echo(f"{res.aux_manifest}: {res.classes} auxiliary classes"
               + (f"; dropped (too few images): {', '.join(res.dropped_classes[:5])}" if res.dropped_classes else ""))


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt retrieve`` and ``neighborlt filter``."""
    app.command("retrieve")(retrieve_cmd)
    app.command("filter")(filter_cmd)
