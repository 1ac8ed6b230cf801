"""Atomic save and exact resume: unwrapped modules, optimizer, step, RNG and sampler state."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from fastbyol import InputError


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary name, fsync, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path, map_location="cpu") -> dict:
    if not path.exists():
        raise InputError(f"no checkpoint at {path}")
    try:
        # Our own files: they hold config dicts and RNG states besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"{path}: not a readable fastbyol checkpoint ({exc})") from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= state.keys():
        raise InputError(f"{path}: not a fastbyol training checkpoint (a torch file without its "
                         "model, optimizer, step and config)")
    return state
