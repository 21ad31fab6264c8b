"""The training engine: ``run_train`` trains on target + auxiliary classes (single process or DDP under
torchrun), checkpoints every epoch, resumes exactly, saves and stops cleanly on SIGTERM, and writes the final
weights and their description. Inference (``predict_logits``, ``load_trained_model``) lives in
:mod:`neighborlt.train.inference`, the frozen-feature head in :mod:`neighborlt.train.heads`; both are re-exported
here for older imports. Seeding, deterministic kernels, the SIGTERM stop and an epoch's batches live in
:mod:`neighborlt.train.loop` (MAE pre-training shares them).

A run, in order (one function each): the key and the checks (:func:`_run_key`, :func:`_check_existing`,
:func:`_per_rank_batch`), the setup (:func:`_build`: data, model, sampler, loss, optimiser, schedule, Mixup), the
resume (:func:`_resume`), the epochs (:func:`_train` -> :func:`_train_epoch` -> :func:`_micro_step` /
:func:`_optimizer_step`, then :func:`_end_epoch`: evaluation, log row, checkpoint) and the outputs
(:func:`_write_outputs`: weights, model.json, cRT, completion marker).

Files under ``RUN/train/``::

    model.safetensors  model.json  log.jsonl  checkpoint/{last.pt, weights-*.safetensors}  crt/ (cRT)

Exact resume: every epoch's sample list depends only on ``(seed, epoch)`` and the global RNGs are re-seeded
from ``(seed, epoch, rank)`` at the start of each epoch; a checkpoint taken in the middle of an epoch (SIGTERM)
also stores every rank's RNG state and the position in the epoch, so in deterministic mode an interrupted and
resumed run ends with the same weights as an uninterrupted one. In stream mode (``train.data_mode``) each
sample's augmentation is a function of ``(seed, epoch, position)``, so this holds for any worker count; in cache
mode with ``num_workers > 0`` augmentation after a mid-epoch resume is re-seeded, so exactness holds at epoch
boundaries only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..defaults import SHOT_THRESHOLDS
from ..errors import ConfigError, NeighborLTError
from ..metrics import cap_per_class
from ..rundir import (
    RunDir,
    StageKey,
    append_jsonl,
    atomic_write_json,
    config_hash,
    read_json,
    truncate_jsonl,
)
from . import checkpoint as ckpt
from . import ddp
from .config import EXECUTION_FIELDS, TrainConfig, TrainResult
from .crt import run_crt
from .heads import FeatureHead, WithFeatures
from .inference import evaluate_model, load_trained_model, predict_logits
from .loop import (
    StopFlag,
    catch_signals,
    derive_seed,
    determinism,
    iterate_batches,
    micro_batches_per_epoch,
    seed_all,
    split_batches,
)

log = logging.getLogger(__name__)

__all__ = ["FeatureHead", "TrainConfig", "TrainResult", "is_trained", "load_trained_model", "load_training_data",
           "manifest_path", "predict_logits", "run_train"]

STAGE = "train"
STAGE_VERSION = 2  # raised when the stage writes other outputs for the same inputs (2: the one key rule)
MODEL_SCHEMA = 1


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def manifest_path(cfg: TrainConfig, rd: RunDir) -> Path | None:
    """The auxiliary manifest a run trains on (``cfg.aux_manifest``, relative to the run directory), or None for the
    targets only; a configured manifest that does not exist is a one-line error naming the commands that make it."""
    if cfg.aux_manifest is None:
        return None
    p = Path(cfg.aux_manifest)
    p = p if p.is_absolute() else rd.root / p
    if not p.is_file():
        raise ConfigError(f"{p}: not found; make it with `neighborlt retrieve {rd.root}` and `neighborlt filter "
                          f"{rd.root}`, or pass --no-aux to train on the target classes only")
    return p


def load_training_data(cfg: TrainConfig, rd: RunDir) -> Any:
    """The run's targets (``split.json`` + ``targets.parquet`` of stage 1) plus the auxiliary classes of its filter
    manifest."""
    from ..data import load_targets
    from ..data.auxiliary import load_aux_training_set

    proto = load_targets(rd.root, data_dir=cfg.data_dir)
    mpath = manifest_path(cfg, rd)
    aux = load_aux_training_set(proto, mpath, rd.root)
    source = "manifest" if mpath is not None else "none"
    log.info("training set: %d images, %d target + %d auxiliary classes (%s), %d neighbour pairs",
             len(aux.train), aux.num_target, aux.train.num_classes - aux.num_target, mpath or "no auxiliary data",
             len(aux.pairs))
    return aux, cap_per_class(aux.test, cfg.max_test_per_class), source


def _given_data(cfg: TrainConfig, data: Any) -> tuple[Any, Any, str]:
    for attr in ("train", "test", "num_target", "pairs"):
        if not hasattr(data, attr):
            raise ConfigError(f"run_train(data=...) needs an AuxTrainingSet-like object; {attr!r} is missing")
    return data, cap_per_class(data.test, cfg.max_test_per_class), "given"


def _data_key(cfg: TrainConfig, data: Any) -> str:
    """The fingerprint of a given training set (its images, test images, L and pairs)."""
    from ..data import fingerprint

    return config_hash([fingerprint(data.train), fingerprint(data.test), int(data.num_target),
                        np.asarray(data.pairs, dtype=np.int64).tolist()])


# ----------------------------------------------------------------------------------------------------------
# run_train
# ----------------------------------------------------------------------------------------------------------


def _check_existing(cfg: TrainConfig, rd: RunDir, key: StageKey, resume: bool | str, force: bool,
                    info: ddp.DistInfo) -> bool:
    """Decide what to do with earlier files; True when an identical finished run can be reused.

    The one key rule (:meth:`RunDir.stage_key`): a finished run with another key (options, ``split.json`` or the
    manifest changed) is replaced, as ``make`` would; an unfinished run (a checkpoint) of the same key is continued
    with ``resume`` (else refused), one of another key is replaced unless ``resume`` is True (explicit ``--resume``
    of another configuration is an error); ``resume="auto"`` continues or starts over, whichever fits."""
    tdir = rd.path(STAGE)
    if not force and rd.is_done(STAGE, key, "train/model.json", "train/model.safetensors"):
        return True
    has_ckpt = not force and ckpt.has_checkpoint(tdir / "checkpoint")
    same_ckpt = has_ckpt and _checkpoint_key(tdir / "checkpoint") == key.key
    if same_ckpt and not resume:
        raise ConfigError(f"{tdir / 'checkpoint' / 'last.pt'}: an unfinished run is here; pass --resume to "
                          "continue it or --force to start over")
    if has_ckpt and not same_ckpt and resume is True:
        raise ConfigError(f"{tdir / 'checkpoint' / 'last.pt'}: was written with another configuration; resume "
                          "with the same options or pass --force to start over")
    if info.is_main:
        log.info("train: %s (%s)", "continuing the unfinished run" if same_ckpt else "training",
                 "--force" if force else rd.stale_reason(STAGE, key))
        rd.clear_done(STAGE)
        for p in (tdir / "model.safetensors", tdir / "model.json"):
            p.unlink(missing_ok=True)
        shutil.rmtree(tdir / "crt", ignore_errors=True)
        if not same_ckpt:  # start over: nothing of an earlier run stays
            shutil.rmtree(tdir / "checkpoint", ignore_errors=True)
            (tdir / "log.jsonl").unlink(missing_ok=True)
    ddp.barrier(info)
    return False


def _checkpoint_key(ckpt_dir: Path) -> str | None:
    """The run key a checkpoint was written with (None when it cannot be read: it is then started over)."""
    try:
        return ckpt.load_checkpoint(ckpt_dir)[1].get("config_key")
    except NeighborLTError:
        return None


def effective_loss_params(cfg: TrainConfig, criterion: nn.Module | None) -> dict[str, Any]:
    """The loss's parameters as it trained (``model.json`` ``loss_params``): the scalar ``loss_params`` given, a
    ``silencing`` preset resolved, and what the loss reports itself (``effective_params()``: λs, aux_weight)."""
    out: dict[str, Any] = {k: v for k, v in cfg.loss_params.items()
                           if k != "silencing" and isinstance(v, (bool, int, float, str))}
    own = getattr(criterion, "effective_params", None)
    if callable(own):
        out.update(own())
    return out


def _model_meta(cfg: TrainConfig, model: nn.Module, aux: Any, frozen_info: dict[str, Any] | None,
                key: str, mode: str, criterion: nn.Module | None = None) -> dict[str, Any]:
    from .models import classifier_keys

    w, b = classifier_keys(model)
    return {
        "schema": MODEL_SCHEMA,
        "architecture": "feature_head" if frozen_info else cfg.model,
        "init": cfg.init,
        "image_size": cfg.image_size,
        "num_classes": int(model.get_classifier().out_features),  # type: ignore[operator]
        "num_target_classes": int(aux.num_target),
        "class_names": list(aux.train.class_names[: model.get_classifier().out_features]),  # type: ignore
        "class_ids": list(aux.train.class_ids[: model.get_classifier().out_features]),  # type: ignore
        "classifier": {"weight": w, "bias": b},
        "classifier_mode": mode,
        **_data_meta(cfg),
        "frozen": frozen_info,
        "loss": cfg.loss,
        "loss_params": effective_loss_params(cfg, criterion),  # what trained (λs, aux_weight, ...): reports read it
        "aux_cap": cfg.aux_cap if int(model.get_classifier().out_features) > int(aux.num_target) else None,  # type: ignore
        "silencing": cfg.loss_params.get("silencing"),
        "recipe": {"name": cfg.recipe, "dataset": cfg.recipe_dataset, "filled": cfg.recipe_values()},
        "neighbor_pairs": np.asarray(aux.pairs, dtype=np.int64).reshape(-1, 2).tolist(),  # (target, auxiliary) rows
        "config_key": key,
        "weights": "model.safetensors",
    }


def _data_meta(cfg: TrainConfig) -> dict[str, Any]:
    """How the model saw pixels (model.json, records): the resolved data mode and the evaluation crop share
    (inference and ``neighborlt.load`` decode new images the same way)."""
    from .data import model_crop_pct, resolve_data_mode

    return {"data_mode": resolve_data_mode(cfg.data_mode, cfg.image_size), "crop_pct": model_crop_pct(cfg.model)}


def run_train(cfg: TrainConfig, run_dir: str | os.PathLike[str] | RunDir, *, resume: bool | str = False,
              force: bool = False, progress: bool = True, on_step: Callable[[int, int], None] | None = None,
              data: Any | None = None) -> TrainResult:
    """Train a model on the target (+ auxiliary) classes of a run directory.

    Runs DDP when launched by torchrun (``WORLD_SIZE`` > 1), one process otherwise. Rank 0 writes every file.

    Args:
        cfg: the training options.
        run_dir: the run directory (holds ``split.json`` and ``targets.parquet`` of ``neighborlt classes``).
        resume: continue from ``RUN/train/checkpoint/last.pt`` (same run key required); ``"auto"`` (the pipeline):
            continue a checkpoint of the same key, start over otherwise.
        force: delete earlier training outputs of this run dir and start over (a finished run with another key,
            options or input files, is replaced without it).
        progress: show a rich progress bar on rank 0.
        on_step: called as ``on_step(epoch, micro_step)`` after each optimizer step (tests, monitoring).
        data: a prebuilt :class:`~neighborlt.data.auxiliary.AuxTrainingSet` (``train``, ``test``,
            ``num_target``, ``pairs``) to train on instead of the one the config names (experiment grids that
            reuse one set); its data fingerprint joins the config key.

    Returns:
        A :class:`TrainResult`; ``interrupted`` is True when SIGTERM stopped the run after saving a checkpoint.

    Raises:
        ConfigError: conflicting earlier outputs, unknown names, bad option combinations.

    Example:
        >>> run_classes(ClassesConfig(protocol="cifar10-neighbours"), "runs/c10")  # doctest: +SKIP
        >>> cfg = TrainConfig(model="resnet8_cifar", epochs=2, aux_manifest=None)  # doctest: +SKIP
        >>> run_train(cfg, "runs/c10").metrics["few"]  # doctest: +SKIP
    """
    if not isinstance(run_dir, RunDir) and data is None and not Path(run_dir, "split.json").is_file():
        raise ConfigError(f"{Path(run_dir, 'split.json')}: not found; run `neighborlt classes {run_dir}` first")  # no
        #   empty run folder left behind by a mistyped path
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = ddp.setup(cfg.device)
    try:
        with determinism(cfg.deterministic):
            return _run(cfg, rd, info, resume=resume, force=force, progress=progress, on_step=on_step, data=data)
    finally:
        ddp.cleanup(info)


def is_trained(cfg: TrainConfig, run_dir: RunDir | str | os.PathLike[str]) -> bool:
    """True when :func:`run_train` (without ``force``) would find this run finished with the same key and train
    nothing (its options, ``split.json``, ``targets.parquet`` and auxiliary manifest unchanged)."""
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    if not (root / "split.json").is_file():  # checked before RunDir(), which would make a mistyped folder
        return False
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(root)
    return rd.is_done(STAGE, _run_key(cfg, rd, None), "train/model.json", "train/model.safetensors")


# ----------------------------------------------------------------------------------------------------------
# One run, in parts: key and checks -> setup (data, model, sampler, loss, optimiser) -> resume -> epochs -> outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """What a run trains and is scored on."""

    aux: Any  # the AuxTrainingSet: ``train`` (targets 0..L-1, auxiliary L..C-1), ``pairs``, ``num_target``
    test: Any  # the target test ImageSet (capped by ``max_test_per_class``)
    relation: str  # where the auxiliary classes came from: "manifest" | "none" | "given"
    L: int  # target classes
    C: int  # all classes (L + K)
    labels: np.ndarray  # int64 [N] training labels
    train_counts: np.ndarray  # training images of the L targets
    thresholds: tuple[int, int]  # the protocol's (many, few) shot thresholds


@dataclass
class _Model:
    """The model and the inputs it trains on: images (``dataset``) or cached frozen features (``train_x``)."""

    model: nn.Module
    dataset: Any  # ImageSetDataset of the training images; None under the frozen-feature protocol
    train_x: torch.Tensor | None  # frozen protocol: features [N, D] of the training images
    test_x: torch.Tensor | None  # frozen protocol: features of the test images
    frozen_info: dict[str, Any] | None  # model.json "frozen" entry (None for image models)


@dataclass
class _Setup:
    """Everything one run trains with, built by :func:`_build` before the first epoch."""

    cfg: TrainConfig
    rd: RunDir
    info: ddp.DistInfo
    key: str  # the run's config key (config + data)
    dev: torch.device
    amp: bool  # bf16 autocast
    per_rank: int  # images per micro-batch on this rank
    data: _Data
    m: _Model
    sampler: Any  # EpochSampler
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_params: list[nn.Parameter]  # learnable parameters of the loss (DRO-LT margins), outside DDP
    mixup_fn: Any  # timm Mixup or None
    n_micro: int  # micro-batches per epoch on every rank
    net: nn.Module | None = None  # what the loop calls: the model, wrapped for features and DDP (set after resume)
    t_start: float | None = None  # time.time() when run_train started in this process; None after its first step
    first_step_s: float | None = None  # seconds from t_start to that first step, until log.jsonl has it
    stage_key: StageKey | None = None  # the run's key with its parts (written to the completion marker)

    @property
    def model(self) -> nn.Module:
        return self.m.model

    @property
    def tdir(self) -> Path:
        return self.rd.path(STAGE)

    @property
    def needs_features(self) -> bool:
        return bool(getattr(self.criterion, "needs_features", False))


@dataclass
class _Start:
    """Where the loop starts: epoch and micro-step, and (mid-epoch resume) the RNG state and partial loss sums."""

    epoch: int = 0
    step: int = 0
    rng: dict[str, Any] | None = None
    partial: tuple[float, int] = (0.0, 0)  # running loss sum and sample count of an epoch interrupted midway


def _run(cfg: TrainConfig, rd: RunDir, info: ddp.DistInfo, *, resume: bool | str, force: bool, progress: bool,
         on_step: Callable[[int, int], None] | None, data: Any | None) -> TrainResult:
    """:func:`run_train` inside the process group and the determinism context."""
    t_start = time.time()
    skey = _run_key(cfg, rd, data)
    key = skey.key
    if _check_existing(cfg, rd, skey, resume, force, info):
        return _skipped(cfg, rd, info)
    per_rank = _per_rank_batch(cfg, info)
    if info.is_main:
        rd.record(STAGE, {**cfg.model_dump(mode="json"), "world_size": info.world_size, "config_key": key},
                  seed=cfg.seed)
        if cfg.recipe != "none":
            log.info("recipe %s (%s) filled: %s", cfg.recipe, cfg.recipe_dataset, cfg.recipe_values())
    s = _build(cfg, rd, info, key, per_rank, data)
    s.stage_key = skey
    s.t_start = t_start
    start = _resume(s) if resume else _Start()
    s.net = ddp.wrap(WithFeatures(s.model) if s.needs_features else s.model, info, sync_bn=cfg.sync_bn)
    try:
        epochs_done, interrupted, metrics = _train(s, start, progress, on_step)
    finally:
        if s.m.dataset is not None:
            s.m.dataset.close()  # stream mode's persistent loader workers end with the training, not at a GC
    wall = time.time() - t_start
    result = TrainResult(run_dir=str(rd.root), model_path=None, epochs_done=epochs_done, interrupted=interrupted,
                         metrics=metrics, num_classes=s.data.C, num_target_classes=s.data.L, wall_s=wall,
                         world_size=info.world_size)
    if interrupted:
        log.warning("stopped by signal at epoch %d; checkpoint saved in %s; re-run with --resume", epochs_done,
                    s.tdir / "checkpoint")
        return result
    _write_outputs(s, result, metrics, wall)
    ddp.barrier(info)
    return result


# ---- key and checks ---------------------------------------------------------------------------------------


def _run_key(cfg: TrainConfig, rd: RunDir, data: Any | None) -> StageKey:
    """The run's key (:meth:`RunDir.stage_key`): the config's key fields (execution-only ones left out), the files
    it reads (``split.json``, ``targets.parquet``, the auxiliary manifest), or the given data's fingerprint."""
    fields: dict[str, Any] = cfg.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))
    fields["data_mode"] = _data_meta(cfg)["data_mode"]  # the mode used: auto and the mode it resolves to agree
    if data is not None:
        return rd.stage_key(STAGE, {**fields, "given_data": _data_key(cfg, data)}, version=STAGE_VERSION)
    if not rd.path("split.json").exists():
        raise ConfigError(f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first")
    mpath = manifest_path(cfg, rd)
    inputs = ["split.json", "targets.parquet"] + ([mpath] if mpath is not None else [])
    return rd.stage_key(STAGE, fields, inputs, version=STAGE_VERSION)


def _skipped(cfg: TrainConfig, rd: RunDir, info: ddp.DistInfo) -> TrainResult:
    """The result of a finished run with the same key, read from its files (nothing is trained)."""
    tdir = rd.path(STAGE)
    meta = read_json(tdir / "model.json")
    log.info("%s: finished run with the same configuration found; skipping (pass --force to retrain)", tdir)
    done = read_json(rd.path("records", f"{STAGE}.done.json"))
    crt = tdir / "crt" / "model.safetensors"
    return TrainResult(run_dir=str(rd.root), model_path=str(tdir / "model.safetensors"),
                       crt_model_path=str(crt) if crt.exists() else None, epochs_done=cfg.epochs,
                       skipped=True, metrics=done.get("metrics", {}), crt_metrics=done.get("crt_metrics", {}),
                       num_classes=meta["num_classes"], num_target_classes=meta["num_target_classes"],
                       world_size=info.world_size)


def _per_rank_batch(cfg: TrainConfig, info: ddp.DistInfo) -> int:
    """Images per micro-batch on each rank; the global batch must split evenly (and evenly again for Mixup)."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world_size} DDP processes")
    per_rank = cfg.batch_size // info.world_size
    if (cfg.mixup > 0 or cfg.cutmix > 0) and per_rank % 2:
        raise ConfigError(f"Mixup/CutMix need an even per-process batch; got {per_rank} (--batch-size / ranks)")
    return per_rank


def _use_amp(cfg: TrainConfig, dev: torch.device) -> bool:
    """bf16 autocast: ``--amp bf16``, or ``auto`` on CUDA."""
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
    if amp and dev.type != "cuda":
        log.info("bf16 autocast requested on %s: running on CPU in bf16 autocast", dev)
    return amp


# ---- setup ------------------------------------------------------------------------------------------------


def _build(cfg: TrainConfig, rd: RunDir, info: ddp.DistInfo, key: str, per_rank: int, data: Any | None) -> _Setup:
    """Data, model, sampler, loss, optimiser and schedule, in the order that fixes the RNG streams of a seed."""
    from .optim import build_scheduler
    from .samplers import build_sampler

    dev = info.device
    amp = _use_amp(cfg, dev)
    seed_all(cfg.seed)
    d = _prepare_data(cfg, rd, data)
    m = _build_model(cfg, d, info)
    sampler = build_sampler(cfg.sampler, d.labels, num_target_classes=d.L, aux_cap=cfg.aux_cap if d.C > d.L else None,
                            seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    criterion = _build_loss(cfg, d, dev)
    optimizer, loss_params = _build_optimizer(cfg, m.model, criterion)
    n_micro = micro_batches_per_epoch(len(sampler), per_rank, info)
    if n_micro >= cfg.grad_accum:  # whole accumulation groups only: each step sees batch_size * grad_accum images
        n_micro -= n_micro % cfg.grad_accum
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    scheduler = build_scheduler(optimizer, cfg.epochs, steps_per_epoch, min(cfg.warmup_epochs, cfg.epochs),
                                cfg.min_lr)
    return _Setup(cfg=cfg, rd=rd, info=info, key=key, dev=dev, amp=amp, per_rank=per_rank, data=d, m=m,
                  sampler=sampler, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                  loss_params=loss_params, mixup_fn=_build_mixup(cfg, d.C), n_micro=n_micro)


def _prepare_data(cfg: TrainConfig, rd: RunDir, data: Any | None) -> _Data:
    """The training set (the config's, or ``data``), the capped test set, labels, counts and shot thresholds."""
    aux, test, relation = load_training_data(cfg, rd) if data is None else _given_data(cfg, data)
    L, C = int(aux.num_target), int(aux.train.num_classes)
    return _Data(aux=aux, test=test, relation=relation, L=L, C=C,
                 labels=np.asarray(aux.train.labels, dtype=np.int64), train_counts=aux.train.counts()[:L],
                 thresholds=tuple(getattr(aux, "thresholds", SHOT_THRESHOLDS)))


def _build_model(cfg: TrainConfig, d: _Data, info: ddp.DistInfo) -> _Model:
    """An image model with its training transform, or (frozen protocol) cached features and a head; on the device."""
    if cfg.frozen:
        train_x, test_x = _frozen_features(cfg, d.aux.train, info), _frozen_features(cfg, d.test, info)
        seed_all(cfg.seed)
        head = FeatureHead(train_x.shape[1], d.C, cfg.head, cfg.head_hidden)
        frozen_info = {"backbone": cfg.model, "init": cfg.init, "image_size": cfg.image_size,
                       "in_features": int(train_x.shape[1]), "head": cfg.head,
                       "hidden": cfg.head_hidden if cfg.head == "mlp" else None}
        return _Model(model=head.to(info.device), dataset=None, train_x=train_x, test_x=test_x,
                      frozen_info=frozen_info)
    from .data import ImageSetDataset, build_transform, resolve_data_mode
    from .models import create_model, model_normalization

    model = create_model(cfg.model, d.C, init=cfg.init, image_size=cfg.image_size)
    if cfg.channels_last:  # weights in NHWC make every convolution's output NHWC too; inputs can stay NCHW
        model = model.to(memory_format=torch.channels_last)
    norm = model_normalization(cfg.model)
    if resolve_data_mode(cfg.data_mode, cfg.image_size) == "stream":  # decoded per sample in the loader workers
        dataset = ImageSetDataset(d.aux.train, None, cfg.image_size, mode="stream", train=True, seed=cfg.seed,
                                  randaugment=cfg.randaugment, normalization=norm)
    else:  # cache: decoded once to the squashed array, augmented in float (the README tables' pixels)
        dataset = ImageSetDataset(d.aux.train, build_transform(cfg.image_size, train=True,
                                                               randaugment=cfg.randaugment, normalization=norm),
                                  cfg.image_size)
    return _Model(model=model.to(info.device), dataset=dataset, train_x=None, test_x=None, frozen_info=None)


def _frozen_features(cfg: TrainConfig, image_set: Any, info: ddp.DistInfo) -> torch.Tensor:
    """Backbone features of ``image_set`` from the feature cache. Under DDP every rank computes its share of the
    missing chunks (chunk ``i`` on rank ``i % WORLD_SIZE``) and one rank merges them
    (:func:`~neighborlt.train.features.extract_model_features`); every rank returns the whole set's features."""
    from .features import extract_features, feature_tensor

    f = extract_features(cfg.model, cfg.init, image_set, cfg.image_size, batch_size=cfg.eval_batch_size,
                         device=str(info.device), bf16=False, distributed=info.distributed)
    return feature_tensor(f)


def _build_loss(cfg: TrainConfig, d: _Data, dev: torch.device) -> nn.Module:
    """The loss with the per-epoch class counts ``n_j`` (auxiliary classes capped at M) and, for
    neighbor_silencing, the neighbour pairs, λs (``loss_params["silencing"]`` preset, else the field), the
    number of targets L (the auxiliary block of ``aux_weight``)."""
    from ..losses import LOSSES
    from .samplers import effective_class_counts

    counts = effective_class_counts(d.labels, d.C, d.L, cfg.aux_cap if d.C > d.L else None)
    loss_kw: dict[str, Any] = dict(cfg.loss_params)
    if cfg.loss == "neighbor_silencing":
        from ..losses import resolve_silencing

        loss_kw = resolve_silencing(loss_kw)  # a `silencing` preset's lambda_s / aux_weight win over the field
        loss_kw.setdefault("neighbor_pairs", torch.as_tensor(np.asarray(d.aux.pairs, dtype=np.int64)).reshape(-1, 2))
        loss_kw.setdefault("lambda_s", cfg.lambda_s)
        loss_kw.setdefault("num_targets", d.L)  # the auxiliary block L..C-1 (aux_weight)
    try:
        criterion: nn.Module = LOSSES.create(cfg.loss, class_counts=torch.as_tensor(counts), **loss_kw)
    except TypeError as e:
        raise ConfigError(f"loss {cfg.loss!r}: bad --loss-param ({e})") from None
    return criterion.to(dev)


def _build_optimizer(cfg: TrainConfig, model: nn.Module,
                     criterion: nn.Module) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """The optimiser of the model, plus a group (no weight decay) for learnable loss parameters (DRO-LT)."""
    from .optim import build_optimizer

    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.layer_decay,
                                betas=cfg.betas, momentum=cfg.momentum)
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:  # e.g. DRO-LT's learnable margins
        optimizer.add_param_group({"params": loss_params, "weight_decay": 0.0, "lr": cfg.lr})
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
    return optimizer, loss_params


def _build_mixup(cfg: TrainConfig, num_classes: int) -> Any:
    """timm's Mixup/CutMix (with label smoothing) when ``--mixup`` or ``--cutmix`` is on, else None."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)


# ---- checkpoints ------------------------------------------------------------------------------------------


def _resume(s: _Setup) -> _Start:
    """Load ``checkpoint/last.pt`` into the model, optimiser, scheduler, loss and sampler; where to continue."""
    ckpt_dir = s.tdir / "checkpoint"
    if not ckpt.has_checkpoint(ckpt_dir):
        log.info("%s: no checkpoint; starting from scratch", ckpt_dir)
        return _Start()
    weights, state = ckpt.load_checkpoint(ckpt_dir)
    if state.get("config_key") != s.key:
        raise ConfigError(f"{ckpt_dir / 'last.pt'}: was written with another configuration; resume with the "
                          "same options or pass --force to start over")
    s.model.load_state_dict(weights)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if state.get("loss"):
        s.criterion.load_state_dict(state["loss"])
    start = _Start(epoch=int(state["epoch"]), step=int(state["step"]))
    per_rank_state = state.get("ranks") or []
    info = s.info
    if len(per_rank_state) == info.world_size:
        mine = per_rank_state[info.rank]
        s.sampler.load_state_dict(mine["sampler"])
        start.rng = mine["rng"]
        start.partial = (float(mine.get("loss_sum", 0.0)), int(mine.get("seen", 0)))
    elif start.step:
        log.warning("checkpoint was written by %d processes, resuming with %d: epoch %d restarts",
                    len(per_rank_state), info.world_size, start.epoch)
        start.step = 0
    if info.is_main:
        truncate_jsonl(s.tdir / "log.jsonl", start.epoch)
    log.info("resuming at epoch %d, step %d", start.epoch, start.step)
    return start


def _save(s: _Setup, epoch: int, step: int, partial: tuple[float, int] = (0.0, 0)) -> None:
    """Write ``checkpoint/last.pt`` (rank 0) with every rank's sampler position, RNG state and partial loss."""
    info = s.info
    mine = {"sampler": s.sampler.state_dict(), "rng": ckpt.rng_state(), "loss_sum": partial[0], "seen": partial[1]}
    ranks: list[Any] = [mine]
    if info.distributed:
        ranks = [None] * info.world_size
        dist.all_gather_object(ranks, mine)
    if info.is_main:
        ckpt.save_checkpoint(s.tdir / "checkpoint", s.model, {
            "epoch": epoch, "step": step, "config_key": s.key, "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "loss": s.criterion.state_dict(), "ranks": ranks,
            "world_size": info.world_size,
        })
    ddp.barrier(info)


# ---- the loop ---------------------------------------------------------------------------------------------


def _train(s: _Setup, start: _Start, progress: bool,
           on_step: Callable[[int, int], None] | None) -> tuple[int, bool, dict[str, float | None]]:
    """Train from ``start`` to ``cfg.epochs``; returns ``(epochs done, interrupted by a signal, last test metrics)``."""
    cfg, info = s.cfg, s.info
    stop = StopFlag()
    metrics: dict[str, float | None] = {}
    epochs_done = start.epoch
    bar = _progress(progress and info.is_main)
    with catch_signals(stop), bar:
        task = bar.add_task("train", total=(cfg.epochs - start.epoch) * s.n_micro - start.step)
        for epoch in range(start.epoch, cfg.epochs):
            t0 = time.time()
            first = start.step if epoch == start.epoch else 0
            loss_sum, seen, stopped = _train_epoch(s, epoch, first, start, stop, lambda: bar.advance(task), on_step)
            if stopped:
                return epochs_done, True, metrics
            metrics = _end_epoch(s, epoch, t0, loss_sum, seen, metrics)
            epochs_done = epoch + 1
            if ddp.any_flag(bool(stop), info) and epoch + 1 != cfg.epochs:
                return epochs_done, True, metrics
    return epochs_done, False, metrics


def _train_epoch(s: _Setup, epoch: int, first: int, start: _Start, stop: StopFlag, advance: Callable[[], None],
                 on_step: Callable[[int, int], None] | None) -> tuple[float, int, bool]:
    """One epoch from micro-step ``first``; returns ``(loss sum, samples, stopped)``. A signal saves a mid-epoch
    checkpoint after the current optimizer step and stops (``stopped``)."""
    cfg, info = s.cfg, s.info
    if first and start.rng is not None:
        ckpt.set_rng_state(start.rng)
    else:
        seed_all(derive_seed(cfg.seed, epoch, info.rank))
    s.sampler.set_epoch(epoch)
    if hasattr(s.criterion, "epoch_start"):
        s.criterion.epoch_start(epoch)
    batches = split_batches(s.sampler.rank_indices(epoch), s.per_rank, s.n_micro)[first:]
    s.model.train()
    loss_sum, seen = start.partial if first else (0.0, 0)
    inputs = iterate_batches(batches, s.m.dataset, s.m.train_x if cfg.frozen else None, s.data.labels,
                             seed=cfg.seed, num_workers=cfg.num_workers, epoch=epoch, info=info,
                             start=first * s.per_rank)
    for i, (x, y) in enumerate(inputs, start=first):
        last_of_group = (i + 1) % cfg.grad_accum == 0 or i == s.n_micro - 1
        loss, n = _micro_step(s, x, y, last_of_group, epoch, i)
        loss_sum += loss * n
        seen += n
        advance()
        if not last_of_group:
            continue
        _optimizer_step(s)
        if s.t_start is not None:  # start-up cost (model, loader, first batch): seconds, whatever the set's size
            s.first_step_s, s.t_start = time.time() - s.t_start, None
            if info.is_main:
                log.info("first optimizer step %.1f s after the start", s.first_step_s)
        if on_step is not None:
            on_step(epoch, i + 1)
        if ddp.any_flag(bool(stop), info) and i + 1 < s.n_micro:
            _save(s, epoch, i + 1, (loss_sum, seen))
            return loss_sum, seen, True
    return loss_sum, seen, False


def _micro_step(s: _Setup, x: torch.Tensor, y: torch.Tensor, last_of_group: bool, epoch: int,
                i: int) -> tuple[float, int]:
    """Forward and backward of one micro-batch (Mixup/CutMix, autocast; gradients synchronised across ranks only on
    the last micro-batch of an accumulation group); returns ``(loss, batch size)``."""
    cfg, info = s.cfg, s.info
    x, y = x.to(s.dev, non_blocking=True), y.to(s.dev, non_blocking=True)
    if x.dtype == torch.uint8:  # stream mode: the workers send pixels, normalised here on the device
        x = s.m.dataset.normalize(x)
    target: torch.Tensor = y
    if s.mixup_fn is not None and len(x) % 2 == 0:
        x, target = s.mixup_fn(x, y)
    assert s.net is not None
    sync = contextlib.nullcontext() if (last_of_group or not info.distributed) else s.net.no_sync()
    with sync:
        with torch.autocast(s.dev.type, dtype=torch.bfloat16, enabled=s.amp):
            out = s.net(x)
            if s.needs_features:
                logits, f = out
                loss = s.criterion(logits.float(), target, features=f.float())
            else:
                loss = s.criterion(out.float(), target)
        if not torch.isfinite(loss):
            raise NeighborLTError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr or check the data")
        (loss / cfg.grad_accum).backward()
    return float(loss.detach()), len(x)


def _optimizer_step(s: _Setup) -> None:
    """Average the loss's own gradients across ranks, clip, step the optimiser and the schedule."""
    cfg, info = s.cfg, s.info
    if s.loss_params and info.world_size > 1:
        # the loss lives outside DDP: average its learnable parameters' gradients (DRO-LT margins)
        # across ranks so every rank takes the same step
        for p in s.loss_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= info.world_size
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()


def format_metrics(metrics: dict[str, Any] | None) -> str:
    """Test metrics for a log line, percentages to one decimal (``overall 92.9, many 95.1, ...``)."""
    if not metrics:
        return "n/a"
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if v is not None and not isinstance(v, (dict, list)))


