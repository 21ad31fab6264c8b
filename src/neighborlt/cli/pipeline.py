"""CLI for the whole pipeline and the experiment grids: ``neighborlt demo``, ``neighborlt run``, ``neighborlt ablate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ._common import build_config


def _json_opt(text: str | None, what: str) -> dict:
    from ..errors import ConfigError

    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON ({e.msg}); pass e.g. '{{\"epochs\": 10}}'") from None
    if not isinstance(val, dict):
        raise ConfigError(f"{what}: expected a JSON object such as '{{\"epochs\": 10}}'")
    return val


def run_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (created; re-running resumes).")],
    protocol: Annotated[str, typer.Option(help="Split-neighbour preset.")] = "cifar10-neighbours",
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    loss: Annotated[str, typer.Option(help="Loss with auxiliary classes.")] = "neighbor_silencing",
    lambda_s: Annotated[float, typer.Option(help="Neighbor-silencing weight λs.")] = 0.1,
    aux_cap: Annotated[int, typer.Option(help="M: images per auxiliary class per epoch.")] = 50,
    neighbors: Annotated[str | None, typer.Option(help="NeighborsConfig fields as JSON.")] = None,
    train: Annotated[str | None, typer.Option(help="TrainConfig fields as JSON (merged over the demo's).")] = None,
    retrieve: Annotated[str | None, typer.Option(
        help="RetrieveConfig fields as JSON (default: the protocol's local pool, matched by name).")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help="FilterConfig fields as JSON.")] = None,
    baseline: Annotated[bool, typer.Option(help="Also train Balanced-CE without auxiliary data.")] = True,
    report: Annotated[bool, typer.Option(help="Write RUN/report/index.html at the end.")] = True,
) -> None:
    """Run classes -> neighbors -> retrieve -> filter -> train -> export -> eval (and the baseline) into RUN_DIR."""
    from ..pipeline import DEMO_TRAIN, PipelineConfig, run_pipeline

    cfg = build_config(PipelineConfig, protocol=protocol, data_dir=str(data_dir) if data_dir else None, seed=seed,
                       loss=loss, lambda_s=lambda_s, aux_cap=aux_cap, baseline=baseline, report=report,
                       neighbors={"backend": "wordnet", **_json_opt(neighbors, "--neighbors")},
                       retrieve=_json_opt(retrieve, "--retrieve"), filter=_json_opt(filter_, "--filter"),
                       train={**DEMO_TRAIN, **_json_opt(train, "--train")})
    out = run_pipeline(cfg, run_dir)
    typer.echo(Path(out["summary"]).read_text())
    extra = f", {run_dir}/report/index.html" if out.get("report") is not None else ""
    typer.echo(f"wrote {run_dir}/summary.md, {run_dir}/eval/report.md{extra}")


def demo_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where the demo run goes.")] = Path("runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
) -> None:
    """The offline demo: CIFAR-10 split-neighbour protocol, WordNet neighbours, its captioned local pool (the
    protocol's sibling relation: CIFAR-10's generic pool names such as "ship" rarely equal WordNet's specific
    neighbour names such as "brig"), the default filter, ResNet-8 from scratch."""
    run_cmd(run_dir, data_dir=data_dir, retrieve='{"match": "wordnet"}')


def ablate_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Experiment folder (created; re-running resumes).")],
    grid: Annotated[list[str], typer.Option("--grid", help="table6 | lambda | cap | k | ratio | losses | pairs "
                                                           "(repeat).")]
    = ["table6"],  # noqa: B006
    protocol: Annotated[str, typer.Option(help="Split-neighbour preset.")] = "cifar10-neighbours",
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0,1,2",
    relation: Annotated[str, typer.Option(help="neighbors (search with --backend) or wordnet (protocol siblings).")]
    = "neighbors",
    backend: Annotated[str, typer.Option(help="Neighbour backend for relation 'neighbors'.")] = "wordnet",
    neighbors_vocabulary: Annotated[str, typer.Option(
        help="backend (its own vocabulary) or pool (answers limited to the pool's class names; embedding backend)."
    )] = "backend",
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
    train: Annotated[str | None, typer.Option(help="TrainConfig fields as JSON (merged over the demo's).")] = None,
    protocol_overrides: Annotated[str | None, typer.Option(help="ProtocolConfig fields as JSON.")] = None,
    lambda_s: Annotated[float, typer.Option(help="λs where not swept.")] = 0.1,
    aux_cap: Annotated[int, typer.Option(help="M where not swept.")] = 50,
    per_class: Annotated[int, typer.Option(help="K where not swept.")] = 5,
    pairing: Annotated[list[str], typer.Option("--pairing", help="Grid pairs: visual (prototype cosine of frozen "
                                                                 "pretrained features) | random (repeat).")]
    = ["visual", "random"],  # noqa: B006
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Table 6 and the λs / M / K / split-ratio / loss grids: mean ± std over seeds, markdown + plots."""
    from ..ablate import AblationConfig, run_ablation
    from ..errors import ConfigError
    from ..pipeline import DEMO_TRAIN

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2") from None
    cfg = build_config(AblationConfig, repeated={"grids": "--grid", "pairings": "--pairing"}, grids=grid,
                       protocol=protocol, seeds=seed_list, relation=relation, neighbors_backend=backend,
                       neighbors_vocabulary=neighbors_vocabulary, data_dir=str(data_dir) if data_dir else None,
                       train={**DEMO_TRAIN, **_json_opt(train, "--train")}, lambda_s=lambda_s, aux_cap=aux_cap,
                       per_class=per_class, pairings=pairing,
                       protocol_overrides=_json_opt(protocol_overrides, "--protocol-overrides"))
    for res in run_ablation(cfg, out_dir, progress=not quiet):
        typer.echo(res.markdown)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("demo")(demo_cmd)
    app.command("ablate")(ablate_cmd)
