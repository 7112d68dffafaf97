"""Entry point of the distribution: registers its strategies with igsp's registry."""

from __future__ import annotations

from typing import Callable

from igsp.hookspecs import hookimpl

from .lora_per_task import LoraPerTask
from .moe_adapters import MoEAdapters
from .similarity_moe import SimilarityMoE

__all__ = ["igsp_register_strategies"]


@hookimpl
def igsp_register_strategies(register: Callable[..., None]) -> None:
    register(
        LoraPerTask.name,
        LoraPerTask,
        "a separate low-rank expert per task in every layer; parameters grow linearly",
    )
    register(
        SimilarityMoE.name,
        SimilarityMoE,
        "experts shared between tasks whose mean image features are similar",
    )
    register(
        MoEAdapters.name,
        MoEAdapters,
        "a fixed pool of ReLU adapters per layer, noisy top-2 routers, most used experts frozen",
    )
