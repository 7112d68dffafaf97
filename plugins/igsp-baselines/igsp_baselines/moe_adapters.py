"""MoE-Adapters: a fixed pool of bottleneck adapters per layer, one noisy top-k router per task.

Every layer gets ``num_experts`` adapters ``scale * B relu(A u)`` of width ``width`` once, before
the first task. Each task trains its own router over the whole pool together with the experts
that are not frozen yet. After the task, the ``freeze_per_task`` not-yet-frozen experts of each
layer with the highest mean routing probability during the task's training are frozen for all
later tasks, which keeps the experts that task relied on most. The expert pool never grows; only
one router per layer and task is added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from igsp.backbone import Routes
from igsp.exceptions import ConfigError
from igsp.hookspecs import hookimpl
from igsp.learner import Outputs
from igsp.strategies.base import Strategy, inject_from_settings

from .common import EXPERT_INITS, check_choice, freeze_router, injected_layers, route_key, router_parameters

if TYPE_CHECKING:
    from igsp.backbone import Backbone
    from igsp.data.task import Task
    from igsp.learner import Batch, ContinualLearner
    from igsp.moe import MoELayer

__all__ = ["MoEAdapters", "MoEAdaptersOptions", "most_selected"]

logger = logging.getLogger(__name__)

STATE_KEY = "moe-adapters"
POOL_OWNER = "pool"
PROMPT_CHUNK = 512


@dataclass
class MoEAdaptersOptions:
    """Options of ``moe-adapters``. Only placement (towers, blocks) comes from the recipe's ``[adapter]``.

    ``noise_std`` is the standard deviation of the Gaussian noise on router logits during
    training. It spreads the zero-initialised routers' choices over the pool.
    """

    num_experts: int = 22
    width: int = 64
    scale: float = 0.1
    top_k: int = 2
    noise_std: float = 1.0
    freeze_per_task: int = 2
    init: str = "kaiming"

    def validate(self) -> None:
        for key in ("num_experts", "width", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"Invalid strategy option {key} = {getattr(self, key)}; expected at least 1.")
        if self.freeze_per_task < 0:
            raise ConfigError(f"Invalid strategy option freeze_per_task = {self.freeze_per_task}; expected a count >= 0.")
        if self.noise_std < 0:
            raise ConfigError(f"Invalid strategy option noise_std = {self.noise_std}; expected a value >= 0.")
        check_choice(self.init, EXPERT_INITS, "strategy option init")


def most_selected(probabilities: torch.Tensor, expert_ids: list[int], candidates: set[int], count: int) -> list[int]:
    """Return up to ``count`` ids from ``candidates`` with the highest mean routing probability.

    ``probabilities[k]`` belongs to ``expert_ids[k]``. Ties go to the expert listed first.
    """
    ranked = sorted(
        (k for k, expert_id in enumerate(expert_ids) if expert_id in candidates),
        key=lambda k: (-float(probabilities[k]), k),
    )
    return [expert_ids[k] for k in ranked[:count]]


class MoEAdapters(Strategy):
    """A fixed expert pool with per-task noisy top-k routers and usage-based expert freezing."""

    name = "moe-adapters"
    Config = MoEAdaptersOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.layer_keys: list[str] = []
        self.frozen: dict[str, list[int]] = {}

    # ---- structure ---------------------------------------------------------------------------

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        self.layer_keys = inject_from_settings(learner)
        for key, layer in zip(self.layer_keys, injected_layers(learner, self.layer_keys)):
            if not layer.expert_ids:
                self._fill_pool(layer)
            self.frozen.setdefault(key, [])
        logger.info("Expert pool: %d adapters of width %d in each of %d layers.",
                    self.config.num_experts, self.config.width, len(self.layer_keys))

    def _fill_pool(self, layer: MoELayer) -> None:
        for _ in range(self.config.num_experts):
            layer.add_expert(
                self.config.width, self.config.scale, activation="relu", init=self.config.init, owner=POOL_OWNER
            )

    @hookimpl
    def igsp_before_task(self, learner: ContinualLearner, task: Task) -> None:
        for layer in injected_layers(learner, self.layer_keys):
            layer.reset_stats()
            layer.add_router(
                route_key(task.name),
                layer.expert_ids,
                learnable=True,
                gating="topk",
                top_k=self.config.top_k,
                noise_std=self.config.noise_std,
            )

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner, task: Task) -> list[dict[str, Any]]:
        parameters = []
        for key, layer in zip(self.layer_keys, injected_layers(learner, self.layer_keys)):
            for expert_id in layer.expert_ids:
                if expert_id not in self.frozen[key]:
                    parameters.extend(layer.expert(expert_id).parameters())
        parameters += router_parameters(injected_layers(learner, self.layer_keys), route_key(task.name))
        return [{"params": parameters}]

    @hookimpl
    def igsp_task_route(self, task: Task) -> str:
        return route_key(task.name)

    # ---- training forward with routing statistics -----------------------------------------

    @hookimpl
    def igsp_forward(self, learner: ContinualLearner, batch: Batch, task: Task) -> Outputs:
        """Run igsp's default training forward, recording every layer's dense routing probabilities."""
        route = learner.task_route(batch.task_index)
        routes = Routes.uniform(route, len(batch), learner.device)
        image_features = learner.backbone.encode_images(batch.images, routes, record=True)
        text_features = self._first_template_features(learner, task, route)
        logits = learner.backbone.logit_scale * image_features @ text_features.T
        return Outputs(logits=logits, image_features=image_features, text_features=text_features)

    @staticmethod
    def _first_template_features(learner: ContinualLearner, task: Task, route: str | None) -> torch.Tensor:
        """Return per-class text features of the first template, recording the text routers' use."""
        prompts = [per_class[0] for per_class in task.prompts(0)]
        tokens = learner.backbone.tokenize(prompts).to(learner.device)
        chunks = []
        for start in range(0, tokens.shape[0], PROMPT_CHUNK):
            part = tokens[start:start + PROMPT_CHUNK]
            routes = Routes.uniform(route, part.shape[0], learner.device)
            chunks.append(learner.backbone.encode_texts(part, routes, record=True))
        return torch.cat(chunks)

    # ---- freezing ----------------------------------------------------------------------------

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task) -> None:
        key = route_key(task.name)
        newly_frozen = {}
        for layer_key, layer in zip(self.layer_keys, injected_layers(learner, self.layer_keys)):
            newly_frozen[layer_key] = self._freeze_most_selected(layer_key, layer, key)
            layer.reset_stats()
        freeze_router(injected_layers(learner, self.layer_keys), key)
        learner.record_task_info(task, {"frozen_experts": newly_frozen})
        trainable_left = {
            len(layer.expert_ids) - len(self.frozen[layer_key])
            for layer_key, layer in zip(self.layer_keys, injected_layers(learner, self.layer_keys))
        }
        frozen_counts = {len(ids) for ids in newly_frozen.values()}
        logger.info("Task %s: froze %s experts per layer; %s per layer remain trainable.",
                    task.name, sorted(frozen_counts), sorted(trainable_left))

    def _freeze_most_selected(self, layer_key: str, layer: MoELayer, router_key: str) -> list[int]:
        probabilities = layer.mean_probabilities(router_key)
        if probabilities is None:
            logger.warning("Layer %s recorded no routing for task router %s; freezing no expert there.",
                           layer_key, router_key)
            return []
        candidates = set(layer.expert_ids) - set(self.frozen[layer_key])
        chosen = most_selected(probabilities, layer.routers[router_key].expert_ids, candidates,
                               self.config.freeze_per_task)
        for expert_id in chosen:
            layer.expert(expert_id).set_trainable(False)
        self.frozen[layer_key].extend(chosen)
        return chosen

    # ---- checkpoints -------------------------------------------------------------------------

    @hookimpl
    def igsp_state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: {"frozen": {key: list(ids) for key, ids in self.frozen.items()}}}

    @hookimpl
    def igsp_load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get(STATE_KEY)
        if saved is not None:
            self.frozen = {key: [int(i) for i in ids] for key, ids in saved["frozen"].items()}
