"""Classifier re-training (cRT; Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020, https://arxiv.org/abs/1910.09217): keep the trained backbone fixed and learn a new
target-only classifier (L rows) with class-balanced sampling.

This is the alternative to the *direct classifier* (dropping the auxiliary rows) that the paper's ablation
compares against. The backbone is frozen, so its features of the target training images are computed once
(eval transform, no augmentation) and the linear classifier is trained on them; this keeps cRT to seconds on
CPU. Output: ``RUN/train/crt/{model.safetensors, model.json}`` with ``num_classes`` = L.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..defaults import SHOT_THRESHOLDS
from ..metrics import target_accuracy
from ..rundir import atomic_write_json
from . import checkpoint as ckpt
from .inference import build_from_meta, image_batches, tensor_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def backbone_features(model: nn.Module, inputs: Any, *, image_size: int, batch_size: int, device: torch.device,
                      num_workers: int | None = 0, model_name: str | None = None, data_mode: str = "cache",
                      crop_pct: float | None = None) -> torch.Tensor:
    """Pooled features ``model.forward_features`` of an ImageSet (eval transform) or of a feature tensor.

    Args:
        model: a trained model (``forward_features`` -> [B, D]).
        inputs: an ImageSet, or a float tensor [N, F] for frozen-feature heads.
        image_size: input side in pixels (images only).
        batch_size: images per batch.
        device: where to run.
        num_workers: DataLoader workers (images only).
        model_name: the architecture, for its input normalisation (None: ImageNet statistics).
        data_mode: ``cache`` or ``stream``: the model's evaluation view (:func:`~neighborlt.train.inference.
            image_batches`); crop_pct: its centre-crop share (stream).

    Returns:
        float32 CPU tensor [N, D].
    """
    model.eval().to(device)
    batches = (tensor_batches(inputs, batch_size) if isinstance(inputs, torch.Tensor)
               else image_batches(inputs, image_size, batch_size, num_workers, model_name, data_mode=data_mode,
                                  crop_pct=crop_pct, device=device))
    out = [model.forward_features(x.to(device)).float().cpu() for x in batches]  # type: ignore[operator]
    return torch.cat(out)


def train_balanced_classifier(feats: torch.Tensor, labels: np.ndarray, num_classes: int, *, epochs: int, lr: float,
                              weight_decay: float, batch_size: int, seed: int) -> nn.Linear:
    """Train a linear classifier on fixed features with class-balanced sampling and cross-entropy.

    Args:
        feats: float [N, D] features.
        labels: int64 [N] in ``0..num_classes-1``.
        num_classes: L.
        epochs: passes over ``N`` class-balanced draws.
        lr: SGD learning rate (momentum 0.9, cosine to 0).
        weight_decay: L2 on the weight.
        batch_size: samples per step.
        seed: seeds the classifier init and the sampler.

    Returns:
        The trained ``nn.Linear(D, num_classes)``.
    """
    from .optim import build_scheduler
    from .samplers import build_sampler

    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    fc = nn.Linear(feats.shape[1], num_classes)
    torch.set_rng_state(gen_state)
    sampler = build_sampler("class_balanced", labels, seed=seed)
    steps = max(1, len(sampler) // batch_size)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = build_scheduler(opt, epochs, steps, 0.0)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    ce = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        idx = torch.from_numpy(sampler.rank_indices(epoch))
        for s in range(steps):
            b = idx[s * batch_size:(s + 1) * batch_size]
            loss = ce(fc(feats[b]), lab[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return fc.eval()


def run_crt(cfg: Any, model: nn.Module, meta: dict[str, Any], aux: Any, test: Any, train_x: torch.Tensor | None,
            test_x: torch.Tensor | None, out_dir: Path, device: torch.device,
            train_counts: np.ndarray,
            thresholds: tuple[int, int] = SHOT_THRESHOLDS) -> tuple[Path, dict[str, float | None]]:
    """Re-train a target-only classifier on the frozen backbone of ``model`` and write it to ``out_dir``.

    Args:
        cfg: the run's :class:`~neighborlt.train.config.TrainConfig` (``crt_epochs``, ``crt_lr``, ...).
        model: the jointly trained model (L + K outputs); left unchanged.
        meta: its ``model.json`` dict.
        aux: the AuxTrainingSet (targets are classes ``0..L-1``).
        test: the target test ImageSet.
        train_x: frozen-feature inputs of ``aux.train`` (frozen protocol) or None (images).
        test_x: frozen-feature inputs of ``test`` or None.
        out_dir: ``RUN/train/crt``.
        device: where to compute features.
        train_counts: target train counts (for the shot groups).
        thresholds: the protocol's (many, few) shot thresholds.

    Returns:
        ``(path of crt/model.safetensors, test metrics in %)``.
    """
    L = int(aux.num_target)
    tgt = np.flatnonzero(np.asarray(aux.train.labels) < L)
    labels = np.asarray(aux.train.labels)[tgt]
    if train_x is not None:
        f_train = backbone_features(model, train_x[torch.from_numpy(tgt)], image_size=cfg.image_size,
                                    batch_size=cfg.eval_batch_size, device=device)
        f_test = backbone_features(model, test_x, image_size=cfg.image_size, batch_size=cfg.eval_batch_size,
                                   device=device)
    else:  # the run's evaluation view, in resumable chunks under RUN/train/crt/features (fp32, as before)
        from .data import resolve_data_mode
        from .features import extract_model_features

        def feats(images: Any) -> torch.Tensor:
            f = extract_model_features(model, cfg.model, images, cfg.image_size, init="trained",
                                       folder=out_dir / "features", batch_size=cfg.eval_batch_size,
                                       device=str(device), bf16=False, num_workers=cfg.num_workers,
                                       data_mode=resolve_data_mode(cfg.data_mode, cfg.image_size))
            return torch.from_numpy(np.array(f, dtype=np.float32))

        f_train, f_test = feats(aux.train.subset(tgt)), feats(test)
    fc = train_balanced_classifier(f_train, labels, L, epochs=cfg.crt_epochs, lr=cfg.crt_lr,
                                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=cfg.seed)
    new_meta = {**meta, "num_classes": L, "class_names": meta["class_names"][:L],
                "class_ids": meta["class_ids"][:L], "classifier_mode": "retrain"}
    new_model = build_from_meta(new_meta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    wkey, bkey = meta["classifier"]["weight"], meta["classifier"]["bias"]
    state[wkey], state[bkey] = fc.weight.detach().clone(), fc.bias.detach().clone()
    new_model.load_state_dict(state)
    with torch.no_grad():
        logits = fc(f_test).numpy()
    metrics = target_accuracy(logits, np.asarray(test.labels), L, train_counts, thresholds)
    path = ckpt.save_weights(out_dir / "model.safetensors", new_model)
    atomic_write_json(out_dir / "model.json", {**new_meta, "crt": {"epochs": cfg.crt_epochs, "lr": cfg.crt_lr},
                                              "test": metrics})
    log.info("cRT classifier (%d classes, %d epochs): test %s", L, cfg.crt_epochs, metrics)
    return path, metrics
