"""Experiment grids on a split-neighbour protocol: the paper's Table 6, the lambda_s / M / K / split-ratio sweeps
and the loss comparison, as markdown tables with mean ± std over seeds and paired same-seed differences.

One output folder holds everything::

    OUT/classes.json, split.json          stage 1 (and targets.parquet), shared by every run
    OUT/neighbors/<setting>/               one run directory per auxiliary setting (K and split ratio, or
                                           "wordnet"): neighbors.json -> retrieve/ (the local pool) -> filter/
    OUT/pairs/<pairing>_<setting>/         the same auxiliary manifest with other silenced pairs (grid "pairs")
    OUT/runs/<run name>/seed<S>/           one complete run directory (classes, split, filter/aux_manifest.parquet,
                                           train/; export and eval work on it), resumable, skipped when finished
    OUT/<grid>.md, OUT/<grid>.json, OUT/<grid>.png
    OUT/index.html                         every grid's tables and plot, the runs and the config on one page
    OUT/commands.txt                       ``prepare_runs`` (``ablate --print-commands``): one shell command per
                                           run, for a grid run across machines (each folder gets its train.json)

Auxiliary images reach training only through the filter stage's manifest, as in ``neighborlt run``. The filter
rules are off by default here (``filter``), so the README's protocol tables, which used every pool image, reproduce.

Every run is keyed by its resolved config, so re-running the same command only trains what is missing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .defaults import AUX_CAP, LAMBDA_S, AuxCap
from .errors import ConfigError
from .rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, run_lock

if TYPE_CHECKING:
    from .train import TrainResult

logger = logging.getLogger(__name__)

SPLITS = ("overall", "many", "medium", "few")
GRIDS = ("table6", "lambda", "cap", "k", "ratio", "losses", "pairs", "silencing")


class AblationConfig(BaseModel):
    """Options of ``neighborlt ablate``; ``train`` holds the TrainConfig fields shared by every run."""

    model_config = ConfigDict(extra="forbid")

    grids: list[Literal["table6", "lambda", "cap", "k", "ratio", "losses", "pairs", "silencing"]] = ["table6"]
    protocol: str = "cifar10-neighbours"  # split-neighbour preset (neighborlt.data.PRESETS)
    protocol_overrides: dict[str, Any] = Field(default_factory=dict)  # n_max, imbalance_ratio, seed, ...
    data_dir: str | None = None
    seeds: list[int] = [0, 1, 2]  # training seeds (the protocol split itself stays fixed)
    relation: Literal["neighbors", "wordnet"] = "neighbors"  # how auxiliary classes are found
    neighbors_backend: str = "wordnet"  # neighbour backend for relation "neighbors"
    # "pool": the backend may only answer with the protocol's pool class names (the offline stand-in for "the LLM
    # proposes names, retrieval finds images"), so K and the split ratio change the auxiliary set; needs a backend
    # with a vocabulary (embedding). "backend": its own vocabulary (WordNet); names outside the pool are dropped.
    neighbors_vocabulary: Literal["backend", "pool"] = "backend"
    per_class: int = Field(5, ge=1)  # K for the grids that do not sweep it
    split_ratio: str = "auto"  # head:medium:tail for the grids that do not sweep it
    lambda_s: float = Field(LAMBDA_S, ge=0.0)  # for the grids that do not sweep it
    aux_cap: AuxCap = AUX_CAP  # M for the grids that do not sweep it ("all": every image)
    lambdas: list[float] = [0.01, 0.1, 0.2, 0.3, 0.5, 1.0]
    caps: list[int] = [10, 30, 50, 100, 150]
    ks: list[int] = [1, 3, 5, 7, 8]
    ratios: list[str] = ["1:1:3", "0:1:3", "auto"]
    # grid "pairs": the relation's auxiliary set with its silenced pairs chosen again (same number per target):
    # "visual" = the auxiliary classes whose prototypes of frozen pretrained features are closest to the target's,
    # "random" = drawn at random (once, seed 0)
    pairings: list[Literal["visual", "random"]] = ["visual", "random"]
    # grid "silencing": which settings follow † (all four by default; fewer for a cheaper grid)
    silencing_variants: list[Literal["paper", "hard_pairs", "aux_exclusive", "official"]] = [
        "paper", "hard_pairs", "aux_exclusive", "official"]
    pairing_model: str = "efficientnet_lite0"  # offline ImageNet weights: the stand-in for DINOv2 features
    pairing_image_size: int = Field(64, ge=16)
    pairing_images_per_class: int = Field(100, ge=1)  # prototype images per class (seeded sample)
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig fields (model, epochs, image_size, ...)
    filter: dict[str, Any] = Field(default_factory=lambda: {"caption": False, "band": False, "leak": False,
                                                            "dedup": False})  # FilterConfig fields of every setting
    #   (default: every rule off, every pool image kept, as the README's tables were run)

    @model_validator(mode="after")
    def _sections_are_valid(self) -> AblationConfig:
        """``train`` and ``filter`` are checked as TrainConfig / FilterConfig fields up front, so a mistyped key is
        one line before any data stage runs (not after minutes of preparing the protocol)."""
        from .filter.config import FilterConfig
        from .train.config import TrainConfig
        from .validation import check_section

        check_section(self.train, TrainConfig, "--train")
        check_section(self.filter, FilterConfig, "--filter")
        return self

    @model_validator(mode="after")
    def _vocabulary_needs_embedding(self) -> AblationConfig:
        if self.neighbors_vocabulary == "pool" and self.neighbors_backend != "embedding":
            raise ValueError(f"the pool vocabulary needs the embedding backend (got {self.neighbors_backend!r}); "
                             "pass --backend embedding")
        return self


@dataclass(frozen=True)
class RunSpec:
    """One training configuration of a grid (trained once per seed)."""

    name: str  # folder name under OUT/runs
    aux: bool  # train with auxiliary classes
    per_class: int
    split_ratio: str
    train: tuple[tuple[str, Any], ...]  # TrainConfig overrides, sorted
    pairing: str = "relation"  # which target/auxiliary pairs are silenced (neighborlt.data.auxiliary.repair)


@dataclass(frozen=True)
class Row:
    """One table row: a run spec and which classifier's metrics it reports."""

    label: str
    run: RunSpec
    source: Literal["metrics", "crt_metrics"] = "metrics"


