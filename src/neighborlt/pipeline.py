"""The whole pipeline in one call: classes -> neighbors -> retrieve -> filter -> train (target + auxiliary
classes) -> export -> eval, plus the same training without auxiliary data as the baseline it is compared with.

``neighborlt demo`` runs it on the bundled offline defaults (the CIFAR-10 split-neighbour protocol, WordNet
neighbours, its local captioned pool, the default filter, a ResNet-8 trained from scratch at 32 px);
``neighborlt run`` takes every option. Each stage is resumable, so a re-run only does what is missing. Every stage
config is validated before any work starts.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .rundir import RunDir, atomic_write_json, atomic_write_text

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


class PipelineConfig(BaseModel):
    """Options of ``neighborlt run`` / ``neighborlt demo``."""

    model_config = ConfigDict(extra="forbid")

    protocol: str = "cifar10-neighbours"  # split-neighbour preset (neighborlt.data.PRESETS)
    data_dir: str | None = None  # offline datasets folder (None: paths.resolve_data_dir())
    protocol_overrides: dict[str, Any] = Field(default_factory=dict)  # ClassesConfig fields: n_max, imbalance_ratio,
    #   seed (of the split), num_targets, many, few
    seed: int = 0  # training seed (the protocol split uses the preset's own seed)
    neighbors: dict[str, Any] = Field(default_factory=lambda: {"backend": "wordnet"})  # NeighborsConfig fields
    retrieve: dict[str, Any] = Field(default_factory=dict)  # RetrieveConfig fields (default: the local pool)
    filter: dict[str, Any] = Field(default_factory=dict)  # FilterConfig fields (default rules)
    train: dict[str, Any] = Field(default_factory=lambda: dict(DEMO_TRAIN))  # TrainConfig fields
    loss: str = "neighbor_silencing"  # loss with auxiliary classes
    lambda_s: float = Field(0.1, ge=0.0)
    aux_cap: int = Field(50, ge=1)  # M
    baseline: bool = True  # also train Balanced-CE without auxiliary data (RUN/baseline) and compare
    max_test_per_class: int | None = Field(None, ge=1)  # evaluate on at most N test images per class (quick runs)
    report: bool = True  # write RUN/report/index.html at the end


def _stage_train_eval(run: Path, tcfg: Any, progress: bool, max_test: int | None) -> dict[str, Any]:
    from .evaluate import EvalConfig, run_eval
    from .export import export_direct
    from .train import run_train

    res = run_train(tcfg, run, progress=progress, resume=True)  # continue an interrupted run
    if res.interrupted:
        from .errors import NeighborLTError

        raise NeighborLTError(f"{run}: training was interrupted; re-run the same command to resume")
    export_direct(run)
    return run_eval(EvalConfig(max_test_per_class=max_test), run)


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's config, validated up front (a bad key is one line naming its section before any work)."""
    from pydantic import ValidationError

    from .classes import ClassesConfig
    from .errors import ConfigError
    from .filter import FilterConfig
    from .neighbors import NeighborsConfig
    from .retrieve import RetrieveConfig
    from .train import TrainConfig

    common = {**cfg.train, "seed": cfg.seed, "data_dir": cfg.data_dir, "max_test_per_class": cfg.max_test_per_class}
    parts: dict[str, tuple[type, dict[str, Any]]] = {
        "classes": (ClassesConfig, {"protocol": cfg.protocol, "data_dir": cfg.data_dir, **cfg.protocol_overrides}),
        "neighbors": (NeighborsConfig, dict(cfg.neighbors)),
        "retrieve": (RetrieveConfig, {"data_dir": cfg.data_dir, **cfg.retrieve}),
        "filter": (FilterConfig, {"data_dir": cfg.data_dir, **cfg.filter}),
        "train": (TrainConfig, {**common, "loss": cfg.loss, "lambda_s": cfg.lambda_s, "aux_cap": cfg.aux_cap}),
        "baseline": (TrainConfig, {**common, "aux_manifest": None, "loss": "balanced_softmax"}),
    }
    out: dict[str, Any] = {}
    for section, (cls, fields) in parts.items():
        try:
            out[section] = cls(**fields)
        except ValidationError as e:
            from .cli._common import format_validation_error

            raise ConfigError(format_validation_error(e, prefix=section if section != "baseline" else "train",
                                                      model=cls)) from None
        except ConfigError as e:
            raise ConfigError(f"{section}: {e}") from None
    return out


