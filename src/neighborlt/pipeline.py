"""The whole pipeline in one call: classes -> neighbors -> retrieve -> filter -> train (target + auxiliary
classes) -> export -> eval -> report, plus the same training without auxiliary data as the baseline it is compared
with (``RUN/baseline``).

``neighborlt demo`` runs it on the bundled offline defaults (the CIFAR-10 split-neighbour protocol, WordNet
neighbours, its local captioned pool, the default filter, a ResNet-8 trained from scratch at 32 px);
``neighborlt run CONFIG.yaml`` takes one YAML file with a section per stage (:func:`load_config`), and
``neighborlt run RUN`` the same options as flags. Every stage config is validated before any work starts (a bad key
is one line naming its key path); each stage is resumable, so a re-run only does what is missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .defaults import AUX_CAP, LAMBDA_S, AuxCap
from .errors import ConfigError
from .rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, change_reason, read_json
from .validation import format_validation_error

logger = logging.getLogger(__name__)

#: Training options of the offline demo: a ResNet-8 from scratch at 32 px, minutes on two CPU cores.
DEMO_TRAIN: dict[str, Any] = {
    "model": "resnet8_cifar",
    "image_size": 32,
    "epochs": 30,
    "warmup_epochs": 2,
    "batch_size": 64,
    "lr": 0.05,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "eval_every": 0,
    "threads": 1,  # tiny convolutions: one thread is as fast as two and never oversubscribes a shared machine
}

#: Filter options of the offline demo: features at 32 px, CIFAR's own size (a quarter of the default 64 px's work on
#: the pool's 25,000 images; the demo's auxiliary images and its few-shot lift are in the README).
DEMO_FILTER: dict[str, Any] = {"feature_image_size": 32}

#: Retrieve options of the offline demo: the protocol's WordNet sibling relation, 2,000 of each pool class's 5,000
#: images (an epoch draws M = 50 per auxiliary class, 1,500 over the 30 epochs; the filter featurises 10,000 pool
#: images instead of 25,000).
DEMO_RETRIEVE: dict[str, Any] = {"match": "wordnet", "pool_per_class": 2000}

#: The stages of ``neighborlt run`` in order (``--from`` / ``--until`` take these names). ``train``, ``export`` and
#: ``eval`` also do the baseline (RUN/baseline) when ``baseline`` is on; ``eval`` writes RUN/summary.md.
STAGES = ("classes", "neighbors", "retrieve", "filter", "train", "export", "eval", "report")
BASELINE_STAGES = ("train", "export", "eval")  # the stages that also run in RUN/baseline
DEFAULT_PROTOCOL = "cifar10-neighbours"
METHOD_DEFAULTS: dict[str, Any] = {"loss": "neighbor_silencing", "lambda_s": LAMBDA_S, "aux_cap": AUX_CAP}


class PipelineConfig(BaseModel):
    """Options of ``neighborlt run`` / ``neighborlt demo``: top-level keys plus one section per stage.

    Each section holds the fields of that stage's own config (``classes``: :class:`~neighborlt.classes.ClassesConfig`,
    ``neighbors``: :class:`~neighborlt.neighbors.NeighborsConfig`, ``retrieve``: :class:`~neighborlt.retrieve
    .RetrieveConfig`, ``filter``: :class:`~neighborlt.filter.FilterConfig`, ``train``: :class:`~neighborlt.train
    .TrainConfig`, ``eval``: :class:`~neighborlt.evaluate.EvalConfig`, ``report``:
    :class:`~neighborlt.report.ReportConfig` or ``false``); :func:`stage_configs` validates them all up front.
    """

    model_config = ConfigDict(extra="forbid")

    run_dir: str | None = None  # the run directory (CLI: the RUN argument wins; default runs/<config file name>)
    protocol: str | None = None  # shorthand for classes.protocol (a split-neighbour preset); None and no classes
    #   source: cifar10-neighbours
    data_dir: str | None = None  # offline datasets folder (None: paths.resolve_data_dir()), passed to every stage
    protocol_overrides: dict[str, Any] = Field(default_factory=dict)  # older spelling of classes fields (n_max, ...)
    seed: int = 0  # training seed of the method and the baseline (the split has its own: classes.seed)
    classes: dict[str, Any] = Field(default_factory=dict)  # ClassesConfig fields: protocol | dataset (+ targets, pool,
    #   imbalance_ratio, n_max, seed, many, few, test_dataset)
    neighbors: dict[str, Any] = Field(default_factory=lambda: {"backend": "wordnet"})  # NeighborsConfig fields
    retrieve: dict[str, Any] = Field(default_factory=dict)  # RetrieveConfig fields (default: the local protocol pool)
    filter: dict[str, Any] = Field(default_factory=dict)  # FilterConfig fields (default rules)
    train: dict[str, Any] = Field(default_factory=lambda: dict(DEMO_TRAIN))  # TrainConfig fields of the method run
    eval: dict[str, Any] = Field(default_factory=dict)  # EvalConfig fields (batch_size, device, many, few, ...)
    report: bool | dict[str, Any] = True  # write RUN/report/index.html at the end; a mapping = ReportConfig fields
    loss: str | None = None  # shorthand for train.loss (default neighbor_silencing)
    lambda_s: float | None = Field(None, ge=0.0)  # shorthand for train.lambda_s (default defaults.LAMBDA_S)
    aux_cap: AuxCap | None = None  # shorthand for train.aux_cap, M (default defaults.AUX_CAP; "all": every image)
    baseline: bool = True  # also train Balanced-CE without auxiliary data (RUN/baseline) and compare
    parallel_baseline: bool | None = None  # train the method and the baseline at once, in two processes; None
    #   (auto): when both run on the CPU, outside torchrun, with intra-op threads that together fit this process's
    #   cores (the demo's threads=1 on 2 cores); the weights are the same either way
    max_test_per_class: int | None = Field(None, ge=1)  # evaluate on at most N test images per class (quick runs)

    def method(self) -> dict[str, Any]:
        """loss / lambda_s / aux_cap of the method run: top-level key > train section > default (λs only when
        given: a ``silencing`` preset in ``train.loss_params`` may set it, and a preset next to a λs it overrides
        is an error, not a silent order)."""
        out = {}
        for k, default in METHOD_DEFAULTS.items():
            top = getattr(self, k)
            if top is not None:
                out[k] = top
            elif k in self.train:
                out[k] = self.train[k]
            elif k != "lambda_s":
                out[k] = default
        return out

    def source_name(self) -> str:
        """The protocol preset or dataset the run is on (for titles)."""
        c = {**self.protocol_overrides, **self.classes}
        return str(c.get("protocol") or c.get("dataset") or self.protocol or DEFAULT_PROTOCOL)


def _section_error(e: ValidationError, section: str, model: type[BaseModel]) -> ConfigError:
    return ConfigError(format_validation_error(e, prefix=section, model=model))


def pipeline_config(raw: Any, *, source: str | None = None) -> PipelineConfig:
    """Validate a pipeline config mapping (a parsed YAML file); problems are one line naming the key path.

    Raises:
        ConfigError: not a mapping, an unknown key (the message lists the allowed ones) or a bad value.
    """
    where = f"{source}: " if source else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}expected a mapping of keys (run_dir, classes, train, ...), got "
                          f"{type(raw).__name__}")
    try:
        return PipelineConfig(**{str(k): v for k, v in raw.items()})
    except ValidationError as e:
        raise ConfigError(where + format_validation_error(e, model=PipelineConfig)) from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of a YAML (or JSON) config file; a syntax error is one line with the file, line and column."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file ({e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}{at}: not valid YAML ({' '.join(str(problem).split())})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping of keys (run_dir, classes, train, ...), got {type(doc).__name__}")
    return doc


def load_config(path: str | os.PathLike[str], **overrides: Any) -> PipelineConfig:
    """Read and validate a pipeline YAML file (top-level keys of ``overrides`` replace the file's)."""
    raw = {**read_config_file(path), **overrides}
    cfg = pipeline_config(raw, source=str(path))
    stage_configs(cfg)  # every section checked before anything runs
    return cfg


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's config, validated up front (a bad key is one line naming its section before any work).

    Returns:
        ``{"classes", "neighbors", "retrieve", "filter", "train", "baseline", "eval", "report"}`` -> the stage's
        pydantic config (``report`` is None when off).
    """
    from .classes import ClassesConfig
    from .evaluate import EvalConfig
    from .filter import FilterConfig
    from .neighbors import NeighborsConfig
    from .report import ReportConfig
    from .retrieve import RetrieveConfig
    from .train import TrainConfig

    classes = {**cfg.protocol_overrides, **cfg.classes}
    if cfg.protocol is not None or ("protocol" not in classes and "dataset" not in classes):
        classes.setdefault("protocol", cfg.protocol or DEFAULT_PROTOCOL)
    if cfg.data_dir is not None:
        classes.setdefault("data_dir", cfg.data_dir)
    common = {**cfg.train, "seed": cfg.seed, "max_test_per_class": cfg.max_test_per_class}
    if cfg.data_dir is not None or "data_dir" not in cfg.train:
        common["data_dir"] = cfg.data_dir
    method = cfg.method()
    baseline = {k: v for k, v in common.items() if k not in (*METHOD_DEFAULTS, "loss_params", "aux_manifest")}
    ev = {"max_test_per_class": cfg.max_test_per_class, **cfg.eval}
    with_dir = {"data_dir": cfg.data_dir} if cfg.data_dir is not None else {}
    parts: dict[str, tuple[type, dict[str, Any]]] = {
        "classes": (ClassesConfig, classes),
        "neighbors": (NeighborsConfig, dict(cfg.neighbors)),
        "retrieve": (RetrieveConfig, {**with_dir, **cfg.retrieve}),
        "filter": (FilterConfig, {**with_dir, **cfg.filter}),
        "train": (TrainConfig, {**common, **method}),
        "baseline": (TrainConfig, {**baseline, "aux_manifest": None, "loss": "balanced_softmax"}),
        "eval": (EvalConfig, ev),
    }
    if cfg.report is not False:
        parts["report"] = (ReportConfig, {} if cfg.report is True else dict(cfg.report))
    out: dict[str, Any] = {"report": None}
    for section, (cls, fields) in parts.items():
        name = "train" if section == "baseline" else section
        for bad in ("predictions", "out") if section == "eval" else ():
            if fields.get(bad) is not None:
                raise ConfigError(f"eval.{bad}: not settable in a pipeline config (the pipeline evaluates the run "
                                  "and writes RUN/eval); use `neighborlt eval` for that")
        try:
            out[section] = cls(**fields)
        except ValidationError as e:
            raise _section_error(e, name, cls) from None
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    return out


def resolved_config(cfg: PipelineConfig, stages: dict[str, Any], run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline config with every section spelled out in full (what ``RUN/config.yaml`` holds): running it
    again gives the same stage configs, hence skips every finished stage."""
    train = stages["train"].model_dump(mode="json")
    return {
        "run_dir": str(run_dir),
        "seed": cfg.seed,
        "data_dir": cfg.data_dir,
        "baseline": cfg.baseline,
        "max_test_per_class": cfg.max_test_per_class,
        "classes": stages["classes"].model_dump(mode="json"),
        "neighbors": stages["neighbors"].model_dump(mode="json"),
        "retrieve": stages["retrieve"].model_dump(mode="json"),
        "filter": stages["filter"].model_dump(mode="json"),
        "train": {k: v for k, v in train.items() if k not in ("seed", "max_test_per_class")},
        "eval": {k: v for k, v in stages["eval"].model_dump(mode="json").items() if k != "max_test_per_class"},
        "report": stages["report"].model_dump(mode="json") if stages["report"] is not None else False,
    }


def stage_range(from_stage: str | None, until_stage: str | None) -> list[str]:
    """The stages from ``from_stage`` to ``until_stage`` (both included); an unknown name lists the stages."""
    for opt, val in (("--from", from_stage), ("--until", until_stage)):
        if val is not None and val not in STAGES:
            raise ConfigError(f"{opt} {val!r}: unknown stage; use one of {', '.join(STAGES)}")
    lo = STAGES.index(from_stage) if from_stage else 0
    hi = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if lo > hi:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}; stages run in the order "
                          f"{' -> '.join(STAGES)}")
    return list(STAGES[lo:hi + 1])