@dataclass
class GridResult:
    grid: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""


def run_spec(cfg: AblationConfig, name: str, *, aux: bool, per_class: int | None = None,
             split_ratio: str | None = None, pairing: str = "relation", **train: Any) -> RunSpec:
    """One run of a grid: its folder ``name``, with or without auxiliary data, and the train fields it changes."""
    if aux:
        train.setdefault("aux_cap", cfg.aux_cap)
    return RunSpec(name=name, aux=aux, per_class=per_class or cfg.per_class, split_ratio=split_ratio or cfg.split_ratio,
                   train=tuple(sorted(train.items())), pairing=pairing)


def grid_rows(cfg: AblationConfig, grid: str) -> list[Row]:
    """The rows of one grid; runs shared by several rows (direct vs cRT classifier) are trained once."""
    ns = {"loss": "neighbor_silencing", "lambda_s": cfg.lambda_s}
    if grid == "table6":
        base = run_spec(cfg, "balce", aux=False, loss="balanced_softmax")
        dag = run_spec(cfg, "balce_aux_crt", aux=True, loss="balanced_softmax", classifier="retrain")
        nsr = run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_crt", aux=True, classifier="retrain", **ns)
        return [Row("Bal-CE (no auxiliary data)", base),
                Row("+ auxiliary data, Bal-CE (†), cRT classifier", dag, "crt_metrics"),
                Row("+ neighbor silencing, cRT classifier", nsr, "crt_metrics"),
                Row("+ auxiliary data, Bal-CE (†), direct classifier", dag),
                Row("+ neighbor silencing + direct classifier", nsr),
                # control: how much of the cRT rows' gain is the re-balanced classifier itself (cRT of the Bal-CE
                # run's backbone, re-trained after the fact; no auxiliary data anywhere)
                Row("Bal-CE (no auxiliary data), cRT classifier (control)", base, "crt_metrics")]
    if grid == "lambda":
        return [Row(f"λs = {lam:g}", run_spec(cfg, f"ns{lam:g}_aux", aux=True, loss="neighbor_silencing", lambda_s=lam))
                for lam in cfg.lambdas]
    if grid == "cap":
        return [Row(f"M = {m}", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_m{m}", aux=True, aux_cap=m, **ns))
                for m in cfg.caps]
    if grid == "k":
        return [Row(f"K = {k}", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_k{k}", aux=True, per_class=k, **ns))
                for k in cfg.ks]
    if grid == "ratio":
        return [Row(f"ratio {r}", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_r{r.replace(':', '-')}", aux=True,
                                        split_ratio=r, **ns)) for r in cfg.ratios]
    if grid == "losses":
        rows = [Row(label, run_spec(cfg, "balce" if name == "balanced_softmax" else name, aux=False, loss=name))
                for label, name in (("CE", "ce"), ("LA (τ=1)", "logit_adjusted"), ("Bal-BCE", "balanced_bce"),
                                    ("DRO-LT", "dro"), ("Bal-CE", "balanced_softmax"))]
        rows.append(Row(f"NS (λs={cfg.lambda_s:g}) + auxiliary data", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux", aux=True,
                                                                             **ns)))
        return rows
    if grid == "pairs":
        dag = run_spec(cfg, "balce_aux_crt", aux=True, loss="balanced_softmax", classifier="retrain")
        runs = [(f"NS, {cfg.relation} pairs", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_crt", aux=True, classifier="retrain",
                                                     **ns))]
        runs += [(f"NS, {p} pairs", run_spec(cfg, f"ns{cfg.lambda_s:g}_aux_crt_{p}", aux=True, classifier="retrain",
                                          pairing=p, **ns)) for p in cfg.pairings]
        return ([Row("† (λs = 1), direct classifier", dag)] + [Row(f"{lab}, direct classifier", r) for lab, r in runs]
                + [Row("† (λs = 1), cRT classifier", dag, "crt_metrics")]
                + [Row(f"{lab}, cRT classifier", r, "crt_metrics") for lab, r in runs])
    if grid == "silencing":
        # the paper's equation against the authors' hard mask (issue 12), all with the same auxiliary set, seeds and
        # the direct classifier; the first row is † (nothing silenced), every other row is compared with it
        nsl = "neighbor_silencing"
        variants = {
            "paper": Row(f"paper (λs {LAMBDA_S:g}, aux_weight 1)", run_spec(cfg, f"ns{LAMBDA_S:g}_aux", aux=True, loss=nsl,
                                                                        lambda_s=LAMBDA_S)),
            "hard_pairs": Row("hard pairs (λs 0, aux_weight 1)", run_spec(cfg, "ns0_aux", aux=True, loss=nsl,
                                                                        lambda_s=0.0)),
            "aux_exclusive": Row("aux-exclusive only (λs 1, aux_weight 0)",
                                 run_spec(cfg, "ns1_aux_auxw0", aux=True, loss=nsl, lambda_s=1.0,
                                       loss_params=(("aux_weight", 0.0),))),
            "official": Row("official (λs 0, aux_weight 0)",
                            run_spec(cfg, "ns_official_aux", aux=True, loss=nsl, lambda_s=0.0,
                                  loss_params=(("silencing", "official"),)))}
        return ([Row("† (λs 1, Bal-CE + auxiliary data)", run_spec(cfg, "balce_aux", aux=True, loss="balanced_softmax"))]
                + [row for name, row in variants.items() if name in cfg.silencing_variants])
    raise ConfigError(f"unknown grid {grid!r}; choose one of: {', '.join(GRIDS)}")


