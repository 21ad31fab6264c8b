"""The training configuration (``TrainConfig``) and its result (``TrainResult``).

Every field carries its unit and allowed values, and is the one definition of its option: the method's defaults
come from :mod:`neighborlt.defaults`, ``neighborlt train`` has a flag for every field (and ``--set key=value``), and
``neighborlt train --print-config`` shows the resolved config without training. The resolved config is written to
``RUN/records/train.config.json`` by :func:`neighborlt.train.engine.run_train`, and its hash keys the run's
completion marker and checkpoints, so a result can always be traced back to the options that made it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..defaults import AUX_CAP, LAMBDA_S, AuxCap
from ..errors import ConfigError

# Fields that change how a run executes but not what it computes; they are left out of the config key so a
# run can be resumed on another device or with another number of loader workers.
EXECUTION_FIELDS = frozenset({"device", "num_workers", "eval_batch_size", "threads", "channels_last"})


class TrainConfig(BaseModel):
    """Options of one training run (stage ``train``).

    Example:
        >>> cfg = TrainConfig(model="resnet8_cifar", epochs=2, image_size=32)
        >>> cfg.loss
        'balanced_softmax'
    """

    model_config = ConfigDict(extra="forbid")

    # ---- data source: the targets of RUN/split.json + RUN/targets.parquet (`neighborlt classes`) ----------------
    data_dir: str | None = None  # where array-backed datasets (CIFAR pickles, Omniglot .npz) are read; None: the
    #   folder split.json records (image files are read where RUN/targets.parquet says)
    aux_manifest: str | None = "filter/aux_manifest.parquet"  # auxiliary images and their parent targets (written by
    #   `neighborlt filter`), relative to the run directory unless absolute; None: the target classes only
    aux_cap: AuxCap = AUX_CAP  # M: images per auxiliary class per epoch (redrawn each epoch), >= 1; None (or
    #   "all" in a config / --aux-cap all): every image; the rule is defaults.parse_aux_cap
    max_test_per_class: int | None = Field(None, ge=1)  # evaluate on at most this many test images/class (speed)
    data_mode: Literal["auto", "cache", "stream"] = "auto"  # how pixels reach the model (train.data): cache = every
    #   image squashed to image_size x image_size once into a memory-mapped uint8 array (today's pixels: the README
    #   tables); stream = decoded per sample in the loader workers (RandomResizedCrop from the full image, eval
    #   resizes the shorter side to image_size / crop_pct and centre-crops); auto = cache when image_size <= 64,
    #   else stream. Part of the run key (it changes the pixels); the mode used is in model.json and the records

    # ---- recipe ------------------------------------------------------------------------------------------
    recipe: str = "none"  # the paper's values (train.recipes): scratch-mae | clip | dinov2 | none; fills only the
    #   fields not set explicitly (recipe_values() lists what it filled)
    recipe_dataset: str | None = None  # imagenet-lt | inat18 | places-lt: picks the recipe's epochs and warm-up;
    #   needed with a recipe unless epochs and warmup_epochs are both set

    # ---- model -------------------------------------------------------------------------------------------
    model: str = "resnet32_cifar"  # train.models name: resnet32_cifar | resnet8_cifar | efficientnet_lite0 | timm
    init: str = "random"  # random | pretrained | path to a .safetensors/.pt checkpoint
    image_size: int = Field(32, ge=8)  # pixels, square input side
    frozen: bool = False  # frozen-feature protocol: extract backbone features once, train only a head
    head: Literal["linear", "mlp"] = "linear"  # head trained on frozen features
    head_hidden: int = Field(512, ge=1)  # hidden units of the MLP head
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only; gloo/CPU has no SyncBatchNorm)

    # ---- loss --------------------------------------------------------------------------------------------
    loss: str = "balanced_softmax"  # losses.LOSSES name: ce | balanced_softmax | logit_adjusted | balanced_bce
    #   | dro | neighbor_silencing
    loss_params: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of the loss (tau, ...);
    #   neighbor_silencing: aux_weight (auxiliary-vs-auxiliary terms, 1 = the paper's equation, 0 = masked) and
    #   silencing = paper (λs 0.1, aux_weight 1) | official (λs 0, aux_weight 0: the authors' hard mask) | custom,
    #   a preset that replaces lambda_s (--loss-param silencing=official)
    lambda_s: float = Field(LAMBDA_S, ge=0.0)  # neighbor_silencing weight of neighbour pairs (1.0 = Balanced-CE)

    # ---- optimisation ------------------------------------------------------------------------------------
    optimizer: Literal["sgd", "adamw"] = "sgd"  # SGD for CIFAR ResNets, AdamW for ViTs / fine-tuning
    lr: float = Field(0.1, gt=0.0)  # peak learning rate for the global batch
    min_lr: float = Field(0.0, ge=0.0)  # cosine floor
    weight_decay: float = Field(5e-4, ge=0.0)  # decoupled for AdamW, L2 for SGD
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)  # layer-wise lr decay (ViTs); None = off
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD momentum
    epochs: int = Field(200, ge=1)  # training epochs
    warmup_epochs: float = Field(5.0, ge=0.0)  # linear warm-up, epochs (fractions allowed)
    batch_size: int = Field(128, ge=1)  # GLOBAL images per optimizer micro-step (split over DDP ranks)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    grad_clip: float | None = Field(None, gt=0.0)  # max global grad norm; None = no clipping
    sampler: Literal["random", "class_balanced", "sqrt"] = "random"  # per-epoch sampling of training images

    # ---- augmentation ------------------------------------------------------------------------------------
    randaugment: str | None = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"; None = flip + crop only
    mixup: float = Field(0.0, ge=0.0)  # Mixup alpha (timm.data.Mixup); 0 = off
    cutmix: float = Field(0.0, ge=0.0)  # CutMix alpha; 0 = off
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)  # probability of applying Mixup/CutMix to a batch
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # only with Mixup/CutMix (timm Mixup smoothing)

    # ---- classifier --------------------------------------------------------------------------------------
    classifier: Literal["joint", "retrain"] = "joint"  # joint: L+K rows (export drops K); retrain: + cRT
    crt_epochs: int = Field(10, ge=1)  # cRT: epochs of the target-only classifier on frozen features
    crt_lr: float = Field(0.1, gt=0.0)  # cRT: SGD learning rate (cosine, no warm-up)

    # ---- execution ---------------------------------------------------------------------------------------
    seed: int = 0  # seeds model init, sampling, augmentation; recorded in env.json
    deterministic: bool = True  # torch.use_deterministic_algorithms + per-(seed, epoch) RNG streams
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int | None = Field(None, ge=0)  # DataLoader worker processes per rank; None: the cores available
    #   per rank in stream mode (os.sched_getaffinity / ranks), 0 in cache mode (its augmentation draws from the
    #   main process's generator, the README tables' randomness)
    threads: int = Field(0, ge=0)  # torch intra-op CPU threads per process (0: torch's default). Use 1 when several
    #   runs share the cores: OpenMP threads spinning on an oversubscribed CPU made a ResNet-8 step 8x slower here
    channels_last: bool = False  # convolution weights and activations in NHWC memory order (timm's --channels-last):
    #   the same function with other float rounding; an EfficientNet-Lite0 step at 64 px was 1.5x faster on this CPU
    #   (bench/train_step.py); ignored by --frozen (features are extracted separately)
    eval_every: int = Field(1, ge=0)  # evaluate on the test set every N epochs (0 = only at the end)
    eval_batch_size: int = Field(256, ge=1)  # images per inference batch

    @model_validator(mode="after")
    def _apply_recipe(self) -> TrainConfig:
        """Fill the recipe's values into the fields not set explicitly (``model_fields_set`` stays the user's)."""
        from .recipes import check_recipe, recipe_values

        check_recipe(self.recipe)
        if self.recipe_dataset is not None and self.recipe == "none":
            raise ConfigError("recipe_dataset needs a recipe: add --recipe scratch-mae | clip | dinov2 or drop it")
        for k, v in recipe_values(self.recipe, self.recipe_dataset, set(self.model_fields_set),
                                  self.grad_accum).items():
            self.__dict__[k] = v  # not setattr: the field must not count as set by the user
        return self

    def recipe_values(self) -> dict[str, Any]:
        """The fields the recipe filled (those the user did not set explicitly) and their values."""
        from .recipes import recipe_table

        if self.recipe == "none":
            return {}
        return {k: getattr(self, k) for k in recipe_table(self.recipe, self.recipe_dataset)
                if k not in self.model_fields_set}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        """Option combinations that cannot work; each is one line naming the flags to change."""
        if self.frozen and (self.cutmix > 0 or self.randaugment):
            raise ConfigError("frozen-feature training sees no images: drop --cutmix/--randaugment or --frozen")
        if self.frozen and self.init == "random":
            raise ConfigError("--frozen needs trained backbone weights: pass --init pretrained or a checkpoint path")
        if self.loss == "neighbor_silencing" and self.aux_manifest is None:
            raise ConfigError("--loss neighbor_silencing needs auxiliary classes: drop --no-aux (training reads "
                              "RUN/filter/aux_manifest.parquet) or use --loss balanced_softmax")
        if "lambda_s" in self.loss_params:  # one writer per value: λs is the lambda_s field
            raise ConfigError(f"--loss-param lambda_s={self.loss_params['lambda_s']}: λs has its own option; pass "
                              "--lambda-s instead (lambda_s in a config file)")
        if "silencing" in self.loss_params:  # the named neighbor-silencing presets (losses.SILENCING_PRESETS)
            from ..losses import resolve_silencing

            if self.loss != "neighbor_silencing":
                raise ConfigError("loss_params silencing=... is a neighbor_silencing preset: add --loss "
                                  "neighbor_silencing or drop it")
            preset = resolve_silencing(self.loss_params)  # also refuses an aux_weight the preset sets otherwise
            lam = float(preset.get("lambda_s", self.lambda_s))
            if "lambda_s" in self.model_fields_set and self.lambda_s != lam:
                raise ConfigError(f"--loss-param silencing={self.loss_params['silencing']} sets λs = {lam:g}: drop "
                                  f"--lambda-s {self.lambda_s:g} or use --loss-param silencing=custom")
            self.__dict__["lambda_s"] = lam  # the field holds what trains (records, reports), not set by the user
        if self.label_smoothing > 0 and self.mixup == 0 and self.cutmix == 0:
            raise ConfigError("--label-smoothing is applied through Mixup/CutMix targets: set --mixup or --cutmix")
        return self

    def key(self) -> str:
        """Hash of every field that affects the result (execution-only fields excluded)."""
        from ..rundir import config_hash

        return config_hash(self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)))


class TrainResult(BaseModel):
    """What :func:`run_train` returns."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str  # the run directory
    model_path: str | None  # RUN/train/model.safetensors (None when interrupted)
    crt_model_path: str | None = None  # RUN/train/crt/model.safetensors with --classifier retrain
    epochs_done: int  # completed epochs
    interrupted: bool = False  # True when SIGTERM stopped the run (checkpoint saved; resume with --resume)
    skipped: bool = False  # True when an identical finished run was found and nothing was trained
    metrics: dict[str, float | None] = Field(default_factory=dict)  # last test metrics (overall/many/medium/few, %)
    crt_metrics: dict[str, float | None] = Field(default_factory=dict)  # test metrics of the cRT classifier
    num_classes: int = 0  # L + K
    num_target_classes: int = 0  # L
    wall_s: float = 0.0  # seconds spent training in this call
    world_size: int = 1  # DDP processes