def _outputs(stage: str, baseline: bool) -> list[str]:
    """Files a finished stage leaves (what a later ``--from`` stage needs)."""
    files = {"classes": ["classes.json", "split.json", "targets.parquet"], "neighbors": ["neighbors.json"],
             "retrieve": ["retrieve/manifest.parquet"], "filter": ["filter/aux_manifest.parquet"],
             "train": ["train/model.safetensors"], "export": ["export/model.safetensors"],
             "eval": ["eval/metrics.json"], "report": []}[stage]
    if baseline and stage in ("train", "export", "eval"):
        files += [f"baseline/{f}" for f in files]
    return files


def _train(run: Path, tcfg: Any, progress: bool) -> None:
    from .train import run_train

    res = run_train(tcfg, run, progress=progress, resume="auto")  # continue an interrupted run of the same key
    if res.interrupted:
        from .errors import NeighborLTError

        raise NeighborLTError(f"{run}: training was interrupted; re-run the same command to resume")


def _train_child(run: Path, tcfg: Any, conn: Any) -> None:
    """The baseline's training in its own process (:func:`_train_both`): sends back None or the error."""
    try:
        _train(run, tcfg, False)
        conn.send(None)
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it (KeyboardInterrupt included)
        try:
            conn.send(e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its text
            conn.send(RuntimeError(f"{type(e).__name__}: {e}"))


def parallel_trainings(method: Any, baseline: Any) -> bool:
    """The ``parallel_baseline`` auto rule: both TrainConfigs on the CPU (``device`` cpu, or auto without CUDA),
    outside torchrun, with ``threads`` set and together within the cores this process may use."""
    import torch

    from .train.data import cores_per_rank
    from .train.ddp import env_world_size

    def on_cpu(tcfg: Any) -> bool:
        return tcfg.device == "cpu" or (tcfg.device == "auto" and not torch.cuda.is_available())

    cores = cores_per_rank(1)
    return (env_world_size() == 1 and on_cpu(method) and on_cpu(baseline) and method.threads > 0
            and baseline.threads > 0 and method.threads + baseline.threads <= cores)


def _either_trained(root: Path, method: Any, bdir: Path, baseline: Any) -> bool:
    """One of the two trainings is up to date: nothing to run side by side (a re-run starts no second process)."""
    from .train.engine import is_trained

    return is_trained(method, root) or is_trained(baseline, bdir)


def _train_both(root: Path, method: Any, bdir: Path, baseline: Any, progress: bool) -> None:
    """Train the method here and the baseline in a spawned process at the same time. An interrupted method run
    stops the baseline too (SIGTERM: it saves its checkpoint), and the baseline's error is raised here."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_train_child, args=(bdir, baseline, send), name="neighborlt-baseline")
    child.start()
    send.close()
    logger.info("pipeline: training the baseline in process %d beside the method", child.pid)
    try:
        _train(root, method, progress)
    except BaseException:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)  # the training's handler saves a checkpoint and returns
        child.join()
        raise
    child.join()
    if not recv.poll():  # killed (out of memory, a signal) before it could say how it ended
        from .errors import NeighborLTError

        raise NeighborLTError(f"{bdir}: the baseline's training process ended with code {child.exitcode}; re-run "
                              "to resume it, or pass --no-parallel-baseline to train it in this process")
    err = recv.recv()
    if err is not None:
        raise err


def _maybe_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def run_pipeline(cfg: PipelineConfig, run_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
                 from_stage: str | None = None, until_stage: str | None = None) -> dict[str, Any]:
    """Run the stages into ``run_dir`` (default ``cfg.run_dir``) and write ``RUN/summary.md`` (method vs baseline,
    acquisition funnel), ``RUN/config.yaml`` (the resolved config) and ``RUN/records/pipeline.config.json``.

    Args:
        cfg: the options.
        run_dir: the run directory; None: ``cfg.run_dir``.
        progress: progress bars while training.
        from_stage: start at this stage (``STAGES``); the earlier ones must have finished in ``run_dir``.
        until_stage: stop after this stage.

    Returns:
        ``{"method": metrics or None, "baseline": metrics or None, "summary": path or None, "funnel": totals or
        None, "report": path or None, "stages": [stages run]}`` with the metrics dicts of
        :func:`neighborlt.evaluate.run_eval` (None when the eval stage is outside the range).

    Raises:
        ConfigError: a bad option (before any work), or ``from_stage`` needs a stage that has not finished.
    """
    import yaml

    from .classes import run_classes
    from .evaluate import run_eval
    from .export import export_direct
    from .filter import run_filter
    from .neighbors import run_neighbors
    from .retrieve import run_retrieve

    stages = stage_configs(cfg)
    selected = stage_range(from_stage, until_stage)
    from .train.ddp import env_world_size

    if cfg.parallel_baseline and env_world_size() > 1:
        raise ConfigError("parallel_baseline: true cannot run under torchrun (the ranks train each model "
                          "together); set it to false or leave it unset")
    if run_dir is None:
        if cfg.run_dir is None:
            raise ConfigError("no run directory: set run_dir in the config or pass RUN")
        run_dir = cfg.run_dir
    rd = RunDir(run_dir)
    root = rd.root
    for stage in STAGES[:STAGES.index(selected[0])]:
        missing = [f for f in _outputs(stage, cfg.baseline) if not rd.path(f).is_file()]
        if missing:
            raise ConfigError(f"--from {selected[0]}: stage {stage} has not finished in {root} (no {missing[0]}); "
                              f"run with --from {stage} or without --from")
    resolved = resolved_config(cfg, stages, run_dir)
    rd.record("pipeline", {"config": resolved, "given": cfg.model_dump(mode="json"), "stages": selected},
              seed=cfg.seed)
    atomic_write_text(rd.path("config.yaml"), "# The resolved config of this run (every option spelled out); "
                      f"`neighborlt run {rd.path('config.yaml')}` re-runs it, skipping finished stages.\n"
                      + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    bdir = rd.path("baseline")
    ran: list[str] = []
    skipped: list[str] = []
    reasons: dict[str, str] = {}
    nres = rres = fres = None
    method = base_metrics = None
    for stage in selected:
        if stage == "report":
            continue  # after the summary, below
        logger.info("pipeline: stage %s", stage)
        dirs = {"": rd, **({"baseline": RunDir(bdir)} if cfg.baseline and stage in BASELINE_STAGES else {})}
        before = {label: d.done_record(stage) for label, d in dirs.items()}
        if stage == "classes":
            run_classes(stages["classes"], rd)
        elif stage == "neighbors":
            nres = run_neighbors(stages["neighbors"], rd)
            logger.info("neighbors: %d auxiliary names for %d target classes", len(nres.doc.get("auxiliary", [])),
                        len(nres.doc.get("targets", [])))
        elif stage == "retrieve":
            rres = run_retrieve(stages["retrieve"], rd)
        elif stage == "filter":
            fres = run_filter(stages["filter"], rd)
        elif stage == "train":
            if cfg.baseline:
                bdir.mkdir(exist_ok=True)
                # atomic and only when changed: under torchrun every rank runs this
                for name in ("classes.json", "split.json", "targets.parquet"):
                    data = rd.path(name).read_bytes()
                    if not (bdir / name).is_file() or (bdir / name).read_bytes() != data:
                        atomic_write_bytes(bdir / name, data)
                parallel = cfg.parallel_baseline
                if parallel is None:
                    parallel = parallel_trainings(stages["train"], stages["baseline"])
                if parallel and not _either_trained(root, stages["train"], bdir, stages["baseline"]):
                    _train_both(root, stages["train"], bdir, stages["baseline"], progress)
                else:
                    _train(root, stages["train"], progress)
                    _train(bdir, stages["baseline"], progress)
            else:
                _train(root, stages["train"], progress)
        elif stage == "export":
            export_direct(root)
            if cfg.baseline:
                export_direct(bdir)
        elif stage == "eval":
            method = run_eval(stages["eval"], root)
            if cfg.baseline:
                base_metrics = run_eval(stages["eval"], bdir)
        why = _why_ran(before, {label: d.done_record(stage) for label, d in dirs.items()})
        if why is None:
            skipped.append(stage)
        else:
            ran.append(stage)
            reasons[stage] = why
            logger.info("pipeline: %s ran (%s)", stage, why)

    summary = None
    funnel = fres.funnel if fres is not None else (_maybe_json(rd.path("filter", "funnel.json")) or {}).get("total")
    if "eval" in selected:
        ndoc = nres.doc if nres is not None else (_maybe_json(rd.path("neighbors.json")) or {})
        rdoc = rres.model_dump() if rres is not None else _maybe_json(rd.path("retrieve", "stats.json"))
        if fres is not None:
            fdoc = fres.model_dump()
        else:
            fj = _maybe_json(rd.path("filter", "funnel.json"))
            fdoc = {"funnel": fj.get("total", {}), "classes": fj.get("classes")} if fj else None
        text = summary_markdown(cfg, method or {}, base_metrics, ndoc, rdoc, fdoc, train=stages["train"],
                                model=_maybe_json(rd.path("train", "model.json")))
        from .coverage import coverage_markdown

        text += coverage_markdown(rd.root)  # targets without an auxiliary class / a silenced pair, and what to try
        atomic_write_text(rd.path("summary.md"), text)
        atomic_write_json(rd.path("summary.json"), {"method": _headline(method or {}),
                                                    "baseline": _headline(base_metrics) if base_metrics else None,
                                                    "funnel": funnel})
        summary = str(rd.path("summary.md"))
    report = None
    if "report" in selected and stages["report"] is not None:
        from .report import run_report

        report = run_report(stages["report"], rd)
        ran.append("report")
        reasons["report"] = "always written"
    return {"method": method, "baseline": base_metrics, "summary": summary, "funnel": funnel, "report": report,
            "stages": ran, "skipped": skipped, "reasons": reasons}


def _why_ran(before: dict[str, dict[str, Any] | None], after: dict[str, dict[str, Any] | None]) -> str | None:
    """Why a stage ran, from its completion records before and after it (``{"": run, "baseline": ...}``); None when
    no record changed (the stage was up to date and skipped)."""
    out = []
    for label, new in after.items():
        old = before.get(label)
        if new is None or (old is not None and old.get("time") == new.get("time")):
            continue
        reason = change_reason(old, new) or "its outputs were missing, or --force"
        out.append(f"{label}: {reason}" if label else reason)
    return "; ".join(out) if out else None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("overall", "many", "medium", "few", "harmonic_mean", "worst_class")}


def _pct(v: Any) -> str:
    return "–" if v is None else f"{float(v):.1f}"  # metrics are already in percent


def summary_markdown(cfg: PipelineConfig, method: dict[str, Any], baseline: dict[str, Any] | None,
                     neighbors: dict[str, Any], retrieve: dict[str, Any] | None = None,
                     filt: dict[str, Any] | None = None, *, train: Any = None,
                     model: dict[str, Any] | None = None) -> str:
    """A short markdown comparison of the method and the baseline (top-1 %, target classes only) and the
    acquisition funnel (candidates -> kept auxiliary images). The loss and its parameters (λs, M) are what trained,
    from the method's ``model.json`` (``model``), never the requested config."""
    tr = train.model_dump() if train is not None else {**cfg.train, **cfg.method()}
    lines = [
        f"# neighborlt run: {cfg.source_name()}",
        "",
        (f"Model {tr.get('model')} ({'frozen features' if tr.get('frozen') else 'trained'}), "
         f"{tr.get('epochs')} epochs, {tr.get('image_size')} px, seed {cfg.seed}; neighbours from the "
         f"{neighbors.get('backend')} backend: {len(neighbors.get('auxiliary', []))} auxiliary names."),
        "",
    ]
    if filt is not None:
        from .filter import FUNNEL

        f = filt.get("funnel", {})
        src = (retrieve or {})
        lines += [(f"Acquisition ({cfg.retrieve.get('source', 'local')} source): {src.get('names_with_images', '?')} "
                   f"of {src.get('names', '?')} auxiliary names got images; {filt.get('classes')} auxiliary classes "
                   "kept."),
                  "", "| " + " | ".join(FUNNEL) + " |", "|" + "---|" * len(FUNNEL),
                  "| " + " | ".join(str(f.get(s, "–")) for s in FUNNEL) + " |", ""]
    lines += ["| run | overall | many | medium | few |", "|---|---|---|---|---|"]
    if baseline is not None:
        lines.append("| Balanced-CE, no auxiliary data | " + " | ".join(
            _pct(baseline.get(k)) for k in ("overall", "many", "medium", "few")) + " |")
    lines.append(f"| {trained_loss_label(model)} + auxiliary classes, direct classifier | "
                 + " | ".join(_pct(method.get(k)) for k in ("overall", "many", "medium", "few")) + " |")
    lines += ["", "One seed: a single run's numbers move by a few points; see `neighborlt ablate` for mean ± std."]
    return "\n".join(lines) + "\n"


def trained_loss_label(model: dict[str, Any] | None) -> str:
    """``neighbor_silencing (λs=0.1, aux_weight=1, M=50)``: the loss and parameters a model trained with, read from its
    ``model.json`` (``loss``, ``loss_params``, ``aux_cap``); models from before these were recorded give the loss
    name and ``(λs not recorded)``."""
    if not model:
        return "(no trained model)"
    params = model.get("loss_params")
    if params is None:
        return f"{model.get('loss')} (λs not recorded)"
    names = {"lambda_s": "λs"}
    parts = [f"{names.get(k, k)}={v:g}" if isinstance(v, float) else f"{names.get(k, k)}={v}" for k, v in params.items()]
    if model.get("aux_cap") is not None or model.get("num_classes", 0) > model.get("num_target_classes", 0):
        parts.append(f"M={model.get('aux_cap') if model.get('aux_cap') is not None else 'all'}")
    return f"{model.get('loss')} ({', '.join(parts)})" if parts else str(model.get("loss"))


def default_run_dir() -> Path:
    return Path("runs") / "demo"
