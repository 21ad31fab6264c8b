"""Optimisers and the per-iteration cosine schedule with warm-up (timm.optim / timm.scheduler).

AdamW (betas 0.9/0.95, weight decay 0.05, layer-wise lr decay for ViTs) is the fine-tuning recipe; SGD with
momentum is the ResNet-32 from-scratch recipe. Norm and bias parameters (ndim <= 1) and a model's
``no_weight_decay()`` names get no weight decay.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, layer_decay: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.9) -> torch.optim.Optimizer:
    """Create the optimiser with weight-decay (and optionally layer-decay) parameter groups.

    Args:
        model: a model from :func:`neighborlt.train.models.create_model` (timm models are unwrapped so their
            ``group_matcher`` drives layer decay).
        name: ``"adamw"`` or ``"sgd"``.
        lr: base learning rate (scaled per group by ``lr_scale`` under layer decay; the scheduler applies it).
        weight_decay: decoupled (AdamW) or L2 (SGD) decay for weight matrices/kernels.
        layer_decay: BEiT-style layer-wise lr decay (e.g. 0.75): layer ``i`` of ``n`` gets
            ``lr * layer_decay ** (n - 1 - i)``; None disables it.
        betas: AdamW betas.
        momentum: SGD momentum (Nesterov off, as in the CIFAR-LT literature).

    Returns:
        A ``torch.optim.Optimizer``; with layer decay each group carries ``lr_scale``.

    Example:
        >>> from neighborlt.train.models import create_model
        >>> opt = build_optimizer(create_model("resnet8_cifar", 10), "sgd", lr=0.1, weight_decay=2e-4)
        >>> sorted(g["weight_decay"] for g in opt.param_groups)
        [0.0, 0.0002]
    """
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if lr <= 0 or weight_decay < 0:
        raise ConfigError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    target = getattr(model, "timm_model", model)
    kwargs: dict[str, Any] = {"betas": tuple(betas)} if name == "adamw" else {"momentum": momentum, "nesterov": False}
    opt = create_optimizer_v2(target, opt=name, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                              filter_bias_and_bn=True, **kwargs)
    logger.debug("optimizer %s: %d param groups", name, len(opt.param_groups))
    return opt


class IterationScheduler:
    """Cosine schedule with linear warm-up, stepped once per optimiser step (timm ``CosineLRScheduler``).

    The lr of iteration ``t`` (0-based, counted in optimiser steps) is
    ``base * t / W`` for ``t < W`` (W warm-up steps) and then
    ``min_lr + (base - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` up to ``T`` total steps, after which it
    stays at ``min_lr``; each group's ``lr_scale`` (layer decay) multiplies it. Call :meth:`step` after every
    ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0) -> None:
        from timm.scheduler import CosineLRScheduler

        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.num_updates = 0
        self._timm = CosineLRScheduler(
            optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr, warmup_t=warmup_steps,
            warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False, cycle_limit=1,
        )
        self._timm.step_update(0)

    def step(self) -> None:
        """Advance one optimiser step and set the next iteration's lr on every param group."""
        self.num_updates += 1
        self._timm.step_update(self.num_updates)

    def get_last_lr(self) -> list[float]:
        """The current lr of each param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "timm": self._timm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count and re-apply its lr to the optimiser."""
        self._timm.load_state_dict(state["timm"])
        self.num_updates = int(state["num_updates"])
        self._timm.step_update(self.num_updates)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                    min_lr: float = 0.0) -> IterationScheduler:
    """Per-iteration cosine schedule with linear warm-up.

    Args:
        optimizer: from :func:`build_optimizer` (its groups' ``initial_lr`` is the base lr).
        epochs: training epochs.
        steps_per_epoch: optimiser steps per epoch (after gradient accumulation).
        warmup_epochs: warm-up length in epochs (may be fractional).
        min_lr: final lr.

    Returns:
        An :class:`IterationScheduler` (``step()``, ``state_dict()``, ``load_state_dict()``, ``get_last_lr()``).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> s = build_scheduler(opt, epochs=10, steps_per_epoch=10, warmup_epochs=1)
        >>> s.get_last_lr(), [s.step() for _ in range(10)] and s.get_last_lr()
        ([0.0], [1.0])
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ConfigError(f"need epochs >= 1 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise ConfigError(f"warmup_epochs must be in 0..{epochs}, got {warmup_epochs}")
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    return IterationScheduler(optimizer, total, warmup, min_lr)
