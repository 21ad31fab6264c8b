"""``run_pretrain``: masked-autoencoder pre-training of a ViT on a run's target training images (stage
``pretrain``), writing the encoder that ``neighborlt train --init RUN/pretrain/encoder.safetensors`` fine-tunes.

Files under ``RUN/pretrain/``::

    encoder.safetensors   the ViT encoder's weights (timm keys, no classifier): train's ``init``
    encoder.json          model, image size, patch size, method, epochs, last loss, config key (written last: the
                          completion marker)
    log.jsonl             one row per epoch (loss, lr, images, seconds)
    checkpoint/           last.pt + weights (train/checkpoint.py): resume after SIGTERM / a crash with --resume

The images are the run's training set as training reads it (``train.engine``'s loader over ``split.json`` /
the targets, optionally plus the filter's auxiliary images capped at M per class and epoch), through the same
``ImageSetDataset`` in cache or stream mode. The loop reuses training's parts: the epoch sampler (ranks split the
epoch without talking), per-``(seed, epoch, rank)`` RNG streams, checkpoints with every rank's RNG state and position,
DDP under ``torchrun``, AdamW + the per-iteration cosine schedule. So a SIGTERM + ``--resume`` run ends with the same
weights as an uninterrupted one (deterministic mode, one process or several).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, NeighborLTError
from ..rundir import (
    RunDir,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    config_hash,
    file_sha256,
    read_json,
    truncate_jsonl,
)
from ..train import checkpoint as ckpt
from ..train import ddp
from .config import PretrainConfig, PretrainResult

log = logging.getLogger(__name__)

STAGE = "pretrain"
ENCODER = "encoder.safetensors"
SCHEMA = 1


def run_pretrain(cfg: PretrainConfig, run_dir: str | os.PathLike[str] | RunDir, *, resume: bool = False,
                 force: bool = False, on_step: Callable[[int, int], None] | None = None) -> PretrainResult:
    """Pre-train ``cfg.model`` as a masked autoencoder on the run's training images.

    Runs DDP when launched by torchrun (``WORLD_SIZE`` > 1); rank 0 writes every file.

    Args:
        cfg: the options (defaults: LiVT's recipe, :mod:`neighborlt.pretrain.config`).
        run_dir: a run directory with stage 1's outputs (``neighborlt classes``).
        resume: continue from ``RUN/pretrain/checkpoint/last.pt`` (same configuration).
        force: start over, replacing earlier outputs.
        on_step: called as ``on_step(epoch, micro_step)`` after each optimizer step (tests, monitoring).

    Returns:
        A :class:`PretrainResult`; ``interrupted`` when SIGTERM stopped it after saving a checkpoint.

    Raises:
        ConfigError: a model that is not a ViT, a missing stage 1, a checkpoint of another configuration.

    Example:
        >>> cfg = PretrainConfig(model="vit_tiny_patch4_32", image_size=32, epochs=1)  # doctest: +SKIP
        >>> run_pretrain(cfg, "runs/c10").encoder_path  # doctest: +SKIP
        'runs/c10/pretrain/encoder.safetensors'
    """
    from ..train.loop import determinism

    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    if not root.is_dir():  # checked before RunDir, which would create it
        raise ConfigError(f"{root}: no such run directory; make it with `neighborlt classes {root} ...`")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _model_or_error(cfg)  # a non-ViT is one line before any data is read
    info = ddp.setup(cfg.device)
    try:
        with determinism(cfg.deterministic):
            return _run(cfg, rd, info, resume=resume, force=force, on_step=on_step)
    finally:
        ddp.cleanup(info)


def _model_or_error(cfg: PretrainConfig) -> nn.Module:
    """The encoder (a timm ViT, classifier unused) or one line naming the fix."""
    from ..train.models import create_model
    from .mae import check_vit

    model = create_model(cfg.model, num_classes=1, init="random", image_size=cfg.image_size)
    vit = getattr(model, "timm_model", model)
    check_vit(vit, cfg.model)
    return vit


def _key(cfg: PretrainConfig, rd: RunDir) -> str:
    """Options + the bytes of the files the run reads (stage 1's outputs, the auxiliary manifest)."""
    inputs = {}
    for name in ("split.json", "targets.parquet"):
        p = rd.path(name)
        inputs[name] = file_sha256(p) if p.is_file() else None
    mpath = _manifest(cfg, rd)
    if mpath is not None:
        inputs["aux_manifest"] = file_sha256(mpath)
    return config_hash({"config": cfg.key(), "inputs": inputs, "schema": SCHEMA})


def _manifest(cfg: PretrainConfig, rd: RunDir) -> Path | None:
    if cfg.aux_manifest is None:
        return None
    p = Path(cfg.aux_manifest)
    p = p if p.is_absolute() else rd.root / p
    if not p.is_file():
        raise ConfigError(f"{p}: not found; make it with `neighborlt retrieve {rd.root}` and `neighborlt filter "
                          f"{rd.root}`, or drop --aux-manifest to pre-train on the target images only")
    return p


@dataclass
class _Setup:
    cfg: PretrainConfig
    rd: RunDir
    info: ddp.DistInfo
    key: str
    mae: nn.Module
    net: nn.Module  # mae, DDP-wrapped when distributed
    dataset: Any
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_rank: int
    n_micro: int
    amp: bool
    images: int

    @property
    def pdir(self) -> Path:
        return self.rd.path(STAGE)


def _run(cfg: PretrainConfig, rd: RunDir, info: ddp.DistInfo, *, resume: bool, force: bool,
         on_step: Callable[[int, int], None] | None) -> PretrainResult:
    t_start = time.time()
    if not rd.path("split.json").is_file():
        raise ConfigError(f"{rd.path('split.json')}: not found; run `neighborlt classes {rd.root}` first")
    key = _key(cfg, rd)
    pdir = rd.path(STAGE)
    done = pdir / "encoder.json"
    if not force and done.is_file() and (pdir / ENCODER).is_file() and read_json(done).get("config_key") == key:
        meta = read_json(done)
        log.info("%s: finished pre-training with the same configuration found; skipping (--force to redo)", pdir)
        return PretrainResult(run_dir=str(rd.root), encoder_path=str(pdir / ENCODER), epochs_done=cfg.epochs,
                              skipped=True, loss=meta.get("loss"), images=int(meta.get("images", 0)),
                              world_size=info.world_size)
    if not resume and info.is_main and pdir.exists():  # a new run replaces the old outputs (force or new options)
        for p in [done, pdir / ENCODER, pdir / "log.jsonl"]:
            p.unlink(missing_ok=True)
        if ckpt.has_checkpoint(pdir / "checkpoint"):
            (pdir / "checkpoint" / "last.pt").unlink()
    ddp.barrier(info)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {info.world_size} DDP processes")
    if info.is_main:
        rd.record(STAGE, {**cfg.model_dump(mode="json"), "resolved_lr": cfg.resolved_lr(),
                          "world_size": info.world_size, "config_key": key}, seed=cfg.seed)
    s = _build(cfg, rd, info, key)
    start_epoch, start_step, rng, partial = _resume(s) if resume else (0, 0, None, (0.0, 0))
    try:
        epochs_done, stopped, loss = _loop(s, start_epoch, start_step, rng, partial, on_step)
    finally:
        s.dataset.close()  # stream mode's persistent loader workers end with the training, not at a GC
    result = PretrainResult(run_dir=str(rd.root), encoder_path=None, epochs_done=epochs_done, interrupted=stopped,
                            loss=loss, images=s.images, wall_s=time.time() - t_start, world_size=info.world_size)
    if stopped:
        log.warning("stopped by signal at epoch %d; checkpoint saved in %s; re-run with --resume", epochs_done,
                    pdir / "checkpoint")
        return result
    if info.is_main:
        atomic_write_bytes(pdir / ENCODER, ckpt.state_to_safetensors_bytes(
            _unwrap(s).encoder_state(), {"format": "pt", "model": cfg.model, "method": cfg.method}))
        enc = _unwrap(s).encoder
        atomic_write_json(done, {
            "schema": SCHEMA, "method": cfg.method, "model": cfg.model, "image_size": cfg.image_size,
            "patch_size": int(enc.patch_embed.patch_size[0]), "embed_dim": int(enc.embed_dim),
            "epochs": cfg.epochs, "mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss,
            "loss": loss, "images": s.images, "weights": ENCODER, "config_key": key,
            "use": f"neighborlt train {rd.root} --model {cfg.model} --image-size {cfg.image_size} "
                   f"--init {pdir / ENCODER}",
        })
    ddp.barrier(info)
    result.encoder_path = str(pdir / ENCODER)
    return result


def _unwrap(s: _Setup) -> Any:
    return ddp.unwrap(s.net)


def _build(cfg: PretrainConfig, rd: RunDir, info: ddp.DistInfo, key: str) -> _Setup:
    """Data, MAE, sampler, optimiser and schedule, in the order that fixes the RNG streams of a seed."""
    from ..train.loop import micro_batches_per_epoch, seed_all
    from ..train.optim import build_optimizer, build_scheduler
    from ..train.samplers import build_sampler
    from .mae import MaskedAutoencoder

    seed_all(cfg.seed)
    aux = _training_set(cfg, rd)
    train = aux.train
    L, C = int(aux.num_target), int(train.num_classes)
    encoder = _model_or_error(cfg)
    mae = MaskedAutoencoder(encoder, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mask_ratio,
                            cfg.norm_pix_loss).to(info.device)
    dataset = _dataset(cfg, train)
    labels = np.asarray(train.labels, dtype=np.int64)
    sampler = build_sampler("random", labels, num_target_classes=L if C > L else None,
                            aux_cap=cfg.aux_cap if C > L else None, seed=cfg.seed, rank=info.rank,
                            world_size=info.world_size)
    per_rank = cfg.batch_size // info.world_size
    n_micro = micro_batches_per_epoch(len(sampler), per_rank, info)
    if n_micro >= cfg.grad_accum:  # whole accumulation groups only, as training
        n_micro -= n_micro % cfg.grad_accum
    optimizer = build_optimizer(mae, "adamw", cfg.resolved_lr(), cfg.weight_decay, None, betas=cfg.betas)
    scheduler = build_scheduler(optimizer, cfg.epochs, math.ceil(n_micro / cfg.grad_accum),
                                min(cfg.warmup_epochs, cfg.epochs), cfg.min_lr)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and info.device.type == "cuda")
    images = len(sampler) * info.world_size if info.distributed else len(sampler)
    log.info("pretrain %s (%s): %d images per epoch (%d target, %d auxiliary classes), lr %.3g, %d steps per epoch",
             cfg.model, cfg.method, images, L, C - L, cfg.resolved_lr(), math.ceil(n_micro / cfg.grad_accum))
    return _Setup(cfg=cfg, rd=rd, info=info, key=key, mae=mae, net=ddp.wrap(mae, info), dataset=dataset,
                  sampler=sampler, optimizer=optimizer, scheduler=scheduler, per_rank=per_rank, n_micro=n_micro,
                  amp=amp, images=images)


def _training_set(cfg: PretrainConfig, rd: RunDir) -> Any:
    """The run's training set exactly as ``neighborlt train`` loads it (targets, + auxiliary classes)."""
    from ..train.config import TrainConfig
    from ..train.engine import load_training_data

    tcfg = TrainConfig(data_dir=cfg.data_dir, aux_manifest=cfg.aux_manifest, max_test_per_class=1)
    _manifest(cfg, rd)
    aux, _test, _source = load_training_data(tcfg, rd)
    return aux


def _dataset(cfg: PretrainConfig, image_set: Any) -> Any:
    """Training's ``ImageSetDataset``: cache mode with MAE's augmentation (RandomResizedCrop scale 0.2-1 + flip,
    models_mae / LiVT ``main_pretrain.py``), or stream mode with training's crop and flip (uint8 batches)."""
    from torchvision import transforms as T

    from ..train.data import ImageSetDataset, resolve_data_mode
    from ..train.models import model_normalization

    norm = model_normalization(cfg.model)
    if resolve_data_mode(cfg.data_mode, cfg.image_size) == "stream":
        return ImageSetDataset(image_set, None, cfg.image_size, mode="stream", train=True, seed=cfg.seed,
                               normalization=norm)
    transform = T.Compose([
        T.RandomResizedCrop(cfg.image_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*norm)])
    return ImageSetDataset(image_set, transform, cfg.image_size)


def _resume(s: _Setup) -> tuple[int, int, dict[str, Any] | None, tuple[float, int]]:
    """Load ``checkpoint/last.pt``: (epoch, step, this rank's RNG state, partial loss sums)."""
    cdir = s.pdir / "checkpoint"
    if not ckpt.has_checkpoint(cdir):
        log.info("%s: no checkpoint; starting from scratch", cdir)
        return 0, 0, None, (0.0, 0)
    weights, state = ckpt.load_checkpoint(cdir)
    if state.get("config_key") != s.key:
        raise ConfigError(f"{cdir / 'last.pt'}: was written with another configuration; resume with the same "
                          "options or pass --force to start over")
    s.mae.load_state_dict(weights)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    epoch, step = int(state["epoch"]), int(state["step"])
    ranks = state.get("ranks") or []
    rng, partial = None, (0.0, 0)
    if len(ranks) == s.info.world_size:
        mine = ranks[s.info.rank]
        s.sampler.load_state_dict(mine["sampler"])
        rng, partial = mine["rng"], (float(mine["loss_sum"]), int(mine["seen"]))
    elif step:
        log.warning("checkpoint was written by %d processes, resuming with %d: epoch %d restarts", len(ranks),
                    s.info.world_size, epoch)
        step = 0
    if s.info.is_main:
        truncate_jsonl(s.pdir / "log.jsonl", epoch)
    log.info("resuming pre-training at epoch %d, step %d", epoch, step)
    return epoch, step, rng, partial


def _save(s: _Setup, epoch: int, step: int, partial: tuple[float, int] = (0.0, 0)) -> None:
    """Every rank's sampler position, RNG state and partial loss; rank 0 writes ``checkpoint/last.pt``."""
    mine = {"sampler": s.sampler.state_dict(), "rng": ckpt.rng_state(), "loss_sum": partial[0], "seen": partial[1]}
    ranks: list[Any] = [mine]
    if s.info.distributed:
        ranks = [None] * s.info.world_size
        dist.all_gather_object(ranks, mine)
    if s.info.is_main:
        ckpt.save_checkpoint(s.pdir / "checkpoint", s.mae, {
            "epoch": epoch, "step": step, "config_key": s.key, "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "ranks": ranks, "world_size": s.info.world_size})
    ddp.barrier(s.info)


def _loop(s: _Setup, start_epoch: int, start_step: int, rng: dict[str, Any] | None, partial: tuple[float, int],
          on_step: Callable[[int, int], None] | None) -> tuple[int, bool, float | None]:
    """Epochs ``start_epoch..epochs-1``; returns (epochs done, stopped by a signal, last epoch's mean loss)."""
    from ..train.loop import StopFlag, catch_signals, derive_seed, iterate_batches, seed_all, split_batches

    cfg, info = s.cfg, s.info
    stop = StopFlag()
    loss_mean: float | None = None
    with catch_signals(stop):
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            first = start_step if epoch == start_epoch else 0
            if first and rng is not None:
                ckpt.set_rng_state(rng)
            else:
                seed_all(derive_seed(cfg.seed, epoch, info.rank))
            s.sampler.set_epoch(epoch)
            batches = split_batches(s.sampler.rank_indices(epoch), s.per_rank, s.n_micro)[first:]
            loss_sum, seen = partial if first else (0.0, 0)
            s.mae.train()
            inputs = iterate_batches(batches, s.dataset, None, np.zeros(len(s.dataset), np.int64), seed=cfg.seed,
                                     num_workers=cfg.num_workers, epoch=epoch, info=info, start=first * s.per_rank)
            for i, (x, _y) in enumerate(inputs, start=first):
                last_of_group = (i + 1) % cfg.grad_accum == 0 or i == s.n_micro - 1
                loss = _micro_step(s, x, last_of_group, epoch, i)
                loss_sum, seen = loss_sum + loss * len(x), seen + len(x)
                if not last_of_group:
                    continue
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                s.scheduler.step()
                if on_step is not None:
                    on_step(epoch, i + 1)
                if ddp.any_flag(bool(stop), info) and i + 1 < s.n_micro:
                    _save(s, epoch, i + 1, (loss_sum, seen))
                    return epoch, True, loss_mean
            loss_mean = ddp.mean_scalar(loss_sum / max(seen, 1), info)
            if info.is_main:
                append_jsonl(s.pdir / "log.jsonl", {"epoch": epoch + 1, "loss": loss_mean,
                                                   "lr": s.scheduler.get_last_lr()[0], "images": s.images,
                                                   "time_s": time.time() - t0})
                log.info("pretrain epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, cfg.epochs, loss_mean,
                         time.time() - t0)
            _save(s, epoch + 1, 0)
            if ddp.any_flag(bool(stop), info) and epoch + 1 != cfg.epochs:
                return epoch + 1, True, loss_mean
    return cfg.epochs, False, loss_mean


def _micro_step(s: _Setup, x: torch.Tensor, last_of_group: bool, epoch: int, i: int) -> float:
    """Forward and backward of one micro-batch; the masking noise comes from the (seeded) CPU generator."""
    x = x.to(s.info.device, non_blocking=True)
    if x.dtype == torch.uint8:  # stream mode: pixels from the workers, normalised on the device
        x = s.dataset.normalize(x)
    n_patches = int(_unwrap(s).encoder.patch_embed.num_patches)
    noise = torch.rand(len(x), n_patches).to(s.info.device)
    sync = contextlib.nullcontext() if (last_of_group or not s.info.distributed) else s.net.no_sync()
    with sync:
        with torch.autocast(s.info.device.type, dtype=torch.bfloat16, enabled=s.amp):
            loss, _pred, _mask = s.net(x, noise)
        if not torch.isfinite(loss):
            raise NeighborLTError(f"MAE loss is {loss.item()} at epoch {epoch} step {i}; lower --lr or --blr")
        (loss / s.cfg.grad_accum).backward()
    return float(loss.detach())


