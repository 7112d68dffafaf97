"""The continual learner: owns the stream -> task -> phase -> batch loop and fires the hooks.

The learner contains no strategy logic. Expansion, regularisation, pruning, routing and task
selection live in strategy and selector plugins that it reaches only through hooks; the same loop
therefore runs every strategy with the same data order, budget and evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import checkpoint as checkpoints
from .backbone import Backbone, load_backbone
from .config import settings_to_dict
from .data.loading import TensorCache, infinite_batches
from .data.task import Task, TaskStream
from .evaluation import Evaluator
from .exceptions import CancelRun, CancelTask, ConfigError, PluginError
from .plugins import HookCaller, get_registry, make_loop_manager
from .results import RunResults
from .seed import rng_state, seed_everything, set_rng_state, task_seed
from .settings import RunSettings

__all__ = ["ContinualLearner", "Batch", "Outputs"]

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Batch:
    """A batch of one task: images already transformed and on the device, integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    task_index: int

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Outputs:
    """What a forward pass returns: logits over the task's classes and the features behind them."""

    logits: torch.Tensor
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class ContinualLearner:
    """Train a backbone on a stream of tasks, one after another, with a pluggable strategy.

    Args:
        backbone: a :class:`~igsp.backbone.Backbone`, or a backbone name for :func:`load_backbone`.
        stream: a :class:`~igsp.data.task.TaskStream`, or a registered stream name.
        strategy: a registered strategy name or a strategy object (a plugin).
        selector: a registered task-selector name or a selector object.
        settings: every other setting; defaults to :class:`~igsp.settings.RunSettings`.
        callbacks: extra plugin objects (loggers, progress displays), called before the strategy.
        out_dir: run folder for checkpoints and results; None keeps everything in memory.
    """

    def __init__(
        self,
        backbone: Backbone | str,
        stream: TaskStream | str,
        strategy: Any = "finetune",
        selector: Any = None,
        settings: RunSettings | None = None,
        callbacks: Sequence[Any] = (),
        out_dir: str | Path | None = None,
    ) -> None:
        self.settings = settings or RunSettings()
        seed_everything(self.settings.seed, self.settings.deterministic)
        self.device = resolve_device(self.settings.backbone.device)
        self.backbone = self._resolve_backbone(backbone)
        self.stream = self._resolve_stream(stream)
        self.strategy = self._resolve_plugin("strategy", strategy, self.settings.strategy.options)
        selector = selector if selector is not None else self.settings.eval.selector
        self.selector = self._resolve_plugin("selector", selector, self.settings.eval.selector_options)
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.results = RunResults.empty(self.stream.task_names, self.strategy_name, self.selector_name)
        self.cache = TensorCache()
        self.training = False
        self.current_task_index = -1
        self.task_step = 0
        self._build_hooks()
        self.evaluator = Evaluator(self)

    # ---- construction -------------------------------------------------------------------------

    def _resolve_backbone(self, backbone: Backbone | str) -> Backbone:
        if isinstance(backbone, str):
            settings = self.settings.backbone
            return load_backbone(backbone, settings.pretrained, self.device, settings.cache_dir or None)
        return backbone.to(self.device)

    def _resolve_stream(self, stream: TaskStream | str) -> TaskStream:
        if isinstance(stream, str):
            from .data.streams import load_stream

            return load_stream(stream, **self.settings.stream.options)
        return stream

    def _resolve_plugin(self, kind: str, value: Any, options: dict[str, Any]) -> Any:
        if not isinstance(value, str):
            return value
        entry = get_registry().get(kind, value)
        plugin = entry.factory(**options)
        if getattr(plugin, "name", None) in (None, ""):
            plugin.name = value
        return plugin

    @property
    def strategy_name(self) -> str:
        return getattr(self.strategy, "name", type(self.strategy).__name__)

    @property
    def selector_name(self) -> str:
        return getattr(self.selector, "name", type(self.selector).__name__)

    def _build_hooks(self) -> None:
        from .training import DefaultLoop

        plugins = [("defaults", DefaultLoop()), ("selector", self.selector), ("strategy", self.strategy)]
        plugins += [(f"callback-{i}-{type(c).__name__}", c) for i, c in enumerate(self.callbacks)]
        self.plugin_manager = make_loop_manager(plugins)
        self.hooks = HookCaller(self.plugin_manager)

    # ---- helpers for plugins ------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.stream)

    def task(self, index: int) -> Task:
        return self.stream[index]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context of the configured precision (a no-op for fp32)."""
        dtype = PRECISIONS[self.settings.backbone.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send metrics to the ``igsp_log`` sinks and keep them in the run's history."""
        step = self.task_step if step is None else step
        record = {"task": self.current_task_index, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.results.history.append(record)
        self.hooks.igsp_log(learner=self, metrics=metrics, step=step)

    def record_task_info(self, task: Task, info: dict[str, Any]) -> None:
        """Store a strategy's per-task facts (phase lengths, pruning) in the results."""
        self.results.task_info.setdefault(task.name, {}).update(info)

    def task_route(self, task_index: int) -> str | None:
        return self.hooks.igsp_task_route(learner=self, task=self.task(task_index), task_index=task_index)

    def train_tensors(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the task's transformed training images and labels (cached on the CPU)."""
        return self.cache.tensors(task, "train", self.backbone.transform, self.settings.train)

    def test_tensors(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.tensors(task, "test", self.backbone.transform, self.settings.train, self.settings.eval.max_test_per_task)

    @torch.no_grad()
    def frozen_image_features(self, task: Task, split: str = "train", capture: bool = False) -> torch.Tensor:
        """Return the frozen backbone's normalised image features of a task split (N, D), on the CPU."""
        images, _ = self.train_tensors(task) if split == "train" else self.test_tensors(task)
        chunks = []
        for start in range(0, images.shape[0], self.settings.eval.batch_size):
            batch = images[start:start + self.settings.eval.batch_size].to(self.device)
            with self.autocast():
                chunks.append(self.backbone.encode_images(batch, None, capture=capture).cpu())
        return torch.cat(chunks)

    def train_batches(self, task: Task, task_index: int) -> Iterator[Batch]:
        """Yield training batches forever, in an order fixed by the run seed and the task index."""
        images, labels = self.train_tensors(task)
        generator = torch.Generator().manual_seed(task_seed(self.settings.seed, task_index))
        for index in infinite_batches(labels.shape[0], self.settings.train.batch_size, generator):
            yield Batch(images[index].to(self.device, non_blocking=True), labels[index].to(self.device), task_index)

    def class_text_features(self, task: Task, route: str | None, template_index: int | None = None) -> torch.Tensor:
        """Return per-class text features (C, D) through ``route``: one template, or the mean over all.

        Gradients flow when called in training mode with ``template_index=0``.
        """
        prompts = task.prompts(template_index)
        flat = [prompt for per_class in prompts for prompt in per_class]
        tokens = self.backbone.tokenize(flat).to(self.device)
        from .backbone import Routes

        chunks = []
        for start in range(0, tokens.shape[0], 512):
            part = tokens[start:start + 512]
            with self.autocast():
                chunks.append(self.backbone.encode_texts(part, Routes.uniform(route, part.shape[0], self.device)))
        features = torch.cat(chunks).reshape(len(prompts), -1, chunks[0].shape[-1]).mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1)

    # ---- the run --------------------------------------------------------------------------------

    def fit_stream(self) -> RunResults:
        """Train on every task in order, evaluate the whole stream after each, and return the results."""
        self.hooks.igsp_configure(learner=self)
        self._setup_model()
        return self._run_tasks(start=0)

    def _setup_model(self) -> None:
        self.hooks.igsp_setup_model(learner=self, backbone=self.backbone)
        self.backbone.to(self.device)
        if self.results.zero_shot_added is None:
            self.results.zero_shot_added = self.backbone.count_added_parameters()

    def _run_tasks(self, start: int) -> RunResults:
        error: BaseException | None = None
        try:
            for task_index in range(start, self.num_tasks):
                self._fit_task(task_index)
        except CancelRun:
            logger.info("Run cancelled after task %d.", self.current_task_index)
        except BaseException as caught:
            error = caught
            raise
        finally:
            self._finish(error)
        return self.results

    def _fit_task(self, task_index: int) -> None:
        task = self.task(task_index)
        self.current_task_index = task_index
        self.task_step = 0
        seed_everything(task_seed(self.settings.seed, task_index), self.settings.deterministic)
        logger.info("Task %d/%d: %s (%d classes).", task_index + 1, self.num_tasks, task.name, task.num_classes)
        started = time.perf_counter()
        self.hooks.igsp_before_task(learner=self, task=task, task_index=task_index)
        self.training = True
        try:
            self.hooks.igsp_train_task(learner=self, task=task, task_index=task_index)
        except CancelTask:
            logger.info("Training on task %s cancelled at step %d.", task.name, self.task_step)
        finally:
            self.training = False
        self.hooks.igsp_after_task(learner=self, task=task, task_index=task_index)
        self.results.train_seconds[task.name] = time.perf_counter() - started
        self.results.total_added[task.name] = self._count_total_added()
        self._evaluate_after(task_index)

    def _count_total_added(self) -> int:
        extra = getattr(self.selector, "count_parameters", None)
        return self.backbone.count_added_parameters() + (int(extra()) if callable(extra) else 0)

    def _evaluate_after(self, task_index: int) -> None:
        row, selection = self.evaluator.evaluate_stream(task_index)
        self.results.set_row(task_index, row, selection)
        if self.out_dir is not None:
            self.save_checkpoint()
            self.results.write(self.out_dir)
        self.log({f"eval/acc/{name}": value for name, value in row.items()})
        self.hooks.igsp_after_eval(learner=self, task_index=task_index, accuracies=row)

    def _finish(self, error: BaseException | None) -> None:
        self.results.finished = error is None and self.results.rows_done == self.num_tasks
        if self.out_dir is not None:
            self.results.write(self.out_dir)
        self.hooks.igsp_after_run(learner=self, results=self.results)

    def record_trainable(self, task: Task, phase: str, count: int) -> None:
        self.results.trainable.append({"task": task.name, "phase": phase, "trainable": int(count)})

    # ---- checkpoints ---------------------------------------------------------------------------

    def plugin_state(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for state in self.hooks.igsp_state_dict(learner=self):
            for namespace, value in (state or {}).items():
                if namespace in merged:
                    raise PluginError(f"Two plugins saved state under the same namespace {namespace!r}.")
                merged[namespace] = value
        return merged

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the last finished task into the run folder, atomically."""
        if self.out_dir is None:
            raise ConfigError("save_checkpoint needs an out_dir; pass out_dir= to ContinualLearner.")
        payload = {
            "format": checkpoints.FORMAT_VERSION,
            "task_index": self.current_task_index,
            "task_names": self.stream.task_names,
            "structure": self.backbone.structure(),
            "added_state": self.backbone.added_state_dict(),
            "plugin_state": self.plugin_state(),
            "results": self.results.to_dict(),
            "rng": rng_state(),
            "settings": settings_to_dict(self.settings),
        }
        return checkpoints.save(self.out_dir / checkpoints.FILENAME, payload)

    def resume_from(self, run_dir: str | Path) -> RunResults:
        """Continue a run from its checkpoint with the next unfinished task."""
        payload = checkpoints.load(Path(run_dir) / checkpoints.FILENAME)
        if payload["task_names"] != self.stream.task_names:
            raise ConfigError(
                f"The checkpoint's tasks {payload['task_names']} differ from this stream's "
                f"{self.stream.task_names}; resume with the recipe that started the run."
            )
        self.hooks.igsp_configure(learner=self)
        self._setup_model()
        self.backbone.rebuild(payload["structure"])
        self.backbone.load_added_state_dict(payload["added_state"])
        self.backbone.to(self.device)
        self.hooks.igsp_load_state_dict(learner=self, state=payload["plugin_state"])
        self.results = RunResults.from_dict(payload["results"])
        set_rng_state(payload["rng"])
        self.current_task_index = payload["task_index"]
        logger.info("Resuming after task %d of %d.", self.current_task_index + 1, self.num_tasks)
        return self._run_tasks(start=self.current_task_index + 1)


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a setting: ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"backbone.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'.")
    return device


def accuracy_percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else math.nan
