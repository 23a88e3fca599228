"""The resumable checkpoint: model, optimizer, scheduler, fp16 loss scaler, epoch and every RNG state,
written atomically.

It holds tensors and plain Python values only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sceneml.errors import SceneMLError


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as plain lists/ints so torch.load(weights_only=True) can read it back
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, extra: dict,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the resumable state atomically: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # fp16's loss scale, grown and shrunk over the run: a resume that restarted it at 65536 would
        # skip steps on overflow until it had shrunk again, and differ from a run that never stopped
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "rng": rng_state(),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch says "file write failed" for a full disk
        tmp.unlink(missing_ok=True)
        raise SceneMLError(f"cannot write the checkpoint {path} ({str(exc).splitlines()[0]}): free disk space "
                           "there or point SCENEML_CACHE at another disk") from None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_checkpoint(state: dict, model: nn.Module, optimizer, scheduler,
                       scaler: torch.amp.GradScaler | None = None) -> int:
    """Put a loaded checkpoint's states back (RNGs included); returns the epoch it was saved after."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["epoch"])
