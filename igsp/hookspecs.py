"""Hook specifications: the public contract between the training loop and its plugins.

Two groups of hooks share the project name ``igsp``:

* registry hooks, implemented at module level by installed plugins (entry-point group ``igsp``)
  and called once when the registry is built: they register strategies, selectors and streams;
* loop hooks, implemented by strategy, selector and callback objects registered on one
  :class:`~igsp.learner.ContinualLearner`; they fire at task, phase and batch granularity, never
  inside a layer's forward pass.

Every hook is called with keyword arguments. An implementation may accept any subset of the
arguments listed in its spec (pluggy's opt-in arguments), so adding an argument later breaks no
plugin. ``firstresult`` hooks are replaceable steps: the first implementation that returns a value
other than None wins, and igsp's defaults are registered so that they run last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from .data.task import Task
    from .learner import Batch, ContinualLearner, Outputs

__all__ = ["hookspec", "hookimpl", "PROJECT", "RegistrySpec", "LoopSpec"]

PROJECT = "igsp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegistrySpec:
    """Hooks that installed plugins implement at module level to add named components."""

    @hookspec
    def igsp_register_strategies(self, register: Callable[..., None]) -> None:
        """Register strategies by calling ``register(name, factory, description="")``.

        Fires once when the registry is built. ``factory(**options)`` returns a strategy object
        whose methods implement loop hooks; ``options`` are the recipe's ``[strategy]`` table
        without ``name``. A factory should raise :class:`~igsp.exceptions.ConfigError` naming
        an unknown or invalid option. Returns nothing.
        """

    @hookspec
    def igsp_register_selectors(self, register: Callable[..., None]) -> None:
        """Register task selectors by calling ``register(name, factory, description="")``.

        A selector decides, per test image, which trained task's experts to use (or none).
        ``factory(**options)`` returns an object implementing ``igsp_select_tasks`` and, if it
        keeps statistics, ``igsp_after_task``. Returns nothing.
        """

    @hookspec
    def igsp_register_regularisers(self, register: Callable[..., None]) -> None:
        """Register iGSP phase-1 regularisers by calling ``register(name, factory, description="")``.

        ``factory(**options)`` returns a callable ``regulariser(views) -> Tensor | None`` that
        receives one :class:`~igsp.regularisers.LayerView` per MoE layer of the current task.
        The iGSP strategy's ``regulariser`` option picks one by name. Returns nothing.
        """

    @hookspec
    def igsp_register_streams(self, register: Callable[..., None]) -> None:
        """Register task streams by calling ``register(name, factory, description="")``.

        ``factory(**options)`` returns a :class:`~igsp.data.task.TaskStream`; ``options`` are the
        recipe's ``[stream]`` table without ``name``. Returns nothing.
        """


class LoopSpec:
    """Hooks that fire during :meth:`~igsp.learner.ContinualLearner.fit_stream`, in this order."""

    @hookspec
    def igsp_configure(self, learner: ContinualLearner) -> None:
        """Validate settings and allocate state once, before the first task.

        Fires at the start of ``fit_stream`` and of ``resume``. Raise
        :class:`~igsp.exceptions.ConfigError` for invalid settings.
        """

    @hookspec
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Any) -> None:
        """Inject expert layers into the backbone (``backbone.inject(...)``).

        Fires once before the first task, and on resume before the saved expert structure and
        weights are loaded.
        """

    @hookspec
    def igsp_load_state_dict(self, learner: ContinualLearner, state: dict[str, Any]) -> None:
        """Restore a plugin's own entry from a checkpoint on resume.

        ``state`` maps namespaces to the values that ``igsp_state_dict`` returned. Fires after
        the expert structure and weights are loaded.
        """

    @hookspec
    def igsp_before_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        """Prepare for training ``task``: add experts and routers, freeze earlier ones."""

    @hookspec(firstresult=True)
    def igsp_task_phases(self, learner: ContinualLearner, task: Task, task_index: int) -> list[str] | None:
        """Return the names of the task's training phases in order (default ``["train"]``).

        Phases share the task's step budget. A phase ends when a hook raises
        :class:`~igsp.exceptions.CancelPhase`, or when the budget is spent; the last phase
        runs all remaining steps.
        """

    @hookspec
    def igsp_before_phase(self, learner: ContinualLearner, task: Task, phase: str) -> None:
        """Fire at the start of each phase, before its parameter groups are collected."""

    @hookspec
    def igsp_param_groups(self, learner: ContinualLearner, task: Task, phase: str) -> list[dict[str, Any]] | None:
        """Return the parameter groups to train in this phase (each a dict with ``params``).

        Every implementation's groups are concatenated; a parameter listed twice is an error.
        Groups may set their own ``lr`` or ``weight_decay``. An empty list means the phase trains
        nothing and is skipped.
        """

    @hookspec(firstresult=True)
    def igsp_make_optimizer(
        self, learner: ContinualLearner, task: Task, phase: str, param_groups: list[dict[str, Any]]
    ) -> tuple[torch.optim.Optimizer, Any] | None:
        """Return ``(optimizer, scheduler)`` for the phase; the default builds AdamW with a cosine schedule.

        The scheduler may be None. It is stepped once per optimiser step.
        """

    @hookspec(firstresult=True)
    def igsp_train_task(self, learner: ContinualLearner, task: Task, task_index: int) -> bool | None:
        """Train on one task and return True; the default runs the phases and batches below."""

    @hookspec
    def igsp_before_batch(self, learner: ContinualLearner, batch: Batch) -> None:
        """Fire for each training batch after it moved to the device."""

    @hookspec(firstresult=True)
    def igsp_forward(self, learner: ContinualLearner, batch: Batch, task: Task) -> Outputs | None:
        """Return the training outputs (logits over the task's classes) for a batch.

        The default encodes the images and the task's first-template prompts through the task's
        training route (``igsp_task_route``).
        """

    @hookspec(firstresult=True)
    def igsp_loss(self, learner: ContinualLearner, batch: Batch, outputs: Outputs) -> torch.Tensor | None:
        """Return the main loss; the default is cross-entropy with label smoothing."""

    @hookspec
    def igsp_extra_losses(
        self, learner: ContinualLearner, batch: Batch, outputs: Outputs, phase: str
    ) -> dict[str, torch.Tensor] | None:
        """Return named loss terms to add to the main loss (for example ``{"subspace": r}``).

        Terms from all implementations are summed with the main loss and logged by name; two
        plugins returning the same name is an error.
        """

    @hookspec
    def igsp_after_backward(self, learner: ContinualLearner, batch: Batch, phase: str) -> None:
        """Fire after ``backward()`` and before the optimiser step: gradient surgery goes here."""

    @hookspec
    def igsp_after_step(
        self, learner: ContinualLearner, batch: Batch, losses: dict[str, torch.Tensor], phase: str, step: int
    ) -> None:
        """Fire after each optimiser step; ``step`` counts the task's steps from 1.

        ``losses`` contains detached scalar tensors (``loss`` and each extra term); call ``float()``
        only when a value is needed, because that waits for the device.

        Raise :class:`~igsp.exceptions.CancelPhase` to end the current phase.
        """

    @hookspec
    def igsp_after_phase(self, learner: ContinualLearner, task: Task, phase: str, steps: int) -> None:
        """Fire at the end of each phase with the number of steps it ran."""

    @hookspec
    def igsp_after_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        """Fire after training on a task and before evaluation: freeze, prune, store statistics."""

    @hookspec(firstresult=True)
    def igsp_task_route(self, learner: ContinualLearner, task: Task, task_index: int) -> str | None:
        """Return the router key that samples of a trained ``task`` use, or None for no experts.

        Used for the training forward pass and for mapping a selected task to its experts at
        evaluation. The default returns None (the frozen backbone).
        """

    @hookspec(firstresult=True)
    def igsp_select_tasks(
        self, learner: ContinualLearner, images: torch.Tensor, features: torch.Tensor, task_index: int
    ) -> torch.Tensor | None:
        """Return, per test image, the index of the trained task whose experts to use, or -1.

        ``features`` are the frozen backbone's normalised image features of ``images``;
        ``task_index`` is the evaluated task (only the ``oracle`` selector may read it).
        Implemented by the run's selector.
        """

    @hookspec
    def igsp_after_eval(self, learner: ContinualLearner, task_index: int, accuracies: dict[str, float]) -> None:
        """Fire after the whole stream was evaluated following task ``task_index``.

        ``accuracies`` maps task names to percent: one row of the accuracy matrix.
        """

    @hookspec
    def igsp_state_dict(self, learner: ContinualLearner) -> dict[str, Any] | None:
        """Return ``{namespace: state}`` of plain data (numbers, strings, lists, dicts, tensors).

        Fires whenever a checkpoint is written; namespaces must not clash between plugins.
        """

    @hookspec
    def igsp_log(self, learner: ContinualLearner, metrics: dict[str, float], step: int) -> None:
        """Receive flat metrics such as ``train/loss`` or ``eval/acc/<task>``; sinks only."""

    @hookspec
    def igsp_after_run(self, learner: ContinualLearner, results: Any) -> None:
        """Fire once at the end of the run, also after an error or a CancelRun."""
