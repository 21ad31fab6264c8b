"""The whole pipeline in one call: classes -> neighbors -> train (target + auxiliary classes) -> export -> eval,
plus the same training without auxiliary data as the baseline it is compared with.

``neighborlt demo`` runs it on the bundled offline defaults (the CIFAR-10 split-neighbour protocol, WordNet
neighbours, a ResNet-8 trained from scratch at 32 px); ``neighborlt run`` takes every option. Each stage is
resumable, so a re-run only does what is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

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
    train: dict[str, Any] = Field(default_factory=lambda: dict(DEMO_TRAIN))  # TrainConfig fields
    loss: str = "neighbor_silencing"  # loss with auxiliary classes
    lambda_s: float = Field(0.1, ge=0.0)
    aux_cap: int = Field(50, ge=1)  # M
    relation: Literal["neighbors", "wordnet"] = "neighbors"  # auxiliary classes: pool classes named in
    #   neighbors.json, or the protocol's WordNet sibling relation (CIFAR-10's generic pool names such as "ship"
    #   rarely equal WordNet's specific neighbour names such as "brig", so its demo uses "wordnet")
    baseline: bool = True  # also train Balanced-CE without auxiliary data (RUN/baseline) and compare
    max_test_per_class: int | None = Field(None, ge=1)  # evaluate on at most N test images per class (quick runs)


def _stage_train_eval(run: Path, train: dict[str, Any], progress: bool, max_test: int | None) -> dict[str, Any]:
    from .evaluate import EvalConfig, run_eval
    from .export import export_direct
    from .train import TrainConfig, run_train

    res = run_train(TrainConfig(**train), run, progress=progress, resume=True)  # continue an interrupted run
    if res.interrupted:
        from .errors import NeighborLTError

        raise NeighborLTError(f"{run}: training was interrupted; re-run the same command to resume")
    export_direct(run)
    return run_eval(EvalConfig(max_test_per_class=max_test), run)


def run_pipeline(cfg: PipelineConfig, run_dir: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``run_dir`` and write ``RUN/summary.md`` (method vs baseline).

    Returns:
        ``{"method": metrics, "baseline": metrics or None, "summary": path}`` with the metrics dicts of
        :func:`neighborlt.evaluate.run_eval`.
    """
    from .classes import ClassesConfig, run_classes
    from .neighbors import NeighborsConfig, run_neighbors

    rd = RunDir(run_dir)
    rd.record("pipeline", cfg, seed=cfg.seed)
    run_classes(ClassesConfig(protocol=cfg.protocol, data_dir=cfg.data_dir, **cfg.protocol_overrides), rd)
    nres = run_neighbors(NeighborsConfig(**cfg.neighbors), rd)
    n_aux = len(nres.doc.get("auxiliary", []))
    logger.info("neighbors: %d auxiliary names for %d target classes", n_aux, len(nres.doc.get("targets", [])))

    common = {**cfg.train, "seed": cfg.seed, "data_dir": cfg.data_dir, "max_test_per_class": cfg.max_test_per_class}
    method = _stage_train_eval(rd.root, {**common, "use_aux": cfg.relation, "loss": cfg.loss,
                                         "lambda_s": cfg.lambda_s, "aux_cap": cfg.aux_cap}, progress,
                               cfg.max_test_per_class)
    baseline = None
    if cfg.baseline:
        bdir = rd.path("baseline")
        bdir.mkdir(exist_ok=True)
        for name in ("classes.json", "split.json"):
            shutil.copyfile(rd.path(name), bdir / name)
        baseline = _stage_train_eval(bdir, {**common, "use_aux": "none", "loss": "balanced_softmax"}, progress,
                                     cfg.max_test_per_class)
    summary = summary_markdown(cfg, method, baseline, nres.doc)
    atomic_write_text(rd.path("summary.md"), summary)
    atomic_write_json(rd.path("summary.json"), {"method": _headline(method),
                                                "baseline": _headline(baseline) if baseline else None})
    return {"method": method, "baseline": baseline, "summary": str(rd.path("summary.md"))}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("overall", "many", "medium", "few", "harmonic_mean", "worst_class")}


def _pct(v: Any) -> str:
    return "–" if v is None else f"{float(v):.1f}"  # metrics are already in percent


def summary_markdown(cfg: PipelineConfig, method: dict[str, Any], baseline: dict[str, Any] | None,
                     neighbors: dict[str, Any]) -> str:
    """A short markdown comparison of the method and the baseline (top-1 %, target classes only)."""
    tr = cfg.train
    source = "neighbour names" if cfg.relation == "neighbors" else "protocol's WordNet siblings"
    lines = [
        f"# neighborlt run: {cfg.protocol}",
        "",
        (f"Model {tr.get('model')} ({'frozen features' if tr.get('frozen') else 'trained'}), "
         f"{tr.get('epochs')} epochs, {tr.get('image_size')} px, seed {cfg.seed}; neighbours from the "
         f"{neighbors.get('backend')} backend: {len(neighbors.get('auxiliary', []))} auxiliary names; auxiliary "
         f"classes for training from the {source} found in the local pool."),
        "",
        "| run | overall | many | medium | few |",
        "|---|---|---|---|---|",
    ]
    if baseline is not None:
        lines.append("| Balanced-CE, no auxiliary data | " + " | ".join(
            _pct(baseline.get(k)) for k in ("overall", "many", "medium", "few")) + " |")
    lines.append(f"| {cfg.loss} (λs={cfg.lambda_s:g}, M={cfg.aux_cap}) + auxiliary classes, direct classifier | "
                 + " | ".join(_pct(method.get(k)) for k in ("overall", "many", "medium", "few")) + " |")
    lines += ["", "One seed: a single run's numbers move by a few points; see `neighborlt ablate` for mean ± std."]
    return "\n".join(lines) + "\n"


def default_run_dir() -> Path:
    return Path("runs") / "demo"
