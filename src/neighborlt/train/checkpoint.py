"""Checkpoints that let a run continue exactly: model weights as safetensors plus the optimizer, scheduler,
sampler, loss and RNG state in ``checkpoint/last.pt``.

Layout under ``RUN/train/checkpoint/``::

    weights-e0003-s000000.safetensors   model weights at epoch 3, step 0 of that epoch
    last.pt                              {"weights": "<that file name>", "epoch": 3, "step": 0, ...}

Each weights file has a unique name and ``last.pt`` is replaced atomically *after* its weights file is
written, so an interruption at any moment leaves a consistent pair; older weights files are removed last.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import NeighborLTError
from ..rundir import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA = 1


def state_to_safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a state dict (cloned to contiguous CPU tensors, no shared storage) as safetensors bytes."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return st_save(flat, metadata=metadata or {})


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` to ``path`` as safetensors, atomically."""
    return atomic_write_bytes(path, state_to_safetensors_bytes(model.state_dict(), metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a CPU state dict.

    Raises:
        NeighborLTError: the file is missing or not a valid safetensors file.
    """
    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise NeighborLTError(f"{path}: weights file not found; re-run `neighborlt train`") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (any failure = bad file)
        raise NeighborLTError(f"{path}: not a valid safetensors file ({e}); delete it and re-run training") from None


def rng_state() -> dict[str, Any]:
    """Snapshot of the torch (CPU and CUDA), numpy and Python RNGs, as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write the weights and the training state of (epoch, step) so that training continues exactly.

    Args:
        ckpt_dir: ``RUN/train/checkpoint``.
        model: the (unwrapped) model.
        state: must hold ``epoch`` (the epoch being trained or about to start) and ``step`` (micro-batches of
            that epoch already done), plus optimizer/scheduler/sampler/loss/RNG state and the config key.

    Returns:
        The path of ``last.pt``.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"weights-e{int(state['epoch']):04d}-s{int(state['step']):06d}.safetensors"
    save_weights(ckpt_dir / name, model, {"epoch": str(state["epoch"]), "step": str(state["step"])})
    buf = io.BytesIO()
    torch.save({**state, "schema": CHECKPOINT_SCHEMA, "weights": name}, buf)
    last = atomic_write_bytes(ckpt_dir / "last.pt", buf.getvalue())
    for old in ckpt_dir.glob("weights-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.debug("checkpoint: epoch %s step %s -> %s", state["epoch"], state["step"], ckpt_dir)
    return last


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``last.pt`` and the weights it names.

    Returns:
        ``(model_state_dict, training_state)``.

    Raises:
        NeighborLTError: missing, unreadable or inconsistent checkpoint files.
    """
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    if not last.exists():
        raise NeighborLTError(f"{last}: no checkpoint to resume from; run without --resume")
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad checkpoint
        raise NeighborLTError(f"{last}: cannot read checkpoint ({e}); delete {ckpt_dir} and re-run") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA or "weights" not in state:
        raise NeighborLTError(f"{last}: not a neighborlt checkpoint (schema {CHECKPOINT_SCHEMA}); delete it")
    weights = load_weights(ckpt_dir / Path(str(state["weights"])).name)
    return weights, state


def has_checkpoint(ckpt_dir: str | Path) -> bool:
    """True when ``ckpt_dir/last.pt`` exists."""
    return (Path(ckpt_dir) / "last.pt").exists()