def run_pipeline(cfg: PipelineConfig, run_dir: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``run_dir`` and write ``RUN/summary.md`` (method vs baseline, acquisition funnel).

    Returns:
        ``{"method": metrics, "baseline": metrics or None, "summary": path, "funnel": totals}`` with the metrics
        dicts of :func:`neighborlt.evaluate.run_eval`.
    """
    from .classes import run_classes
    from .filter import run_filter
    from .neighbors import run_neighbors
    from .retrieve import run_retrieve

    stages = stage_configs(cfg)
    rd = RunDir(run_dir)
    rd.record("pipeline", cfg, seed=cfg.seed)
    run_classes(stages["classes"], rd)
    nres = run_neighbors(stages["neighbors"], rd)
    n_aux = len(nres.doc.get("auxiliary", []))
    logger.info("neighbors: %d auxiliary names for %d target classes", n_aux, len(nres.doc.get("targets", [])))
    rres = run_retrieve(stages["retrieve"], rd)
    fres = run_filter(stages["filter"], rd)
    method = _stage_train_eval(rd.root, stages["train"], progress, cfg.max_test_per_class)
    baseline = None
    if cfg.baseline:
        bdir = rd.path("baseline")
        bdir.mkdir(exist_ok=True)
        for name in ("classes.json", "split.json"):
            shutil.copyfile(rd.path(name), bdir / name)
        baseline = _stage_train_eval(bdir, stages["baseline"], progress, cfg.max_test_per_class)
    summary = summary_markdown(cfg, method, baseline, nres.doc, rres.model_dump(), fres.model_dump())
    atomic_write_text(rd.path("summary.md"), summary)
    atomic_write_json(rd.path("summary.json"), {"method": _headline(method),
                                                "baseline": _headline(baseline) if baseline else None,
                                                "funnel": fres.funnel})
    report = None
    if cfg.report:
        try:
            from .report import ReportConfig, run_report
        except ImportError:  # pragma: no cover - the report module ships with the package
            run_report = None
        if run_report is not None:
            report = run_report(ReportConfig(), rd)
    return {"method": method, "baseline": baseline, "summary": str(rd.path("summary.md")), "funnel": fres.funnel,
            "report": report}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("overall", "many", "medium", "few", "harmonic_mean", "worst_class")}


def _pct(v: Any) -> str:
    return "–" if v is None else f"{float(v):.1f}"  # metrics are already in percent


def summary_markdown(cfg: PipelineConfig, method: dict[str, Any], baseline: dict[str, Any] | None,
                     neighbors: dict[str, Any], retrieve: dict[str, Any] | None = None,
                     filt: dict[str, Any] | None = None) -> str:
    """A short markdown comparison of the method and the baseline (top-1 %, target classes only) and the
    acquisition funnel (candidates -> kept auxiliary images)."""
    tr = cfg.train
    lines = [
        f"# neighborlt run: {cfg.protocol}",
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
    lines.append(f"| {cfg.loss} (λs={cfg.lambda_s:g}, M={cfg.aux_cap}) + auxiliary classes, direct classifier | "
                 + " | ".join(_pct(method.get(k)) for k in ("overall", "many", "medium", "few")) + " |")
    lines += ["", "One seed: a single run's numbers move by a few points; see `neighborlt ablate` for mean ± std."]
    return "\n".join(lines) + "\n"


def default_run_dir() -> Path:
    return Path("runs") / "demo"
