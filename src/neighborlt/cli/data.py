"""CLI for datasets: ``neighborlt data summary`` (class counts, many/medium/few split) and ``neighborlt data decode``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..defaults import FEW_SHOT, MANY_SHOT

data_app = typer.Typer(help="Inspect and prepare datasets and split-neighbour protocols.", no_args_is_help=True)


def _print_counts(title: str, ids: list[str], names: list[str], counts: list[int], shots: list[str] | None,
                  limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("id")
    table.add_column("name")
    table.add_column("images", justify="right")
    if shots is not None:
        table.add_column("shot")
    rows = list(range(len(ids)))
    if limit and len(rows) > limit:
        half = limit // 2
        rows = rows[:half] + [-1] + rows[-half:]
    for i in rows:
        if i < 0:
            table.add_row("...", "", f"({len(ids) - 2 * (limit // 2)} more)", "", *([""] if shots else []))
            continue
        table.add_row(str(i), ids[i], names[i], str(counts[i]), *([shots[i]] if shots is not None else []))
    Console().print(table)


def _print_shots(counts: list[int], many: int, few: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..data.shots import shot_totals

    totals = shot_totals(counts, many, few)
    table = Table(title=f"shot groups (many > {many}, few < {few} training images)")
    for col in ("group", "classes", "images"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for g, v in totals.items():
        table.add_row(g, str(v["classes"]), str(v["images"]))
    table.add_row("total", str(len(counts)), str(sum(counts)))
    Console().print(table)


@data_app.command("summary")
def summary_cmd(
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="cifar10 | cifar100 | tiny-imagenet | omniglot | a path.")] = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", "-p", help="Split-neighbour preset, e.g. cifar10-neighbours, tiny-imagenet-lt-neighbours.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split (with --dataset).")] = "train",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the datasets.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Protocol seed.")] = None,
    imbalance_ratio: Annotated[float | None, typer.Option("--imbalance-ratio", help="n_max / n_min.")] = None,
    n_max: Annotated[int | None, typer.Option("--n-max", help="Images of the head class.")] = None,
    many: Annotated[int | None, typer.Option("--many", help="Many-shot: more than this many images.")] = None,
    few: Annotated[int | None, typer.Option("--few", help="Few-shot: fewer than this many images.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many class rows (0: all).")] = 40,
    skip_corrupt: Annotated[bool, typer.Option("--skip-corrupt", help="Decode all images; skip corrupt ones.")] = False,
    download: Annotated[bool, typer.Option("--download", help="Fetch CIFAR through torchvision if missing.")] = False,
) -> None:
    """Print class counts and the many / medium / few split of a dataset or protocol."""
    from ..data.protocol import build_protocol
    from ..data.readers import load_dataset
    from ..data.shots import shot_groups
    from ..errors import ConfigError

    if (dataset is None) == (protocol is None):
        raise ConfigError("give exactly one of --dataset or --protocol")
    if protocol is not None:
        p = build_protocol(protocol, data_dir, seed=seed, imbalance_ratio=imbalance_ratio, n_max=n_max,
                           many=many, few=few, skip_corrupt=skip_corrupt or None, download=download or None)
        tr = p.target_train
        counts = tr.counts().tolist()
        shots = shot_groups(counts, p.config.many, p.config.few).tolist()
        _print_counts(f"{p.config.preset or p.config.dataset}: {tr.num_classes} target classes (head -> tail)",
                      tr.class_ids, tr.class_names, counts, shots, limit)
        _print_shots(counts, p.config.many, p.config.few)
        if p.pool is not None:
            pc = p.pool.counts().tolist()
            typer.echo(f"pool: {p.pool.num_classes} classes, {sum(pc)} images; test: {len(p.target_test)} images; "
                       f"targets with siblings in the pool: {p.stats.get('targets_with_siblings', 0)}/{tr.num_classes}"
                       + (f" (direct hypernym: {p.stats['targets_with_direct_sibling']})"
                          if "targets_with_direct_sibling" in p.stats else ""))
        skipped = set(tr.skipped) | set(p.target_test.skipped)
    else:
        assert dataset is not None
        s = load_dataset(dataset, split, data_dir, skip_corrupt=skip_corrupt, download=download)
        counts = s.counts().tolist()
        m, f = (many if many is not None else MANY_SHOT), (few if few is not None else FEW_SHOT)
        _print_counts(f"{dataset} [{split}]: {s.num_classes} classes, {len(s)} images", s.class_ids, s.class_names,
                      counts, shot_groups(counts, m, f).tolist(), limit)
        _print_shots(counts, m, f)
        skipped = set(s.skipped)
    if skipped:
        typer.echo(f"skipped {len(skipped)} corrupt images (first: {min(skipped)})")


@data_app.command("decode")
def decode_cmd(
    dataset: Annotated[str, typer.Argument(help="cifar10 | cifar100 | tiny-imagenet | omniglot | a path.")],
    size: Annotated[int, typer.Option("--size", help="Side length of the decoded images.")] = 32,
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the datasets.")] = None,
    skip_corrupt: Annotated[bool, typer.Option("--skip-corrupt", help="Skip corrupt images.")] = False,
) -> None:
    """Decode a dataset once into the uint8 array cache (later training runs reuse it)."""
    import time

    from ..data.arrays import as_array
    from ..data.readers import load_dataset

    s = load_dataset(dataset, split, data_dir, skip_corrupt=skip_corrupt)
    t0 = time.perf_counter()
    arr = as_array(s, size)
    typer.echo(f"{dataset} [{split}]: {arr.shape[0]} images as {arr.shape[1]}x{arr.shape[2]} uint8 "
               f"in {time.perf_counter() - t0:.1f} s ({arr.filename if hasattr(arr, 'filename') else 'in memory'})")


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt data ...``."""
    app.add_typer(data_app, name="data")
