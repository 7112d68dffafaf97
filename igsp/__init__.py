"""igsp: continual learning of CLIP models with mixture-of-experts low-rank layers.

The three-line use::

    from igsp import ContinualLearner
    learner = ContinualLearner("igsp-vit-small", "synthetic", "finetune")
    results = learner.fit_stream()
"""

from __future__ import annotations

from .backbone import Backbone, Routes, load_backbone, register_backbone
from .data.streams import load_stream
from .data.task import Task, TaskStream
from .exceptions import (
    BackboneError,
    CancelBatch,
    CancelPhase,
    CancelRun,
    CancelTask,
    CheckpointError,
    ConfigError,
    DataError,
    IgspError,
    InjectionError,
    PluginError,
    SourceNotInstalledError,
)
from .hookspecs import hookimpl, hookspec
from .learner import Batch, ContinualLearner, Outputs
from .moe import MoELayer, Router
from .results import RunResults
from .settings import RunSettings
from .strategies.base import Strategy

__version__ = "0.1.0.dev0"

__all__ = [
    "Backbone",
    "BackboneError",
    "Batch",
    "CancelBatch",
    "CancelPhase",
    "CancelRun",
    "CancelTask",
    "CheckpointError",
    "ConfigError",
    "ContinualLearner",
    "DataError",
    "IgspError",
    "InjectionError",
    "MoELayer",
    "Outputs",
    "PluginError",
    "Router",
    "Routes",
    "RunResults",
    "RunSettings",
    "SourceNotInstalledError",
    "Strategy",
    "Task",
    "TaskStream",
    "hookimpl",
    "hookspec",
    "load_backbone",
    "load_stream",
    "register_backbone",
    "__version__",
]
