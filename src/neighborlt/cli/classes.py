"""CLI for stage 1: ``neighborlt classes RUN_DIR --protocol NAME | --dataset PATH_OR_NAME [--targets A,B --pool C,D]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import build_config


def classes_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (created if missing).")],
    protocol: Annotated[str | None, typer.Option(
        "--protocol", "-p", help="Split-neighbour preset: tiny-imagenet-lt-neighbours, cifar10-neighbours, "
        "omniglot-neighbours, cifar10-lt, cifar100-lt.")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="A dataset (name or path: ImageFolder with train/ and test/, split file, ...): "
        "every class is a target and there is no pool, unless --targets / --pool say otherwise.")] = None,
    targets: Annotated[str | None, typer.Option(
        "--targets", help="Comma-separated target classes (names or ids), head -> tail: the first gets --n-max "
        "images, the last n-max / imbalance-ratio.")] = None,
    pool: Annotated[str | None, typer.Option(
        "--pool", help="Comma-separated classes of the dataset that form the captioned auxiliary pool.")] = None,
    test_dataset: Annotated[str | None, typer.Option(
        "--test-dataset", help="Test images from another path (e.g. a test split file); default: the "
        "dataset's test split.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the datasets.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the split and the long-tail sampling.")] = None,
    imbalance_ratio: Annotated[float | None, typer.Option("--imbalance-ratio", help="n_max / n_min.")] = None,
    n_max: Annotated[int | None, typer.Option("--n-max", help="Images of the head target class.")] = None,
    num_targets: Annotated[int | None, typer.Option(
        "--num-targets", help="Number of target classes (tiny-imagenet protocol).")] = None,
    many: Annotated[int | None, typer.Option("--many", help="Many-shot: more than this many images.")] = None,
    few: Annotated[int | None, typer.Option("--few", help="Few-shot: fewer than this many images.")] = None,
    skip_corrupt: Annotated[bool, typer.Option(
        "--skip-corrupt", help="Skip undecodable images (counted in RUN/logs/classes.jsonl).")] = False,
    download: Annotated[bool, typer.Option(
        "--download", help="Fetch CIFAR-10/100 through torchvision when no local copy exists (online).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run made with a different config.")] = False,
) -> None:
    """Stage 1: resolve the target classes; writes RUN/classes.json and RUN/split.json."""
    from ..classes import ClassesConfig, run_classes
    from ..data.shots import shot_totals
    from ..errors import ConfigError

    lists: dict[str, list[str]] = {}
    for opt, text in (("targets", targets), ("pool", pool)):
        if text is not None:
            names = [n.strip() for n in text.split(",") if n.strip()]
            if not names and opt == "targets":
                raise ConfigError("--targets: give comma-separated class names such as 'cat,dog'")
            lists[opt] = names
    cfg = build_config(ClassesConfig, protocol=protocol, dataset=dataset, test_dataset=test_dataset, **lists,
                       data_dir=str(data_dir) if data_dir else None, seed=seed, imbalance_ratio=imbalance_ratio,
                       n_max=n_max, num_targets=num_targets, many=many, few=few, skip_corrupt=skip_corrupt,
                       download=download, force=force)
    res = run_classes(cfg, run_dir)
    from ..rundir import read_json

    th = read_json(res.classes_path)["thresholds"]
    totals = shot_totals(res.train_counts, th["many"], th["few"])
    state = "already done" if res.skipped else "wrote"
    typer.echo(f"{state} {res.classes_path} and {res.split_path}: {res.num_targets} target classes "
               f"({sum(res.train_counts)} training images; many/medium/few classes "
               f"{totals['many']['classes']}/{totals['medium']['classes']}/{totals['few']['classes']}), "
               f"{res.num_pool} pool classes" + (f"; skipped {res.skipped_corrupt} corrupt images"
                                                 if res.skipped_corrupt else ""))


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt classes``."""
    app.command("classes")(classes_cmd)
