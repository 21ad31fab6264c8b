"""The training engine: ``run_train`` trains on target + auxiliary classes (single process or DDP under
torchrun), checkpoints every epoch, resumes exactly, saves and stops cleanly on SIGTERM, and writes the final
weights and their description; ``predict_logits`` runs a trained or exported model on images.

Files under ``RUN/train/``::

    model.safetensors  model.json  log.jsonl  checkpoint/{last.pt, weights-*.safetensors}  crt/ (cRT)

Exact resume: every epoch's sample list depends only on ``(seed, epoch)`` and the global RNGs are re-seeded
from ``(seed, epoch, rank)`` at the start of each epoch; a checkpoint taken in the middle of an epoch (SIGTERM)
also stores every rank's RNG state and the position in the epoch, so in deterministic mode an interrupted and
resumed run ends with the same weights as an uninterrupted one (with ``num_workers > 0`` augmentation after a
mid-epoch resume is re-seeded, so exactness holds at epoch boundaries only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, NeighborLTError
from ..rundir import RunDir, atomic_write_json, config_hash, file_sha256, read_json, to_jsonable
from . import checkpoint as ckpt
from . import ddp
from .config import TrainConfig, TrainResult

log = logging.getLogger(__name__)

__all__ = ["FeatureHead", "TrainConfig", "TrainResult", "load_trained_model", "predict_logits", "run_train"]

STAGE = "train"
MODEL_SCHEMA = 1


# ----------------------------------------------------------------------------------------------------------
# Models trained by the engine besides train.models: the head of the frozen-feature protocol.
# ----------------------------------------------------------------------------------------------------------


class FeatureHead(nn.Module):
    """A linear or one-hidden-layer MLP classifier on frozen backbone features.

    Has the same interface as :func:`neighborlt.train.models.create_model` models (``forward``,
    ``forward_features``, ``num_features``, ``get_classifier``); the classifier is always ``fc``.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = 512) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ConfigError(f"unknown head {kind!r}; choose linear or mlp")
        self.kind = kind
        self.in_features = in_features
        if kind == "mlp":
            self.body: nn.Module = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU())
            self.num_features = hidden
        else:
            self.body = nn.Identity()
            self.num_features = in_features
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc


