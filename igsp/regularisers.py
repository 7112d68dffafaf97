"""iGSP's phase-1 regularisers, selected by name through the ``igsp_register_regularisers`` hook.

A regulariser receives one :class:`LayerView` per MoE layer of the task being trained and returns
a scalar tensor (or None when it does not apply, as on the first task). The iGSP strategy scales it
by its ``reg_weight`` and returns it as a named loss term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .hookspecs import hookimpl
from .moe import MoELayer
from .subspace import subspace_penalty

__all__ = ["LayerView", "SubspaceRegulariser"]


@dataclass
class LayerView:
    """Read-only view of one layer for a regulariser while a task trains."""

    key: str
    layer: MoELayer
    route: str
    candidate_ids: list[int]
    historical_ids: list[int]
    basis: torch.Tensor | None

    @property
    def candidates(self) -> list[torch.Tensor]:
        return [self.layer.expert(i).A for i in self.candidate_ids if str(i) in self.layer.experts]


class SubspaceRegulariser:
    """Mean share of each candidate's down-projection outside the historical subspace.

    ``R = mean_j ||A_j (I - P_H)||_F^2 / ||A_j||_F^2`` over the candidates of every layer that has
    history. Minimising it pulls the candidates' input directions into the historical subspace, so
    a new task first reuses what earlier tasks found. R is None on the first task.
    """

    def __init__(self, **options: Any) -> None:
        if options:
            from .exceptions import ConfigError

            raise ConfigError(f"The subspace regulariser takes no options, got {sorted(options)}.")

    def __call__(self, views: Sequence[LayerView]) -> torch.Tensor | None:
        penalties = [subspace_penalty(view.candidates, view.basis) for view in views]
        penalties = [p for p in penalties if p is not None]
        if not penalties:
            return None
        return torch.stack(penalties).mean()


@hookimpl
def igsp_register_regularisers(register) -> None:
    register("subspace", SubspaceRegulariser, "share of candidate down-projections outside the historical subspace")
