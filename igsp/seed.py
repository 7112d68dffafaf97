"""Seeding of python, numpy and torch, per run and per task."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "task_seed", "rng_state", "set_rng_state"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def task_seed(seed: int, task_index: int) -> int:
    """Derive a task's seed from the run seed, so a task's randomness does not depend on earlier tasks."""
    digest = hashlib.sha256(f"{seed}:{task_index}".encode()).hexdigest()
    return int(digest[:8], 16)


def rng_state() -> dict[str, Any]:
    """Return the RNG states of python, numpy and torch (CPU, and CUDA when present)."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list[Any]:
    """Return numpy's state as plain data that ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states that :func:`rng_state` returned."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