def _canonical(spec: RunSpec, data: GridData) -> tuple[Any, ...]:
    """What makes two runs identical (the folder name does not): the training options and the auxiliary set they
    see, i.e. its classes and neighbour pairs. Two neighbour settings that give the same set (K = 7 and K = 8 when the
    pool has only 5 classes, say) therefore train once. The classifier option is left out: a run with
    ``classifier="retrain"`` also gives the direct classifier's metrics, and a joint run gets its cRT after the fact
    (:func:`posthoc_crt`), so Table 6's † and the silencing grid's † are one run."""
    aux = data.training_set(spec)
    classes = tuple(aux.train.class_ids[aux.num_target:])
    train = tuple((k, v) for k, v in spec.train if k != "classifier")
    return (classes, tuple(map(tuple, np.asarray(aux.pairs).tolist())), train)


def _neighbors_dir(out: Path, spec: RunSpec) -> Path:
    return out / "neighbors" / f"k{spec.per_class}_r{spec.split_ratio.replace(':', '-')}"


class GridData:
    """Builds and memoises the auxiliary settings: each is a run directory made by neighbors -> retrieve (the
    protocol's local pool) -> filter, whose ``filter/aux_manifest.parquet`` the training runs copy."""

    def __init__(self, cfg: AblationConfig, out: Path) -> None:
        from .classes import ClassesConfig, run_classes
        from .filter import FilterConfig

        self.cfg, self.out = cfg, Path(out)
        ov = dict(cfg.protocol_overrides)
        run_classes(ClassesConfig(protocol=cfg.protocol, data_dir=cfg.data_dir, **ov), out)
        from .data import load_targets

        self.protocol = load_targets(out, data_dir=cfg.data_dir)
        self.filter_cfg = FilterConfig(**{"data_dir": cfg.data_dir, **cfg.filter})
        self._dirs: dict[Any, Path | None] = {}
        self._sets: dict[Any, Any] = {}

    def setting_dir(self, spec: RunSpec) -> Path | None:
        """The run directory whose ``filter/aux_manifest.parquet`` a spec trains on (None: no auxiliary data)."""
        if not spec.aux:
            return None
        if spec.pairing != "relation":
            key: Any = ("pairing", spec.pairing, spec.per_class, spec.split_ratio)
        elif self.cfg.relation == "wordnet":
            key = "wordnet"
        else:
            key = (spec.per_class, spec.split_ratio)
        if key not in self._dirs:
            self._dirs[key] = self._repaired(spec) if spec.pairing != "relation" else self._acquire(spec)
        return self._dirs[key]

    def training_set(self, spec: RunSpec) -> Any:
        from .data.auxiliary import load_aux_training_set

        d = self.setting_dir(spec)
        if d not in self._sets:
            manifest = d / "filter" / "aux_manifest.parquet" if d is not None else None
            self._sets[d] = load_aux_training_set(self.protocol, manifest, d or self.out)
        return self._sets[d]

    def _prepare(self, d: Path) -> RunDir:
        d.mkdir(parents=True, exist_ok=True)
        for name in ("classes.json", "split.json", "targets.parquet"):
            if not (d / name).is_file() or (d / name).read_bytes() != (self.out / name).read_bytes():
                shutil.copyfile(self.out / name, d / name)
        return RunDir(d)

    def _acquire(self, spec: RunSpec) -> Path:
        from .filter import run_filter
        from .retrieve import RetrieveConfig, run_retrieve

        if self.cfg.relation == "wordnet":
            rd = self._prepare(self.out / "neighbors" / "wordnet")
            run_retrieve(RetrieveConfig(source="local", match="wordnet", data_dir=self.cfg.data_dir), rd)
        else:
            rd = self._prepare(_neighbors_dir(self.out, spec))
            self._neighbors(spec, rd)
            run_retrieve(RetrieveConfig(source="local", match="names", data_dir=self.cfg.data_dir), rd)
        run_filter(self.filter_cfg, rd)
        return rd.root

    def _repaired(self, spec: RunSpec) -> Path:
        """The relation's auxiliary manifest with its pairs chosen again (``spec.pairing``) in
        ``OUT/pairs/<pairing>_<setting>/``; the pairs and their overlap with the relation's go to
        ``OUT/pairs/<pairing>_k<K>_r<ratio>.json``."""
        from dataclasses import replace

        import pyarrow as pa
        import pyarrow.parquet as pq

        from .data.auxiliary import pairing_sample, repair
        from .data.manifest import write_table

        base_spec = replace(spec, pairing="relation")
        base_dir = self.setting_dir(base_spec)
        assert base_dir is not None
        base = self.training_set(base_spec)
        feats = labels = None
        if spec.pairing == "visual":
            from .train.features import extract_features

            idx = pairing_sample(base, self.cfg.pairing_images_per_class)
            sample = base.train.subset(idx)
            feats = extract_features(self.cfg.pairing_model, "pretrained", sample, self.cfg.pairing_image_size)
            labels = sample.labels
        aux = repair(base, spec.pairing, features=feats, feature_labels=labels)
        names = aux.train.class_names
        old = {tuple(p) for p in base.pairs.tolist()}
        setting = _neighbors_dir(self.out, spec).name
        atomic_write_json(self.out / "pairs" / f"{spec.pairing}_{setting}.json", {
            "pairing": spec.pairing, "relation": self.cfg.relation, "model": self.cfg.pairing_model,
            "image_size": self.cfg.pairing_image_size, "images_per_class": self.cfg.pairing_images_per_class,
            "pairs": len(aux.pairs), "shared_with_relation": sum(tuple(p) in old for p in aux.pairs.tolist()),
            "relation_pairs": len(base.pairs),
            "pair_names": [[names[i], names[j]] for i, j in aux.pairs.tolist()]})
        rd = self._prepare(self.out / "pairs" / f"{spec.pairing}_{setting}")
        L = aux.num_target
        parents: dict[int, list[str]] = {}
        for i, a in aux.pairs.tolist():
            parents.setdefault(a - L, []).append(names[i])
        table = pq.read_table(base_dir / "filter" / "aux_manifest.parquet")
        new = [parents.get(int(k), []) for k in table.column("class_index").to_pylist()]
        col = table.schema.get_field_index("parents")
        table = table.set_column(col, table.schema.field(col), pa.array(new, type=pa.list_(pa.string())))
        write_table(table, rd.path("filter", "aux_manifest.parquet"))
        return rd.root

    def _neighbors(self, spec: RunSpec, rd: RunDir) -> dict[str, Any]:
        from .neighbors import NeighborsConfig, run_neighbors

        extra: dict[str, Any] = {}
        if self.cfg.neighbors_vocabulary == "pool":
            extra["vocabulary"] = str(self._pool_vocabulary())
        cfg = NeighborsConfig(backend=self.cfg.neighbors_backend, per_class=spec.per_class,
                              split_ratio=spec.split_ratio, **extra)
        return run_neighbors(cfg, rd).doc

    def _pool_vocabulary(self) -> Path:
        """``OUT/neighbors/pool_vocabulary.txt``: one pool class name per line (what the backend may answer)."""
        pool = self.protocol.pool
        if pool is None or pool.num_classes == 0:
            raise ConfigError(f"--neighbors-vocabulary pool: protocol {self.cfg.protocol!r} has no auxiliary pool")
        path = self.out / "neighbors" / "pool_vocabulary.txt"
        atomic_write_text(path, "".join(f"{name}\n" for name in pool.class_names))
        return path

    def populate(self, spec: RunSpec, run_dir: Path) -> None:
        """Make ``run_dir`` a complete run directory of ``spec``: classes, split, neighbours and its manifest."""
        self._prepare(run_dir)
        d = self.setting_dir(spec)
        if d is None:
            return
        for rel in ("neighbors.json", "filter/aux_manifest.parquet", "filter/funnel.json"):
            src = d / rel
            dst = run_dir / rel
            if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


