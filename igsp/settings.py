"""Typed run settings: the sections of a recipe that the core loop reads.

Strategy-, selector- and stream-specific options stay free-form here; their own factories validate
them. :mod:`igsp.config` loads recipes into these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BackboneSettings",
    "StreamSettings",
    "TrainSettings",
    "EvalSettings",
    "AdapterSettings",
    "StrategySettings",
    "RunSettings",
]


@dataclass
class BackboneSettings:
    """The CLIP model to load and the device and precision to run it with."""

    model: str = "igsp-vit-small"
    pretrained: str = ""
    cache_dir: str = ""
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False


@dataclass
class StreamSettings:
    """The task stream: a registered name and the options its factory takes."""

    name: str = "mtil-lite"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSettings:
    """The per-task training budget and optimiser, identical for every strategy of a comparison."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"
    label_smoothing: float = 0.2
    grad_clip: float = 0.0
    num_workers: int = 0
    cache_images: bool = True
    augment: bool = False


@dataclass
class EvalSettings:
    """Evaluation after each task: the task selector and batch size."""

    selector: str = "prototype"
    selector_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    max_test_per_task: int = 0


@dataclass
class AdapterSettings:
    """Placement and shape of experts, read by strategies."""

    rank: int = 8
    scale: float = 1.0
    towers: list[str] = field(default_factory=lambda: ["image", "text"])
    blocks: list[int] = field(default_factory=list)


@dataclass
class StrategySettings:
    """The strategy's registered name and its own options."""

    name: str = "finetune"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSettings:
    """Every setting of a run; a recipe file resolves to one of these."""

    name: str = "run"
    seed: int = 0
    out: str = ""
    deterministic: bool = False
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
