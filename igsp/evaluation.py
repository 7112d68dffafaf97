"""Task-agnostic evaluation of the whole stream after each task.

For every test batch, one frozen forward pass gives the features that the task selector reads and
the zero-shot prediction for samples that fall back to the frozen backbone. One routed pass, with
each sample sent through the experts of its selected task, predicts the others. Class text features are
computed once per (evaluated task, route) in each evaluation round.

Under torchrun each rank evaluates a contiguous part of every test set and the correct, selected
and fallback counts are summed over the ranks, so every rank ends with the same row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import distributed
from .backbone import Routes

if TYPE_CHECKING:
    from .learner import ContinualLearner

__all__ = ["Evaluator", "RouteTable", "route_table"]

logger = logging.getLogger(__name__)


class Evaluator:
    """Fills one row of the accuracy matrix and the selector statistics after each task."""

    def __init__(self, learner: ContinualLearner) -> None:
        self.learner = learner
        self.zero_shot_text: dict[int, torch.Tensor] = {}
        self.routed_text: dict[tuple[int, str], torch.Tensor] = {}

    def text_features(self, task_index: int, route: str | None) -> torch.Tensor:
        learner = self.learner
        if route is None:
            if task_index not in self.zero_shot_text:
                self.zero_shot_text[task_index] = learner.class_text_features(learner.task(task_index), None)
            return self.zero_shot_text[task_index]
        key = (task_index, route)
        if key not in self.routed_text:
            self.routed_text[key] = learner.class_text_features(learner.task(task_index), route)
        return self.routed_text[key]

    @torch.no_grad()
    def evaluate_stream(self, after_task: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Return the accuracy row (percent per task) and, per task, the selector's statistics."""
        learner = self.learner
        learner.backbone.eval()
        self.routed_text.clear()
        routes = route_table({j: learner.task_route(j) for j in range(after_task + 1)}, learner.num_tasks)
        row, selection = {}, {}
        for task_index, task in enumerate(learner.stream):
            accuracy, stats = self._evaluate_task(task_index, after_task, routes)
            row[task.name] = accuracy
            selection[task.name] = stats
            logger.info("After %s: %s accuracy %.2f%%.", learner.task(after_task).name, task.name, accuracy)
        return row, selection

    def _evaluate_task(self, task_index: int, after_task: int, route_of_task: RouteTable):
        """Return a task's accuracy and selector statistics; under torchrun each rank tests a part."""
        learner = self.learner
        task = learner.task(task_index)
        counts = torch.zeros(3, dtype=torch.long, device=learner.device)
        for images, labels in learner.image_batches(task, "test", shard=True):
            predictions, selected = self._predict(images, task_index, route_of_task)
            counts[0] += (predictions == labels).sum()
            counts[1] += (selected == task_index).sum()
            counts[2] += (selected < 0).sum()
        correct, chosen_right, fallback = distributed.all_reduce_sum(counts).tolist()
        total = learner.split_size(task, "test")
        stats = {
            "selected_correct": 100.0 * chosen_right / total if task_index <= after_task else math.nan,
            "fallback": 100.0 * fallback / total,
        }
        return 100.0 * correct / total, stats

    def _predict(self, images: torch.Tensor, task_index: int, route_of_task: RouteTable):
        """Return predictions and selected tasks of one batch: one frozen pass, one routed pass.

        Samples whose selected task has no route (and those the selector sends to -1) keep the
        frozen features and the zero-shot text features.
        """
        learner = self.learner
        capture = bool(getattr(learner.selector, "needs_routing_tokens", False))
        with learner.autocast():
            frozen = learner.backbone.encode_images(images, None, capture=capture)
        selected = learner.hooks.igsp_select_tasks(learner=learner, images=images, features=frozen, task_index=task_index)
        if selected is None:
            selected = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        selected = selected.to(images.device).long()

        # One host sync per batch: the routes in use decide which text features to compute.
        assignment = route_of_task.assign(selected.cpu())
        used = sorted(set(assignment.unique().tolist()))
        features = frozen.clone()
        routed_rows = (assignment >= 0).nonzero(as_tuple=True)[0]
        if routed_rows.numel() > 0:
            keys = route_of_task.keys
            with learner.autocast():
                routed = learner.backbone.encode_images(images[routed_rows.to(images.device)], Routes(keys, assignment[routed_rows]))
            features[routed_rows.to(images.device)] = routed

        predictions = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
        for column in used:
            rows = (assignment == column).nonzero(as_tuple=True)[0].to(images.device)
            route = route_of_task.keys[column] if column >= 0 else None
            logits = features[rows] @ self.text_features(task_index, route).T
            predictions[rows] = logits.argmax(dim=-1)
        return predictions, selected


@dataclass
class RouteTable:
    """The distinct routes of the trained tasks and, per task index, the column of its route.

    ``columns[j]`` indexes ``keys`` for task ``j``, or is -1 where the task has no route (the
    frozen backbone predicts). The last entry, for selection -1, is always -1.
    """

    keys: list[str]
    columns: torch.Tensor

    def assign(self, selected: torch.Tensor) -> torch.Tensor:
        """Map selected task indices (-1: none) to route columns (-1: none), on the CPU."""
        return self.columns[selected.clamp(min=-1)]


def route_table(routes: dict[int, str | None], num_tasks: int) -> RouteTable:
    keys = sorted({route for route in routes.values() if route is not None})
    columns = torch.full((num_tasks + 1,), -1, dtype=torch.long)
    for task_index, route in routes.items():
        if route is not None:
            columns[task_index] = keys.index(route)
    return RouteTable(keys, columns)