def posthoc_crt(run_dir: Path, tcfg: Any, aux: Any) -> dict[str, float | None]:
    """cRT of a finished joint-classifier run: re-train a class-balanced target classifier on its frozen backbone
    (seconds; ``RUN/train/crt/``) and return the test metrics, cached in ``RUN/train/crt/metrics.json``."""
    import torch

    from .metrics import cap_per_class
    from .train.crt import run_crt
    from .train.engine import load_trained_model

    crt_dir = run_dir / "train" / "crt"
    cached = crt_dir / "metrics.json"
    if cached.is_file():
        return read_json(cached)
    if tcfg.frozen:
        raise ConfigError(f"{run_dir}: cRT after the fact needs an image model; train frozen runs with "
                          "classifier='retrain'")
    model, meta = load_trained_model(run_dir / "train")
    use_cuda = tcfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    L = int(aux.num_target)
    counts = np.bincount(np.asarray(aux.train.labels), minlength=L)[:L]
    test = cap_per_class(aux.test, tcfg.max_test_per_class)  # the test set the run itself was scored on
    _, metrics = run_crt(tcfg, model.to(device), meta, aux, test, None, None, crt_dir, device, counts,
                         aux.thresholds)
    atomic_write_json(cached, metrics)
    return metrics


def _train_seconds(run_dir: Path) -> float:
    """Training time of a run: the sum of its epochs' times in ``train/log.jsonl`` (also right for runs that were
    resumed, or skipped because they had finished earlier)."""
    log = run_dir / "train" / "log.jsonl"
    if not log.exists():
        return float("nan")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return float(sum(r.get("time_s", 0.0) for r in rows if "epoch" in r))


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the per-seed values (None / NaN left out; NaN std for one value, NaN both for none);
    the one summary of the grids, the pilot and the bench scripts."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")  # one seed: no std


