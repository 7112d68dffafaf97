"""A separate low-rank expert per task: full isolation, linear parameter growth."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igsp.hookspecs import hookimpl
from igsp.strategies.base import Strategy, inject_from_settings

from .common import EXPERT_INITS, check_choice, freeze_owned, injected_layers, owned_parameters, route_key

if TYPE_CHECKING:
    from igsp.backbone import Backbone
    from igsp.data.task import Task
    from igsp.learner import ContinualLearner

__all__ = ["LoraPerTask", "LoraPerTaskOptions"]

logger = logging.getLogger(__name__)


@dataclass
class LoraPerTaskOptions:
    """Options of ``lora-per-task``. Rank, scale and placement come from the recipe's ``[adapter]``."""

    init: str = "kaiming"

    def validate(self) -> None:
        check_choice(self.init, EXPERT_INITS, "strategy option init")


class LoraPerTask(Strategy):
    """Each task adds one expert of rank r per layer, used alone through a fixed router.

    The router is keyed by the task name and has no weights, so it gives its single expert weight
    1. Earlier experts stay frozen, so earlier tasks keep their accuracy whenever the task
    selector picks them. Added parameters grow by ``rank * (in + out)`` per layer and task.
    """

    name = "lora-per-task"
    Config = LoraPerTaskOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.layer_keys: list[str] = []

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        self.layer_keys = inject_from_settings(learner)

    @hookimpl
    def igsp_before_task(self, learner: ContinualLearner, task: Task) -> None:
        adapter = learner.settings.adapter
        key = route_key(task.name)
        for layer in injected_layers(learner, self.layer_keys):
            expert_id = layer.add_expert(adapter.rank, adapter.scale, init=self.config.init, owner=task.name)
            layer.add_router(key, [expert_id], learnable=False)
        logger.info("Task %s: added one rank-%d expert to each of %d layers.", task.name, adapter.rank, len(self.layer_keys))

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner, task: Task) -> list[dict[str, Any]]:
        return [{"params": owned_parameters(injected_layers(learner, self.layer_keys), task.name)}]

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task) -> None:
        freeze_owned(injected_layers(learner, self.layer_keys), task.name)

    @hookimpl
    def igsp_task_route(self, task: Task) -> str:
        return route_key(task.name)
