"""CLI for the whole pipeline and the experiment grids: ``neighborlt demo``, ``neighborlt run``, ``neighborlt ablate``,
``neighborlt pilot``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import AUX_CAP, LAMBDA_S
from ._common import build_config, default_help, format_validation_error


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


def _is_config_file(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml", ".json") and not path.is_dir()


def run_cmd(
    target: Annotated[Path, typer.Argument(
        metavar="RUN_OR_CONFIG", help="A run directory (created; re-running resumes), or a CONFIG.yaml whose run_dir "
                                      "is the run directory.")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config: top-level keys + a section per stage (see configs/). Flags given "
                               "here override it.")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", help="Stop after this stage: classes | neighbors | retrieve | filter | train | export | eval | "
                        "report.")] = None,
    from_: Annotated[str | None, typer.Option(
        "--from", help="Start at this stage; the earlier ones must have finished in the run directory.")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="Split-neighbour preset (default cifar10-neighbours; a config's classes section replaces it).",
        show_default=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed (default 0).", show_default=False)] = None,
    loss: Annotated[str | None, typer.Option(help="Loss with auxiliary classes (default neighbor_silencing).",
                                             show_default=False)] = None,
    lambda_s: Annotated[float | None, typer.Option(help=f"Neighbor-silencing weight λs (default {LAMBDA_S}).",
                                                   show_default=False)] = None,
    aux_cap: Annotated[str | None, typer.Option(
        help=f"M: images per auxiliary class per epoch, or 'all' (default {AUX_CAP}).", show_default=False)] = None,
    neighbors: Annotated[str | None, typer.Option(help="NeighborsConfig fields as JSON.")] = None,
    train: Annotated[str | None, typer.Option(
        help="TrainConfig fields as JSON (merged over the config's train section, else the demo's).")] = None,
    retrieve: Annotated[str | None, typer.Option(
        help="RetrieveConfig fields as JSON (default: the protocol's local pool, matched by name).")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help="FilterConfig fields as JSON.")] = None,
    baseline: Annotated[bool | None, typer.Option(
        "--baseline/--no-baseline", help="Also train Balanced-CE without auxiliary data (default on).",
        show_default=False)] = None,
    parallel_baseline: Annotated[bool | None, typer.Option(
        "--parallel-baseline/--no-parallel-baseline",
        help="Train the baseline in a second process beside the method (default: when both run on the CPU with "
             "threads that fit the cores).", show_default=False)] = None,
    report: Annotated[bool | None, typer.Option(
        "--report/--no-report", help="Write RUN/report/index.html at the end (default on).", show_default=False)]
    = None,
) -> None:
    """Run classes -> neighbors -> retrieve -> filter -> train -> export -> eval -> report (and the baseline).

    `neighborlt run CONFIG.yaml`, `neighborlt run RUN --config CONFIG.yaml` or `neighborlt run RUN [flags]`. Every
    option is checked before any work starts; finished stages are skipped on a re-run."""
    from ..errors import ConfigError
    from ..pipeline import DEMO_TRAIN, pipeline_config, read_config_file, run_pipeline, stage_configs, stage_range

    run_dir: Path | None = target
    source = None
    raw: dict = {}
    if config is None and _is_config_file(target):
        config, run_dir = target, None
    if config is not None:
        raw = read_config_file(config)
        source = str(config)
    flags = {"protocol": protocol, "data_dir": str(data_dir) if data_dir else None, "seed": seed, "loss": loss,
             "lambda_s": lambda_s, "aux_cap": aux_cap, "baseline": baseline, "parallel_baseline": parallel_baseline,
             "report": report}
    raw.update({k: v for k, v in flags.items() if v is not None})
    sections = {"neighbors": (neighbors, {"backend": "wordnet"}), "train": (train, DEMO_TRAIN),
                "retrieve": (retrieve, {}), "filter": (filter_, {})}
    for key, (text, default) in sections.items():
        opt = "--filter" if key == "filter" else f"--{key}"
        given = _json_opt(text, opt)
        if given:
            base = raw.get(key, default)
            raw[key] = {**(base if isinstance(base, dict) else {}), **given}
    stage_range(from_, until)
    cfg = pipeline_config(raw, source=source)
    try:
        stage_configs(cfg)  # every section validated before the run directory is touched
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    if run_dir is None:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / Path(str(config)).stem
        typer.echo(f"run directory: {run_dir}", err=True)
    out = run_pipeline(cfg, run_dir, from_stage=from_, until_stage=until)
    if out.get("summary"):
        typer.echo(Path(out["summary"]).read_text())
    wrote = [p for p, ok in ((f"{run_dir}/summary.md", out.get("summary")),
                             (f"{run_dir}/eval/report.md", out.get("method") is not None),
                             (f"{run_dir}/report/index.html", out.get("report") is not None)) if ok]
    typer.echo(stages_line(out) + f"; config in {run_dir}/config.yaml" + (f"; wrote {', '.join(wrote)}" if wrote else ""))


def stages_line(out: dict) -> str:
    """``stages run: train (epochs changed), export (train/model.json changed); skipped (up to date): classes``."""
    reasons = out.get("reasons") or {}
    ran = [f"{s} ({reasons[s]})" if reasons.get(s) else s for s in out.get("stages", [])]
    line = f"stages run: {', '.join(ran) or 'none'}"
    if out.get("skipped"):
        line += f"; skipped (up to date): {', '.join(out['skipped'])}"
    return line


def demo_cmd(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where the demo run goes.")] = Path("runs/demo"),
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
) -> None:
    """The offline demo: CIFAR-10 split-neighbour protocol, WordNet neighbours, its captioned local pool (the
    protocol's sibling relation: CIFAR-10's generic pool names such as "ship" rarely equal WordNet's specific
    neighbour names such as "brig"), the default filter on 32-px features, ResNet-8 from scratch."""
    import json

    from ..pipeline import DEMO_FILTER, DEMO_RETRIEVE

    run_cmd(run_dir, data_dir=data_dir, retrieve=json.dumps(DEMO_RETRIEVE), filter_=json.dumps(DEMO_FILTER))


def _ah(field: str, text: str) -> str:
    from ..ablate import AblationConfig

    return default_help(AblationConfig, field, text)


def _ph(field: str, text: str) -> str:
    from ..pilot import PilotConfig

    return default_help(PilotConfig, field, text)


def ablate_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Experiment folder (created; re-running resumes).")],
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help=_ah("grids", "table6 | lambda | cap | k | ratio | losses | pairs | silencing (repeat)."))]
    = None,
    protocol: Annotated[str | None, typer.Option(help=_ah("protocol", "Split-neighbour preset."))] = None,
    seeds: Annotated[str | None, typer.Option(help=_ah("seeds", "Comma-separated training seeds."))] = None,
    relation: Annotated[str | None, typer.Option(
        help=_ah("relation", "neighbors (search with --backend) or wordnet (protocol siblings)."))] = None,
    backend: Annotated[str | None, typer.Option(
        help=_ah("neighbors_backend", "Neighbour backend for relation 'neighbors'."))] = None,
    neighbors_vocabulary: Annotated[str | None, typer.Option(help=_ah(
        "neighbors_vocabulary", "backend (its own vocabulary) or pool (answers limited to the pool's class names; "
                                "embedding backend)."))] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
    train: Annotated[str | None, typer.Option(help="TrainConfig fields as JSON (merged over the demo's).")] = None,
    protocol_overrides: Annotated[str | None, typer.Option(help="ProtocolConfig fields as JSON.")] = None,
    filter_: Annotated[str | None, typer.Option(
        "--filter", help="FilterConfig fields as JSON for every auxiliary setting (default: every rule off, every "
                         "pool image kept, as the README's tables were run), e.g. '{\"band\": true, \"leak\": true}'.")]
    = None,
    lambda_s: Annotated[float | None, typer.Option(help=_ah("lambda_s", "λs where not swept."))] = None,
    aux_cap: Annotated[str | None, typer.Option(help=_ah("aux_cap", "M where not swept (a number or 'all')."))] = None,
    per_class: Annotated[int | None, typer.Option(help=_ah("per_class", "K where not swept."))] = None,
    pairing: Annotated[list[str] | None, typer.Option("--pairing", help=_ah(
        "pairings", "Grid pairs: visual (prototype cosine of frozen pretrained features) | random (repeat)."))] = None,
    silencing_variant: Annotated[list[str] | None, typer.Option(
        "--silencing-variant", help=_ah("silencing_variants", "Grid silencing: the settings after † (repeat): paper "
                                                              "| hard_pairs | aux_exclusive | official."))] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    print_commands: Annotated[bool, typer.Option(
        "--print-commands", help="Prepare every run folder (with its train.json) and print one shell command per "
        "unfinished run (`neighborlt job RUN`: train + export + eval; also in OUT/commands.txt) instead of training, for a SLURM array, "
        "Ray or GNU parallel; run the same ablate command afterwards to write the tables.")] = False,
    executable: Annotated[str, typer.Option(
        "--executable", help="How the printed commands call neighborlt (e.g. 'python -m neighborlt').")]
    = "neighborlt",
    include_finished: Annotated[bool, typer.Option(
        "--include-finished", help="With --print-commands: also print the runs already trained and evaluated.")]
    = False,
) -> None:
    """Table 6 and the λs / M / K / split-ratio / loss grids: mean ± std over seeds, markdown + plots, OUT/index.html.

    Several `ablate` processes on one OUT share the runs (a lock per run folder); `--print-commands` hands the runs
    to other machines instead. Options left out keep AblationConfig's defaults (shown in the help)."""
    from ..ablate import AblationConfig, prepare_runs, run_ablation
    from ..errors import ConfigError
    from ..pipeline import DEMO_TRAIN

    try:
        seed_list = None if seeds is None else [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2") from None
    given = {"grids": grid, "silencing_variants": silencing_variant, "protocol": protocol, "seeds": seed_list,
             "relation": relation, "neighbors_backend": backend, "neighbors_vocabulary": neighbors_vocabulary,
             "data_dir": str(data_dir) if data_dir else None, "lambda_s": lambda_s, "aux_cap": aux_cap,
             "per_class": per_class, "pairings": pairing}
    cfg = build_config(AblationConfig, repeated={"grids": "--grid", "pairings": "--pairing",
                                                 "silencing_variants": "--silencing-variant"},
                       **{k: v for k, v in given.items() if v is not None},
                       train={**DEMO_TRAIN, **_json_opt(train, "--train")},
                       protocol_overrides=_json_opt(protocol_overrides, "--protocol-overrides"),
                       **({"filter": {**AblationConfig.model_fields["filter"].default_factory(),  # type: ignore[misc]
                                      **_json_opt(filter_, "--filter")}} if filter_ else {}))
    from pydantic import ValidationError

    from ..filter import FilterConfig

    try:
        FilterConfig(**cfg.filter)  # before any work: a bad key is one line naming it
    except ValidationError as e:
        raise ConfigError("--filter: " + format_validation_error(e, prefix="filter", model=FilterConfig)) from None
    if print_commands:  # stdout carries only the commands (`... | parallel`); logs go to stderr
        for command in prepare_runs(cfg, out_dir, executable=executable, include_finished=include_finished):
            typer.echo(command)
        return
    for res in run_ablation(cfg, out_dir, progress=not quiet):
        typer.echo(res.markdown)
    typer.echo(f"wrote {out_dir / 'index.html'}")


def job_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder prepared by `ablate OUT ... --print-commands` "
                                                 "(OUT/runs/<run>/seed<S>, holding train.json).")],
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = False,
) -> None:
    """Train (resuming), export and evaluate one prepared grid run in one process: one line of OUT/commands.txt."""
    from ..ablate import run_prepared

    result = run_prepared(run_dir, progress=progress)
    if result.interrupted:
        typer.echo(f"interrupted after {result.epochs_done} epochs; checkpoint saved in {run_dir / 'train'}; "
                   "re-run the same command to resume", err=True)
        raise SystemExit(143)  # 128 + SIGTERM, as `neighborlt train` after a clean save
    state = "skipped (finished with the same configuration)" if result.skipped else f"{result.wall_s:.1f} s"
    typer.echo(f"{run_dir}: trained ({state}), exported, evaluated; wrote {run_dir / 'eval'}")