def fmt_mean_std(mean: float, std: float) -> str:
    """``12.3 ± 0.4`` (one decimal; "–" for no value, no "± nan"; a mean that rounds to zero is 0.0, not -0.0)."""
    if math.isnan(mean):
        return "–"
    m = f"{mean:.1f}"
    if m == "-0.0":  # a mean that rounds to zero is 0.0, not "-0.0"
        m = "0.0"
    return m if math.isnan(std) else f"{m} ± {std:.1f}"


def train_config(cfg: AblationConfig, spec: RunSpec, seed: int) -> Any:
    """The resolved :class:`~neighborlt.train.TrainConfig` of one run of a grid (what its folder trains with)."""
    from .train import TrainConfig

    aux = {} if spec.aux else {"aux_manifest": None}
    own = dict(spec.train)
    if isinstance(own.get("loss_params"), tuple):  # kept as sorted pairs in the (hashable) spec
        own["loss_params"] = {**cfg.train.get("loss_params", {}), **dict(own["loss_params"])}
    return TrainConfig(**{"max_test_per_class": None, **cfg.train, **own, "seed": seed,
                          "data_dir": cfg.data_dir, **aux})


def _plan(cfg: AblationConfig, data: GridData) -> tuple[dict[tuple[Any, int], tuple[RunSpec, str]], dict[Any, str]]:
    """Every distinct run of the grids once, in grid order: ``{(canonical run, seed): (spec, folder name)}``, and
    the folder name of each canonical run (identical runs in several grids, e.g. M = 50 and λs = 0.1, train once)."""
    todo: dict[tuple[Any, int], tuple[RunSpec, str]] = {}
    folder: dict[Any, str] = {}
    for grid in cfg.grids:
        for row in grid_rows(cfg, grid):
            canon = _canonical(row.run, data)
            for seed in cfg.seeds:
                todo.setdefault((canon, seed), (row.run, folder.setdefault(canon, row.run.name)))
    return todo, folder


RUN_CONFIG = "train.json"  # each run folder's resolved TrainConfig (``neighborlt train RUN --config RUN/train.json``)


def _finished(run_dir: Path, tcfg: Any) -> bool:
    """True when ``run_dir`` finished training with ``tcfg`` (its recorded config equals it, execution-only fields
    aside, and its done marker carries the recorded key) and has been evaluated (``eval/metrics.json``)."""
    from .errors import NeighborLTError
    from .train.config import EXECUTION_FIELDS

    try:
        rec = read_json(run_dir / "records" / "train.config.json")
        done = read_json(run_dir / "records" / "train.done.json")
    except (NeighborLTError, OSError, ValueError):  # not trained yet (or a broken record: train again)
        return False
    if not isinstance(rec, dict) or not isinstance(done, dict) or done.get("key") != rec.get("config_key"):
        return False
    skip = set(EXECUTION_FIELDS) | {"world_size", "config_key"}
    want = {k: v for k, v in tcfg.model_dump(mode="json").items() if k not in skip}
    return ({k: v for k, v in rec.items() if k not in skip} == want and (run_dir / "train" / "model.json").is_file()
            and (run_dir / "eval" / "metrics.json").is_file())


def run_command(run_dir: Path, executable: str = "neighborlt", *, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> str:
    """The self-contained shell command that trains, exports and evaluates one prepared run folder in one process
    (``neighborlt job RUN``: :func:`run_prepared`).

    ``cwd`` and ``env`` (``NEIGHBORLT_CACHE`` / ``NEIGHBORLT_DATA``) pin what relative paths and the data lookup
    resolve to, so a worker sees the same image files (and so the same config key) as the preparing process."""
    import shlex

    d = shlex.quote(str(run_dir))
    prefix = f"cd {shlex.quote(str(cwd))} && " if cwd is not None else ""
    if env:
        prefix += "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " && "
    return f"{prefix}{executable} job {d}"


def run_prepared(run_dir: str | os.PathLike[str], *, progress: bool = False) -> TrainResult:
    """Train (resuming), export and evaluate one run folder prepared by :func:`prepare_runs`, in this process: what
    one line of ``OUT/commands.txt`` (``neighborlt job RUN``) does on a worker. One start per run, so a container
    wrapper or an import from a network file system is paid once, not three times.

    The run trains with ``RUN/train.json`` (``resume=True``: a pre-empted job continues from its checkpoint, a
    finished one is only read), then ``RUN/export`` and ``RUN/eval`` (at most the config's ``max_test_per_class``
    test images per class) are written. Re-running a finished job redoes no work.

    Returns:
        The :class:`~neighborlt.train.TrainResult`; when training was interrupted (SIGTERM, checkpoint saved), export
        and evaluation are left for the re-run.

    Raises:
        ConfigError: ``RUN/train.json`` is missing or holds no valid TrainConfig (one line naming the file).
    """
    from pydantic import ValidationError

    from .errors import NeighborLTError
    from .evaluate import EvalConfig, run_eval
    from .export import export_direct
    from .train import TrainConfig, run_train
    from .validation import format_validation_error

    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: not found; prepare the run folders with `neighborlt ablate OUT ... "
                          "--print-commands` and pass one of OUT/runs/<run>/seed<S>")
    try:
        doc = read_json(path)
    except NeighborLTError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields; prepare it again with "
                          "`neighborlt ablate OUT ... --print-commands`")
    try:
        tcfg = TrainConfig(**doc)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + format_validation_error(e, model=TrainConfig)) from None
    result = run_train(tcfg, run_dir, resume=True, progress=progress)
    if result.interrupted:
        return result
    export_direct(run_dir)
    run_eval(EvalConfig(max_test_per_class=tcfg.max_test_per_class), run_dir)
    return result


