"""CLI for training: ``neighborlt train RUN_DIR ...`` (also ``torchrun --nproc_per_node N -m neighborlt train``).

Every :class:`~neighborlt.train.config.TrainConfig` field has a flag here (``--loss-param`` fills ``loss_params``,
``--no-aux`` sets ``aux_manifest`` to None), and ``--set key=value`` reaches any field. The flags default to "not given": the defaults live only in ``TrainConfig`` (their
help shows them), and ``--print-config`` prints the resolved config without training.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..defaults import AUX_CAP_ALL
from ..train.config import TrainConfig
from ._common import build_config
from ._common import parse_key_values as _pairs

logger = logging.getLogger(__name__)


def _h(field: str, text: str) -> str:
    """Help text of a field's flag, ending with the field's default (the one definition, in TrainConfig)."""
    default = TrainConfig.model_fields[field].default
    shown = AUX_CAP_ALL if field == "aux_cap" and default is None else default
    return f"{text} (default: {shown})"  # not "[default: ...]": rich help would read it as markup


def train_cmd(
    run_dir: Annotated[Path, typer.Argument(
        help="Run directory (reads split.json + targets.parquet of `neighborlt classes` and the filter's manifest, "
             "writes train/).")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="JSON file of TrainConfig fields (e.g. RUN/records/train.config.json); "
                         "options given here override it.")] = None,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help=_h("recipe", "The paper's values for the fields not given: scratch-mae | clip | dinov2 | "
                                      "none (neighborlt.train.recipes)."))] = None,
    recipe_dataset: Annotated[str | None, typer.Option(
        "--recipe-dataset", help="The recipe's epochs and warm-up: imagenet-lt | inat18 | places-lt.")] = None,
    data_dir: Annotated[str | None, typer.Option(
        "--data-dir", help="Where array-backed datasets (CIFAR pickles, Omniglot .npz) are read; default: the "
                           "folder split.json records.")] = None,
    aux_manifest: Annotated[str | None, typer.Option(
        "--aux-manifest", help=_h("aux_manifest", "Auxiliary images (relative to the run directory; written by "
                                                  "`neighborlt filter`)."))] = None,
    no_aux: Annotated[bool, typer.Option(
        "--no-aux", help="Train on the target classes only (no auxiliary manifest).")] = False,
    aux_cap: Annotated[str | None, typer.Option(
        "--aux-cap", help=_h("aux_cap", f"M: images per auxiliary class per epoch (>= 1), or {AUX_CAP_ALL!r} for "
                                        "every image."))] = None,
    max_test_per_class: Annotated[int | None, typer.Option(
        "--max-test-per-class", help="Evaluate on at most this many test images per class.")] = None,
    data_mode: Annotated[str | None, typer.Option(
        "--data-mode", help=_h("data_mode", "auto | cache (decode all once, squashed to S x S) | stream (decode per "
                                            "sample in the workers); auto: cache when --image-size <= 64."))] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help=_h("model", "resnet32_cifar | resnet8_cifar | efficientnet_lite0 | any timm name."))] = None,
    init: Annotated[str | None, typer.Option("--init", help=_h("init", "random | pretrained | checkpoint path."))] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=_h("image_size", "Input side in pixels."))] = None,
    frozen: Annotated[bool | None, typer.Option(
        "--frozen/--no-frozen", help="Frozen-feature protocol: train only a head on cached features.")] = None,
    head: Annotated[str | None, typer.Option("--head", help=_h("head", "Head on frozen features: linear | mlp."))] = None,
    head_hidden: Annotated[int | None, typer.Option(
        "--head-hidden", help=_h("head_hidden", "Hidden units of the MLP head."))] = None,
    sync_bn: Annotated[bool | None, typer.Option(
        "--sync-bn/--no-sync-bn", help="SyncBatchNorm under DDP (CUDA only).")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help=_h(
        "loss", "ce | balanced_softmax | logit_adjusted | balanced_bce | dro | neighbor_silencing."))] = None,
    loss_param: Annotated[list[str] | None, typer.Option(
        "--loss-param", help="Loss keyword key=value (tau=1.0); repeatable.")] = None,
    lambda_s: Annotated[float | None, typer.Option(
        "--lambda-s", help=_h("lambda_s", "neighbor_silencing weight λs of neighbour pairs (1 = Balanced Softmax)."))
    ] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help=_h("optimizer", "sgd | adamw."))] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=_h("lr", "Peak learning rate (global batch)."))] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help=_h("min_lr", "Cosine floor."))] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", help=_h("weight_decay", "Weight decay."))] = None,
    layer_decay: Annotated[float | None, typer.Option(
        "--layer-decay", help=_h("layer_decay", "Layer-wise lr decay (ViTs)."))] = None,
    betas: Annotated[tuple[float, float] | None, typer.Option(
        "--betas", help=_h("betas", "AdamW betas: two numbers, e.g. --betas 0.9 0.999."))] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help=_h("momentum", "SGD momentum."))] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=_h("epochs", "Training epochs."))] = None,
    warmup_epochs: Annotated[float | None, typer.Option(
        "--warmup-epochs", help=_h("warmup_epochs", "Linear warm-up epochs."))] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help=_h("batch_size", "Global batch size (split over DDP processes)."))] = None,
    grad_accum: Annotated[int | None, typer.Option(
        "--grad-accum", help=_h("grad_accum", "Micro-batches per step."))] = None,
    grad_clip: Annotated[float | None, typer.Option(
        "--grad-clip", help="Clip the global gradient norm to this value (default: off).")] = None,
    sampler: Annotated[str | None, typer.Option(
        "--sampler", help=_h("sampler", "random | class_balanced | sqrt."))] = None,
    randaugment: Annotated[str | None, typer.Option(
        "--randaugment", help="timm RandAugment spec, e.g. rand-m9-mstd0.5 (default: flip + crop only).")] = None,
    mixup: Annotated[float | None, typer.Option("--mixup", help=_h("mixup", "Mixup alpha (0 = off)."))] = None,
    cutmix: Annotated[float | None, typer.Option("--cutmix", help=_h("cutmix", "CutMix alpha (0 = off)."))] = None,
    mix_prob: Annotated[float | None, typer.Option(
        "--mix-prob", help=_h("mix_prob", "Probability of applying Mixup/CutMix to a batch."))] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        "--label-smoothing", help=_h("label_smoothing", "Label smoothing of the Mixup/CutMix targets (needs --mixup "
                                                        "or --cutmix)."))] = None,
    classifier: Annotated[str | None, typer.Option(
        "--classifier", help=_h("classifier", "joint (direct classifier at export) | retrain (cRT after "
                                              "training)."))] = None,
    crt_epochs: Annotated[int | None, typer.Option("--crt-epochs", help=_h("crt_epochs", "cRT epochs."))] = None,
    crt_lr: Annotated[float | None, typer.Option("--crt-lr", help=_h("crt_lr", "cRT learning rate."))] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=_h("seed", "Random seed."))] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic", help="Deterministic kernels (exact resume) (default: on).")] = None,
    amp: Annotated[str | None, typer.Option("--amp", help=_h("amp", "auto | bf16 | off."))] = None,
    device: Annotated[str | None, typer.Option("--device", help=_h("device", "auto | cpu | cuda | cuda:N."))] = None,
    num_workers: Annotated[int | None, typer.Option(
        "--num-workers", help="DataLoader workers per rank (default: the cores per rank in stream mode, 0 in "
                              "cache mode).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_h(
        "threads", "torch CPU threads per process (0: torch's default; 1 when several runs share the cores)."))] = None,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory order for convolutions (faster for EfficientNet on "
                                                   "CPU; execution only, not part of the run key) (default: off).")] = None,
    eval_every: Annotated[int | None, typer.Option(
        "--eval-every", help=_h("eval_every", "Evaluate every N epochs (0 = at the end only)."))] = None,
    eval_batch_size: Annotated[int | None, typer.Option(
        "--eval-batch-size", help=_h("eval_batch_size", "Images per inference batch."))] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/train/checkpoint/last.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete earlier training outputs and start over.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any TrainConfig field as key=value (JSON values: label_smoothing=0.1, betas=[0.9,0.99]); "
                      "repeatable.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Validate the options, print the resolved TrainConfig as JSON (the fields "
                               "RUN/records/train.config.json will hold) and exit without training.")] = False,
) -> None:
    """Train on the target (+ auxiliary) classes; writes RUN/train/{model.safetensors, model.json, log.jsonl}."""
    given = {k: v for k, v in locals().items() if k in TrainConfig.model_fields}
    cfg = _resolve(config, given, no_aux=no_aux, loss_param=loss_param, set_=set_)
    if print_config:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    _train(cfg, run_dir, resume=resume, force=force, progress=not no_progress)


def _resolve(config: Path | None, given: dict[str, Any], *, no_aux: bool, loss_param: list[str] | None,
             set_: list[str] | None) -> TrainConfig:
    """The TrainConfig of a command line: ``--config`` file < flags < ``--set``; ``--no-aux`` and ``--loss-param``
    on top. Validation errors are one line naming the flag."""
    from ..errors import ConfigError
    from ..rundir import read_json

    base: dict[str, Any] = {}
    if config is not None:
        base = read_json(config)
        if not isinstance(base, dict):
            raise ConfigError(f"{config}: expected a JSON object of TrainConfig fields")
        for k in ("world_size", "config_key"):  # written by RunDir.record next to the config fields
            base.pop(k, None)
        for k in ("protocol", "protocol_overrides"):  # unset fields of older records: stage 1 now fixes the data
            if k in base and not base[k]:
                base.pop(k)
    fields = {**base, **{k: v for k, v in given.items() if v is not None}, **_pairs(set_, "--set")}
    if no_aux:
        fields["aux_manifest"] = None
    if loss_param:
        fields["loss_params"] = {**fields.get("loss_params", {}), **_pairs(loss_param, "--loss-param")}
    return build_config(TrainConfig, **fields)


def _train(cfg: TrainConfig, run_dir: Path, *, resume: bool, force: bool, progress: bool) -> None:
    """Run training and print its outcome (rank 0); exit 143 after a SIGTERM that saved a checkpoint."""
    from ..train.engine import run_train

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    result = run_train(cfg, run_dir, resume=resume, force=force, progress=progress)
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