def _number_list(text: str, what: str, kind: type) -> list:
    from ..errors import ConfigError

    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated numbers such as 1,2,10") from None


def pilot_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Experiment folder (created; re-running resumes).")],
    dataset: Annotated[str | None, typer.Option(help=_ph(
        "dataset", "Dataset name or path whose classes are WordNet ids (tiny-imagenet) or 'group/class' "
                   "(omniglot)."))] = None,
    num_classes: Annotated[int | None, typer.Option(help=_ph("num_classes", "Classes per long-tailed dataset."))]
    = None,
    superclasses: Annotated[str | None, typer.Option(help=_ph(
        "superclasses", "Comma-separated numbers of superclasses S."))] = None,
    ratios: Annotated[str | None, typer.Option(help=_ph(
        "ratios", "Comma-separated imbalance ratios n_max / n_min."))] = None,
    n_max: Annotated[int | None, typer.Option(help=_ph("n_max", "Training images of the head class."))] = None,
    seeds: Annotated[str | None, typer.Option(help=_ph(
        "seeds", "Comma-separated seeds (class sample, long tail, training)."))] = None,
    partition_groups: Annotated[int | None, typer.Option(help=_ph(
        "partition_groups", "WordNet datasets: split the hypernym tree into at least this many superclasses."))]
    = None,
    head_tail_fraction: Annotated[float | None, typer.Option(help=_ph(
        "head_tail_fraction", "Head / tail = this share of the classes by training-count rank (0 < f <= 0.5)."))]
    = None,
    train: Annotated[str | None, typer.Option(
        help="TrainConfig fields as JSON (merged over the pilot's ResNet-8 / Balanced-CE defaults).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Offline datasets folder.")] = None,
    workers: Annotated[int, typer.Option(help="Training processes (each trains whole runs).")] = 1,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The granularity study (the paper's Fig. 3): head-tail accuracy gap against the imbalance ratio, for classes
    drawn from S superclasses; Balanced-CE from scratch, mean ± std over seeds, OUT/pilot.md and OUT/index.html.

    Several `pilot` processes on one OUT share the runs (a lock per run folder). Options left out keep
    PilotConfig's defaults (shown in the help)."""
    from ..pilot import PILOT_TRAIN, PilotConfig, run_pilot

    given = {"dataset": dataset, "num_classes": num_classes, "n_max": n_max, "partition_groups": partition_groups,
             "head_tail_fraction": head_tail_fraction, "data_dir": str(data_dir) if data_dir else None,
             "superclasses": None if superclasses is None else _number_list(superclasses, "--superclasses", int),
             "ratios": None if ratios is None else _number_list(ratios, "--ratios", float),
             "seeds": None if seeds is None else _number_list(seeds, "--seeds", int)}
    cfg = build_config(PilotConfig, **{k: v for k, v in given.items() if v is not None},
                       train={**PILOT_TRAIN, **_json_opt(train, "--train")})
    doc = run_pilot(cfg, out_dir, workers=workers, progress=not quiet and workers == 1)
    typer.echo((out_dir / "pilot.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out_dir / 'index.html'} ({len(doc['rows'])} settings)")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("demo")(demo_cmd)
    app.command("ablate")(ablate_cmd)
    app.command("job")(job_cmd)
    app.command("pilot")(pilot_cmd)