def prepare_runs(cfg: AblationConfig, out_dir: str | os.PathLike[str], *, executable: str = "neighborlt",
                 include_finished: bool = False) -> list[str]:
    """Prepare every run folder of the grids and return one shell command per run, for running a grid on several
    machines (a SLURM job array, Ray, GNU parallel); ``run_ablation`` with the same config then writes the tables
    from the finished runs without training them again.

    Each ``OUT/runs/<run>/seed<S>/`` gets what ``run_ablation`` would give it (classes, split, neighbours and the
    filter manifest of its auxiliary setting) plus ``train.json``, its resolved TrainConfig; the command is
    ``neighborlt job RUN`` (:func:`run_prepared`: train with ``RUN/train.json``, resuming, then export and eval, in
    one process), after a ``cd`` to the current directory and an ``export`` of ``NEIGHBORLT_CACHE`` and
    ``NEIGHBORLT_DATA`` as this process sees them (relative paths and the extracted datasets resolve the same on
    every worker: a run's config key includes its image paths). The workers need the same paths (a shared file
    system, or the same absolute paths on each). The commands are also written to ``OUT/commands.txt``.

    Args:
        cfg: the grids (as for :func:`run_ablation`).
        out_dir: the experiment folder (absolute paths are printed, so the commands run from any directory).
        executable: how to call neighborlt on the workers (``"python -m neighborlt"``, a container wrapper, ...).
        include_finished: also list runs that are already trained and evaluated with the same config.

    Returns:
        The commands, in grid order.
    """
    from .paths import ENV_CACHE, ENV_DATA, cache_dir, resolve_data_dir

    out = Path(out_dir).resolve()
    RunDir(out).record("ablate", cfg)
    data = GridData(cfg, out)
    todo, _ = _plan(cfg, data)
    # the workers must read the same image files as this process: a run's config key includes the paths (and
    # mtimes) of its images, and extracted archives live in the cache
    cwd = Path.cwd().resolve()
    env = {ENV_CACHE: str(cache_dir()), ENV_DATA: str(resolve_data_dir(cfg.data_dir))}
    commands: list[str] = []
    finished = 0
    for (_canon, seed), (spec, name) in todo.items():
        run_dir = out / "runs" / name / f"seed{seed}"
        tcfg = train_config(cfg, spec, seed)
        data.populate(spec, run_dir)
        atomic_write_json(run_dir / RUN_CONFIG, tcfg.model_dump(mode="json"))
        if not include_finished and _finished(run_dir, tcfg):
            finished += 1
            continue
        commands.append(run_command(run_dir, executable, cwd=cwd, env=env))
    atomic_write_text(out / "commands.txt", "".join(f"{c}\n" for c in commands))
    logger.info("ablate: %d run folders prepared, %d already finished, %d commands in %s", len(todo), finished,
                len(commands), out / "commands.txt")
    return commands


