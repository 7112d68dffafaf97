"""An alternative reading of iGSP's regulariser: penalise the routing mass sent to candidates.

WARNING: this reading is known to fail. Candidates start with ``B = 0``, so a router that is
penalised for using them learns to ignore them at once; they then receive no gradient, every one
is pruned, and the new task does not learn (on a small 3-task prototype its loss stayed at
ln(number of classes)). It ships as a separate plugin to show how a regulariser is replaced
through the ``igsp_register_regularisers`` hook, and to let that failure be reproduced:
``--set strategy.regulariser=routing-mass``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..exceptions import ConfigError
from ..hookspecs import hookimpl
from ..regularisers import LayerView

__all__ = ["RoutingMassRegulariser"]


class RoutingMassRegulariser:
    """Mean over layers of the dense routing probability that the batch sends to candidates."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"The routing-mass regulariser takes no options, got {sorted(options)}.")

    def __call__(self, views: Sequence[LayerView]) -> torch.Tensor | None:
        masses = []
        for view in views:
            if not view.historical_ids:
                continue
            probabilities = view.layer.last_probabilities.get(view.route)
            router = view.layer.routers[view.route]
            if probabilities is None:
                continue
            columns = [k for k, i in enumerate(router.expert_ids) if i in set(view.candidate_ids)]
            if columns:
                masses.append(probabilities[:, columns].sum(dim=1).mean())
        return torch.stack(masses).mean() if masses else None


@hookimpl
def igsp_register_regularisers(register) -> None:
    register("routing-mass", RoutingMassRegulariser, "routing mass sent to candidates (known to starve them; see docs)")
