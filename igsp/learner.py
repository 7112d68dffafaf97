"""The continual learner: owns the stream -> task -> phase -> batch loop and fires the hooks.

The learner contains no strategy logic. Expansion, regularisation, pruning, routing and task
selection live in strategy and selector plugins that it reaches only through hooks. The same loop
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

import torch

from . import checkpoint as checkpoints
from . import distributed
from .backbone import Backbone, Routes, load_backbone
from .config import settings_to_dict
from .data.loading import TensorCache, _Transformed, infinite_batches
from .data.task import Task, TaskStream
from .evaluation import Evaluator
from .exceptions import CancelRun, CancelTask, ConfigError, PluginError
from .plugins import HookCaller, get_registry, make_loop_manager
from .results import RunResults
from .seed import rng_state, seed_everything, set_rng_state, task_seed
from .settings import RunSettings

__all__ = ["ContinualLearner", "Batch", "Outputs", "resolve_device", "check_precision", "compile_encoders"]

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Batch:
    """A batch of one task: images already transformed and on the device, integer labels.

    Under torchrun a batch is this rank's slice of a global batch of ``global_size`` samples;
    in a single process ``global_size`` equals ``len(batch)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    task_index: int
    global_size: int = 0

    def __post_init__(self) -> None:
        if self.global_size <= 0:
            self.global_size = len(self)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Outputs:
    """Output of a forward pass: logits over the task's classes and the features behind them."""

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

    Started by torchrun (``WORLD_SIZE`` > 1), the learner joins the process group, trains on its
    rank's slice of every batch with gradients averaged over the ranks, and writes files on rank
    0 only; see :mod:`igsp.distributed`.
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
        self.distributed = distributed.init_from_env(self.settings.backbone.device)
        seed_everything(self.settings.seed, self.settings.deterministic)
        self.device = resolve_device(self.settings.backbone.device, self.distributed.local_rank if self.distributed.enabled else None)
        check_precision(self.settings.backbone.precision, self.device)
        self.backbone = self._resolve_backbone(backbone)
        self.stream = self._resolve_stream(stream)
        self.strategy = self._resolve_plugin("strategy", strategy, self.settings.strategy.options)
        selector = selector if selector is not None else self.settings.eval.selector
        self.selector = self._resolve_plugin("selector", selector, self.settings.eval.selector_options)
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.results = RunResults.empty(self.stream.task_names, self.strategy_name, self.selector_name)
        self.cache = TensorCache()
        self._tokens: dict[tuple[str, int | None], torch.Tensor] = {}
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
        """Keep metrics in the run's history and send them to the ``igsp_log`` sinks (rank 0 only)."""
        step = self.task_step if step is None else step
        record = {"task": self.current_task_index, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.results.history.append(record)
        if distributed.is_main():
            self.hooks.igsp_log(learner=self, metrics=metrics, step=step)

    def record_task_info(self, task: Task, info: dict[str, Any]) -> None:
        """Store a strategy's per-task facts (phase lengths, pruning) in the results."""
        self.results.task_info.setdefault(task.name, {}).update(info)

    def task_route(self, task_index: int) -> str | None:
        return self.hooks.igsp_task_route(learner=self, task=self.task(task_index), task_index=task_index)

    # ---- data ----------------------------------------------------------------------------------

    @property
    def streams_images(self) -> bool:
        """Whether images are read and transformed per batch instead of cached as tensors.

        ``train.cache_images = false`` turns the cache off for datasets too big for memory;
        ``train.augment = true`` needs fresh random transforms each epoch, so it does too.
        """
        return not self.settings.train.cache_images or self.settings.train.augment

    def train_tensors(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the task's transformed training images and labels (cached on the CPU)."""
        return self.cache.tensors(task, "train", self.backbone.transform, self.settings.train)

    def test_tensors(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.tensors(task, "test", self.backbone.transform, self.settings.train, self.settings.eval.max_test_per_task)

    def split_size(self, task: Task, split: str) -> int:
        """Return the number of images of a split that training or evaluation uses."""
        if not self.streams_images:
            images, _ = self.train_tensors(task) if split == "train" else self.test_tensors(task)
            return images.shape[0]
        return len(self._split_dataset(task, split))

    def image_batches(self, task: Task, split: str, shard: bool = False,
                      batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` of a split in order, on the device, in batches.

        With ``shard`` each rank gets its contiguous part of the split (evaluation); otherwise
        every rank reads all of it.
        """
        batch_size = batch_size or self.settings.eval.batch_size
        rows = torch.arange(self.split_size(task, split))
        rows = distributed.shard(rows) if shard else rows
        if rows.numel() == 0:
            return
        if not self.streams_images:
            images, labels = self.train_tensors(task) if split == "train" else self.test_tensors(task)
            first, last = int(rows[0]), int(rows[-1]) + 1
            for start in range(first, last, batch_size):
                stop = min(start + batch_size, last)
                yield self._to_device(images[start:stop]), labels[start:stop].to(self.device, non_blocking=True)
            return
        dataset = torch.utils.data.Subset(self._split_dataset(task, split), rows.tolist())
        for images, labels in self._loader(dataset, batch_size=batch_size):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    @torch.no_grad()
    def frozen_image_features(self, task: Task, split: str = "train", capture: bool = False) -> torch.Tensor:
        """Return the frozen backbone's normalised image features of a task split (N, D), on the CPU."""
        chunks = []
        for images, _ in self.image_batches(task, split):
            with self.autocast():
                chunks.append(self.backbone.encode_images(images, None, capture=capture).cpu())
        return torch.cat(chunks)

    def train_batches(self, task: Task, task_index: int) -> Iterator[Batch]:
        """Yield training batches forever, in an order fixed by the run seed and the task index.

        Every rank draws the same seeded permutation and takes its slice of each global batch of
        ``train.batch_size`` images, so the union over ranks is the batch a single process draws.
        """
        generator = torch.Generator().manual_seed(task_seed(self.settings.seed, task_index))
        size = self.split_size(task, "train")
        global_size = min(size, self.settings.train.batch_size)
        self._check_shardable(task, global_size)
        order = infinite_batches(size, self.settings.train.batch_size, generator)
        if self.streams_images:
            yield from self._streamed_train_batches(task, task_index, order, global_size)
            return
        images, labels = self.train_tensors(task)
        for index in order:
            local = distributed.shard(index)
            yield Batch(self._to_device(images[local]), labels[local].to(self.device, non_blocking=True), task_index, global_size)

    def _streamed_train_batches(self, task: Task, task_index: int, order: Iterator[torch.Tensor],
                                global_size: int) -> Iterator[Batch]:
        shards = (distributed.shard(index).tolist() for index in order)
        loader = self._loader(self._split_dataset(task, "train"), batch_sampler=_IndexBatches(shards))
        for images, labels in loader:
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), task_index, global_size)

    def _check_shardable(self, task: Task, global_size: int) -> None:
        ranks = distributed.world_size()
        if global_size < ranks:
            raise ConfigError(
                f"Task {task.name!r} gives training batches of {global_size} images, fewer than the "
                f"{ranks} ranks of this run. Raise train.batch_size or start fewer processes."
            )

    def _split_dataset(self, task: Task, split: str) -> torch.utils.data.Dataset:
        """Return a split as a dataset of transformed images with checked labels (the streamed path)."""
        dataset = task.train if split == "train" else task.test
        limit = self.settings.eval.max_test_per_task if split == "test" else 0
        if limit and len(dataset) > limit:
            # The same seeded subset as TensorCache takes, so both paths evaluate the same images.
            generator = torch.Generator().manual_seed(0)
            indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
            dataset = torch.utils.data.Subset(dataset, indices)
        augment = split == "train" and self.settings.train.augment
        transform = self.backbone.train_transform if augment else self.backbone.transform
        return _Transformed(dataset, transform, task, split)

    def _loader(self, dataset: torch.utils.data.Dataset, **options: Any) -> torch.utils.data.DataLoader:
        # NOTE: a 2-process gloo run on a 2-core CPU once hung here with one forked worker per
        # rank, rank 0 waiting on its worker's queue. The cause is not known yet.
        workers = self.settings.train.num_workers
        return torch.utils.data.DataLoader(
            dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None, **options,
        )

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Copy a CPU batch to the device; through pinned memory on CUDA, so the copy is asynchronous."""
        if self.device.type != "cuda":
            return images
        return images.pin_memory().to(self.device, non_blocking=True)

    # ---- text ----------------------------------------------------------------------------------

    def class_tokens(self, task: Task, template_index: int | None = None) -> torch.Tensor:
        """Return the task's tokenized prompts on the device, class-major; tokenized once per task."""
        key = (task.name, template_index)
        if key not in self._tokens:
            prompts = task.prompts(template_index)
            flat = [prompt for per_class in prompts for prompt in per_class]
            self._tokens[key] = self.backbone.tokenize(flat).to(self.device)
        return self._tokens[key]

    def class_text_features(self, task: Task, route: str | None, template_index: int | None = None) -> torch.Tensor:
        """Return per-class text features (C, D) through ``route``: one template, or the mean over all.

        Gradients flow when called in training mode with ``template_index=0``.
        """
        tokens = self.class_tokens(task, template_index)
        chunks = []
        for start in range(0, tokens.shape[0], 512):
            part = tokens[start:start + 512]
            with self.autocast():
                chunks.append(self.backbone.encode_texts(part, Routes.uniform(route, part.shape[0])))
        features = torch.cat(chunks).reshape(task.num_classes, -1, chunks[0].shape[-1]).mean(dim=1)
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
        if self.settings.backbone.compile:
            compile_encoders(self.backbone)
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
        if self.out_dir is not None and distributed.is_main():
            self.save_checkpoint()
            self.results.write(self.out_dir)
        self.log({f"eval/acc/{name}": value for name, value in row.items()})
        self.hooks.igsp_after_eval(learner=self, task_index=task_index, accuracies=row)

    def _finish(self, error: BaseException | None) -> None:
        self.results.finished = error is None and self.results.rows_done == self.num_tasks
        if self.out_dir is not None and distributed.is_main():
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
        """Write the checkpoint of the last finished task into the run folder, atomically.

        The learner calls this on rank 0 only, because every rank has the same state.
        """
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


class _IndexBatches(torch.utils.data.Sampler):
    """A batch sampler over an iterator of index lists, for DataLoader(batch_sampler=...)."""

    def __init__(self, batches: Iterator[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """Return the torch device for a setting: ``auto`` picks CUDA when present.

    Under torchrun (``local_rank`` given) a CUDA setting resolves to GPU ``local_rank``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"backbone.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'.")
    if device.type != "cuda" or local_rank is None:
        return device
    if device.index is not None and device.index != local_rank:
        raise ConfigError(
            f"backbone.device is {name!r}, but torchrun gave this process GPU {local_rank}. Set "
            "backbone.device to 'cuda' or 'auto' and choose GPUs with CUDA_VISIBLE_DEVICES."
        )
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    """Reject precisions that the device cannot run: fp16 needs CUDA, bf16 on CUDA needs support."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Invalid backbone.precision = {precision!r}; expected one of {sorted(PRECISIONS)}.")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"backbone.precision = 'fp16' needs a CUDA device (with a gradient scaler), but this run "
            f"uses {device.type!r}; use backbone.precision = 'bf16' (or 'fp32') on the CPU."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"backbone.precision = 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
            "use 'fp16' (which adds a gradient scaler) or 'fp32'."
        )


COMPILED_ENCODERS = ("encode_image", "encode_text")


def compile_encoders(backbone: Backbone, backend: Any = "inductor") -> None:
    """Replace the CLIP model's image and text encoders with ``torch.compile`` versions.

    Compilation happens at the first call of each encoder, and again whenever the experts change
    (new experts or routers in a task), so errors surface then: they are raised as a ConfigError
    that names ``backbone.compile``. Calling this twice compiles nothing new.

    NOTE: the MoE layers' routing partitions depend on tensor values, so each injected block
    splits the compiled graph; the frozen blocks between them still compile.
    """
    clip = backbone.clip
    for name in COMPILED_ENCODERS:
        if getattr(getattr(clip, name), "igsp_compiled", False):
            continue
        compiled = torch.compile(getattr(clip, name), dynamic=True, backend=backend)
        setattr(clip, name, _name_compile_errors(compiled, name))
    logger.info("Compiling %s of %s with torch.compile (dynamic shapes) at first use.", " and ".join(COMPILED_ENCODERS), backbone.name)


def _name_compile_errors(compiled: Any, name: str) -> Any:
    import torch._dynamo.exc
    import torch._inductor.exc

    errors = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)

    def encode(*args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return compiled(*args, **kwargs)
        except errors as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"backbone.compile = true: torch.compile failed on clip.{name} ({type(error).__name__}: "
                f"{first_line}). Set backbone.compile = false to run the encoders without compiling."
            ) from error

    encode.igsp_compiled = True
    return encode
def accuracy_percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else math.nan
