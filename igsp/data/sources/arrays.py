"""Labelled uint8 image arrays: de-duplication, resizing and per-class splits."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from igsp.exceptions import DataError

__all__ = [
    "LabelledImages",
    "drop_duplicates",
    "resize_images",
    "source_rng",
    "split_per_class",
    "select_per_class",
]


@dataclass
class LabelledImages:
    """Images as one uint8 array, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, with labels and ids.

    ``ids`` name each image's origin in its source (row, file or position), so that splits can
    be checked and reported.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"Images must be a uint8 array of shape (N, H, W) or (N, H, W, 3), got "
                f"{self.images.dtype} {self.images.shape}."
            )
        if self.images.ndim == 4 and self.images.shape[3] != 3:
            raise ValueError(f"RGB images must have 3 channels, got shape {self.images.shape}.")
        if not len(self.images) == len(self.labels) == len(self.ids):
            raise ValueError(
                f"Images, labels and ids differ in length: {len(self.images)}, "
                f"{len(self.labels)}, {len(self.ids)}."
            )
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=str)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "LabelledImages":
        return LabelledImages(self.images[indices], self.labels[indices], self.ids[indices])

    def relabel(self, labels: np.ndarray) -> "LabelledImages":
        """Return the same images (shared, not copied) with other labels."""
        return LabelledImages(self.images, labels, self.ids)


def drop_duplicates(pool: LabelledImages) -> tuple[LabelledImages, int]:
    """Keep the first copy of each repeated image, and drop every copy of one with two labels.

    Returns the reduced pool and the number of images dropped. Without this step a split by
    index could put the same pixels in train and test.
    """
    first_index: dict[bytes, int] = {}
    labels_of: dict[bytes, set[int]] = {}
    digests = []
    for index, (image, label) in enumerate(zip(pool.images, pool.labels)):
        digest = hashlib.sha1(image.tobytes()).digest()
        digests.append(digest)
        first_index.setdefault(digest, index)
        labels_of.setdefault(digest, set()).add(int(label))

    keep = [
        index
        for index, digest in enumerate(digests)
        if first_index[digest] == index and len(labels_of[digest]) == 1
    ]
    return pool.subset(np.asarray(keep, dtype=np.int64)), len(pool) - len(keep)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize every image to ``size x size`` with Pillow's bicubic filter (antialiased)."""
    if images.shape[1:3] == (size, size):
        return images
    shape = (len(images), size, size) + images.shape[3:]
    resized = np.empty(shape, dtype=np.uint8)
    for index, image in enumerate(images):
        resized[index] = np.asarray(
            Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
        )
    return resized


def source_rng(seed: int, key: str) -> np.random.Generator:
    """Return a generator that depends only on ``seed`` and ``key``, never on global RNG state."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _split_sizes(available: int, train_cap: int, test_cap: int) -> tuple[int, int]:
    """Return the ``(train, test)`` counts of a class, keeping the caps' ratio for a short class."""
    if available >= train_cap + test_cap:
        return train_cap, test_cap
    test = round(available * test_cap / (train_cap + test_cap))
    test = min(test_cap, max(1, test))
    return min(train_cap, available - test), test


def split_per_class(
    labels: np.ndarray,
    num_classes: int,
    train_cap: int,
    test_cap: int,
    rng: np.random.Generator,
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Split one pool into disjoint train and test indices, at most the caps per class.

    Each class is shuffled by ``rng``, its first images go to test and the next ones to train,
    so train and test never share an index. Both index arrays come back sorted.
    """
    train_parts, test_parts = [], []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise DataError(
                f"Class {label} of {source} has {len(members)} image(s), but a train/test split "
                "needs at least 2. The source is incomplete: reinstall it."
            )
        order = rng.permutation(members)
        train_count, test_count = _split_sizes(len(members), train_cap, test_cap)
        test_parts.append(order[:test_count])
        train_parts.append(order[test_count : test_count + train_count])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def select_per_class(
    labels: np.ndarray,
    num_classes: int,
    cap: int,
    rng: np.random.Generator,
    source: str,
) -> np.ndarray:
    """Pick at most ``cap`` random indices per class from one split of a source (sorted)."""
    parts = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) == 0:
            raise DataError(f"Class {label} has no images in {source}. Reinstall the source.")
        parts.append(rng.permutation(members)[:cap])
    return np.sort(np.concatenate(parts))
