"""Options of stage 4 (``filter``): which retrieved images become auxiliary training images."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError

#: fields that change how the stage runs, not what it keeps (left out of its completion key)
EXECUTION_FIELDS = frozenset({"force", "device", "batch_size", "data_dir", "sheets", "sheet_images"})


class FilterConfig(BaseModel):
    """Options of ``neighborlt filter``. Every rule can be switched off (``--no-caption``, ``--no-band``, ...).

    The band defaults (centered cosine, γ1 = 0.0, γ2 = 0.5 of the offline EfficientNet-Lite0 features at 64 px) were
    chosen on the Tiny-ImageNet pool by ``bench/filter_band.py`` (see bench/README.md): they keep 75 % of the images
    of a target's true WordNet siblings and 45 % of unrelated pool images; γ2 = 0.5 drops 20 % of the target's own
    test images (and 3 % of sibling images). Re-choose them for another feature model (DINOv2 separates better).

    Example:
        >>> FilterConfig(band=False).leak_threshold
        0.94
    """

    model_config = ConfigDict(extra="forbid")

    caption: bool = True  # keep an image only when its caption names its class (normalised name or a synonym)
    band: bool = True  # keep an image only when gamma_low < cos(feature, prototype of its parent) < gamma_high
    band_mode: Literal["absolute", "quantile"] = "absolute"  # absolute: gamma_low/high; quantile: per-class quantiles
    center: bool = True  # band on centered features (the mean target-training feature subtracted): pooled CNN
    #   features share one large direction that makes every raw cosine high (bench/filter_band.py: AUC 0.68 -> 0.74)
    gamma_low: float = Field(0.0, ge=-1.0, le=1.0)  # γ1: below it an image is unrelated to its parent target
    gamma_high: float = Field(0.5, ge=-1.0, le=1.0)  # γ2: above it an image is (nearly) the target class itself
    quantile_low: float = Field(0.1, ge=0.0, le=1.0)  # band_mode quantile: drop this share of least similar images
    quantile_high: float = Field(1.0, ge=0.0, le=1.0)  # band_mode quantile: and the share above this quantile
    leak: bool = True  # drop exact (SHA-256) and near duplicates of the targets' test images
    leak_threshold: float = Field(0.94, ge=0.0, le=1.0)  # feature cosine at or above it = a near duplicate (CLIP
    #   retrieval's default on CLIP features)
    dedup: bool = True  # drop exact duplicates across the auxiliary set and near duplicates within a class
    dedup_threshold: float = Field(0.97, ge=0.0, le=1.0)  # feature cosine of two images of one class = duplicates
    max_per_class: int | None = Field(None, ge=1)  # keep at most this many images per auxiliary class (most
    #   similar to its parent first when features exist, else manifest order); None = all
    min_per_class: int = Field(1, ge=1)  # an auxiliary class with fewer kept images is dropped entirely
    feature_model: str = "efficientnet_lite0"  # train.models name (or a timm name, e.g. vit_base_patch14_dinov2)
    feature_init: str = "pretrained"  # pretrained | a checkpoint path
    feature_image_size: int = Field(64, ge=16)  # input side of the feature model
    batch_size: int = Field(256, ge=1)  # images per feature batch
    device: str = "auto"  # auto: cuda when available (bf16), else cpu
    sheets: int = Field(6, ge=0)  # contact sheets (kept / rejected) for this many classes
    sheet_images: int = Field(24, ge=1)  # images per contact sheet
    data_dir: str | None = None  # offline data folder (protocol images); None: paths.resolve_data_dir()
    force: bool = False  # redo the stage even when a finished one with the same options exists

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if self.band and self.band_mode == "absolute" and self.gamma_low >= self.gamma_high:
            raise ConfigError(f"filter: gamma_low ({self.gamma_low}) must be below gamma_high ({self.gamma_high})")
        if self.band and self.band_mode == "quantile" and self.quantile_low >= self.quantile_high:
            raise ConfigError(f"filter: quantile_low ({self.quantile_low}) must be below quantile_high "
                              f"({self.quantile_high})")
        return self

    @property
    def needs_features(self) -> bool:
        return self.band or self.leak or self.dedup or (self.max_per_class is not None)

    def key_fields(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))

    @classmethod
    def keep_all(cls, **kw: object) -> FilterConfig:
        """Every rule off: all downloaded / referenced images are kept (how the README's protocol tables were run)."""
        return cls(caption=False, band=False, leak=False, dedup=False, **kw)  # type: ignore[arg-type]


__all__ = ["FilterConfig"]
