"""Find the blocks of a CLIP model that receive experts, and attach MoE layers beside them.

The experts run in parallel with a module (a transformer block's MLP, a convolutional block) through
a forward hook: the hook computes the experts' contribution from the module's input and adds it to
the module's output. No module of the backbone is replaced, so open_clip's own code that reads
attributes such as ``mlp.c_fc.weight.dtype`` keeps working, and the frozen weights keep their
state-dict names.

Other tower types plug in through :func:`register_tower_finder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .exceptions import InjectionError
from .moe import MoELayer, RoutingContext

__all__ = [
    "InjectionTarget",
    "register_tower_finder",
    "find_targets",
    "attach_layer",
    "TOWERS",
]

logger = logging.getLogger(__name__)

TOWERS = ("image", "text")

TokenFn = Callable[[torch.Tensor, RoutingContext], torch.Tensor]


@dataclass
class InjectionTarget:
    """A module that gets an expert branch beside it.

    ``layout`` is ``"tokens"`` for inputs of shape (N, L, D) and ``"channels_first"`` for
    (N, C, H, W). ``routing_token`` maps the module's input (in channels-last form) and the
    tower's routing context to the routing tokens (N, in_features).
    """

    name: str
    tower: str
    module: nn.Module
    in_features: int
    out_features: int
    layout: str
    routing_token: TokenFn


TowerFinder = Callable[[nn.Module], list[InjectionTarget]]
_FINDERS: list[tuple[str, TowerFinder]] = []


def register_tower_finder(name: str, finder: TowerFinder) -> None:
    """Register a function that lists injection targets of a model type; later ones take precedence."""
    _FINDERS[:] = [(n, f) for n, f in _FINDERS if n != name]
    _FINDERS.insert(0, (name, finder))


def first_token(u: torch.Tensor, context: RoutingContext) -> torch.Tensor:
    """Route on the class token, the first position of a ViT sequence."""
    return u[:, 0]


def indexed_token(u: torch.Tensor, context: RoutingContext) -> torch.Tensor:
    """Route on the token at ``context.token_index`` (the end-of-text token of a prompt)."""
    if context.token_index is None:
        raise InjectionError("The text tower's routing context has no token_index; encode text through Backbone.encode_texts.")
    index = context.token_index.to(u.device)
    return u[torch.arange(u.shape[0], device=u.device), index]


def pooled_channels(u: torch.Tensor, context: RoutingContext) -> torch.Tensor:
    """Route on the global-average-pooled features of a channels-last feature map."""
    return u.reshape(u.shape[0], -1, u.shape[-1]).mean(dim=1)


def _resblock_targets(transformer: nn.Module, prefix: str, tower: str, token: TokenFn) -> list[InjectionTarget]:
    targets = []
    for index, block in enumerate(getattr(transformer, "resblocks", [])):
        mlp = getattr(block, "mlp", None)
        c_fc = getattr(mlp, "c_fc", None)
        c_proj = getattr(mlp, "c_proj", None)
        if not isinstance(c_fc, nn.Linear) or not isinstance(c_proj, nn.Linear):
            continue
        targets.append(
            InjectionTarget(
                name=f"{prefix}.resblocks.{index}.mlp",
                tower=tower,
                module=mlp,
                in_features=c_fc.in_features,
                out_features=c_proj.out_features,
                layout="tokens",
                routing_token=token,
            )
        )
    return targets


def open_clip_targets(model: nn.Module) -> list[InjectionTarget]:
    """List the MLPs of open_clip's ViT image tower and its built-in text transformer."""
    targets = []
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):
        if not getattr(visual.transformer, "batch_first", True):
            raise InjectionError("Only batch-first open_clip transformers are supported (open_clip >= 2.24).")
        targets += _resblock_targets(visual.transformer, "visual.transformer", "image", first_token)
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        targets += _resblock_targets(model.transformer, "transformer", "text", indexed_token)
    return targets


register_tower_finder("open_clip", open_clip_targets)


def find_targets(
    model: nn.Module,
    towers: Sequence[str] = TOWERS,
    blocks: Sequence[int] | None = None,
) -> list[InjectionTarget]:
    """List the injection targets of ``model`` in the requested towers and block indices.

    ``blocks`` indexes the blocks of each tower (negative indices count from the end); None
    selects every block. Raises :class:`InjectionError` when nothing matches.
    """
    unknown = [tower for tower in towers if tower not in TOWERS]
    if unknown:
        raise InjectionError(f"Unknown towers {unknown}; use a subset of {TOWERS}.")
    found: dict[str, list[InjectionTarget]] = {tower: [] for tower in TOWERS}
    for tower in TOWERS:
        for name, finder in _FINDERS:
            candidates = [t for t in finder(model) if t.tower == tower]
            if candidates:
                found[tower] = candidates
                break
    selected = []
    for tower in towers:
        selected += _select_blocks(found[tower], blocks, tower)
    if not selected:
        raise InjectionError(
            f"Expert injection matched no block of {type(model).__name__} in towers {list(towers)} "
            f"with blocks={blocks}. Supported: open_clip ViT and text transformers, plus any "
            "tower registered with igsp.inject.register_tower_finder."
        )
    return selected


def _select_blocks(targets: list[InjectionTarget], blocks: Sequence[int] | None, tower: str) -> list[InjectionTarget]:
    if blocks is None or not targets:
        return targets
    chosen = []
    for index in blocks:
        if not -len(targets) <= index < len(targets):
            raise InjectionError(
                f"Block index {index} is out of range for the {tower} tower, which has "
                f"{len(targets)} blocks (valid: {-len(targets)}..{len(targets) - 1})."
            )
        chosen.append(targets[index])
    return chosen


def attach_layer(target: InjectionTarget, layer: MoELayer, context: RoutingContext) -> torch.utils.hooks.RemovableHandle:
    """Register the forward hook that adds ``layer``'s output to ``target.module``'s output."""

    def add_experts(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not context.active and not context.capture:
            return output
        u = inputs[0]
        if target.layout == "channels_first":
            u = u.permute(0, 2, 3, 1)
        z = target.routing_token(u, context)
        delta = layer(u, z, context)
        if delta is None:
            return output
        if target.layout == "channels_first":
            delta = delta.permute(0, 3, 1, 2)
        return output + delta.to(output.dtype)

    return target.module.register_forward_hook(add_experts)
