"""Registration of igsp's built-in strategies."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .finetune import FineTune
from .igsp import IGSP
from .zeroshot import ZeroShot

__all__ = ["igsp_register_strategies"]


@hookimpl
def igsp_register_strategies(register) -> None:
    register("zeroshot", ZeroShot, "no training: the frozen backbone's zero-shot accuracy")
    register("finetune", FineTune, "one shared low-rank adapter set trained on every task in turn")
    register("igsp", IGSP, "iGSP: subspace-regularised expansion, router-convergence pruning, orthogonal fine-tuning")
