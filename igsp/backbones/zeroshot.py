"""Zero-shot accuracy of a frozen backbone on each task of a stream, next to chance."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from igsp.backbone import Backbone
from igsp.data.task import Task, TaskStream

__all__ = ["ZeroShotResult", "class_text_embeddings", "zero_shot_accuracy", "zero_shot_table"]

logger = logging.getLogger(__name__)


@dataclass
class ZeroShotResult:
    """Zero-shot top-1 accuracy (percent) of one task, and the chance level ``100 / classes``."""

    task: str
    classes: int
    images: int
    accuracy: float
    chance: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def class_text_embeddings(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Return one unit-norm embedding per class: the mean over the templates' unit-norm embeddings."""
    rows = []
    for name in classnames:
        prompts = [template.format(name) for template in templates]
        embeddings = backbone.encode_texts(backbone.tokenize(prompts).to(backbone.device))
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows)


class _Transformed(Dataset):
    """The first ``count`` items of a task's test set, images transformed for the backbone."""

    def __init__(self, dataset: Dataset, transform: Callable, count: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


@torch.no_grad()
def zero_shot_accuracy(
    backbone: Backbone, task: Task, batch_size: int = 128, max_images: int | None = None, workers: int = 0
) -> ZeroShotResult:
    """Classify ``task.test`` by the nearest class text embedding with the frozen backbone.

    ``workers`` DataLoader processes transform the images; 0 transforms them in this process.
    """
    backbone.eval()
    classes = class_text_embeddings(backbone, task.classnames, task.templates)
    count = len(task.test) if max_images is None else min(max_images, len(task.test))
    loader = DataLoader(_Transformed(task.test, backbone.transform, count), batch_size=batch_size, num_workers=workers)
    correct = 0
    for images, labels in loader:
        predictions = (backbone.encode_images(images.to(backbone.device)) @ classes.T).argmax(dim=-1)
        correct += int((predictions == labels.to(backbone.device)).sum())
    accuracy = 100.0 * correct / max(count, 1)
    logger.info("Zero-shot accuracy on %s: %.2f%% over %d images.", task.name, accuracy, count)
    return ZeroShotResult(task.name, task.num_classes, count, round(accuracy, 2), round(100.0 / task.num_classes, 2))


def zero_shot_table(
    backbone: Backbone, stream: TaskStream, batch_size: int = 128, max_images: int | None = None, workers: int = 0
) -> list[ZeroShotResult]:
    """Return the zero-shot result of every task of ``stream``, in stream order."""
    return [zero_shot_accuracy(backbone, task, batch_size, max_images, workers) for task in stream]
