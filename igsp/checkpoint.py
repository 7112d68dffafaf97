"""Checkpoint files written at task boundaries: added parameters and plain state only."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .exceptions import CheckpointError

__all__ = ["FILENAME", "FORMAT_VERSION", "save", "load", "settings_to_dict"]

logger = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "task_index", "task_names", "structure", "added_state", "plugin_state", "results", "rng", "settings")


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` to a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("Wrote checkpoint %s (after task %d).", path, payload["task_index"] + 1)
    return path


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, checking its format."""
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {str(path)!r}; a run folder gets one after its first task.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Checkpoint {str(path)!r} cannot be read ({error!r}); it may be truncated or not an igsp checkpoint.") from error
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"Checkpoint {str(path)!r} lacks {missing}; it was not written by igsp.")
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format {payload['format']}, this igsp reads format {FORMAT_VERSION}."
        )
    return payload


def settings_to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)
