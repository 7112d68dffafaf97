"""Expert bookkeeping shared by the baseline strategies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from torch import nn

from igsp.exceptions import ConfigError

if TYPE_CHECKING:
    from igsp.learner import ContinualLearner
    from igsp.moe import MoELayer

__all__ = [
    "EXPERT_INITS",
    "route_key",
    "check_choice",
    "injected_layers",
    "owned_expert_ids",
    "owned_parameters",
    "router_parameters",
    "freeze_owned",
    "freeze_router",
]

EXPERT_INITS = ("kaiming", "orthonormal")


def route_key(task_name: str) -> str:
    """Return the router key of a task: its name, with dots replaced because module names cannot contain dots."""
    return task_name.replace(".", "-")


def check_choice(value: str, choices: Iterable[str], key: str) -> None:
    """Raise ConfigError when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"Invalid {key} = {value!r}; use one of {list(choices)}.")


def injected_layers(learner: ContinualLearner, keys: list[str]) -> list[MoELayer]:
    """Return the MoE layers named by ``keys``, in injection order."""
    return [learner.backbone.experts[key] for key in keys]


def owned_expert_ids(layer: MoELayer, owner: str) -> list[int]:
    """Return the ids of the layer's experts whose owner is ``owner``."""
    return [expert_id for expert_id in layer.expert_ids if layer.expert(expert_id).owner == owner]


def owned_parameters(layers: Iterable[MoELayer], owner: str) -> list[nn.Parameter]:
    """Return the down and up projections of every expert owned by ``owner``."""
    parameters = []
    for layer in layers:
        for expert_id in owned_expert_ids(layer, owner):
            parameters.extend(layer.expert(expert_id).parameters())
    return parameters


def router_parameters(layers: Iterable[MoELayer], key: str) -> list[nn.Parameter]:
    """Return the weights of router ``key`` in every layer that has one (fixed routers have none)."""
    return [p for layer in layers if key in layer.routers for p in layer.routers[key].parameters()]


def freeze_owned(layers: Iterable[MoELayer], owner: str) -> None:
    """Freeze every expert owned by ``owner``."""
    for layer in layers:
        for expert_id in owned_expert_ids(layer, owner):
            layer.expert(expert_id).set_trainable(False)


def freeze_router(layers: Iterable[MoELayer], key: str) -> None:
    for parameter in router_parameters(layers, key):
        parameter.requires_grad_(False)
