"""Published MTIL results: reading their accuracy matrices and the reference numbers.

Published matrices come as 11 x 11 (MTIL's tasks in training order) or 11 x 12 tables, the latter
with an extra CIFAR10 column that the 11-task protocol does not train on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .exceptions import DataError

__all__ = ["import_matrix", "PUBLISHED_ORDER1", "CIFAR10_COLUMN_ORDER1"]

# Column of CIFAR10 in the 12-column Order-I tables of ZSCL and MoE-Adapters:
# Aircraft, Caltech101, CIFAR10, CIFAR100, DTD, ...
CIFAR10_COLUMN_ORDER1 = 2

# Order-I full-shot Transfer / Avg / Last (percent) of earlier methods, as the MTIL literature
# quotes them from the methods' own papers. igsp does not re-measure these.
PUBLISHED_ORDER1 = {
    "zero-shot CLIP": (69.4, 65.3, 65.3),
    "ZSCL": (68.1, 75.4, 83.6),
    "MoE-Adapters": (68.9, 76.7, 85.0),
    "DIKI": (68.7, 76.3, 85.1),
}


def import_matrix(path: str | Path, drop_column: int = CIFAR10_COLUMN_ORDER1) -> np.ndarray:
    """Read a published accuracy matrix from CSV or ``.npy`` and return it as 11 x 11 (or T x T).

    A matrix with one more column than rows loses column ``drop_column`` (CIFAR10 in Order I).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Matrix file {str(path)!r} does not exist.")
    matrix = _read(path)
    if matrix.ndim != 2:
        raise DataError(f"{str(path)!r} contains a {matrix.ndim}-d array; expected a 2-d accuracy matrix.")
    rows, columns = matrix.shape
    if columns == rows + 1:
        if not 0 <= drop_column < columns:
            raise DataError(f"drop_column {drop_column} is outside the {columns} columns of {str(path)!r}.")
        matrix = np.delete(matrix, drop_column, axis=1)
    elif columns != rows:
        raise DataError(
            f"{str(path)!r} is {rows} x {columns}; expected a square matrix or one extra column "
            "(11 x 12 with CIFAR10)."
        )
    return matrix


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False).astype(float)
        except ValueError as error:
            raise DataError(f"{str(path)!r} is not a numeric .npy array: {error}.") from error
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return np.array([[float(cell) for cell in line.split(",")] for line in lines], dtype=float)
    except ValueError:
        pass
    try:
        return np.array([[float(cell) for cell in line.split(",")[1:]] for line in lines[1:]], dtype=float)
    except ValueError as error:
        raise DataError(
            f"{str(path)!r} is not a numeric CSV matrix (optionally with a header row and a label "
            f"column): {error}."
        ) from error
