"""The pre-training configuration (``PretrainConfig``) and its result (``PretrainResult``).

The defaults are LiVT's MAE pre-training of a ViT-B/16 on ImageNet-LT (the recipe the paper's from-scratch paradigm
follows, Appendix B.1: "following LiVT, we conduct MAE training on the downstream dataset"), read from
XuZhengzhuo/LiVT: ``script/pretrain.py`` (``epochs = 800``, ``warmup_epochs = 40``, ``batch = 64`` per GPU x
``accum_iter = 16`` x 4 GPUs = 4096, ``mask_ratio = 0.75``, ``blr = 1.5e-4``, ``weight_decay = 0.05``),
``exp/pretrain/ImageNet-LT/vit_base_224/args.txt`` (``norm_pix_loss: True``, ``min_lr: 0.0``, ``lr: 0.0024`` =
1.5e-4 x 4096 / 256, ``input_size: 224``; that logged run used 400 epochs) and ``main_pretrain.py`` (AdamW betas
(0.9, 0.95); ``RandomResizedCrop(scale=(0.2, 1.0))`` + flip; a plain random sampler over the long-tailed set).
LiVT has no balanced MAE variant: its ``models/mae.py`` keeps a class-balanced loss and a mask-ratio schedule only
as commented-out code, so pre-training here is plain MAE on the long-tailed images, as LiVT ran it.
The decoder is MAE's ``dec512d8b`` (512-d, 8 blocks, 16 heads).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..defaults import AUX_CAP, AuxCap

# Fields that change how a run executes but not what it computes (left out of the run key).
EXECUTION_FIELDS = frozenset({"device", "num_workers", "threads"})


class PretrainConfig(BaseModel):
    """Options of one pre-training run (stage ``pretrain``); the defaults are LiVT's (module docstring).

    Example:
        >>> PretrainConfig(model="vit_tiny_patch4_32", image_size=32, batch_size=256).resolved_lr()
        0.00015
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["mae"] = "mae"  # masked autoencoder (He et al. 2022), the only method so far

    # ---- data --------------------------------------------------------------------------------------------
    data_dir: str | None = None  # offline data folder; None: paths.resolve_data_dir()
    aux_manifest: str | None = None  # also the filtered auxiliary images (e.g. filter/aux_manifest.parquet,
    #   relative to RUN); None: the target training images only, as LiVT
    aux_cap: AuxCap = AUX_CAP  # with aux_manifest: images per auxiliary class per epoch (redrawn), as training's M
    data_mode: Literal["auto", "cache", "stream"] = "auto"  # as train.data_mode (auto: cache at <= 64 px, else
    #   stream). cache: MAE's RandomResizedCrop(scale 0.2-1) + flip; stream: training's crop (scale 0.08-1) + flip

    # ---- model -------------------------------------------------------------------------------------------
    model: str = "vit_base_patch16_224"  # a timm ViT (or vit_tiny_patch4_32 / vit_pico_patch4_32); train --model
    #   must name the same architecture to load the encoder
    image_size: int = Field(224, ge=8)  # pixels (LiVT input_size 224)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # share of patches removed (LiVT mask_ratio 0.75)
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (LiVT norm_pix_loss True)
    decoder_dim: int = Field(512, ge=4)  # MAE dec512d8b
    decoder_depth: int = Field(8, ge=1)
    decoder_heads: int = Field(16, ge=1)

    # ---- optimisation ------------------------------------------------------------------------------------
    epochs: int = Field(800, ge=1)  # LiVT script/pretrain.py (its logged ImageNet-LT run: 400)
    warmup_epochs: float = Field(40.0, ge=0.0)  # LiVT warmup_epochs 40
    batch_size: int = Field(4096, ge=1)  # GLOBAL images per micro-step (LiVT: 64 x 16 accumulation x 4 GPUs);
    #   on fewer GPUs keep batch_size x grad_accum = 4096, e.g. batch_size 512 and grad_accum 8
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float | None = Field(None, gt=0.0)  # absolute peak lr; None: blr x batch_size x grad_accum / 256
    blr: float = Field(1.5e-4, gt=0.0)  # MAE base lr (LiVT blr 1.5e-4)
    min_lr: float = Field(0.0, ge=0.0)  # cosine floor (LiVT min_lr 0)
    weight_decay: float = Field(0.05, ge=0.0)  # AdamW, none on norms and biases (LiVT weight_decay 0.05)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (main_pretrain.py)

    # ---- execution ---------------------------------------------------------------------------------------
    seed: int = 0  # seeds the initialisation, sampling, augmentation and masks
    deterministic: bool = True  # deterministic kernels (exact resume)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int | None = Field(None, ge=0)  # loader workers per rank (None: as training decides)
    threads: int = Field(0, ge=0)  # torch CPU threads per process (0: torch's default)

    def resolved_lr(self) -> float:
        """The peak lr: ``lr``, or MAE's rule ``blr x effective batch / 256``."""
        return float(self.lr) if self.lr is not None else self.blr * self.batch_size * self.grad_accum / 256

    def key(self) -> str:
        """Hash of every field that affects the result (execution-only fields excluded)."""
        from ..rundir import config_hash

        return config_hash(self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)))


class PretrainResult(BaseModel):
    """What :func:`~neighborlt.pretrain.stage.run_pretrain` returns."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str
    encoder_path: str | None  # RUN/pretrain/encoder.safetensors (None when interrupted)
    epochs_done: int
    interrupted: bool = False  # SIGTERM stopped the run (checkpoint saved; resume with --resume)
    skipped: bool = False  # a finished run with the same key was found
    loss: float | None = None  # mean reconstruction loss of the last epoch
    images: int = 0  # images per epoch (targets + capped auxiliary)
    wall_s: float = 0.0
    world_size: int = 1
