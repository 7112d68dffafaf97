"""Texture patches cut from scikit-image's CC0 photos, from disjoint train and test regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from igsp.data.sources.arrays import LabelledImages, resize_images
from igsp.exceptions import DataError

__all__ = ["TEXTURE_FILES", "PATCH_SIZE", "TRAIN_FRACTION", "read_texture", "cut_patches"]

TEXTURE_FILES = ("brick.png", "grass.png", "gravel.png")
PATCH_SIZE = 64
# Rows above this fraction of the photo's height feed train patches, rows below it test patches.
TRAIN_FRACTION = 0.75


def read_texture(path: Path) -> np.ndarray:
    """Read one texture photo as a grey uint8 array at least two patches high and one wide."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(
            f"Corrupt texture photo {path}: {error}. Reinstall it with: "
            "pip install --force-reinstall scikit-image"
        ) from error

    minimum = int(np.ceil(PATCH_SIZE / (1 - TRAIN_FRACTION)))
    if array.shape[0] < minimum or array.shape[1] < PATCH_SIZE:
        raise DataError(
            f"Texture photo {path} is {array.shape[1]}x{array.shape[0]} pixels, but cutting disjoint "
            f"train and test patches of {PATCH_SIZE} pixels needs at least {PATCH_SIZE}x{minimum}."
        )
    return array


def _patch_corners(
    first_row: int, last_row: int, width: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``count`` distinct top-left corners of patches that lie within rows first..last-1."""
    rows = last_row - first_row - PATCH_SIZE + 1
    columns = width - PATCH_SIZE + 1
    count = min(count, rows * columns)
    flat = rng.choice(rows * columns, size=count, replace=False)
    return np.stack([first_row + flat // columns, flat % columns], axis=1)


def cut_patches(
    photos: list[tuple[str, np.ndarray]],
    split: str,
    per_class: int,
    size: int,
    rng: np.random.Generator,
) -> LabelledImages:
    """Cut ``per_class`` random patches per photo from the train or the test region.

    Patches of one split may overlap each other, but no pixel of the test region (the bottom
    ``1 - TRAIN_FRACTION`` of each photo) appears in a train patch.
    """
    images, labels, ids = [], [], []
    for label, (name, photo) in enumerate(photos):
        boundary = int(photo.shape[0] * TRAIN_FRACTION)
        first, last = (0, boundary) if split == "train" else (boundary, photo.shape[0])
        for top, left in _patch_corners(first, last, photo.shape[1], per_class, rng):
            images.append(photo[top : top + PATCH_SIZE, left : left + PATCH_SIZE])
            labels.append(label)
            ids.append(f"{name}:y={top},x={left}")
    patches = resize_images(np.stack(images), size)
    return LabelledImages(patches, np.asarray(labels), np.asarray(ids))
