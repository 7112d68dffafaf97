"""A procedurally drawn stream for tests and smoke runs: learnable in a few steps, no installs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .task import Task, TaskStream

__all__ = ["build_synthetic_stream", "SYNTHETIC_TASKS"]


class _DrawnImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def _draw_colors(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    image[..., label] = np.clip(image[..., label] + 160, 0, 255)
    return image


def _draw_stripes(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    period = int(rng.integers(3, 6))
    line = ((np.arange(size) // period) % 2 * 200).astype(np.uint8)
    pattern = np.tile(line, (size, 1)) if label == 0 else np.tile(line[:, None], (1, size))
    noise = rng.integers(0, 50, (size, size)).astype(np.uint8)
    return np.repeat((pattern + noise)[..., None], 3, axis=2)


def _draw_quadrants(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    image = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
    half = size // 2
    row, column = divmod(label, 2)
    image[row * half:(row + 1) * half, column * half:(column + 1) * half] += 180
    return image


SYNTHETIC_TASKS = {
    "colors": (_draw_colors, ["red", "green", "blue"], ["a photo that is mostly {}.", "a {} picture."]),
    "stripes": (_draw_stripes, ["vertical stripes", "horizontal stripes"], ["a pattern of {}.", "a texture with {}."]),
    "quadrants": (
        _draw_quadrants,
        ["top left", "top right", "bottom left", "bottom right"],
        ["a bright square in the {} corner.", "a patch at the {}."],
    ),
}


def _draw_split(draw, num_classes: int, per_class: int, size: int, rng: np.random.Generator) -> _DrawnImages:
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.stack([draw(int(label), size, rng) for label in labels])
    return _DrawnImages(images, labels)


def build_synthetic_stream(
    tasks: Sequence[str] | None = None,
    train_per_class: int = 32,
    test_per_class: int = 16,
    image_size: int = 32,
    seed: int = 0,
) -> TaskStream:
    """Return a stream of drawn tasks (colors, stripes, quadrants by default)."""
    names = list(tasks) if tasks else list(SYNTHETIC_TASKS)
    unknown = [name for name in names if name not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"Unknown synthetic tasks {unknown}; available: {sorted(SYNTHETIC_TASKS)}.")
    built = []
    for offset, name in enumerate(names):
        draw, classnames, templates = SYNTHETIC_TASKS[name]
        rng = np.random.default_rng([seed, offset])
        train = _draw_split(draw, len(classnames), train_per_class, image_size, rng)
        test = _draw_split(draw, len(classnames), test_per_class, image_size, rng)
        built.append(Task(name, list(classnames), list(templates), train, test, {"source": "drawn"}))
    return TaskStream("synthetic", built)
