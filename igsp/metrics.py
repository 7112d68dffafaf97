"""Continual-learning metrics as pure functions of the accuracy matrix.

``matrix[t][i]`` is the accuracy on task ``i`` after training task ``t`` (both in training order),
in percent. Rows not yet filled (a partial run) are NaN and are ignored where that makes sense.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "as_matrix",
    "transfer",
    "average",
    "last",
    "backward_transfer",
    "forgetting",
    "per_task",
    "summary",
]


def as_matrix(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Return a float copy of a square accuracy matrix, checking its shape."""
    array = np.array(matrix, dtype=float)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ValueError(f"An accuracy matrix must be square and non-empty, got shape {array.shape}.")
    return array


def _filled_rows(array: np.ndarray) -> int:
    """Return the number of leading rows without NaN (tasks trained so far)."""
    for row in range(array.shape[0]):
        if np.isnan(array[row]).any():
            return row
    return array.shape[0]


def transfer(matrix) -> float:
    """Mean over tasks i >= 2 of the mean accuracy on task i before it was trained.

    This is MTIL's Transfer: it measures zero-shot ability kept on tasks not learned yet.
    """
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    values = [array[:min(i, rows), i].mean() for i in range(1, array.shape[0]) if min(i, rows) > 0]
    return float(np.mean(values)) if values else math.nan


def average(matrix) -> float:
    """MTIL's Avg: the mean of every filled entry (the mean over all T x T entries when complete)."""
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    return float(array[:rows].mean()) if rows else math.nan


def last(matrix) -> float:
    """MTIL's Last: the mean of the last filled row."""
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    return float(array[rows - 1].mean()) if rows else math.nan


def backward_transfer(matrix) -> float:
    """Mean over tasks i < T of ``a[T][i] - a[i][i]`` (negative values mean forgetting)."""
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    if rows < 2:
        return math.nan
    final = rows - 1
    return float(np.mean([array[final, i] - array[i, i] for i in range(final)]))


def forgetting(matrix) -> float:
    """Mean over tasks i < T of the drop from their best accuracy after training to the final one."""
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    if rows < 2:
        return math.nan
    final = rows - 1
    drops = [array[i:final, i].max() - array[final, i] for i in range(final)]
    return float(np.mean(drops))


def per_task(matrix) -> dict[str, list[float]]:
    """Return each task's Transfer, Avg and Last (the columns of a published MTIL table).

    Transfer is NaN for the first task, which has no accuracy before training.
    """
    array = as_matrix(matrix)
    rows = _filled_rows(array)
    size = array.shape[0]
    if rows == 0:
        return {"transfer": [math.nan] * size, "avg": [math.nan] * size, "last": [math.nan] * size}
    return {
        "transfer": [float(array[:min(i, rows), i].mean()) if min(i, rows) else math.nan for i in range(size)],
        "avg": [float(array[:rows, i].mean()) for i in range(size)],
        "last": [float(array[rows - 1, i]) for i in range(size)],
    }


def summary(matrix, per_task_decimals: int | None = None) -> dict[str, float]:
    """Return Transfer, Avg, Last, backward transfer and forgetting in one dict.

    Published MTIL tables round each task's value to one decimal before averaging over tasks, so
    ``per_task_decimals=1`` reproduces their numbers exactly (the sequential fine-tuning matrix
    has Avg 55.85 unrounded and 55.9 in print).
    """
    if per_task_decimals is None:
        return {
            "transfer": transfer(matrix),
            "avg": average(matrix),
            "last": last(matrix),
            "bwt": backward_transfer(matrix),
            "forgetting": forgetting(matrix),
        }
    columns = per_task(matrix)
    rounded = {
        name: float(np.nanmean(np.round(values, per_task_decimals)))
        for name, values in columns.items()
        if not np.isnan(values).all()
    }
    return {
        "transfer": rounded.get("transfer", math.nan),
        "avg": rounded.get("avg", math.nan),
        "last": rounded.get("last", math.nan),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }
