"""igsp's default implementations of the replaceable loop steps, registered to run last.

``DefaultLoop`` is an ordinary plugin: a strategy overrides any of its ``firstresult`` hooks by
implementing the same hook and returning a value.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import distributed
from .backbone import Routes
from .exceptions import CancelBatch, CancelPhase, ConfigError, PluginError
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .data.task import Task
    from .learner import Batch, ContinualLearner, Outputs

__all__ = ["DefaultLoop", "lr_factor", "collect_param_groups"]

logger = logging.getLogger(__name__)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Return the learning-rate multiplier at ``step`` (0-based) of a ``total``-step task."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"Unknown train.schedule {schedule!r}; use 'cosine' or 'constant'.")


def collect_param_groups(learner: ContinualLearner, task: Task, phase: str) -> list[dict[str, Any]]:
    """Gather every plugin's parameter groups and make exactly those parameters trainable."""
    groups: list[dict[str, Any]] = []
    for contribution in learner.hooks.igsp_param_groups(learner=learner, task=task, phase=phase):
        groups.extend(contribution or [])
    seen: set[int] = set()
    for group in groups:
        group["params"] = [p for p in group["params"]]
        for parameter in group["params"]:
            if id(parameter) in seen:
                raise PluginError(f"A parameter of shape {tuple(parameter.shape)} appears in two parameter groups.")
            seen.add(id(parameter))
    for parameter in learner.backbone.experts.parameters():
        parameter.requires_grad_(id(parameter) in seen)
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    return groups


class DefaultLoop:
    """The core defaults: one phase, AdamW with cosine warm-up, the CLIP forward and CE loss."""

    @hookimpl(trylast=True)
    def igsp_task_phases(self) -> list[str]:
        return ["train"]

    @hookimpl(trylast=True)
    def igsp_task_route(self) -> None:
        return None

    @hookimpl(trylast=True)
    def igsp_make_optimizer(self, learner: ContinualLearner, param_groups: list[dict[str, Any]]):
        settings = learner.settings.train
        optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay)
        total, warmup, schedule = settings.steps, settings.warmup_steps, settings.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _: lr_factor(learner.task_step, total, warmup, schedule)
        )
        return optimizer, scheduler

    @hookimpl(trylast=True)
    def igsp_forward(self, learner: ContinualLearner, batch: Batch, task: Task) -> Outputs:
        from .learner import Outputs

        route = learner.task_route(batch.task_index)
        # The assignment stays on the CPU: MoE layers read it there without a device sync.
        routes = Routes.uniform(route, len(batch))
        image_features = learner.backbone.encode_images(batch.images, routes)
        text_features = learner.class_text_features(task, route, template_index=0)
        logits = learner.backbone.logit_scale * image_features @ text_features.T
        return Outputs(logits=logits, image_features=image_features, text_features=text_features)

    @hookimpl(trylast=True)
    def igsp_loss(self, learner: ContinualLearner, batch: Batch, outputs: Outputs) -> torch.Tensor:
        smoothing = learner.settings.train.label_smoothing
        return F.cross_entropy(outputs.logits.float(), batch.labels, label_smoothing=smoothing)

    @hookimpl(trylast=True)
    def igsp_train_task(self, learner: ContinualLearner, task: Task, task_index: int) -> bool:
        phases = learner.hooks.igsp_task_phases(learner=learner, task=task, task_index=task_index) or ["train"]
        batches = learner.train_batches(task, task_index)
        budget = learner.settings.train.steps
        for number, phase in enumerate(phases):
            if learner.task_step >= budget:
                logger.info("Phase %s of task %s gets no steps: the budget of %d is spent.", phase, task.name, budget)
            self._run_phase(learner, task, phase, batches, budget)
        return True

    def _run_phase(self, learner: ContinualLearner, task: Task, phase: str, batches, budget: int) -> None:
        learner.hooks.igsp_before_phase(learner=learner, task=task, phase=phase)
        groups = collect_param_groups(learner, task, phase)
        trainable = sum(p.numel() for group in groups for p in group["params"])
        learner.record_trainable(task, phase, trainable)
        steps = 0
        if groups and learner.task_step < budget:
            optimizer, scheduler = learner.hooks.igsp_make_optimizer(
                learner=learner, task=task, phase=phase, param_groups=groups
            )
            steps = self._run_steps(learner, task, phase, batches, budget, optimizer, scheduler)
        elif not groups:
            logger.info("Phase %s of task %s has no trainable parameters; skipping it.", phase, task.name)
        learner.hooks.igsp_after_phase(learner=learner, task=task, phase=phase, steps=steps)

    def _run_steps(self, learner, task, phase, batches, budget, optimizer, scheduler) -> int:
        steps = 0
        scaler = make_grad_scaler(learner)
        learner.backbone.train()
        try:
            while learner.task_step < budget:
                batch = next(batches)
                learner.task_step += 1
                steps += 1
                try:
                    self._step(learner, task, phase, batch, optimizer, scheduler, scaler)
                except CancelBatch:
                    optimizer.zero_grad(set_to_none=True)
        except CancelPhase:
            logger.debug("Phase %s of task %s ended by a plugin after %d steps.", phase, task.name, steps)
        finally:
            learner.backbone.eval()
        return steps

    def _step(self, learner, task, phase, batch, optimizer, scheduler, scaler) -> None:
        hooks = learner.hooks
        hooks.igsp_before_batch(learner=learner, batch=batch)
        with learner.autocast():
            outputs = hooks.igsp_forward(learner=learner, batch=batch, task=task)
            loss = hooks.igsp_loss(learner=learner, batch=batch, outputs=outputs)
            extras = merge_loss_terms(hooks.igsp_extra_losses(learner=learner, batch=batch, outputs=outputs, phase=phase))
        total = loss + sum(extras.values()) if extras else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
        else:
            total.backward()
        average_gradients(learner, batch, optimizer)
        if scaler is not None:
            scaler.unscale_(optimizer)
        hooks.igsp_after_backward(learner=learner, batch=batch, phase=phase)
        clip_gradients(learner, optimizer)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses = {"loss": loss.detach(), **{name: term.detach() for name, term in extras.items()}}
        distributed.reduce_layer_stats(learner.backbone)
        hooks.igsp_after_step(learner=learner, batch=batch, losses=losses, phase=phase, step=learner.task_step)
        if learner.task_step % 10 == 0 or learner.task_step == 1:
            learner.log({f"train/{name}": float(value) for name, value in global_losses(batch, losses).items()})


