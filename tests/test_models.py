"""Models: uniform interface, forward/backward on CPU, offline EfficientNet-Lite0 weights, checkpoint init."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cifar_helpers import read_cifar_test_images
from safetensors.torch import save_file
from torch import nn

from neighborlt.errors import ConfigError, DataError
from neighborlt.train.models import MODELS, classifier_keys, create_model, model_normalization

# Registered models plus two small timm ones (a CNN and a ViT at 32 px); heavy timm models are left out.
SMALL_TIMM = ["resnet18", "vit_tiny_patch16_224"]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.mark.parametrize("name", MODELS.names() + SMALL_TIMM)
def test_forward_backward_interface(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, image_size=32)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    feats = model.forward_features(x)
    assert logits.shape == (4, 7)
    assert feats.shape == (4, model.num_features)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 7 and head.in_features == model.num_features
    # forward == classifier(forward_features) in eval mode (no dropout)
    model.eval()
    torch.testing.assert_close(model(x), head(model.forward_features(x)), rtol=1e-4, atol=1e-4)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 6]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert head.weight.grad.abs().sum() > 0
    w_key, b_key = classifier_keys(model)
    sd = model.state_dict()
    assert sd[w_key].shape == (7, model.num_features) and sd[b_key].shape == (7,)


def test_resnet32_is_the_cifar_resnet32() -> None:
    model = create_model("resnet32_cifar", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # 31 conv layers + the classifier (option-A shortcuts have no parameters)
    assert [c.out_channels for c in convs][::10] == [16, 16, 32, 64]
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.45e6 < n_params < 0.47e6  # 0.46M as reported by He et al. 2016, Table 6
    assert len([m for m in create_model("resnet8_cifar", 10).modules() if isinstance(m, nn.Conv2d)]) == 7


@pytest.fixture(scope="module")
def cifar_vehicles(data_dir):
    from neighborlt.data import as_array

    sub = read_cifar_test_images(data_dir / "cifar10.tar.gz", ["automobile", "ship", "airplane"], 20)
    assert len(sub) == 60
    return sub, as_array(sub, 128)


def test_efficientnet_lite0_offline_imagenet_weights(cifar_vehicles) -> None:
    """The packaged ImageNet weights really load: on real CIFAR vehicles (upscaled to 128 px) the ImageNet
    top-5 contains a matching vehicle class far above chance (measured 0.51; random weights: 0.0)."""
    from timm.data import ImageNetInfo

    sub, images = cifar_vehicles
    info = ImageNetInfo()
    desc = [info.index_to_description(i).lower() for i in range(1000)]
    keywords = {
        "automobile": ["sports car", "convertible", "cab,", "beach wagon", "racer", "minivan", "jeep", "limousine",
                       "car wheel", "grille", "model t", "ambulance", "police van", "pickup", "moving van",
                       "tow truck", "golfcart"],
        "ship": ["container ship", "liner", "fireboat", "speedboat", "yawl", "schooner", "catamaran", "trimaran",
                 "aircraft carrier", "pirate", "wreck", "lifeboat", "submarine", "dock", "canoe", "paddlewheel",
                 "drilling platform", "amphibian"],
        "airplane": ["airliner", "warplane", "wing", "airship", "space shuttle"],
    }
    allowed = {c: {i for i, d in enumerate(desc) if any(k in d for k in kws)} for c, kws in keywords.items()}
    mean, std = model_normalization("efficientnet_lite0")
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def hit_rate(model: nn.Module) -> float:
        with torch.no_grad():
            top5 = model.eval()(x).topk(5, dim=1).indices.tolist()
        return float(np.mean([bool(set(t) & allowed[sub.class_names[y]]) for t, y in zip(top5, sub.labels)]))

    pretrained = hit_rate(create_model("efficientnet_lite0", 1000, init="pretrained"))
    torch.manual_seed(0)
    random = hit_rate(create_model("efficientnet_lite0", 1000, init="random"))
    assert pretrained >= 0.35, pretrained
    assert random <= 0.1, random


def test_pretrained_with_other_class_count_reinitialises_classifier(caplog) -> None:
    ref = create_model("efficientnet_lite0", 1000, init="pretrained")
    with caplog.at_level(logging.INFO, logger="neighborlt.train.models"):
        m = create_model("efficientnet_lite0", 12, init="pretrained")
    assert "re-initialising the classifier" in caplog.text
    assert "no classifier in the checkpoint" not in caplog.text  # one message, not two that contradict
    assert m.get_classifier().out_features == 12
    torch.testing.assert_close(m.net._conv_head.weight, ref.net._conv_head.weight)


def test_checkpoint_init_safetensors_and_pt(tmp_path, caplog) -> None:
    torch.manual_seed(1)
    src = create_model("resnet8_cifar", 12)
    st = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(st))
    same = create_model("resnet8_cifar", 12, init=str(st))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    # A checkpoint with L + K = 12 rows into an L = 10 model: backbone kept, classifier re-initialised.
    with caplog.at_level(logging.INFO, logger="neighborlt.train.models"):
        fewer = create_model("resnet8_cifar", 10, init=str(st))
    assert "re-initialising the classifier" in caplog.text
    torch.testing.assert_close(fewer.conv1.weight, src.conv1.weight)
    assert fewer.fc.weight.shape == (10, 64)
    # torch files: a bare state dict or one under "model"
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, pt)
    torch.testing.assert_close(create_model("resnet8_cifar", 12, init=str(pt)).fc.weight, src.fc.weight)


def test_timm_checkpoint_without_wrapper_prefix(tmp_path) -> None:
    torch.manual_seed(2)
    raw = create_model("resnet18", 5).timm_model  # a plain timm state dict has no "timm_model." prefix
    path = tmp_path / "raw.pt"
    torch.save(raw.state_dict(), path)
    m = create_model("resnet18", 5, init=str(path))
    torch.testing.assert_close(m.timm_model.conv1.weight, raw.conv1.weight)


def test_bad_checkpoints_and_names(tmp_path) -> None:
    r32 = tmp_path / "r32.safetensors"
    save_file(create_model("resnet32_cifar", 10).state_dict(), str(r32))
    with pytest.raises(DataError, match=r"r32\.safetensors: checkpoint does not fit CifarResNet.*unexpected"):
        create_model("resnet8_cifar", 10, init=str(r32))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="junk.pt: cannot read checkpoint"):
        create_model("resnet8_cifar", 10, init=str(junk))
    with pytest.raises(DataError, match="checkpoint file not found"):
        create_model("resnet8_cifar", 10, init=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="neither one of random, pretrained"):
        create_model("resnet8_cifar", 10, init="imagenet")
    with pytest.raises(ConfigError, match="unknown model 'resnet_does_not_exist'.*efficientnet_lite0"):
        create_model("resnet_does_not_exist", 10)
    with pytest.raises(ConfigError, match="has no pretrained weights"):
        create_model("resnet32_cifar", 10, init="pretrained")


def test_timm_pretrained_offline_is_a_clear_error() -> None:
    """Without internet (HF_HUB_OFFLINE=1, set before huggingface_hub is imported) timm weights give one line."""
    code = (
        "from neighborlt.train.models import create_model\n"
        "from neighborlt.errors import ConfigError\n"
        "try:\n    create_model('resnet18', 2, init='pretrained')\n"
        "except ConfigError as e:\n    print('CONFIGERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert "CONFIGERROR cannot fetch timm pretrained weights for 'resnet18'" in out.stdout, out.stderr[-2000:]