def run_ablation(cfg: AblationConfig, out_dir: str | os.PathLike[str], *, progress: bool = True,
                 on_run: Callable[[str, int], None] | None = None) -> list[GridResult]:
    """Train every run of the requested grids (skipping finished ones) and write one table per grid.

    Args:
        cfg: grids, protocol, seeds and the shared training options.
        out_dir: the experiment folder (created; re-running resumes).
        progress: show the training progress bars.
        on_run: called as ``on_run(run_name, seed)`` before each training run.

    Returns:
        One :class:`GridResult` per grid, in order; the markdown tables are also written to ``OUT/<grid>.md``
        (``.json``, ``.png``), and all of them to the page ``OUT/index.html``. Runs trained elsewhere from the
        commands of :func:`prepare_runs` are recognised as finished (same config key) and only read.
    """
    from .train import run_train

    out = Path(out_dir)
    rd = RunDir(out)
    rd.record("ablate", cfg)
    data = GridData(cfg, out)
    results: list[GridResult] = []
    cache: dict[tuple[Any, int], Any] = {}

    def tcfg_of(spec: RunSpec, seed: int) -> Any:
        return train_config(cfg, spec, seed)

    def train(key: tuple[Any, int], spec: RunSpec, name: str, *, wait: bool) -> bool:
        seed = key[1]
        run_dir = out / "runs" / name / f"seed{seed}"
        with run_lock(run_dir, wait=wait) as mine:
            if not mine:  # another `ablate` process on this folder is training it: come back to it at the end
                return False
            if on_run:
                on_run(name, seed)
            data.populate(spec, run_dir)
            res = run_train(tcfg_of(spec, seed), run_dir, progress=progress, resume="auto")
        if res.interrupted:
            raise ConfigError(f"training of {name} seed {seed} was interrupted; re-run to resume")
        cache[key] = (res, _train_seconds(run_dir))
        return True

    # every distinct run once, in grid order; runs that a parallel worker holds are trained (or, once it has
    # finished them, just read) last, so several processes on one folder share the work
    todo, folder = _plan(cfg, data)
    busy = [(key, spec, name) for key, (spec, name) in todo.items() if not train(key, spec, name, wait=False)]
    for key, spec, name in busy:
        train(key, spec, name, wait=True)

    for grid in cfg.grids:
        rows = grid_rows(cfg, grid)
        table_rows = []
        baseline: dict[int, dict[str, float]] | None = None
        for row in rows:
            per_seed: dict[int, dict[str, float]] = {}
            walls = []
            for seed in cfg.seeds:
                k = (_canonical(row.run, data), seed)
                res, wall = cache[k]
                metrics = getattr(res, row.source) or {}
                if row.source == "crt_metrics" and not metrics:  # a joint-classifier run: cRT after the fact
                    run_dir = out / "runs" / folder[k[0]] / f"seed{seed}"
                    with run_lock(run_dir, wait=True):
                        metrics = posthoc_crt(run_dir, tcfg_of(row.run, seed), data.training_set(row.run))
                per_seed[seed] = {s: metrics.get(s) for s in SPLITS}
                if metrics.get("ece") is not None:  # runs trained before ECE was recorded have none
                    per_seed[seed]["ece"] = metrics["ece"]
                walls.append(wall)
            if baseline is None:
                baseline = per_seed
            run_name = folder[_canonical(row.run, data)]
            entry: dict[str, Any] = {"label": row.label, "run": run_name, "classifier": row.source, "seeds": per_seed,
                                     "wall_s_mean": float(np.mean(walls)),
                                     "trained": trained_label(out / "runs" / run_name, cfg.seeds)}
            for s in SPLITS:
                entry[s] = mean_std([per_seed[sd][s] for sd in cfg.seeds])
                entry[f"delta_{s}"] = mean_std([per_seed[sd][s] - baseline[sd][s] for sd in cfg.seeds
                                                if per_seed[sd][s] is not None and baseline[sd][s] is not None])
            table_rows.append(entry)
        md = _markdown(cfg, grid, table_rows)
        if grid == "table6":
            md += _silencing_vs_dagger(table_rows, cfg.seeds, (("direct classifier", 3, 4), ("cRT classifier", 1, 2)))
        elif grid == "pairs":
            n = len(table_rows) // 2
            md += _silencing_vs_dagger(table_rows, cfg.seeds, [(table_rows[off + i]["label"], off, off + i)
                                                                for off in (0, n) for i in range(1, n)])
        elif grid == "silencing":
            md += _silencing_vs_dagger(table_rows, cfg.seeds, [(table_rows[i]["label"], 0, i)
                                                                for i in range(1, len(table_rows))])
            sets = [data.training_set(r.run) for r in rows]
            where = [[where_on_test(out / "runs" / folder[_canonical(r.run, data)] / f"seed{sd}", aux,
                                    tcfg_of(r.run, sd).max_test_per_class) for sd in cfg.seeds]
                     for r, aux in zip(rows, sets)]
            md += _silencing_notes(cfg, table_rows, sets, where)
        gr = GridResult(grid=grid, rows=table_rows, markdown=md)
        atomic_write_text(out / f"{grid}.md", gr.markdown)
        atomic_write_json(out / f"{grid}.json", {"config": cfg, "rows": table_rows})
        _plot(out / f"{grid}.png", grid, table_rows)
        results.append(gr)
    from .report import write_ablation_page

    write_ablation_page(out, cfg.grids)  # OUT/index.html: the tables, plots and config on one page
    return results


