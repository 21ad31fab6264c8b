"""Optimisers (weight-decay and layer-decay groups) and the per-iteration warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from neighborlt.errors import ConfigError
from neighborlt.train.models import create_model
from neighborlt.train.optim import build_optimizer, build_scheduler


def expected_lr(t: int, base: float, total: int, warmup: int, min_lr: float) -> float:
    if t < warmup:
        return base * t / warmup
    if t >= total:
        return min_lr
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup_epochs,min_lr", [(2, 0.0), (0, 1e-3), (0.5, 0.01)])
def test_schedule_values(warmup_epochs: float, min_lr: float) -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = build_scheduler(opt, epochs=10, steps_per_epoch=7, warmup_epochs=warmup_epochs, min_lr=min_lr)
    warmup = round(warmup_epochs * 7)
    for t in range(75):  # beyond the end: stays at min_lr
        assert sched.get_last_lr()[0] == pytest.approx(expected_lr(t, 0.4, 70, warmup, min_lr), abs=1e-12), t
        opt.step()
        sched.step()


def test_schedule_state_dict_round_trip() -> None:
    def make() -> tuple[torch.optim.Optimizer, object]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
        return opt, build_scheduler(opt, epochs=5, steps_per_epoch=10, warmup_epochs=1, min_lr=1e-5)

    _opt_a, a = make()
    for _ in range(23):
        a.step()
    state = a.state_dict()
    _opt_b, b = make()
    b.load_state_dict(state)
    assert b.get_last_lr() == a.get_last_lr()
    for _ in range(30):
        a.step()
        b.step()
        assert b.get_last_lr() == a.get_last_lr()
    assert a.get_last_lr()[0] == pytest.approx(1e-5)


def test_sgd_resnet32_no_decay_on_norm_and_bias() -> None:
    model = create_model("resnet32_cifar", 10)
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=2e-4)
    assert isinstance(opt, torch.optim.SGD)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 else 2e-4), name
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in opt.param_groups)


def test_adamw_betas_and_wd() -> None:
    opt = build_optimizer(create_model("resnet8_cifar", 10), "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_vit_layer_decay_groups_and_scheduled_lr() -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 5, image_size=32)
    vit = model.timm_model
    depth = len(vit.blocks)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    n_layers = depth + 2  # embeddings, blocks, head
    assert sorted({round(s, 10) for s in scale_of.values()}) == sorted(
        round(0.75 ** (n_layers - 1 - i), 10) for i in range(n_layers))
    assert scale_of[id(vit.head.weight)] == 1.0
    assert scale_of[id(vit.pos_embed)] == pytest.approx(0.75 ** (n_layers - 1))
    assert scale_of[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.75 ** depth)
    assert scale_of[id(vit.blocks[-1].mlp.fc1.weight)] == pytest.approx(0.75)
    assert decay_of[id(vit.pos_embed)] == 0.0 and decay_of[id(vit.cls_token)] == 0.0  # no_weight_decay()
    assert decay_of[id(vit.blocks[0].norm1.weight)] == 0.0 and decay_of[id(vit.blocks[0].attn.qkv.bias)] == 0.0
    assert decay_of[id(vit.blocks[0].attn.qkv.weight)] == 0.05
    # the scheduler multiplies each group's lr by its scale
    sched = build_scheduler(opt, epochs=2, steps_per_epoch=4, warmup_epochs=1)
    for _ in range(4):
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_bad_optimizer_arguments() -> None:
    model = create_model("resnet8_cifar", 10)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'; choose one of: adamw, sgd"):
        build_optimizer(model, "adam", lr=1e-3, weight_decay=0.0)
    with pytest.raises(ConfigError, match="layer_decay"):
        build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0, layer_decay=1.5)
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_scheduler(opt, epochs=2, steps_per_epoch=3, warmup_epochs=3)
