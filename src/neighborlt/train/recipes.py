"""The paper's three fine-tuning recipes (``TrainConfig.recipe``), each value traced to the paper.

The paper trains a ViT-B in three paradigms (Sec. 4.3, Table 2; Appendix B.1 of "Learning from Neighbors:
Category Extrapolation for Long-Tail Learning", ``../shared/paper/paper.md``):

* ``scratch-mae``: "when training from scratch, following LiVT, we conduct MAE training on the downstream dataset"
  (B.1), then fine-tune; the MAE encoder comes from ``neighborlt pretrain RUN --method mae`` and is passed as
  ``init: RUN/pretrain/encoder.safetensors``.
* ``clip``: "we directly initialize ViT from their weights" (B.1): timm's ``vit_base_patch16_clip_224.openai``.
* ``dinov2``: the same with DINOv2 weights: timm's ``vit_base_patch14_dinov2.lvd142m`` (at 224 px: 16 x 16 patches).
* ``none``: no recipe (every field keeps its own default).

Values shared by the three (Sec. 4.2 and B.1): AdamW with betas (0.9, 0.95); effective batch 512; weight decay
0.05; layer decay 0.75; RandAug(9, 0.5), Mixup 0.8, CutMix 1.0; a cosine schedule to a minimum lr of 1e-6. Per
paradigm (B.1): lr 1e-3 (scratch), 1e-5 (CLIP), 3.5e-5 (DINOv2). Per dataset (Sec. 4.2, B.1, "following LiVT"):
epochs 100 / 100 / 30 and warm-up 10 / 10 / 5 for ImageNet-LT / iNaturalist 2018 / Places-LT. M = 50 and
λs = 0.1 (Sec. 4.2) are already the method's defaults (:mod:`neighborlt.defaults`), so no recipe sets them.

Rules (decided here, see :func:`recipe_values`):

* A field the user set explicitly (pydantic ``model_fields_set``: a key of the config file, a flag, ``--set``)
  always wins; the recipe fills only the fields left unset. :meth:`TrainConfig.recipe_values` returns what it
  filled; the resolved config (``RUN/records/train.config.json``) and ``RUN/train/model.json`` record it.
* Epochs depend on the dataset, so a recipe needs ``recipe_dataset: imagenet-lt | inat18 | places-lt`` unless
  both ``epochs`` and ``warmup_epochs`` are set explicitly (then the dataset is not needed).
* The effective batch is ``batch_size x grad_accum``: the recipe fills ``batch_size = 512 / grad_accum``.
* ``scratch-mae`` needs ``init`` to be the MAE encoder's checkpoint path (the recipe cannot know the run
  directory); ``init: random`` with it is an error rather than a silent from-scratch ViT.

Read with care: the paper's lr is taken as the absolute peak lr at the effective batch of 512 (``TrainConfig.lr``).
LiVT's own fine-tuning states a *base* lr (``blr: 0.001``, absolute ``lr: 0.008`` = 1e-3 x 2048 / 256 in
``exp/finetune/ImageNet-LT/vit_base_224/args.txt``), so the paper's 1e-3 may be MAE's base lr, i.e. 2e-3 absolute at
512; set ``lr`` explicitly to use that reading.

ASSUMED where the paper is silent: RandAug(9, 0.5) is written as timm's ``rand-m9-mstd0.5-inc1`` (the spelling of
LiVT's fine-tuning runs, ``exp/finetune/ImageNet-LT/vit_base_224/args.txt`` in XuZhengzhuo/LiVT: ``aa:
rand-m9-mstd0.5-inc1``); the input side is 224 px (ViT-B/16 at 224, as LiVT's ``input_size: 224``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

RECIPE_NAMES: tuple[str, ...] = ("none", "scratch-mae", "clip", "dinov2")
RECIPE_DATASETS: tuple[str, ...] = ("imagenet-lt", "inat18", "places-lt")

EFFECTIVE_BATCH = 512  # Sec. 4.2 / B.1: "an effective batch size of 512"

# Sec. 4.2 / B.1: AdamW betas {0.9, 0.95}; B.1: weight decay 0.05, layer decay 0.75, cosine schedule, minimum lr
# 1e-6; Sec. 4.2 / B.1: RandAug(9, 0.5), Mixup(0.8), Cutmix(1.0). ASSUMED: 224 px, "-inc1" (module docstring).
_COMMON: dict[str, Any] = {
    "optimizer": "adamw",
    "betas": (0.9, 0.95),
    "weight_decay": 0.05,
    "layer_decay": 0.75,
    "min_lr": 1e-6,
    "randaugment": "rand-m9-mstd0.5-inc1",
    "mixup": 0.8,
    "cutmix": 1.0,
    "image_size": 224,
}

# B.1: "The learning rate is set to 1e-3, 1e-5, and 3.5e-5 for training from scratch, CLIP, and DINOv2";
# Sec. 4.2: "We adopt ViT-Base as the backbone" (timm names of the ViT-B/16, CLIP ViT-B/16 and DINOv2 ViT-B/14).
_PARADIGM: dict[str, dict[str, Any]] = {
    "scratch-mae": {"model": "vit_base_patch16_224", "lr": 1e-3},
    "clip": {"model": "vit_base_patch16_clip_224.openai", "init": "pretrained", "lr": 1e-5},
    "dinov2": {"model": "vit_base_patch14_dinov2.lvd142m", "init": "pretrained", "lr": 3.5e-5},
}

# Sec. 4.2 / B.1: "the number of training epochs for ImageNet-LT, iNaturalist 18, and Place-LT is set to 100, 100,
# and 30"; B.1: "The number of epochs for warmup is set to 10, 10, and 5".
_DATASET: dict[str, dict[str, Any]] = {
    "imagenet-lt": {"epochs": 100, "warmup_epochs": 10},
    "inat18": {"epochs": 100, "warmup_epochs": 10},
    "places-lt": {"epochs": 30, "warmup_epochs": 5},
}


def check_recipe(name: str) -> str:
    """``name`` if it is a known recipe, else one line listing the known ones.

    Example:
        >>> check_recipe("dinov2")
        'dinov2'
    """
    if name not in RECIPE_NAMES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPE_NAMES)}")
    return name


def recipe_table(name: str, dataset: str | None) -> dict[str, Any]:
    """Every value recipe ``name`` sets for ``dataset`` (None: the dataset-free values only).

    Example:
        >>> recipe_table("dinov2", "places-lt")["lr"], recipe_table("dinov2", "places-lt")["epochs"]
        (3.5e-05, 30)
    """
    check_recipe(name)
    if name == "none":
        return {}
    if dataset is not None and dataset not in _DATASET:
        raise ConfigError(f"unknown recipe_dataset {dataset!r}; known: {', '.join(RECIPE_DATASETS)}")
    out = {**_COMMON, **_PARADIGM[name], "batch_size": EFFECTIVE_BATCH}
    if dataset is not None:
        out.update(_DATASET[dataset])
    return out


def recipe_values(name: str, dataset: str | None, explicit: set[str], grad_accum: int) -> dict[str, Any]:
    """The values recipe ``name`` fills in a TrainConfig whose explicitly set fields are ``explicit``.

    Args:
        name: one of :data:`RECIPE_NAMES`.
        dataset: one of :data:`RECIPE_DATASETS`, or None.
        explicit: the fields the user set (``TrainConfig.model_fields_set``); they are never filled.
        grad_accum: the config's micro-batches per step; ``batch_size`` is filled as ``512 / grad_accum``.

    Raises:
        ConfigError: unknown recipe or dataset; a recipe without ``recipe_dataset`` while epochs or warm-up are
            left to it; a ``grad_accum`` that does not divide 512; ``scratch-mae`` without an encoder checkpoint.

    Example:
        >>> v = recipe_values("clip", "imagenet-lt", {"lr"}, grad_accum=4)
        >>> "lr" in v, v["batch_size"], v["epochs"], v["warmup_epochs"]
        (False, 128, 100, 10)
    """
    table = recipe_table(name, dataset)
    if not table:
        return {}
    if dataset is None and not {"epochs", "warmup_epochs"} <= explicit:
        raise ConfigError(f"recipe {name!r} sets epochs per dataset: add recipe_dataset (--recipe-dataset) "
                          f"{' | '.join(RECIPE_DATASETS)}, or set both epochs and warmup_epochs")
    if "batch_size" not in explicit:
        if EFFECTIVE_BATCH % grad_accum:
            raise ConfigError(f"recipe {name!r} uses an effective batch of {EFFECTIVE_BATCH}: grad_accum "
                              f"{grad_accum} does not divide it; set batch_size explicitly or use grad_accum 1, 2, 4, ...")
        table["batch_size"] = EFFECTIVE_BATCH // grad_accum
    if name == "scratch-mae" and "init" not in explicit:
        raise ConfigError("recipe 'scratch-mae' fine-tunes an MAE encoder: run `neighborlt pretrain RUN --method mae` "
                          "and set init: RUN/pretrain/encoder.safetensors (--init)")
    return {k: v for k, v in table.items() if k not in explicit}