class _WithFeatures(nn.Module):
    """Returns ``(logits, features)`` from one forward pass, so that DDP hooks see the whole computation
    (losses such as DRO-LT need the pooled features too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)  # type: ignore[operator]
        return self.model.get_classifier()(feats), feats  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------------------
# Seeding, determinism, signals
# ----------------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training; the previous global setting is restored afterwards."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


class _StopFlag:
    """Set by SIGTERM (and SIGINT when asked); training stops after the current optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def _catch_signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        flag.signum = signum
        log.warning("received signal %d: saving a checkpoint after this step", signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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


def _load_data(cfg: TrainConfig, rd: RunDir) -> Any:
    """The run's targets (``split.json`` or ``cfg.protocol``) plus the auxiliary classes of its filter manifest."""
    from ..data import build_protocol, load_protocol
    from ..data.auxiliary import load_aux_training_set

    if cfg.protocol:
        proto = build_protocol(cfg.protocol, data_dir=cfg.data_dir, **cfg.protocol_overrides)
    else:
        if not rd.path("split.json").exists():
            raise ConfigError(
                f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first or pass --protocol"
            )
        if cfg.protocol_overrides:
            raise ConfigError("--protocol-overrides needs --protocol (RUN/split.json fixes the protocol)")
        proto = load_protocol(rd.root, data_dir=cfg.data_dir)
    mpath = manifest_path(cfg, rd)
    aux = load_aux_training_set(proto, mpath, rd.root)
    source = "manifest" if mpath is not None else "none"
    log.info("training set: %d images, %d target + %d auxiliary classes (%s), %d neighbour pairs",
             len(aux.train), aux.num_target, aux.train.num_classes - aux.num_target, mpath or "no auxiliary data",
             len(aux.pairs))
    return aux, _cap_test(aux.test, cfg.max_test_per_class), source


def _cap_test(test: Any, per_class: int | None) -> Any:
    """The first ``per_class`` test images of every class (all when None)."""
    if per_class is None:
        return test
    keep = np.concatenate([np.flatnonzero(test.labels == c)[:per_class] for c in range(test.num_classes)])
    return test.subset(np.sort(keep))


def _given_data(cfg: TrainConfig, data: Any) -> tuple[Any, Any, str]:
    for attr in ("train", "test", "num_target", "pairs"):
        if not hasattr(data, attr):
            raise ConfigError(f"run_train(data=...) needs an AuxTrainingSet-like object; {attr!r} is missing")
    return data, _cap_test(data.test, cfg.max_test_per_class), "given"


def _data_key(cfg: TrainConfig, data: Any) -> str:
    from ..data import fingerprint
    from ..rundir import config_hash

    return config_hash([cfg.key(), fingerprint(data.train), fingerprint(data.test), int(data.num_target),
                        np.asarray(data.pairs, dtype=np.int64).tolist()])


def _batches(indices: np.ndarray, batch: int, n_micro: int) -> list[list[int]]:
    out = [indices[i * batch:(i + 1) * batch].tolist() for i in range(n_micro)]
    return [b for b in out if b]


def _n_micro(n: int, batch: int, info: ddp.DistInfo) -> int:
    """Micro-batches per epoch on every rank (full batches; one partial batch when there is less than one)."""
    k = n // batch if n >= batch else 1
    if info.distributed:
        t = torch.tensor([k], dtype=torch.int64, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        k = int(t.item())
    return k


# ----------------------------------------------------------------------------------------------------------
# Model description (model.json) and loading
# ----------------------------------------------------------------------------------------------------------


def _build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An untrained model with the architecture described by a ``model.json`` dict."""
    frozen = meta.get("frozen")
    if frozen:
        return FeatureHead(int(frozen["in_features"]), int(meta["num_classes"]), frozen["head"],
                           int(frozen.get("hidden") or 1))
    from .models import create_model

    return create_model(meta["architecture"], int(meta["num_classes"]), init="random",
                        image_size=meta.get("image_size"))


def _find_model_dir(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    for cand in (path, path / "export", path / "train"):
        if (cand / "model.json").exists():
            return cand
    raise NeighborLTError(f"{path}: no model.json here nor in export/ or train/; run `neighborlt train` first")


def load_trained_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Load the model of a run dir (its ``export/`` if present, else ``train/``) or of a model directory.

    Args:
        path: ``RUN``, ``RUN/train``, ``RUN/train/crt`` or ``RUN/export`` (any folder with model.json +
            model.safetensors).

    Returns:
        ``(model in eval mode on CPU, model.json dict)``.
    """
    d = _find_model_dir(path)
    meta = read_json(d / "model.json")
    model = _build_from_meta(meta)
    state = ckpt.load_weights(d / meta.get("weights", "model.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise NeighborLTError(f"{d / 'model.safetensors'}: does not fit {d / 'model.json'} ({first}); "
                              "re-run training or export") from None
    return model.eval(), meta


@torch.no_grad()
def _logits_of(model: nn.Module, batches: Iterator[torch.Tensor], device: torch.device,
               amp: bool) -> np.ndarray:
    model.eval()
    out = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _image_batches(image_set: Any, image_size: int, batch_size: int, num_workers: int,
                   model_name: str | None = None) -> Iterator[torch.Tensor]:
    from .data import ImageSetDataset, build_transform
    from .models import model_normalization

    norm = model_normalization(model_name) if model_name else None  # the input statistics the weights expect
    ds = ImageSetDataset(image_set, build_transform(image_size, train=False, normalization=norm), image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for x, _y in loader:
        yield x


def _tensor_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def predict_logits(run_dir_or_export_dir: str | os.PathLike[str], image_set: Any, *, batch_size: int = 256,
                   device: str = "cpu", num_workers: int = 0) -> np.ndarray:
    """Logits of a trained (or exported) model on ``image_set``.

    Args:
        run_dir_or_export_dir: a run dir (uses ``export/`` when present, else ``train/``) or a folder with
            ``model.json`` + ``model.safetensors``.
        image_set: the images (labels are ignored).
        batch_size: images per inference batch.
        device: ``cpu``, ``cuda`` or ``auto``.
        num_workers: DataLoader workers.

    Returns:
        float32 array [N, C] where C is the model's ``num_classes`` (L after export).

    Example:
        >>> logits = predict_logits("runs/c10", protocol.target_test)  # doctest: +SKIP
        >>> (logits.argmax(1) == protocol.target_test.labels).mean()  # doctest: +SKIP
    """
    model, meta = load_trained_model(run_dir_or_export_dir)
    dev = ddp.resolve_device(device)
    model.to(dev)
    amp = dev.type == "cuda"
    frozen = meta.get("frozen")
    if frozen:
        from .features import extract_features

        feats = extract_features(frozen["backbone"], frozen["init"], image_set, int(frozen["image_size"]),
                                 batch_size=batch_size, device=str(dev))
        return _logits_of(model, _tensor_batches(torch.from_numpy(np.asarray(feats, np.float32)), batch_size),
                          dev, amp).astype(np.float32)
    return _logits_of(model, _image_batches(image_set, int(meta["image_size"]), batch_size, num_workers,
                                            meta.get("architecture")), dev, amp).astype(np.float32)


def _test_metrics(logits: np.ndarray, labels: np.ndarray, num_target: int,
                  train_counts: np.ndarray, thresholds: tuple[int, int] = (100, 20)) -> dict[str, float | None]:
    """Accuracy (%) of the target rows (auxiliary rows masked), split into many/medium/few when evaluate exists."""
    pred = logits[:, :num_target].argmax(1)
    try:
        from ..evaluate import shot_accuracy
    except ImportError:
        return {"overall": float((pred == labels).mean() * 100.0)}
    # a shot group without classes has no accuracy (None)
    return {k: None if v is None else float(v) for k, v in shot_accuracy(pred, labels, train_counts, many=thresholds[0],
                                                                          few=thresholds[1]).items()}


# ----------------------------------------------------------------------------------------------------------
# run_train
# ----------------------------------------------------------------------------------------------------------


def _check_existing(cfg: TrainConfig, rd: RunDir, key: str, resume: bool, force: bool,
                    info: ddp.DistInfo) -> bool:
    """Decide what to do with earlier files; True when an identical finished run can be reused."""
    tdir = rd.path(STAGE)
    done = rd.done_key(STAGE)
    has_ckpt = ckpt.has_checkpoint(tdir / "checkpoint")
    if force:
        if info.is_main:
            for p in (tdir / "checkpoint", tdir / "crt"):
                shutil.rmtree(p, ignore_errors=True)
            for p in (tdir / "log.jsonl", tdir / "model.safetensors", tdir / "model.json",
                      rd.path("records", f"{STAGE}.done.json")):
                p.unlink(missing_ok=True)
        ddp.barrier(info)
        return False
    if done == key and (tdir / "model.json").exists():
        return True
    if done is not None and done != key:
        raise ConfigError(f"{tdir}: holds a finished run with another configuration; use a new run directory "
                          "or pass --force to overwrite it")
    if has_ckpt and not resume:
        raise ConfigError(f"{tdir / 'checkpoint' / 'last.pt'}: an unfinished run is here; pass --resume to "
                          "continue it or --force to start over")
    return False


def _model_meta(cfg: TrainConfig, model: nn.Module, aux: Any, frozen_info: dict[str, Any] | None,
                key: str, mode: str) -> dict[str, Any]:
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
        "frozen": frozen_info,
        "loss": cfg.loss,
        "neighbor_pairs": np.asarray(aux.pairs, dtype=np.int64).reshape(-1, 2).tolist(),  # (target, auxiliary) rows
        "config_key": key,
        "weights": "model.safetensors",
    }


def run_train(cfg: TrainConfig, run_dir: str | os.PathLike[str] | RunDir, *, resume: bool = False,
              force: bool = False, progress: bool = True, on_step: Callable[[int, int], None] | None = None,
              data: Any | None = None) -> TrainResult:
    """Train a model on the target (+ auxiliary) classes of a run directory.

    Runs DDP when launched by torchrun (``WORLD_SIZE`` > 1), one process otherwise. Rank 0 writes every file.

    Args:
        cfg: the training options.
        run_dir: the run directory (holds ``split.json`` and ``neighbors.json`` unless ``cfg.protocol`` is set).
        resume: continue from ``RUN/train/checkpoint/last.pt`` (same config key required).
        force: delete earlier training outputs of this run dir and start over.
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
        >>> cfg = TrainConfig(protocol="cifar10-neighbours", model="resnet8_cifar", epochs=2)  # doctest: +SKIP
        >>> run_train(cfg, "runs/c10").metrics["few"]  # doctest: +SKIP
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = ddp.setup(cfg.device)
    try:
        with _determinism(cfg.deterministic):
            return _run(cfg, rd, info, resume=resume, force=force, progress=progress, on_step=on_step, data=data)
    finally:
        ddp.cleanup(info)


def _run(cfg: TrainConfig, rd: RunDir, info: ddp.DistInfo, *, resume: bool, force: bool, progress: bool,
         on_step: Callable[[int, int], None] | None, data: Any | None) -> TrainResult:
    from ..losses import LOSSES
    from .optim import build_optimizer, build_scheduler
    from .samplers import build_sampler, effective_class_counts

    t_start = time.time()
    if data is None:
        if not cfg.protocol and not rd.path("split.json").exists():
            raise ConfigError(
                f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first or pass --protocol"
            )
        mpath = manifest_path(cfg, rd)
        key = cfg.key() if mpath is None else config_hash([cfg.key(), file_sha256(mpath)])
    else:
        key = _data_key(cfg, data)
    tdir = rd.path(STAGE)
    if _check_existing(cfg, rd, key, resume, force, info):
        meta = read_json(tdir / "model.json")
        log.info("%s: finished run with the same configuration found; skipping (pass --force to retrain)", tdir)
        done = read_json(rd.path("records", f"{STAGE}.done.json"))
        crt = tdir / "crt" / "model.safetensors"
        return TrainResult(run_dir=str(rd.root), model_path=str(tdir / "model.safetensors"),
                           crt_model_path=str(crt) if crt.exists() else None, epochs_done=cfg.epochs,
                           skipped=True, metrics=done.get("metrics", {}), crt_metrics=done.get("crt_metrics", {}),
                           num_classes=meta["num_classes"], num_target_classes=meta["num_target_classes"],
                           world_size=info.world_size)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world_size} DDP processes")
    per_rank = cfg.batch_size // info.world_size
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if mixing and per_rank % 2:
        raise ConfigError(f"Mixup/CutMix need an even per-process batch; got {per_rank} (--batch-size / ranks)")
    if info.is_main:
        rd.record(STAGE, {**cfg.model_dump(mode="json"), "world_size": info.world_size, "config_key": key},
                  seed=cfg.seed)
    dev = info.device
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
    if amp and dev.type != "cuda":
        log.info("bf16 autocast requested on %s: running on CPU in bf16 autocast", dev)

    # ---- data and model --------------------------------------------------------------------------------
    _seed_all(cfg.seed)
    aux, test, relation = _load_data(cfg, rd) if data is None else _given_data(cfg, data)
    L, C = int(aux.num_target), int(aux.train.num_classes)
    labels = np.asarray(aux.train.labels, dtype=np.int64)
    train_counts = aux.train.counts()[:L]
    thresholds = tuple(getattr(aux, "thresholds", (100, 20)))  # the protocol's shot thresholds
    frozen_info: dict[str, Any] | None = None
    if cfg.frozen:
        from .features import extract_features

        def feats(image_set: Any) -> torch.Tensor:
            # rank 0 fills the cache first; the others then read it
            if not info.is_main:
                ddp.barrier(info)
            f = extract_features(cfg.model, cfg.init, image_set, cfg.image_size,
                                 batch_size=cfg.eval_batch_size, device=str(dev))
            if info.is_main:
                ddp.barrier(info)
            return torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))

        train_x, test_x = feats(aux.train), feats(test)
        _seed_all(cfg.seed)
        model: nn.Module = FeatureHead(train_x.shape[1], C, cfg.head, cfg.head_hidden)
        frozen_info = {"backbone": cfg.model, "init": cfg.init, "image_size": cfg.image_size,
                       "in_features": int(train_x.shape[1]), "head": cfg.head,
                       "hidden": cfg.head_hidden if cfg.head == "mlp" else None}
        dataset: Any = None
    else:
        from .data import ImageSetDataset, build_transform
        from .models import create_model, model_normalization

        model = create_model(cfg.model, C, init=cfg.init, image_size=cfg.image_size)
        dataset = ImageSetDataset(aux.train, build_transform(cfg.image_size, train=True, randaugment=cfg.randaugment,
                                                             normalization=model_normalization(cfg.model)),
                                  cfg.image_size)
    model.to(dev)

    sampler = build_sampler(cfg.sampler, labels, num_target_classes=L, aux_cap=cfg.aux_cap if C > L else None,
                            seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    counts = effective_class_counts(labels, C, L, cfg.aux_cap if C > L else None)
    loss_kw: dict[str, Any] = dict(cfg.loss_params)
    if cfg.loss == "neighbor_silencing":
        loss_kw.setdefault("neighbor_pairs", torch.as_tensor(np.asarray(aux.pairs, dtype=np.int64)).reshape(-1, 2))
        loss_kw.setdefault("lambda_s", cfg.lambda_s)
    try:
        criterion: nn.Module = LOSSES.create(cfg.loss, class_counts=torch.as_tensor(counts), **loss_kw)
    except TypeError as e:
        raise ConfigError(f"loss {cfg.loss!r}: bad --loss-param ({e})") from None
    criterion.to(dev)
    needs_features = bool(getattr(criterion, "needs_features", False))

    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.layer_decay,
                                betas=cfg.betas, momentum=cfg.momentum)
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:  # e.g. DRO-LT's learnable margins
        optimizer.add_param_group({"params": loss_params, "weight_decay": 0.0, "lr": cfg.lr})
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
    n_micro = _n_micro(len(sampler), per_rank, info)
    if n_micro >= cfg.grad_accum:  # whole accumulation groups only: each step sees batch_size * grad_accum images
        n_micro -= n_micro % cfg.grad_accum
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    scheduler = build_scheduler(optimizer, cfg.epochs, steps_per_epoch, min(cfg.warmup_epochs, cfg.epochs),
                                cfg.min_lr)
    mixup_fn = None
    if mixing:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                         label_smoothing=cfg.label_smoothing, num_classes=C)

    # ---- resume ------------------------------------------------------------------------------------------
    start_epoch, start_step = 0, 0
    ckpt_dir = tdir / "checkpoint"
    rng_to_restore: dict[str, Any] | None = None
    partial_to_restore = (0.0, 0)  # running loss sum and sample count of an epoch interrupted midway
    if resume and ckpt.has_checkpoint(ckpt_dir):
        weights, state = ckpt.load_checkpoint(ckpt_dir)
        if state.get("config_key") != key:
            raise ConfigError(f"{ckpt_dir / 'last.pt'}: was written with another configuration; resume with the "
                              "same options or pass --force to start over")
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("loss"):
            criterion.load_state_dict(state["loss"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        per_rank_state = state.get("ranks") or []
        if len(per_rank_state) == info.world_size:
            sampler.load_state_dict(per_rank_state[info.rank]["sampler"])
            rng_to_restore = per_rank_state[info.rank]["rng"]
            partial_to_restore = (float(per_rank_state[info.rank].get("loss_sum", 0.0)),
                                  int(per_rank_state[info.rank].get("seen", 0)))
        elif start_step:
            log.warning("checkpoint was written by %d processes, resuming with %d: epoch %d restarts",
                        len(per_rank_state), info.world_size, start_epoch)
            start_step = 0
        if info.is_main:
            _truncate_log(tdir / "log.jsonl", start_epoch)
        log.info("resuming at epoch %d, step %d", start_epoch, start_step)
    elif resume:
        log.info("%s: no checkpoint; starting from scratch", ckpt_dir)

    net: nn.Module = _WithFeatures(model) if needs_features else model
    net = ddp.wrap(net, info, sync_bn=cfg.sync_bn)

    def save(epoch: int, step: int, partial: tuple[float, int] = (0.0, 0)) -> None:
        mine = {"sampler": sampler.state_dict(), "rng": ckpt.rng_state(), "loss_sum": partial[0],
                "seen": partial[1]}
        ranks: list[Any] = [mine]
        if info.distributed:
            ranks = [None] * info.world_size
            dist.all_gather_object(ranks, mine)
        if info.is_main:
            ckpt.save_checkpoint(ckpt_dir, model, {
                "epoch": epoch, "step": step, "config_key": key, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss": criterion.state_dict(), "ranks": ranks,
                "world_size": info.world_size,
            })
        ddp.barrier(info)

    # ---- loop --------------------------------------------------------------------------------------------
    stop = _StopFlag()
    metrics: dict[str, float | None] = {}
    epochs_done = start_epoch
    interrupted = False
    bar = _progress(progress and info.is_main)
    with _catch_signals(stop), bar:
        task = bar.add_task("train", total=(cfg.epochs - start_epoch) * n_micro - start_step)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            first = start_step if epoch == start_epoch else 0
            if first and rng_to_restore is not None:
                ckpt.set_rng_state(rng_to_restore)
            else:
                _seed_all(_derive_seed(cfg.seed, epoch, info.rank))
            sampler.set_epoch(epoch)
            if hasattr(criterion, "epoch_start"):
                criterion.epoch_start(epoch)
            idx = sampler.rank_indices(epoch)
            batches = _batches(idx, per_rank, n_micro)[first:]
            model.train()
            loss_sum, seen = partial_to_restore if first else (0.0, 0)
            for i, (x, y) in enumerate(_iterate(batches, dataset, train_x if cfg.frozen else None,
                                                labels, cfg, epoch, info), start=first):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                target: torch.Tensor = y
                if mixup_fn is not None and len(x) % 2 == 0:
                    x, target = mixup_fn(x, y)
                last_of_group = (i + 1) % cfg.grad_accum == 0 or i == n_micro - 1
                sync = contextlib.nullcontext() if (last_of_group or not info.distributed) else net.no_sync()
                with sync:
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                        out = net(x)
                        if needs_features:
                            logits, f = out
                            loss = criterion(logits.float(), target, features=f.float())
                        else:
                            loss = criterion(out.float(), target)
                    if not torch.isfinite(loss):
                        raise NeighborLTError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr or "
                                              "check the data")
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) * len(x)
                seen += len(x)
                bar.advance(task)
                if not last_of_group:
                    continue
                if loss_params and info.world_size > 1:
                    # the loss lives outside DDP: average its learnable parameters' gradients (DRO-LT margins)
                    # across ranks so every rank takes the same step
                    for p in loss_params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                        p.grad /= info.world_size
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if on_step is not None:
                    on_step(epoch, i + 1)
                if ddp.any_flag(bool(stop), info) and i + 1 < n_micro:
                    save(epoch, i + 1, (loss_sum, seen))
                    interrupted = True
                    break
            if interrupted:
                break
            # ---- end of epoch: metrics, log, checkpoint ---------------------------------------------------
            train_loss = ddp.mean_scalar(loss_sum / max(seen, 1), info)
            is_last = epoch + 1 == cfg.epochs
            do_eval = is_last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
            if do_eval and info.is_main:
                metrics = _evaluate(model, test, test_x if cfg.frozen else None, cfg, dev, amp, L, train_counts,
                                    thresholds)
            if info.is_main:
                row = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": train_loss,
                       "lr": float(scheduler.get_last_lr()[0]), **sampler.epoch_counts(epoch),
                       "time_s": time.time() - t0, "world_size": info.world_size}
                if do_eval:
                    row["test"] = metrics
                _append_jsonl(tdir / "log.jsonl", row)
                log.info("epoch %d/%d loss %.4f%s", epoch + 1, cfg.epochs, train_loss,
                         f" test {metrics}" if do_eval else "")
            save(epoch + 1, 0)
            epochs_done = epoch + 1
            if ddp.any_flag(bool(stop), info) and not is_last:
                interrupted = True
                break

    wall = time.time() - t_start
    result = TrainResult(run_dir=str(rd.root), model_path=None, epochs_done=epochs_done, interrupted=interrupted,
                         metrics=metrics, num_classes=C, num_target_classes=L, wall_s=wall,
                         world_size=info.world_size)
    if interrupted:
        log.warning("stopped by signal at epoch %d; checkpoint saved in %s; re-run with --resume", epochs_done,
                    ckpt_dir)
        return result

    # ---- final outputs (rank 0) --------------------------------------------------------------------------
    if info.is_main:
        meta = _model_meta(cfg, model, aux, frozen_info, key, "joint")
        ckpt.save_weights(tdir / "model.safetensors", model)
        atomic_write_json(tdir / "model.json", meta)
        result.model_path = str(tdir / "model.safetensors")
        if cfg.classifier == "retrain":
            from .crt import run_crt

            crt_path, crt_metrics = run_crt(cfg, model, meta, aux, test,
                                            train_x if cfg.frozen else None, test_x if cfg.frozen else None,
                                            tdir / "crt", dev, train_counts, thresholds)
            result.crt_model_path, result.crt_metrics = str(crt_path), crt_metrics
        rd.mark_done(STAGE, key, metrics=metrics, crt_metrics=result.crt_metrics, epochs=cfg.epochs,
                     wall_s=wall, world_size=info.world_size, relation=relation)
    ddp.barrier(info)
    return result


def _iterate(batches: list[list[int]], dataset: Any, feats: torch.Tensor | None, labels: np.ndarray,
             cfg: TrainConfig, epoch: int, info: ddp.DistInfo) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` for the given index batches (images through a DataLoader, or features)."""
    if feats is not None:
        lab = torch.from_numpy(labels)
        for b in batches:
            t = torch.as_tensor(b, dtype=torch.int64)
            yield feats[t], lab[t]
        return
    g = torch.Generator()
    g.manual_seed(_derive_seed(cfg.seed, epoch, info.rank, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                         generator=g, worker_init_fn=_worker_init,
                                         persistent_workers=False, pin_memory=info.device.type == "cuda")
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.int64)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() & 0xFFFFFFFF
    np.random.seed(s)
    random.seed(s)


def _evaluate(model: nn.Module, test: Any, test_x: torch.Tensor | None, cfg: TrainConfig, dev: torch.device,
              amp: bool, L: int, train_counts: np.ndarray,
              thresholds: tuple[int, int] = (100, 20)) -> dict[str, float | None]:
    was_training = model.training
    if test_x is not None:
        logits = _logits_of(model, _tensor_batches(test_x, cfg.eval_batch_size), dev, amp)
    else:
        logits = _logits_of(model, _image_batches(test, cfg.image_size, cfg.eval_batch_size, cfg.num_workers,
                                                  cfg.model),
                            dev, amp)
    model.train(was_training)
    return _test_metrics(logits, np.asarray(test.labels), L, train_counts, thresholds)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable({"time": time.time(), **row})) + "\n")


def _truncate_log(path: Path, start_epoch: int) -> None:
    """Drop log rows of epochs that will be trained again after a resume."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("epoch", 0) <= start_epoch]
    if len(keep) != len(rows):
        from ..rundir import atomic_write_text

        atomic_write_text(path, "".join(k + "\n" for k in keep))


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)