def _end_epoch(s: _Setup, epoch: int, t0: float, loss_sum: float, seen: int,
               metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Test metrics (every ``eval_every`` epochs and at the end), the log row and the checkpoint of a finished
    epoch; returns the latest test metrics (``metrics`` when this epoch was not evaluated)."""
    cfg, info, d = s.cfg, s.info, s.data
    train_loss = ddp.mean_scalar(loss_sum / max(seen, 1), info)
    do_eval = epoch + 1 == cfg.epochs or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
    if do_eval and info.is_main:
        metrics = evaluate_model(s.model, d.test, s.m.test_x if cfg.frozen else None, cfg, s.dev, s.amp, d.L,
                                 d.train_counts, d.thresholds)
    if info.is_main:
        row = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": train_loss,
               "lr": float(s.scheduler.get_last_lr()[0]), **s.sampler.epoch_counts(epoch),
               "time_s": time.time() - t0, "world_size": info.world_size}
        if do_eval:
            row["test"] = metrics
        if s.first_step_s is not None:  # the first row this process writes
            row["first_step_s"], s.first_step_s = s.first_step_s, None
        append_jsonl(s.tdir / "log.jsonl", row)
        log.info("epoch %d/%d loss %.4f%s", epoch + 1, cfg.epochs, train_loss,
                 " test " + format_metrics(metrics) if do_eval else "")
    _save(s, epoch + 1, 0)
    return metrics


# ---- outputs ----------------------------------------------------------------------------------------------


def _write_outputs(s: _Setup, result: TrainResult, metrics: dict[str, float | None], wall: float) -> None:
    """Rank 0: the final weights and model.json, cRT with ``--classifier retrain``, and the completion marker
    (fills ``result``'s model paths and cRT metrics)."""
    cfg, d, tdir = s.cfg, s.data, s.tdir
    if not s.info.is_main:
        return
    meta = _model_meta(cfg, s.model, d.aux, s.m.frozen_info, s.key, "joint", s.criterion)
    ckpt.save_weights(tdir / "model.safetensors", s.model)
    atomic_write_json(tdir / "model.json", meta)
    result.model_path = str(tdir / "model.safetensors")
    if cfg.classifier == "retrain":
        crt_path, crt_metrics = run_crt(cfg, s.model, meta, d.aux, d.test, s.m.train_x if cfg.frozen else None,
                                        s.m.test_x if cfg.frozen else None, tdir / "crt", s.dev, d.train_counts,
                                        d.thresholds)
        result.crt_model_path, result.crt_metrics = str(crt_path), crt_metrics
    s.rd.mark_done(STAGE, s.stage_key or s.key, metrics=metrics, crt_metrics=result.crt_metrics, epochs=cfg.epochs,
                   wall_s=wall, world_size=s.info.world_size, relation=d.relation, **_data_meta(cfg))


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)
