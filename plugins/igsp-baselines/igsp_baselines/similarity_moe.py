"""Expert sharing driven by visual similarity: tasks whose images look alike share experts.

Each task's visual prototype is the normalised mean of the frozen backbone's image features of
its training data. An earlier task whose prototype has cosine similarity at least ``share_tau``
with the new task's is similar: the new task's routers may use that task's experts (frozen)
besides a group of new experts. When the most similar task reaches ``reuse_tau``, the new task
adds no experts and trains only its routers over that task's experts. Visually different tasks
share nothing, whatever their labels need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from igsp.exceptions import ConfigError
from igsp.hookspecs import hookimpl
from igsp.strategies.base import Strategy, inject_from_settings

from .common import (
    EXPERT_INITS,
    check_choice,
    freeze_owned,
    freeze_router,
    injected_layers,
    owned_parameters,
    route_key,
    router_parameters,
)

if TYPE_CHECKING:
    from igsp.backbone import Backbone
    from igsp.data.task import Task
    from igsp.learner import ContinualLearner
    from igsp.moe import MoELayer

__all__ = ["SimilarityMoE", "SimilarityMoEOptions", "SharingDecision", "decide_sharing", "visual_prototype"]

logger = logging.getLogger(__name__)

STATE_KEY = "similarity-moe"


@dataclass
class SimilarityMoEOptions:
    """Options of ``similarity-moe``. Rank, scale and placement come from the recipe's ``[adapter]``.

    ``noise_std`` is the standard deviation of the Gaussian noise added to router logits during
    training. Routers start at zero, so without noise every sample's top-k picks the same first
    experts in the router's list and the others never receive a gradient.
    """

    share_tau: float = 0.8
    reuse_tau: float = 0.95
    experts_per_task: int = 2
    top_k: int = 2
    noise_std: float = 1.0
    init: str = "kaiming"

    def validate(self) -> None:
        for key in ("share_tau", "reuse_tau"):
            value = getattr(self, key)
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"Invalid strategy option {key} = {value}; a cosine similarity lies in [-1, 1].")
        if self.share_tau > self.reuse_tau:
            raise ConfigError(
                f"Invalid strategy options share_tau = {self.share_tau} > reuse_tau = {self.reuse_tau}; "
                "a reused task must also count as similar, so set share_tau <= reuse_tau."
            )
        if self.experts_per_task < 1:
            raise ConfigError(f"Invalid strategy option experts_per_task = {self.experts_per_task}; expected at least 1.")
        if self.top_k < 1:
            raise ConfigError(f"Invalid strategy option top_k = {self.top_k}; expected at least 1.")
        if self.noise_std < 0:
            raise ConfigError(f"Invalid strategy option noise_std = {self.noise_std}; expected a value >= 0.")
        check_choice(self.init, EXPERT_INITS, "strategy option init")


@dataclass
class SharingDecision:
    """The earlier tasks whose experts a new task may use.

    ``shared`` lists the similar tasks, most similar first. ``reused`` is the most similar task
    when its similarity reaches ``reuse_tau``, else None.
    """

    similarities: dict[str, float] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    reused: str | None = None


def visual_prototype(features: torch.Tensor) -> torch.Tensor:
    """Return the normalised mean of image features (N, D) as a (D,) vector."""
    return F.normalize(features.float().mean(dim=0), dim=0)


def decide_sharing(similarities: dict[str, float], share_tau: float, reuse_tau: float) -> SharingDecision:
    """Apply the sharing rule to the cosine similarities between the new task and earlier ones."""
    ranked = sorted(similarities, key=lambda name: similarities[name], reverse=True)
    shared = [name for name in ranked if similarities[name] >= share_tau]
    reused = shared[0] if shared and similarities[shared[0]] >= reuse_tau else None
    return SharingDecision(dict(similarities), shared, reused)


def router_experts(layer: MoELayer, task_names: list[str]) -> list[int]:
    """Return the experts that the routers of ``task_names`` use in a layer, without repeats."""
    ids: list[int] = []
    for name in task_names:
        key = route_key(name)
        if key not in layer.routers:
            continue
        ids.extend(i for i in layer.routers[key].active_ids if i not in ids)
    return ids


class SimilarityMoE(Strategy):
    """Share frozen experts with visually similar earlier tasks; top-k learnable routers."""

    name = "similarity-moe"
    Config = SimilarityMoEOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.layer_keys: list[str] = []
        self.prototypes: dict[str, torch.Tensor] = {}

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        self.layer_keys = inject_from_settings(learner)

    @hookimpl
    def igsp_before_task(self, learner: ContinualLearner, task: Task) -> None:
        prototype = visual_prototype(learner.frozen_image_features(task, "train"))
        similarities = {name: float(prototype @ earlier) for name, earlier in self.prototypes.items()}
        decision = decide_sharing(similarities, self.config.share_tau, self.config.reuse_tau)
        new_per_layer = self._build_routers(learner, task, decision)
        self.prototypes[task.name] = prototype
        learner.record_task_info(
            task,
            {
                "similarity": decision.similarities,
                "shared_tasks": decision.shared,
                "reused_task": decision.reused,
                "new_experts_per_layer": new_per_layer,
            },
        )
        logger.info(
            "Task %s: shares experts with %s%s; %d new experts per layer.",
            task.name,
            decision.shared or "no earlier task",
            f" and reuses {decision.reused}'s" if decision.reused else "",
            new_per_layer,
        )

    def _build_routers(self, learner: ContinualLearner, task: Task, decision: SharingDecision) -> int:
        """Add the task's new experts and its router in every layer; return the new experts per layer."""
        adapter = learner.settings.adapter
        new_count = 0 if decision.reused else self.config.experts_per_task
        for layer in injected_layers(learner, self.layer_keys):
            borrowed = router_experts(layer, [decision.reused] if decision.reused else decision.shared)
            new = [
                layer.add_expert(adapter.rank, adapter.scale, init=self.config.init, owner=task.name)
                for _ in range(new_count)
            ]
            layer.add_router(
                route_key(task.name),
                new + borrowed,
                learnable=True,
                gating="topk",
                top_k=self.config.top_k,
                noise_std=self.config.noise_std,
            )
        return new_count

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner, task: Task) -> list[dict[str, Any]]:
        layers = injected_layers(learner, self.layer_keys)
        return [{"params": owned_parameters(layers, task.name) + router_parameters(layers, route_key(task.name))}]

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task) -> None:
        layers = injected_layers(learner, self.layer_keys)
        freeze_owned(layers, task.name)
        freeze_router(layers, route_key(task.name))

    @hookimpl
    def igsp_task_route(self, task: Task) -> str:
        return route_key(task.name)

    @hookimpl
    def igsp_state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: {"prototypes": {name: p.clone() for name, p in self.prototypes.items()}}}

    @hookimpl
    def igsp_load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get(STATE_KEY)
        if saved is not None:
            self.prototypes = dict(saved["prototypes"])
