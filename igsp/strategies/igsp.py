"""iGSP: Implicit Gradient Subspace Projection, as hook implementations on the core loop.

Per task, in every MoE layer:

1. phase ``subspace``: add candidate experts (orthonormal ``A``, ``B = 0``) and a zero-initialised
   router over historical and candidate experts, routed densely. Train the router and the
   candidates with cross-entropy plus a regulariser that pulls the candidates' down-projections
   into the historical subspace. Stop when the routers converge (or at a cap), then delete
   candidates whose mean routing probability is under tau and mask out historical experts under it;
2. phase ``orthogonal``: top-k routing over the survivors. Train the router and the surviving
   candidates, with each survivor's down-projection update stripped of its component inside the
   historical subspace;
3. after the task: freeze the survivors, which join the history; keep the router for inference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..exceptions import CancelPhase, ConfigError
from ..hookspecs import hookimpl
from ..regularisers import LayerView
from ..subspace import ConvergenceDetector, project_out, prune_decision, subspace_basis
from .base import Strategy, inject_from_settings

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..data.task import Task
    from ..learner import Batch, ContinualLearner, Outputs

__all__ = ["IGSP", "IGSPOptions", "PHASES"]

logger = logging.getLogger(__name__)

PHASES = ["subspace", "orthogonal"]


@dataclass
class IGSPOptions:
    """iGSP's settings; every default is the method's default."""

    candidates: int = 4
    candidates_first: int = 8
    rank: int = 0
    reg_weight: float = 1.0
    regulariser: str = "subspace"
    check_every: int = 20
    tolerance: float = 0.05
    patience: int = 2
    min_phase1_steps: int = 40
    max_phase1_fraction: float = 0.3
    tau: float = 0.0
    tau_factor: float = 0.5
    top_k: int = 2
    orthogonal: str = "project"
    noise_std: float = 0.0

    def validate(self) -> None:
        checks = [
            (self.candidates >= 0, "candidates", self.candidates, "a count >= 0"),
            (self.candidates_first >= 1, "candidates_first", self.candidates_first, "at least 1"),
            (self.rank >= 0, "rank", self.rank, "0 (use adapter.rank) or a positive rank"),
            (self.reg_weight >= 0, "reg_weight", self.reg_weight, "a number >= 0"),
            (self.check_every >= 1, "check_every", self.check_every, "at least 1"),
            (self.tolerance >= 0, "tolerance", self.tolerance, "a number >= 0"),
            (self.patience >= 1, "patience", self.patience, "at least 1"),
            (self.min_phase1_steps >= 0, "min_phase1_steps", self.min_phase1_steps, "a count >= 0"),
            (0 < self.max_phase1_fraction <= 1, "max_phase1_fraction", self.max_phase1_fraction, "in (0, 1]"),
            (self.tau >= 0, "tau", self.tau, "0 (use tau_factor / experts) or a probability"),
            (self.top_k >= 1, "top_k", self.top_k, "at least 1"),
            (self.orthogonal in ("project", "none"), "orthogonal", self.orthogonal, "'project' or 'none'"),
            (self.noise_std >= 0, "noise_std", self.noise_std, "a number >= 0"),
        ]
        for valid, key, value, expected in checks:
            if not valid:
                raise ConfigError(f"Invalid strategy.{key} = {value!r} for igsp; expected {expected}.")


@dataclass
class TaskState:
    """Per-layer bookkeeping of the task being trained."""

    route: str
    candidates: dict[str, list[int]] = field(default_factory=dict)
    historical: dict[str, list[int]] = field(default_factory=dict)
    bases: dict[str, torch.Tensor | None] = field(default_factory=dict)
    detector: ConvergenceDetector | None = None
    window: dict[str, torch.Tensor] = field(default_factory=dict)
    phase1_steps: int = 0
    phase1_end: str = ""
    pruned: bool = False
    before_step: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    last_regulariser: float = math.nan


class IGSP(Strategy):
    """The iGSP strategy; see the module docstring for the method."""

    name = "igsp"
    Config = IGSPOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from ..plugins import get_registry

        self.regulariser = get_registry().get("regulariser", self.config.regulariser).factory()
        self.trained: list[str] = []
        self.state: TaskState | None = None
        self.routing_stats: dict[str, dict[str, list[float]]] = {}

    # ---- structure --------------------------------------------------------------------------------

    @hookimpl
    def igsp_setup_model(self, learner: ContinualLearner, backbone: Backbone) -> None:
        inject_from_settings(learner)

    @hookimpl
    def igsp_task_phases(self) -> list[str]:
        return list(PHASES)

    @hookimpl
    def igsp_task_route(self, task: Task) -> str | None:
        if task.name in self.trained or (self.state is not None and self.state.route == task.name):
            return task.name
        return None

    def _rank(self, learner: ContinualLearner) -> int:
        return self.config.rank or learner.settings.adapter.rank

    @hookimpl
    def igsp_before_task(self, learner: ContinualLearner, task: Task, task_index: int) -> None:
        first = not self.trained
        count = self.config.candidates_first if first else self.config.candidates
        state = TaskState(route=task.name)
        for key, layer in learner.backbone.layers():
            historical = layer.expert_ids
            state.historical[key] = historical
            state.bases[key] = subspace_basis([layer.expert(i).A for i in historical])
            rank = self._rank(learner)
            state.candidates[key] = [layer.add_expert(rank, learner.settings.adapter.scale, owner=task.name) for _ in range(count)]
            layer.add_router(task.name, historical + state.candidates[key], learnable=True, gating="dense",
                             top_k=self.config.top_k, noise_std=self.config.noise_std)
        steps = learner.settings.train.steps
        state.detector = ConvergenceDetector(
            check_every=self.config.check_every,
            tolerance=self.config.tolerance,
            patience=self.config.patience,
            min_steps=self.config.min_phase1_steps,
            max_steps=max(1, math.floor(self.config.max_phase1_fraction * steps)),
        )
        self.state = state
        logger.info("iGSP task %s: %d candidates per layer in %d layers.", task.name, count, len(state.candidates))

    # ---- phases -----------------------------------------------------------------------------------

    @hookimpl
    def igsp_before_phase(self, learner: ContinualLearner, phase: str) -> None:
        state = self._require_state()
        gating = "dense" if phase == "subspace" else "topk"
        for key, layer in learner.backbone.layers():
            layer.routers[state.route].gating = gating
            layer.reset_stats()
        learner.backbone.always_record = phase == "subspace"

    @hookimpl
    def igsp_param_groups(self, learner: ContinualLearner, phase: str) -> list[dict[str, Any]]:
        state = self._require_state()
        parameters = []
        for key, layer in learner.backbone.layers():
            router = layer.routers[state.route]
            if router.weight is not None:
                parameters.append(router.weight)
            for expert_id in state.candidates[key]:
                if str(expert_id) in layer.experts:
                    expert = layer.expert(expert_id)
                    parameters += [expert.A, expert.B]
        return [{"params": parameters}] if parameters else []

    def views(self, learner: ContinualLearner) -> list[LayerView]:
        """Return the per-layer view that regularisers read."""
        state = self._require_state()
        return [
            LayerView(key, layer, state.route, state.candidates[key], state.historical[key], state.bases[key])
            for key, layer in learner.backbone.layers()
        ]

    @hookimpl
    def igsp_extra_losses(self, learner: ContinualLearner, phase: str) -> dict[str, torch.Tensor] | None:
        if phase != "subspace" or self.config.reg_weight == 0:
            return None
        value = self.regulariser(self.views(learner))
        if value is None:
            return None
        return {self.config.regulariser: self.config.reg_weight * value}

    @hookimpl
    def igsp_after_backward(self, learner: ContinualLearner, phase: str) -> None:
        if phase != "orthogonal" or self.config.orthogonal != "project":
            return
        state = self._require_state()
        for key, layer in learner.backbone.layers():
            basis = state.bases[key]
            for expert_id in state.candidates[key]:
                expert = layer.expert(expert_id)
                if basis is not None and expert.A.grad is not None:
                    expert.A.grad.copy_(project_out(expert.A.grad, basis))
                    state.before_step[(key, expert_id)] = expert.A.detach().clone()

    @hookimpl
    def igsp_after_step(self, learner: ContinualLearner, phase: str, step: int) -> None:
        state = self._require_state()
        if phase == "orthogonal":
            self._project_updates(learner, state)
            return
        state.phase1_steps = step
        if step % self.config.check_every != 0:
            return
        window = self._window_means(learner, state)
        verdict = state.detector.check(step, window)
        state.window = window
        if verdict is not None:
            state.phase1_end = verdict
            raise CancelPhase()

    def _project_updates(self, learner: ContinualLearner, state: TaskState) -> None:
        """Remove the part of each survivor's optimiser update that lies in the historical subspace.

        Projecting the gradient alone is not enough under AdamW, because its per-coordinate scaling
        and weight decay move ``A`` inside the subspace too. Projecting the update is exact.
        """
        with torch.no_grad():
            for (key, expert_id), before in state.before_step.items():
                expert = learner.backbone.experts[key].expert(expert_id)
                update = project_out(expert.A - before, state.bases[key])
                expert.A.copy_(before + update)
        state.before_step.clear()

    def _window_means(self, learner: ContinualLearner, state: TaskState) -> dict[str, torch.Tensor]:
        means = {}
        for key, layer in learner.backbone.layers():
            mean = layer.mean_probabilities(state.route)
            if mean is not None:
                means[key] = mean.detach().cpu()
            layer.reset_stats()
        return means

    @hookimpl
    def igsp_after_phase(self, learner: ContinualLearner, task: Task, phase: str, steps: int) -> None:
        state = self._require_state()
        if phase != "subspace":
            return
        learner.backbone.always_record = False
        if not state.phase1_end:
            state.phase1_end = "budget"
        if not state.window:
            state.window = self._window_means(learner, state)
        logger.info("iGSP task %s: phase 1 ended after %d steps (%s).", task.name, steps, state.phase1_end)
        self._prune(learner, task, state)

    def _prune(self, learner: ContinualLearner, task: Task, state: TaskState) -> None:
        kept, masked, added = {}, {}, {}
        for key, layer in learner.backbone.layers():
            router = layer.routers[state.route]
            means = state.window.get(key)
            added[key] = len(state.candidates[key])
            if means is None:
                kept[key], masked[key] = added[key], 0
                continue
            decision = prune_decision(router.expert_ids, means, state.candidates[key], self.config.tau or None, self.config.tau_factor)
            for expert_id in decision.delete:
                layer.remove_expert(expert_id)
            router.set_mask([i for i in router.expert_ids if i not in set(decision.mask_out)])
            state.candidates[key] = [i for i in state.candidates[key] if i not in set(decision.delete)]
            kept[key], masked[key] = len(state.candidates[key]), len(decision.mask_out)
        state.pruned = True
        self.routing_stats[task.name] = {key: value.tolist() for key, value in state.window.items()}
        learner.record_task_info(task, {
            "phase1_steps": state.phase1_steps,
            "phase1_end": state.phase1_end,
            "candidates_added": sum(added.values()),
            "candidates_kept": sum(kept.values()),
            "historical_masked": sum(masked.values()),
            "kept_per_layer": kept,
            "masked_per_layer": masked,
            "tv_changes": list(state.detector.changes),
        })
        logger.info("iGSP task %s: kept %d of %d candidates; masked %d historical experts.",
                    task.name, sum(kept.values()), sum(added.values()), sum(masked.values()))

    # ---- after the task ------------------------------------------------------------------------

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner, task: Task) -> None:
        state = self._require_state()
        for key, layer in learner.backbone.layers():
            router = layer.routers[state.route]
            router.gating = "topk"
            if router.weight is not None:
                router.weight.requires_grad_(False)
            for expert_id in state.candidates[key]:
                layer.expert(expert_id).set_trainable(False)
        regulariser = [r for r in learner.results.history if r.get("task") == learner.current_task_index]
        learner.record_task_info(task, {
            "added_parameters": learner.backbone.count_added_parameters(),
            "regulariser_last": next((r[f"train/{self.config.regulariser}"] for r in reversed(regulariser)
                                      if f"train/{self.config.regulariser}" in r), None),
        })
        self.trained.append(task.name)
        self.state = None

    def _require_state(self) -> TaskState:
        if self.state is None:
            raise RuntimeError("iGSP hook called outside a task; igsp_before_task has not run.")
        return self.state

    # ---- checkpoints -------------------------------------------------------------------------------

    @hookimpl
    def igsp_state_dict(self) -> dict[str, Any]:
        return {"strategy/igsp": {"trained": list(self.trained), "routing_stats": self.routing_stats}}

    @hookimpl
    def igsp_load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("strategy/igsp")
        if saved is not None:
            self.trained = list(saved["trained"])
            self.routing_stats = dict(saved["routing_stats"])