def _markdown(cfg: AblationConfig, grid: str, rows: list[dict[str, Any]]) -> str:
    tr = cfg.train
    head = (f"### {grid}: {cfg.protocol}, model {tr.get('model', 'resnet32_cifar')}"
            f"{' (frozen features)' if tr.get('frozen') else ''}, {tr.get('epochs', '?')} epochs, "
            f"seeds {', '.join(map(str, cfg.seeds))}, auxiliary relation {cfg.relation}\n\n"
            "Top-1 accuracy (%) on the target classes, mean ± std over seeds; Δ = paired same-seed difference "
            "to the first row.\n\n")
    lines = ["| variant | overall | many | medium | few | Δ overall | Δ few | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = ([r["label"]] + [fmt_mean_std(*r[s]) for s in SPLITS]
                 + [fmt_mean_std(*r["delta_overall"]), fmt_mean_std(*r["delta_few"]), f"{r['wall_s_mean']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    trained = dict.fromkeys(r.get("trained") for r in rows if r.get("trained"))
    note = ("\nLosses as trained (each run's model.json): " + "; ".join(trained) + ".\n") if trained else ""
    return head + "\n".join(lines) + "\n" + note


def trained_label(run: Path, seeds: list[int]) -> str | None:
    """The loss and its parameters a grid run trained with, from ``<run>/seed<S>/train/model.json`` (never the
    requested config); None when no seed has one.

    Raises:
        ConfigError: the seeds of one run trained with different loss parameters (folders of another grid).
    """
    from .pipeline import trained_loss_label

    labels = {trained_loss_label(m) for sd in seeds
              if isinstance(m := _maybe_read(run / f"seed{sd}" / "train" / "model.json"), dict)}
    if len(labels) > 1:
        raise ConfigError(f"{run}: its seeds trained with different losses ({'; '.join(sorted(labels))}); remove the "
                          "folder and run again")
    return labels.pop() if labels else None


def _maybe_read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _silencing_vs_dagger(rows: list[dict[str, Any]], seeds: list[int],
                         comparisons: Sequence[tuple[str, int, int]]) -> str:
    """Paired same-seed differences neighbor silencing − † (plain Balanced-CE with the same auxiliary data), per
    ``(label, † row, silencing row)``: the extra gain of silencing over just adding the auxiliary classes."""
    lines = ["", "Neighbor silencing − † (same classifier, paired over seeds):", ""]
    for source, dag_i, ns_i in comparisons:
        dag, ns = rows[dag_i]["seeds"], rows[ns_i]["seeds"]
        parts = []
        for s in SPLITS:
            vals = [ns[k][s] - dag[k][s] for k in seeds if ns[k][s] is not None and dag[k][s] is not None]
            parts.append(f"{s} {fmt_mean_std(*mean_std(vals))}")
        lines.append(f"* {source}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def where_on_test(run_dir: Path, aux: Any, max_test_per_class: int | None) -> dict[str, Any]:
    """Where a finished run's joint model (``RUN/train``, L + K outputs) sends the target test images it was scored
    on (:func:`neighborlt.evaluate.where_predictions` with the training set's pairs), cached in
    ``RUN/train/where.json`` under the weights' SHA-256."""
    from .evaluate import where_predictions
    from .metrics import cap_per_class
    from .rundir import file_sha256
    from .train.inference import predict_logits

    model_dir = run_dir / "train"
    sha = file_sha256(model_dir / "model.safetensors")
    cached = model_dir / "where.json"
    if cached.is_file():
        doc = read_json(cached)
        if isinstance(doc, dict) and doc.get("weights_sha256") == sha:
            return doc
    test = cap_per_class(aux.test, max_test_per_class)
    logits = predict_logits(model_dir, test)
    doc = {**where_predictions(logits, test.labels, int(aux.num_target), aux.pairs), "weights_sha256": sha}
    doc.pop("per_class", None)
    atomic_write_json(cached, doc)
    return doc


def _silencing_notes(cfg: AblationConfig, rows: list[dict[str, Any]], sets: Sequence[Any],
                     where: Sequence[Sequence[dict[str, Any]]] = ()) -> str:
    """Grid ``silencing``: each row's ECE (when recorded), where each row's joint model sends the target test images
    (``where``: one :func:`where_on_test` per seed; the paired share of the confusions) and the pair density of
    each row's training set (:func:`neighborlt.data.auxiliary.pair_density`: how much of the auxiliary set the
    silenced pairs cover)."""
    from .data.auxiliary import pair_density

    lines = [""]
    eces = [(r["label"], [r["seeds"][k].get("ece") for k in cfg.seeds]) for r in rows]
    if all(v is not None for _, vals in eces for v in vals):
        lines += ["Expected calibration error (%, 15 bins, target rows, direct classifier): "
                  + "; ".join(f"{lab} {fmt_mean_std(*mean_std(vals))}" for lab, vals in eces), ""]
    if where:
        lines += [("Where the target test images go under the full L + K head (top-1 %, mean ± std over seeds; "
                  "`paired aux` = an auxiliary class paired with the image's own class, the only ones silencing "
                  "touches):"), ""]
        for r, docs in zip(rows, where):
            share = {k: fmt_mean_std(*mean_std([d["share"][k] for d in docs]))
                     for k in ("correct", "other_target", "aux", "paired_aux")}
            lines.append(f"* {r['label']}: correct {share['correct']}, other target {share['other_target']}, "
                         f"auxiliary {share['aux']}, paired auxiliary {share['paired_aux']}")
        lines.append("")
    lines += ["Pair density of the training set (the pairs that λs silences):", ""]
    seen: dict[tuple[Any, ...], list[str]] = {}
    for r, aux in zip(rows, sets):
        key = (tuple(map(tuple, np.asarray(aux.pairs).tolist())), int(aux.num_target), int(aux.train.num_classes))
        seen.setdefault(key, []).append(r["label"])
    for (pairs, L, C), labels in seen.items():
        d = pair_density(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), L, C - L)
        lines.append(f"* {', '.join(labels)}: {d['pairs']} pairs over {L} targets and {C - L} auxiliary classes; "
                     f"pairs per target {d['pairs_per_target_mean']:.2f} (max {d['pairs_per_target_max']}), paired "
                     f"share of the auxiliary set {100 * d['paired_share_mean']:.0f} %, targets without a pair "
                     f"{d['targets_without_pair']}, targets paired with most of it {100 * d['dense_targets']:.0f} %"
                     + (" (dense: silencing removes most of the auxiliary competition)" if d["dense"] else ""))
    return "\n".join(lines) + "\n"


def _plot(path: Path, grid: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.6))
    width = 0.8 / len(SPLITS)
    x = np.arange(len(rows))
    for i, s in enumerate(SPLITS):
        means = [r[s][0] for r in rows]
        stds = [r[s][1] for r in rows]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, label=s, capsize=2)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(grid, pad=22)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()  # through a unique temp file: parallel workers on one folder write the same plot
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def read_grid(out_dir: str | os.PathLike[str], grid: str) -> dict[str, Any]:
    """Load a finished grid's JSON (``OUT/<grid>.json``)."""
    return read_json(Path(out_dir) / f"{grid}.json")
