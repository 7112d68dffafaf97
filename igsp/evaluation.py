"""Task-agnostic evaluation of the whole stream after each task.

For every test batch: one frozen forward pass gives the features that the task selector reads and
the zero-shot answer for samples that fall back to the frozen backbone; one routed pass, with each
sample sent through the experts of its selected task, answers the others. Class text features are
computed once per (evaluated task, route) in each evaluation round.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from .backbone import Routes

if TYPE_CHECKING:
    from .learner import ContinualLearner

__all__ = ["Evaluator"]

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
        routes = {j: learner.task_route(j) for j in range(after_task + 1)}
        row, selection = {}, {}
        for task_index, task in enumerate(learner.stream):
            accuracy, stats = self._evaluate_task(task_index, after_task, routes)
            row[task.name] = accuracy
            selection[task.name] = stats
            logger.info("After %s: %s accuracy %.2f%%.", learner.task(after_task).name, task.name, accuracy)
        return row, selection

    def _evaluate_task(self, task_index: int, after_task: int, routes: dict[int, str | None]):
        learner = self.learner
        images, labels = learner.test_tensors(learner.task(task_index))
        correct = chosen_right = fallback = 0
        batch_size = learner.settings.eval.batch_size
        for start in range(0, labels.shape[0], batch_size):
            batch_images = images[start:start + batch_size].to(learner.device)
            batch_labels = labels[start:start + batch_size].to(learner.device)
            predictions, selected = self._predict(batch_images, task_index, routes)
            correct += int((predictions == batch_labels).sum())
            chosen_right += int((selected == task_index).sum())
            fallback += int((selected < 0).sum())
        total = labels.shape[0]
        stats = {
            "selected_correct": 100.0 * chosen_right / total if task_index <= after_task else math.nan,
            "fallback": 100.0 * fallback / total,
        }
        return 100.0 * correct / total, stats

    def _predict(self, images: torch.Tensor, task_index: int, routes: dict[int, str | None]):
        learner = self.learner
        capture = bool(getattr(learner.selector, "needs_routing_tokens", False))
        with learner.autocast():
            frozen = learner.backbone.encode_images(images, None, capture=capture)
        selected = learner.hooks.igsp_select_tasks(learner=learner, images=images, features=frozen, task_index=task_index)
        if selected is None:
            selected = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        selected = selected.to(images.device).long()
        sample_routes = [routes.get(int(j)) if j >= 0 else None for j in selected.tolist()]
        features = frozen.clone()
        keys = sorted({route for route in sample_routes if route is not None})
        if keys:
            assignment = torch.tensor([keys.index(r) if r is not None else -1 for r in sample_routes], device=images.device)
            rows = (assignment >= 0).nonzero(as_tuple=True)[0]
            with learner.autocast():
                routed = learner.backbone.encode_images(images[rows], Routes(keys, assignment[rows]))
            features[rows] = routed
        predictions = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
        for route in set(sample_routes):
            rows = torch.tensor([n for n, r in enumerate(sample_routes) if r == route], device=images.device)
            logits = features[rows] @ self.text_features(task_index, route).T
            predictions[rows] = logits.argmax(dim=-1)
        return predictions, selected
