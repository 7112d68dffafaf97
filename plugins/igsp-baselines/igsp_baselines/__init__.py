"""Baseline strategies for igsp, installed as a third-party plugin distribution.

The strategies register through the entry-point group ``igsp`` (see :mod:`igsp_baselines.plugin`)
and use only igsp's public hooks and helpers, so they double as worked examples of strategy
plugins.
"""

from __future__ import annotations

from .lora_per_task import LoraPerTask, LoraPerTaskOptions
from .moe_adapters import MoEAdapters, MoEAdaptersOptions, most_selected
from .similarity_moe import SharingDecision, SimilarityMoE, SimilarityMoEOptions, decide_sharing, visual_prototype

__version__ = "0.1.0"

__all__ = [
    "LoraPerTask",
    "LoraPerTaskOptions",
    "MoEAdapters",
    "MoEAdaptersOptions",
    "SharingDecision",
    "SimilarityMoE",
    "SimilarityMoEOptions",
    "decide_sharing",
    "most_selected",
    "visual_prototype",
    "__version__",
]
