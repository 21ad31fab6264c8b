"""CLI for training: ``neighborlt train RUN_DIR ...`` (also ``torchrun --nproc_per_node N -m neighborlt train``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import build_config

logger = logging.getLogger(__name__)


def _pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Parse repeated ``key=value`` options; values are JSON when they parse (numbers, lists), else strings."""
    from ..errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"{flag} {item!r}: use key=value, e.g. {flag} tau=1.0")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def train_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads split.json/neighbors.json, writes train/).")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="JSON file of TrainConfig fields (e.g. RUN/records/train.config.json); "
                         "options given here override it.")] = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="Split-neighbour preset (cifar10-neighbours, tiny-imagenet-lt-neighbours, ...); "
                           "default: RUN/split.json.")] = None,
    protocol_set: Annotated[list[str] | None, typer.Option(
        "--protocol-set", help="Protocol override key=value (n_max=50, seed=1, ...); repeatable.")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Offline data folder.")] = None,
    aux_manifest: Annotated[str | None, typer.Option(
        "--aux-manifest", help="Auxiliary images (default RUN/filter/aux_manifest.parquet, written by "
                               "`neighborlt filter`).")] = None,
    no_aux: Annotated[bool, typer.Option(
        "--no-aux", help="Train on the target classes only (no auxiliary manifest).")] = False,
    aux_cap: Annotated[int | None, typer.Option("--aux-cap", help="M: images per auxiliary class per epoch.")] = None,
    max_test_per_class: Annotated[int | None, typer.Option(
        "--max-test-per-class", help="Evaluate on at most this many test images per class.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="resnet32_cifar | resnet8_cifar | efficientnet_lite0 | any timm name.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="random | pretrained | checkpoint path.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input side in pixels.")] = None,
    frozen: Annotated[bool | None, typer.Option(
        "--frozen/--no-frozen", help="Frozen-feature protocol: train only a head on cached features.")] = None,
    head: Annotated[str | None, typer.Option("--head", help="Head on frozen features: linear | mlp.")] = None,
    loss: Annotated[str | None, typer.Option(
        "--loss", help="ce | balanced_softmax | logit_adjusted | balanced_bce | dro | neighbor_silencing.")] = None,
    loss_param: Annotated[list[str] | None, typer.Option(
        "--loss-param", help="Loss keyword key=value (tau=1.0); repeatable.")] = None,
    lambda_s: Annotated[float | None, typer.Option(
        "--lambda-s", help="neighbor_silencing weight of neighbour pairs.")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="sgd | adamw.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (global batch).")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="Weight decay.")] = None,
    layer_decay: Annotated[float | None, typer.Option("--layer-decay", help="Layer-wise lr decay.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", help="Linear warm-up epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Global batch size (split over DDP processes).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per step.")] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="random | class_balanced | sqrt.")] = None,
    randaugment: Annotated[str | None, typer.Option(
        "--randaugment", help="timm RandAugment spec, e.g. rand-m9-mstd0.5.")] = None,
    mixup: Annotated[float | None, typer.Option("--mixup", help="Mixup alpha (0 = off).")] = None,
    cutmix: Annotated[float | None, typer.Option("--cutmix", help="CutMix alpha (0 = off).")] = None,
    classifier: Annotated[str | None, typer.Option(
        "--classifier", help="joint (direct classifier at export) | retrain (cRT after training).")] = None,
    crt_epochs: Annotated[int | None, typer.Option("--crt-epochs", help="cRT epochs.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic", help="Deterministic kernels (exact resume).")] = None,
    amp: Annotated[str | None, typer.Option("--amp", help="auto | bf16 | off.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="DataLoader workers.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads per process (0: default; "
                                                "1 when several runs share the cores).")] = None,
    eval_every: Annotated[int | None, typer.Option(
        "--eval-every", help="Evaluate every N epochs (0 = at the end only).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/train/checkpoint/last.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete earlier training outputs and start over.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any TrainConfig field as key=value (JSON values: label_smoothing=0.1, betas=[0.9,0.99]); "
                      "repeatable.")] = None,
) -> None:
    """Train on the target (+ auxiliary) classes; writes RUN/train/{model.safetensors, model.json, log.jsonl}."""
    from ..errors import ConfigError
    from ..rundir import read_json
    from ..train.config import TrainConfig
    from ..train.engine import run_train

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    base: dict[str, Any] = {}
    if config is not None:
        base = read_json(config)
        if not isinstance(base, dict):
            raise ConfigError(f"{config}: expected a JSON object of TrainConfig fields")
        for k in ("world_size", "config_key"):  # written by RunDir.record next to the config fields
            base.pop(k, None)
    given = {
        "protocol": protocol, "data_dir": data_dir, "aux_manifest": aux_manifest,
        "aux_cap": aux_cap, "max_test_per_class": max_test_per_class, "model": model, "init": init,
        "image_size": image_size, "frozen": frozen, "head": head, "loss": loss, "lambda_s": lambda_s,
        "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "layer_decay": layer_decay,
        "epochs": epochs, "warmup_epochs": warmup_epochs, "batch_size": batch_size, "grad_accum": grad_accum,
        "sampler": sampler, "randaugment": randaugment, "mixup": mixup, "cutmix": cutmix,
        "classifier": classifier, "crt_epochs": crt_epochs, "seed": seed, "deterministic": deterministic,
        "amp": amp, "device": device, "num_workers": num_workers, "threads": threads, "eval_every": eval_every,
    }
    fields = {**base, **{k: v for k, v in given.items() if v is not None}, **_pairs(set_, "--set")}
    if no_aux:
        fields["aux_manifest"] = None
    if protocol_set:
        fields["protocol_overrides"] = {**fields.get("protocol_overrides", {}), **_pairs(protocol_set, "--protocol-set")}
    if loss_param:
        fields["loss_params"] = {**fields.get("loss_params", {}), **_pairs(loss_param, "--loss-param")}
    if aux_cap is not None and aux_cap <= 0:
        fields["aux_cap"] = None  # --aux-cap 0: use every auxiliary image
    cfg = build_config(TrainConfig, **fields)
    result = run_train(cfg, run_dir, resume=resume, force=force, progress=not no_progress)
    if result.interrupted:
        typer.echo(f"interrupted after {result.epochs_done} epochs; checkpoint saved in {run_dir / 'train'}; "
                   "re-run with --resume", err=True)
        raise SystemExit(143)  # 128 + SIGTERM, like a process killed by the signal but after a clean save
    if os.environ.get("RANK", "0") == "0":
        msg = "skipped (finished with the same configuration)" if result.skipped else f"{result.wall_s:.1f} s"
        typer.echo(f"{result.model_path}: {result.num_target_classes} target + "
                   f"{result.num_classes - result.num_target_classes} auxiliary classes, {msg}; test {result.metrics}")
        if result.crt_model_path:
            typer.echo(f"{result.crt_model_path}: cRT classifier; test {result.crt_metrics}")


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt train``."""
    app.command("train")(train_cmd)
