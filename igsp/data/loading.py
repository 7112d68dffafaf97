"""Turning task datasets into device-ready tensors and seeded batch orders."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..exceptions import DataError
from .task import Task

__all__ = ["TensorCache", "infinite_batches", "stack_dataset"]

logger = logging.getLogger(__name__)


def infinite_batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index batches over ``range(size)`` forever, reshuffling with ``generator`` each epoch.

    The last incomplete batch of an epoch is dropped unless the dataset is smaller than a batch.
    """
    if size == 0:
        raise DataError("Cannot draw training batches from an empty dataset.")
    while True:
        order = torch.randperm(size, generator=generator)
        if size <= batch_size:
            yield order
            continue
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform: Callable, task: Task, split: str) -> None:
        self.dataset = dataset
        self.transform = transform
        self.task = task
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        label = int(label)
        if not 0 <= label < self.task.num_classes:
            raise DataError(
                f"Item {index} of task {self.task.name!r} ({self.split}) has label {label}, outside "
                f"range(0, {self.task.num_classes}); the dataset and its class names disagree."
            )
        return self.transform(image), label


def stack_dataset(dataset: Dataset, transform: Callable, task: Task, split: str, num_workers: int = 0,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform every item of ``dataset`` and return ``(images, labels)`` as two tensors."""
    loader = DataLoader(_Transformed(dataset, transform, task, split), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise DataError(f"The {split} split of task {task.name!r} is empty.")
    return torch.cat(images), torch.cat(labels).long()


class TensorCache:
    """Transformed task splits kept on the CPU, built on first use.

    NOTE: every split is held in memory as float tensors, which suits the offline stream and
    few-shot MTIL; full-shot MTIL at 224 px needs tens of GiB this way.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def tensors(self, task: Task, split: str, transform: Callable, train_settings: Any,
                limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        key = (task.name, split)
        if key not in self._store:
            dataset = task.train if split == "train" else task.test
            if limit and len(dataset) > limit:
                generator = torch.Generator().manual_seed(0)
                indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
                dataset = torch.utils.data.Subset(dataset, indices)
            images, labels = stack_dataset(dataset, transform, task, split, train_settings.num_workers)
            logger.debug("Cached %d %s images of task %s.", labels.shape[0], split, task.name)
            self._store[key] = (images, labels)
        return self._store[key]

    def clear(self) -> None:
        self._store.clear()
