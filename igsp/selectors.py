"""Task selectors: choose, per test image, the trained task whose experts classify it.

A selector is a plugin object implementing ``igsp_select_tasks`` (returning a task index per image,
or -1 for the frozen backbone) and, when it keeps statistics, ``igsp_after_task`` plus
``igsp_state_dict`` / ``igsp_load_state_dict``. Third parties add selectors through the
``igsp_register_selectors`` hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .hookspecs import hookimpl
from .options import parse_options
from .exceptions import ConfigError

if TYPE_CHECKING:
    from .data.task import Task
    from .learner import ContinualLearner

__all__ = [
    "OracleSelector",
    "PrototypeSelector",
    "RouterSelector",
    "mahalanobis_distances",
    "kl_to_reference",
]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    """Zero-shot fallback: a task is refused when the distance exceeds this percentile of its own."""

    percentile: float = 95.0
    fallback: bool = True

    def validate(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"eval.selector_options.percentile must be in (0, 100], got {self.percentile}.")


class OracleSelector:
    """Choose the true task when it is trained (an upper bound), else the frozen backbone."""

    name = "oracle"

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"The oracle selector takes no options, got {sorted(options)}.")

    @hookimpl
    def igsp_select_tasks(self, learner: ContinualLearner, images: torch.Tensor, task_index: int) -> torch.Tensor:
        chosen = task_index if task_index <= learner.current_task_index else -1
        return torch.full((images.shape[0],), chosen, dtype=torch.long, device=images.device)


def mahalanobis_distances(features: torch.Tensor, means: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Return (N, T) diagonal Mahalanobis distances of features (N, D) to task means (T, D)."""
    scaled = (features[:, None, :] - means[None, :, :]) ** 2 / variance[None, None, :]
    return scaled.sum(dim=-1).sqrt()


def choose_with_fallback(distances: torch.Tensor, thresholds: torch.Tensor, fallback: bool) -> torch.Tensor:
    """Pick the nearest task per row; rows farther than that task's threshold get -1."""
    best, chosen = distances.min(dim=1)
    if fallback:
        chosen = torch.where(best > thresholds[chosen], torch.full_like(chosen, -1), chosen)
    return chosen


class PrototypeSelector:
    """Nearest task prototype by diagonal Mahalanobis distance on frozen image features.

    Per trained task the selector keeps the mean of its frozen training features; a diagonal
    variance is pooled over all trained tasks. A task's threshold is the chosen percentile of its
    own training images' distances, measured when the task was trained.
    """

    name = "prototype"
    needs_routing_tokens = False

    def __init__(self, **options: Any) -> None:
        self.config = parse_options(CalibrationOptions, options, "selector 'prototype'")
        self.task_indices: list[int] = []
        self.means: list[torch.Tensor] = []
        self.thresholds: list[float] = []
        self.square_sum: torch.Tensor | None = None
        self.count = 0

    @property
    def variance(self) -> torch.Tensor:
        return (self.square_sum / max(self.count - len(self.means), 1)).clamp_min(1e-6)

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        features = learner.frozen_image_features(task, "train").float()
        mean = features.mean(dim=0)
        deviations = ((features - mean) ** 2).sum(dim=0)
        self.square_sum = deviations if self.square_sum is None else self.square_sum + deviations
        self.count += features.shape[0]
        self.means.append(mean)
        self.task_indices.append(task_index)
        own = mahalanobis_distances(features, mean[None], self.variance)[:, 0]
        self.thresholds.append(float(torch.quantile(own, self.config.percentile / 100.0)))

    @hookimpl
    def igsp_select_tasks(self, features: torch.Tensor) -> torch.Tensor:
        if not self.means:
            return torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        means = torch.stack(self.means).to(features.device)
        distances = mahalanobis_distances(features.float(), means, self.variance.to(features.device))
        thresholds = torch.tensor(self.thresholds, device=features.device)
        chosen = choose_with_fallback(distances, thresholds, self.config.fallback)
        indices = torch.tensor(self.task_indices + [-1], device=features.device)
        return indices[chosen]

    def count_parameters(self) -> int:
        if not self.means:
            return 0
        return len(self.means) * self.means[0].numel() + self.means[0].numel() + len(self.thresholds)

    @hookimpl
    def igsp_state_dict(self) -> dict[str, Any]:
        return {
            "selector/prototype": {
                "task_indices": list(self.task_indices),
                "means": [m.clone() for m in self.means],
                "thresholds": list(self.thresholds),
                "square_sum": self.square_sum,
                "count": self.count,
            }
        }

    @hookimpl
    def igsp_load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("selector/prototype")
        if saved is None:
            return
        self.task_indices = list(saved["task_indices"])
        self.means = list(saved["means"])
        self.thresholds = list(saved["thresholds"])
        self.square_sum = saved["square_sum"]
        self.count = int(saved["count"])


