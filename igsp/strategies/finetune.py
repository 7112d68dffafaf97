"""Sequential fine-tuning of one shared low-rank adapter set: the forgetting baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..hookspecs import hookimpl
from .base import Strategy, inject_from_settings

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..learner import ContinualLearner

__all__ = ["FineTune"]

ROUTE = "shared"


class FineTune(Strategy):
    """One expert per layer, trained on every task in turn, used for every test image.

    There is no isolation between tasks, so later tasks overwrite what earlier ones learned. The
    strategy ignores the task selector: every image goes through the shared adapter.
    """

    name = "finetune"

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        rank = learner.settings.adapter.rank
        scale = learner.settings.adapter.scale
        for key in inject_from_settings(learner):
            layer = backbone.experts[key]
            if ROUTE not in layer.routers:
                expert_id = layer.add_expert(rank, scale, init="kaiming", owner=ROUTE)
                layer.add_router(ROUTE, [expert_id], learnable=False)

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner) -> list[dict[str, Any]]:
        return [{"params": list(learner.backbone.experts.parameters())}]

    @hookimpl
    def igsp_task_route(self) -> str:
        return ROUTE

    @hookimpl(tryfirst=True)
    def igsp_select_tasks(self, learner: ContinualLearner, images: torch.Tensor) -> torch.Tensor:
        if learner.current_task_index < 0:
            return torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        return torch.full((images.shape[0],), learner.current_task_index, dtype=torch.long, device=images.device)
