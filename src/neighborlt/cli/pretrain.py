"""CLI for pre-training: ``neighborlt pretrain RUN_DIR --method mae ...`` (also under ``torchrun -m neighborlt``).

Every :class:`~neighborlt.pretrain.config.PretrainConfig` field has a flag (defaults shown from the field, the one
definition), ``--config`` reads a JSON/YAML file of fields (e.g. ``RUN/records/pretrain.config.json``) and
``--set key=value`` reaches any field; ``--print-config`` prints the resolved config without training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..pretrain.config import PretrainConfig
from ._common import build_config

logger = logging.getLogger(__name__)


def _h(field: str, text: str) -> str:
    return f"{text} (default: {PretrainConfig.model_fields[field].default})"


def pretrain_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (reads split.json, writes pretrain/).")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="JSON or YAML file of PretrainConfig fields; options given here override it.")] = None,
    method: Annotated[str | None, typer.Option("--method", help=_h("method", "Pre-training method: mae."))] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Offline data folder.")] = None,
    aux_manifest: Annotated[str | None, typer.Option(
        "--aux-manifest", help="Also pre-train on the filtered auxiliary images (e.g. filter/aux_manifest.parquet; "
                               "default: the target images only, as LiVT).")] = None,
    aux_cap: Annotated[str | None, typer.Option(
        "--aux-cap", help=_h("aux_cap", "With --aux-manifest: images per auxiliary class per epoch, or 'all'."))] = None,
    data_mode: Annotated[str | None, typer.Option(
        "--data-mode", help=_h("data_mode", "auto | cache | stream (as neighborlt train)."))] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help=_h("model", "A timm ViT name, vit_tiny_patch4_32 or vit_pico_patch4_32."))] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=_h("image_size", "Input side."))] = None,
    mask_ratio: Annotated[float | None, typer.Option(
        "--mask-ratio", help=_h("mask_ratio", "Share of patches removed."))] = None,
    norm_pix_loss: Annotated[bool | None, typer.Option(
        "--norm-pix-loss/--no-norm-pix-loss", help="Regress per-patch normalised pixels (default: on).")] = None,
    decoder_dim: Annotated[int | None, typer.Option("--decoder-dim", help=_h("decoder_dim", "Decoder width."))] = None,
    decoder_depth: Annotated[int | None, typer.Option(
        "--decoder-depth", help=_h("decoder_depth", "Decoder blocks."))] = None,
    decoder_heads: Annotated[int | None, typer.Option(
        "--decoder-heads", help=_h("decoder_heads", "Decoder heads."))] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=_h("epochs", "Epochs."))] = None,
    warmup_epochs: Annotated[float | None, typer.Option(
        "--warmup-epochs", help=_h("warmup_epochs", "Linear warm-up epochs."))] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help=_h("batch_size", "Global images per micro-step."))] = None,
    grad_accum: Annotated[int | None, typer.Option(
        "--grad-accum", help=_h("grad_accum", "Micro-batches per step."))] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Absolute peak lr (default: --blr x effective batch / 256).")] = None,
    blr: Annotated[float | None, typer.Option("--blr", help=_h("blr", "Base lr per 256 images."))] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help=_h("min_lr", "Cosine floor."))] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", help=_h("weight_decay", "AdamW weight decay."))] = None,
    betas: Annotated[tuple[float, float] | None, typer.Option(
        "--betas", help=_h("betas", "AdamW betas: two numbers."))] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=_h("seed", "Random seed."))] = None,
    deterministic: Annotated[bool | None, typer.Option(
        "--deterministic/--no-deterministic", help="Deterministic kernels (exact resume) (default: on).")] = None,
    amp: Annotated[str | None, typer.Option("--amp", help=_h("amp", "auto | bf16 | off."))] = None,
    device: Annotated[str | None, typer.Option("--device", help=_h("device", "auto | cpu | cuda | cuda:N."))] = None,
    num_workers: Annotated[int | None, typer.Option(
        "--num-workers", help="Loader workers per rank (default: as neighborlt train).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_h("threads", "torch CPU threads."))] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/pretrain/checkpoint/last.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any PretrainConfig field as key=value (JSON values); repeatable.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved PretrainConfig as JSON and exit.")] = False,
) -> None:
    """Masked-autoencoder pre-training of a ViT on the run's training images; writes RUN/pretrain/encoder.safetensors
    for `neighborlt train --init`."""
    import json

    from ..errors import ConfigError
    from ._common import parse_key_values

    given = {k: v for k, v in locals().items() if k in PretrainConfig.model_fields and v is not None}
    base: dict[str, Any] = {}
    if config is not None:
        base = _read_fields(config)
    for k in ("world_size", "config_key", "resolved_lr"):  # written by the record next to the config fields
        base.pop(k, None)
    fields = {**base, **given, **parse_key_values(set_, "--set")}
    if fields.get("method", "mae") != "mae":
        raise ConfigError(f"--method {fields['method']!r}: unknown pre-training method; known: mae")
    cfg = build_config(PretrainConfig, **fields)
    if print_config:
        typer.echo(json.dumps({**cfg.model_dump(mode="json"), "resolved_lr": cfg.resolved_lr()}, indent=2))
        return
    from ..pretrain.stage import run_pretrain

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    result = run_pretrain(cfg, run_dir, resume=resume, force=force)
    if result.interrupted:
        typer.echo(f"interrupted after {result.epochs_done} epochs; checkpoint saved in {run_dir / 'pretrain'}; "
                   "re-run with --resume", err=True)
        raise SystemExit(143)
    if os.environ.get("RANK", "0") == "0":
        what = "skipped (finished with the same configuration)" if result.skipped else f"{result.wall_s:.1f} s"
        typer.echo(f"{result.encoder_path}: {cfg.method} {cfg.model}, {result.images} images per epoch, loss "
                   f"{result.loss}, {what}; fine-tune with: neighborlt train {run_dir} --model {cfg.model} "
                   f"--image-size {cfg.image_size} --init {result.encoder_path}")


def _read_fields(path: Path) -> dict[str, Any]:
    from ..errors import ConfigError
    from ..rundir import read_json

    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    else:
        data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of PretrainConfig fields")
    return dict(data)


def register(app: typer.Typer) -> None:
    """Mount ``neighborlt pretrain``."""
    app.command("pretrain")(pretrain_cmd)
