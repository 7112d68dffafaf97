"""Tasks and streams: the unit of continual learning and their ordered sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch.utils.data import Dataset

__all__ = ["Task", "TaskStream", "validate_labels"]


@dataclass
class Task:
    """One image-classification task of a stream.

    ``train`` and ``test`` are map-style datasets whose items are ``(image, label)`` pairs, where
    ``image`` is a ``PIL.Image.Image`` and ``label`` an ``int`` in ``range(len(classnames))``.
    The backbone's own transform is applied by the learner, so datasets return raw images.
    ``templates`` contain ``{}`` where the class name goes; training uses ``templates[0]``,
    evaluation averages the text embeddings over all of them.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    test: Dataset
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Task name must be a non-empty string.")
        if len(self.classnames) < 2:
            raise ValueError(
                f"Task {self.name!r} has {len(self.classnames)} class name(s); "
                "a classification task needs at least 2."
            )
        if len(set(self.classnames)) != len(self.classnames):
            raise ValueError(f"Task {self.name!r} has duplicate class names: {self.classnames}.")
        if not self.templates:
            raise ValueError(f"Task {self.name!r} has no prompt templates.")
        for template in self.templates:
            if "{}" not in template:
                raise ValueError(
                    f"Template {template!r} of task {self.name!r} has no '{{}}' placeholder "
                    "for the class name."
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, template_index: int | None = None) -> list[list[str]]:
        """Return, per class, its prompts: all templates, or only ``templates[template_index]``."""
        templates = self.templates if template_index is None else [self.templates[template_index]]
        return [[template.format(name) for template in templates] for name in self.classnames]


@dataclass
class TaskStream:
    """An ordered sequence of tasks with unique names."""

    name: str
    tasks: list[Task]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"Stream {self.name!r} contains no tasks.")
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Stream {self.name!r} has duplicate task names: {duplicates}.")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def select(self, names: Sequence[str]) -> "TaskStream":
        """Return a stream with only the named tasks, in the given order."""
        by_name = {task.name: task for task in self.tasks}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise KeyError(
                f"Tasks {missing} are not in stream {self.name!r}; available: {self.task_names}."
            )
        return TaskStream(self.name, [by_name[name] for name in names], dict(self.metadata))


def validate_labels(task_name: str, labels: Sequence[int], num_classes: int) -> None:
    """Raise ``ValueError`` if any label lies outside ``range(num_classes)``."""
    bad = sorted({int(label) for label in labels if not 0 <= int(label) < num_classes})
    if bad:
        raise ValueError(
            f"Task {task_name!r} has labels {bad[:10]} outside range(0, {num_classes}); "
            "the class name list and the labels disagree. Check the class count of the source."
        )