def merge_loss_terms(contributions: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Merge named loss terms from several plugins; a name returned twice is an error."""
    merged: dict[str, torch.Tensor] = {}
    for terms in contributions:
        for name, value in (terms or {}).items():
            if name in merged:
                raise PluginError(f"Two plugins returned a loss term named {name!r}; rename one of them.")
            merged[name] = value
    return merged


def average_gradients(learner: ContinualLearner, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
    """Average the optimiser's gradients over the ranks of a torchrun run (a no-op in one process).

    The gradients are all-reduced by hand after the backward pass instead of wrapping a model in
    DistributedDataParallel: the trainable set changes with every phase and task (new candidates,
    pruned experts, frozen history), which would need a new DDP wrapper each time, and the
    ``igsp_after_backward`` hooks must see the averaged gradients. Each rank weights its gradient
    by its share of the global batch, so the result is the gradient of the loss's mean over the
    global batch. Under fp16 the averaging runs on the scaled gradients, before ``unscale_``, so
    an overflow on any rank reaches every rank and all of them skip the same step.

    NOTE: this is exact for losses that are means over samples (the default cross-entropy) plus
    terms that depend only on the parameters. A loss term that is a non-linear function of a batch
    statistic (a load-balancing loss on the batch's mean routing) is computed on the rank's shard
    alone, so it differs from the single-process value.
    """
    if not distributed.is_distributed():
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.average_gradients(parameters, len(batch) / batch.global_size)


def global_losses(batch: Batch, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the loss terms of the global batch: each rank's values weighted by its share, summed."""
    if not distributed.is_distributed() or not losses:
        return losses
    values = torch.stack([value.float() for value in losses.values()]) * (len(batch) / batch.global_size)
    distributed.all_reduce_sum(values)
    return dict(zip(losses, values))


def clip_gradients(learner: ContinualLearner, optimizer: torch.optim.Optimizer) -> None:
    max_norm = learner.settings.train.grad_clip
    if max_norm > 0:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def make_grad_scaler(learner: ContinualLearner):
    """Return a gradient scaler for fp16 on CUDA, else None (bf16 and fp32 need none)."""
    if learner.settings.backbone.precision == "fp16" and learner.device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
