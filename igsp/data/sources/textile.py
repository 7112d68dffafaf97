"""Simulated textile images of conformal-clip-data: one folder of JPEG files per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from igsp.data.sources.arrays import LabelledImages
from igsp.exceptions import DataError

__all__ = ["TEXTILE_FOLDERS", "list_textile_files", "decode_textile_files"]

# Class folders in label order: nominal, local defect, global defect.
TEXTILE_FOLDERS = ("nominal", "local", "global")
_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def list_textile_files(root: Path) -> tuple[list[Path], np.ndarray]:
    """Return the image files under ``root/<class folder>/`` (sorted by name) and their labels."""
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(TEXTILE_FOLDERS):
        members = sorted(
            path for path in (root / folder).iterdir() if path.suffix.lower() in _EXTENSIONS
        )
        if not members:
            raise DataError(
                f"The textile folder {root / folder} has no images. Reinstall it with: "
                "pip install --force-reinstall conformal-clip-data"
            )
        files.extend(members)
        labels.extend([label] * len(members))
    return files, np.asarray(labels, dtype=np.int64)


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            # JPEG draft mode decodes at a reduced scale that is still at least ``size``.
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"Corrupt textile image {path}: {error}.") from error
    return np.asarray(rgb)


def decode_textile_files(files: list[Path], labels: np.ndarray, size: int) -> LabelledImages:
    """Decode the given files into ``(N, size, size, 3)`` uint8 images."""
    images = np.stack([_decode(path, size) for path in files])
    ids = np.asarray([f"{path.parent.name}/{path.name}" for path in files])
    return LabelledImages(images, labels, ids)