def kl_to_reference(probabilities: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Return KL(p || reference) per row, ignoring experts that both give zero mass."""
    p = probabilities.clamp_min(1e-8)
    q = reference.clamp_min(1e-8)
    return (probabilities * (p.log() - q.log())).sum(dim=-1)


class RouterSelector:
    """iGSP's own selector: compare each task's routing of the frozen tokens with its training routing.

    From one frozen forward pass the selector applies every trained task's routers to the frozen
    routing tokens of every layer. Per task, it sums over layers the KL divergence between the
    resulting dense distribution and the task's mean distribution on its training data. The task
    with the smallest sum wins, with the same percentile fallback as the prototype selector. It needs
    learned routers: tasks whose routes have none all look alike to it.
    """

    name = "router"
    needs_routing_tokens = True

    def __init__(self, **options: Any) -> None:
        self.config = parse_options(CalibrationOptions, options, "selector 'router'")
        self.task_indices: list[int] = []
        self.routes: list[str] = []
        self.references: list[dict[str, torch.Tensor]] = []
        self.thresholds: list[float] = []

    def _image_layers(self, learner: ContinualLearner):
        return learner.backbone.layers("image")

    def _task_divergence(self, learner: ContinualLearner, route: str, references: dict[str, torch.Tensor] | None):
        """Return per-image summed KL (or mean distributions when ``references`` is None)."""
        total = None
        means = {}
        for key, layer in self._image_layers(learner):
            if route not in layer.routers or layer.captured_tokens is None:
                continue
            probabilities = layer.routers[route].probabilities(layer.captured_tokens)
            if references is None:
                means[key] = probabilities.mean(dim=0).cpu()
                continue
            divergence = kl_to_reference(probabilities, references[key].to(probabilities.device))
            total = divergence if total is None else total + divergence
        return means if references is None else total

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        route = learner.task_route(task_index)
        if route is None:
            return
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch, _ in learner.image_batches(task, "train"):
            with torch.no_grad(), learner.autocast():
                learner.backbone.encode_images(batch, None, capture=True)
                means = self._task_divergence(learner, route, None)
            for key, mean in means.items():
                sums[key] = sums.get(key, 0) + mean * batch.shape[0]
            count += batch.shape[0]
        if not sums:
            logger.warning("Router selector: task %s has no routers in the image tower; it is never selected.", task.name)
            return
        references = {key: value / count for key, value in sums.items()}
        own = self._own_divergences(learner, task, route, references)
        self.task_indices.append(task_index)
        self.routes.append(route)
        self.references.append(references)
        self.thresholds.append(float(torch.quantile(own, self.config.percentile / 100.0)))

    @torch.no_grad()
    def _own_divergences(self, learner, task, route, references) -> torch.Tensor:
        values = []
        for batch, _ in learner.image_batches(task, "train"):
            with learner.autocast():
                learner.backbone.encode_images(batch, None, capture=True)
            values.append(self._task_divergence(learner, route, references).float().cpu())
        return torch.cat(values)

    @hookimpl
    def igsp_select_tasks(self, learner: ContinualLearner, features: torch.Tensor) -> torch.Tensor:
        if not self.routes:
            return torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        divergences = torch.stack(
            [self._task_divergence(learner, route, refs).float() for route, refs in zip(self.routes, self.references)],
            dim=1,
        )
        thresholds = torch.tensor(self.thresholds, device=divergences.device)
        chosen = choose_with_fallback(divergences, thresholds, self.config.fallback)
        indices = torch.tensor(self.task_indices + [-1], device=divergences.device)
        return indices[chosen]

    def count_parameters(self) -> int:
        return sum(ref.numel() for refs in self.references for ref in refs.values()) + len(self.thresholds)

    @hookimpl
    def igsp_state_dict(self) -> dict[str, Any]:
        return {
            "selector/router": {
                "task_indices": list(self.task_indices),
                "routes": list(self.routes),
                "references": [dict(r) for r in self.references],
                "thresholds": list(self.thresholds),
            }
        }

    @hookimpl
    def igsp_load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("selector/router")
        if saved is None:
            return
        self.task_indices = list(saved["task_indices"])
        self.routes = list(saved["routes"])
        self.references = [dict(r) for r in saved["references"]]
        self.thresholds = list(saved["thresholds"])


@hookimpl
def igsp_register_selectors(register) -> None:
    register("oracle", OracleSelector, "the true task when trained (upper bound)")
    register("prototype", PrototypeSelector, "nearest frozen-feature prototype, Mahalanobis, zero-shot fallback")
    register("router", RouterSelector, "closest routing distribution of each task's routers (KL), zero-shot fallback")
