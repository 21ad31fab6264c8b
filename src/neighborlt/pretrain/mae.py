"""A masked autoencoder (He et al., CVPR 2022) around a timm ``VisionTransformer``, as facebookresearch/mae's
``models_mae.py`` builds it (the model LiVT pre-trains with: XuZhengzhuo/LiVT ``models/mae.py`` is the same file).

Choice: our own ~150 lines on timm's blocks rather than ``lightly``. ``lightly`` has MAE building blocks for timm
ViTs, but it pulls in ``pytorch_lightning`` and ``hydra-core`` for a model that is one encoder pass over the kept
tokens, a small decoder and a masked MSE; the reference code itself is written on timm's ``Block``. Following it
line by line keeps the recipe LiVT reports (random masking by argsort of noise, fixed 2-D sin-cos position
embeddings, the ``norm_pix_loss`` target, xavier initialisation) and, above all, makes the *encoder* the very
timm ``VisionTransformer`` that fine-tuning builds: its ``state_dict`` minus the classifier is the
``encoder.safetensors`` that ``neighborlt train --init`` loads, key for key, with no conversion.

Differences from ``models_mae.py``: the encoder's modules are timm's own (``patch_embed``, ``cls_token``,
``pos_embed``, ``norm_pre``, ``blocks``, ``norm``), not copies, so any timm ViT with a class token and no register
tokens works; the masking noise is an argument (drawn by the caller from its seeded generator).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """MAE's fixed 2-D sine-cosine position embedding ``[(1 +) grid_size**2, embed_dim]`` (``util/pos_embed.py``:
    half the dimensions encode the row, half the column; the class token's row is zeros).

    Example:
        >>> sincos_2d(8, 2).shape
        (5, 8)
    """
    if embed_dim % 4:
        raise ConfigError(f"the sin-cos position embedding needs an embedding width divisible by 4, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w goes first

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def check_vit(vit: nn.Module, name: str) -> None:
    """One line when ``vit`` is not a timm ViT that MAE can mask (patch tokens + one class token, no registers)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"MAE pre-training needs a ViT (timm VisionTransformer); model {name!r} is a "
                          f"{type(vit).__name__}: choose e.g. vit_base_patch16_224 or vit_tiny_patch4_32")
    if vit.cls_token is None or getattr(vit, "num_prefix_tokens", 1) != 1 or vit.pos_embed is None \
            or getattr(vit, "no_embed_class", False) or getattr(vit, "dynamic_img_size", False):
        raise ConfigError(f"MAE pre-training needs a ViT with one class token, a learned position embedding that "
                          f"covers it and a fixed image size; {name!r} differs: choose e.g. vit_base_patch16_224")
    gh, gw = vit.patch_embed.grid_size
    if gh != gw:
        raise ConfigError(f"MAE pre-training needs a square patch grid; {name!r} has {gh} x {gw}")


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ViT encoder (``models_mae.MaskedAutoencoderViT``).

    Args:
        encoder: a timm ``VisionTransformer`` (its classifier is not used).
        decoder_dim: decoder width (MAE/LiVT ViT-B: 512).
        decoder_depth: decoder blocks (8).
        decoder_heads: decoder attention heads (16).
        mask_ratio: share of patches removed (0.75).
        norm_pix_loss: regress per-patch normalised pixels (LiVT: True).

    ``forward(images, noise)`` returns ``(loss, pred [N, L, p*p*3], mask [N, L])``; ``noise`` ``[N, L]`` in [0, 1)
    decides the masking (the smallest ``L * (1 - mask_ratio)`` are kept).
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = False) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.encoder: Any = encoder
        for name in ("fc_norm", "attn_pool", "head", "head_drop"):  # pooling and classifier: unused by MAE (frozen,
            mod = getattr(encoder, name, None)  # so DDP does not wait for their gradients; fine-tuning trains them)
            if isinstance(mod, nn.Module):
                mod.requires_grad_(False)
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        embed_dim = int(encoder.embed_dim)
        num_patches = int(encoder.patch_embed.num_patches)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        norm_layer = type(encoder.norm) if isinstance(encoder.norm, nn.LayerNorm) else nn.LayerNorm
        eps = encoder.norm.eps if isinstance(encoder.norm, nn.LayerNorm) else 1e-6

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=partial(norm_layer, eps=eps))
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3, bias=True)
        self._initialize()

    def _initialize(self) -> None:
        """``initialize_weights`` of models_mae.py: fixed sin-cos position embeddings, xavier patch embedding and
        linear layers, N(0, 0.02) class and mask tokens, unit LayerNorms."""
        enc = self.encoder
        grid = int(enc.patch_embed.grid_size[0])
        enc.pos_embed.data.copy_(torch.from_numpy(sincos_2d(enc.pos_embed.shape[-1], grid)).float().unsqueeze(0))
        enc.pos_embed.requires_grad_(False)  # fixed during pre-training (fine-tuning learns it, as in MAE)
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], grid)).float().unsqueeze(0))
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # -- models_mae.py, method by method -------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, L, p*p*3]``."""
        p = self.patch_size
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p**2 * 3)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the ``L * (1 - mask_ratio)`` patches of smallest noise; returns (kept tokens, mask [N, L] with 1 =
        removed, ids_restore)."""
        N, L, D = x.shape
        len_keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(x)
        x = x + enc.pos_embed[:, 1:, :]  # add pos embed w/o cls token
        x, mask, ids_restore = self.random_masking(x, noise)
        cls_token = enc.cls_token + enc.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = enc.norm_pre(x)  # Identity for the standard ViT (timm keeps it for CLIP-style pre-norm)
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # remove cls token

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (per-patch normalised pixels with ``norm_pix_loss``)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred.float(), mask), pred, mask

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights without its classifier (``head.*``): what ``train --init`` loads."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("head.")}
