"""Shared fixtures: tiny settings, fresh random-weight backbones and whole runs shared by modules.

Whole runs are session-scoped because each takes seconds on a 2-core CPU. Each run is made once
and read by every test that checks one property of it. Runs use the ``igsp-vit-tiny`` backbone
(random weights, 32 px) on the drawn ``synthetic`` stream, so they need no installs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import torch

from igsp.backbone import Backbone, load_backbone
from igsp.config import apply_overrides, resolve_settings
from igsp.hookspecs import hookimpl
from igsp.learner import ContinualLearner
from igsp.plugins import reset_registry
from igsp.results import RunResults
from igsp.runner import run_settings
from igsp.settings import RunSettings

# The models here are tiny, so one thread is as fast as two on an idle machine. With other
# processes on the same 2 cores, two threads per process made each step 10 to 30 times slower
# (measured: a 3-task finetune run trained in 0.4 s with one thread and in 7 s with two).
torch.set_num_threads(1)

# With four phase-1 steps the routers stay close to uniform, so the default tau (half of the
# uniform share) would prune nothing. tau_factor = 1.0 sets tau to the uniform share: every
# expert under average routing mass is pruned, and at least one per layer survives.
IGSP_TEST_OPTIONS = {
    "candidates": 2,
    "candidates_first": 3,
    "check_every": 2,
    "min_phase1_steps": 2,
    "max_phase1_fraction": 0.5,
    "tau_factor": 1.0,
}


def make_settings(
    strategy: str = "finetune",
    *,
    steps: int = 6,
    tasks: list[str] | None = None,
    selector: str = "oracle",
    options: dict[str, Any] | None = None,
    train_per_class: int = 8,
    test_per_class: int = 8,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> RunSettings:
    """Return validated settings of a tiny run: igsp-vit-tiny, synthetic stream, rank 4, CPU.

    ``overrides`` are ``key=value`` strings applied as the command line's ``--set`` does.
    """
    stream: dict[str, Any] = {"name": "synthetic", "train_per_class": train_per_class, "test_per_class": test_per_class}
    if tasks is not None:
        stream["tasks"] = list(tasks)
    recipe = {
        "name": "test",
        "seed": seed,
        "backbone": {"model": "igsp-vit-tiny", "device": "cpu"},
        "stream": stream,
        "train": {"steps": steps, "batch_size": 12, "lr": 0.005, "warmup_steps": 1},
        "eval": {"selector": selector, "batch_size": 64},
        "adapter": {"rank": 4},
        "strategy": {"name": strategy, **(options or {})},
    }
    return resolve_settings(apply_overrides(recipe, overrides))


@contextlib.contextmanager
def builtin_plugins_only() -> Iterator[None]:
    """Build the plugin registry from igsp's built-ins alone, and forget it afterwards.

    Core tests use this so that an installed third-party plugin (which may replace a built-in
    name or fail to import while it is being edited) cannot change what they measure.
    """
    saved = os.environ.get("IGSP_LOAD_PLUGINS")
    os.environ["IGSP_LOAD_PLUGINS"] = ""
    reset_registry()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("IGSP_LOAD_PLUGINS", None)
        else:
            os.environ["IGSP_LOAD_PLUGINS"] = saved
        reset_registry()


@pytest.fixture
def core_plugins_only() -> Iterator[None]:
    """Isolate one test from installed plugins (see :func:`builtin_plugins_only`)."""
    with builtin_plugins_only():
        yield



def fresh_backbone(name: str = "igsp-vit-tiny", seed: int = 0) -> Backbone:
    """Build a random-weight backbone whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return load_backbone(name)


def image_size(backbone: Backbone) -> int:
    size = backbone.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def random_images(backbone: Backbone, count: int, seed: int = 1) -> torch.Tensor:
    """Return ``count`` random images at the backbone's input size."""
    generator = torch.Generator().manual_seed(seed)
    size = image_size(backbone)
    return torch.rand(count, 3, size, size, generator=generator)


@pytest.fixture
def tiny_backbone() -> Backbone:
    return fresh_backbone("igsp-vit-tiny")



@pytest.fixture
def image_factory():
    """Return :func:`random_images`."""
    return random_images


# ---- recording callbacks -------------------------------------------------------------------------


def param_ids(groups: list[dict[str, Any]]) -> set[int]:
    return {id(p) for group in groups for p in group["params"]}


class TrainableProbe:
    """Checks, at the first batch of every phase, which added parameters are trainable."""

    def __init__(self) -> None:
        self.phase = ""
        self.seen: set[tuple[int, str]] = set()
        self.checks: list[dict[str, Any]] = []
        self.learner: ContinualLearner | None = None

    @hookimpl
    def igsp_before_phase(self, phase: str) -> None:
        self.phase = phase

    @hookimpl
    def igsp_before_batch(self, learner: ContinualLearner, batch) -> None:
        key = (batch.task_index, self.phase)
        if key in self.seen:
            return
        self.seen.add(key)
        task = learner.task(batch.task_index)
        groups = []
        for contribution in learner.hooks.igsp_param_groups(learner=learner, task=task, phase=self.phase):
            groups.extend(contribution or [])
        expected = param_ids(groups)
        trainable = {id(p) for p in learner.backbone.experts.parameters() if p.requires_grad}
        self.checks.append({
            "task": batch.task_index,
            "phase": self.phase,
            "expected": expected,
            "trainable": trainable,
            "expected_count": sum(p.numel() for group in groups for p in group["params"]),
            "clip_trainable": sum(p.requires_grad for p in learner.backbone.clip.parameters()),
        })

    @hookimpl
    def igsp_after_run(self, learner: ContinualLearner) -> None:
        self.learner = learner


def manual_outside_shares(strategy: Any, learner: ContinualLearner) -> list[float]:
    """Return each candidate's share outside its layer's historical subspace, computed by QR.

    This deliberately does not use :mod:`igsp.subspace`: the historical basis comes from a QR
    factorisation of the stacked historical down-projections.
    """
    shares = []
    for view in strategy.views(learner):
        if not view.historical_ids:
            continue
        stacked = torch.cat([view.layer.expert(i).A.detach().double() for i in view.historical_ids])
        basis, _ = torch.linalg.qr(stacked.T)
        for expert_id in view.candidate_ids:
            down = view.layer.expert(expert_id).A.detach().double()
            outside = down - down @ basis @ basis.T
            shares.append(float(outside.pow(2).sum() / down.pow(2).sum()))
    return shares


@dataclass
class PhaseRecord:
    """What the recorder saw of one task of an iGSP run."""

    historical: dict[str, list[int]] = field(default_factory=dict)
    candidates: dict[str, list[int]] = field(default_factory=dict)
    bases: dict[str, torch.Tensor | None] = field(default_factory=dict)
    router_ids_before: dict[str, list[int]] = field(default_factory=dict)
    router_ids_after: dict[str, list[int]] = field(default_factory=dict)
    active_ids_after: dict[str, list[int]] = field(default_factory=dict)
    experts_after: dict[str, list[int]] = field(default_factory=dict)
    window: dict[str, list[float]] = field(default_factory=dict)
    down_phase1_end: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    down_task_end: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    features_frozen: torch.Tensor | None = None
    features_before_pruning: torch.Tensor | None = None
    features_after_pruning: torch.Tensor | None = None
    phase_steps: dict[str, int] = field(default_factory=dict)
    loss_names: dict[str, set[str]] = field(default_factory=dict)
    regulariser_pairs: list[tuple[float, float]] = field(default_factory=list)
    regulariser_grads: dict[str, Any] = field(default_factory=dict)
    historical_grads: list[str] = field(default_factory=list)
    historical_trainable: list[str] = field(default_factory=list)


class IgspRecorder(TrainableProbe):
    """Reads the iGSP strategy's state at hook points, without changing anything training uses.

    pluggy calls callbacks before the strategy because later-registered plugins run first. So
    ``igsp_after_phase`` reads the layers before pruning, and ``igsp_before_phase("orthogonal")``
    reads them after pruning but still with dense gating.
    """

    def __init__(self, probe_images: int = 24) -> None:
        super().__init__()
        self.probe_images = probe_images
        self.tasks: dict[int, PhaseRecord] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.pending_regulariser: float | None = None
        self.gradients_before: dict[str, torch.Tensor | None] = {}

    def _record(self, learner: ContinualLearner) -> PhaseRecord:
        return self.tasks.setdefault(learner.current_task_index, PhaseRecord())

    def _features(self, learner: ContinualLearner, route: str | None) -> torch.Tensor:
        """Encode the task's first training images without adding to the routing statistics."""
        from igsp.backbone import Routes

        images, _ = learner.train_tensors(learner.task(learner.current_task_index))
        images = images[: self.probe_images]
        recording = learner.backbone.always_record
        learner.backbone.always_record = False
        try:
            with torch.no_grad():
                routes = Routes.uniform(route, images.shape[0])
                return learner.backbone.encode_images(images, routes).clone()
        finally:
            learner.backbone.always_record = recording

    @hookimpl
    def igsp_before_phase(self, learner: ContinualLearner, task, phase: str) -> None:
        self.phase = phase
        strategy = learner.strategy
        record = self._record(learner)
        if phase == "subspace":
            record.historical = {k: list(v) for k, v in strategy.state.historical.items()}
            record.candidates = {k: list(v) for k, v in strategy.state.candidates.items()}
            record.bases = {k: None if v is None else v.clone() for k, v in strategy.state.bases.items()}
            return
        record.features_after_pruning = self._features(learner, task.name)
        for key, layer in learner.backbone.layers():
            router = layer.routers[task.name]
            record.router_ids_after[key] = list(router.expert_ids)
            record.active_ids_after[key] = list(router.active_ids)
            record.experts_after[key] = layer.expert_ids
        record.window = {k: list(v) for k, v in strategy.routing_stats[task.name].items()}

    @hookimpl
    def igsp_before_batch(self, learner: ContinualLearner, batch) -> None:
        first_batch = (batch.task_index, self.phase) not in self.seen
        super().igsp_before_batch(learner=learner, batch=batch)
        self._snapshot_gradients(learner)
        strategy = learner.strategy
        if self.phase != "subspace" or batch.task_index == 0 or strategy.config.regulariser != "subspace":
            return
        shares = manual_outside_shares(strategy, learner)
        self.pending_regulariser = sum(shares) / len(shares)
        if first_batch:
            self._check_regulariser_gradient(learner, strategy)

    def _check_regulariser_gradient(self, learner: ContinualLearner, strategy: Any) -> None:
        record = self._record(learner)
        value = strategy.regulariser(strategy.views(learner))
        candidates, routers, frozen = [], [], []
        for key, layer in learner.backbone.layers():
            for expert_id in record.candidates[key]:
                candidates.append(layer.expert(expert_id).A)
                candidates.append(layer.expert(expert_id).B)
            routers += [router.weight for router in layer.routers.values() if router.weight is not None and router.weight.requires_grad]
            frozen += [f"{key}/{i}" for i in record.historical[key] if layer.expert(i).A.requires_grad]
        grads = torch.autograd.grad(value, candidates + routers, allow_unused=True)
        down_grads, up_grads = grads[0:len(candidates):2], grads[1:len(candidates):2]
        record.regulariser_grads = {
            "down_nonzero": [g is not None and float(g.abs().max()) > 0 for g in down_grads],
            "up_nonzero": [g is not None and float(g.abs().max()) > 0 for g in up_grads],
            "router_nonzero": [g is not None and float(g.abs().max()) > 0 for g in grads[len(candidates):]],
            "routers_checked": len(routers),
            "historical_requiring_grad": frozen,
        }

    def _historical_parameters(self, learner: ContinualLearner) -> dict[str, torch.Tensor]:
        """Return the parameters of earlier tasks: historical experts and other tasks' routers."""
        record = self._record(learner)
        current = learner.task(learner.current_task_index).name
        parameters = {}
        for key, layer in learner.backbone.layers():
            for expert_id in record.historical.get(key, []):
                expert = layer.expert(expert_id)
                parameters[f"{key}/{expert_id}/A"] = expert.A
                parameters[f"{key}/{expert_id}/B"] = expert.B
            for route, router in layer.routers.items():
                if route != current and router.weight is not None:
                    parameters[f"{key}/router/{route}"] = router.weight
        return parameters

    def _snapshot_gradients(self, learner: ContinualLearner) -> None:
        # A parameter keeps the .grad of its own task's last step; only a change counts.
        self.gradients_before = {
            name: None if p.grad is None else p.grad.clone()
            for name, p in self._historical_parameters(learner).items()
        }

    @hookimpl
    def igsp_after_backward(self, learner: ContinualLearner) -> None:
        record = self._record(learner)
        for name, parameter in self._historical_parameters(learner).items():
            before = self.gradients_before.get(name)
            changed = parameter.grad is not None and (before is None or not torch.equal(before, parameter.grad))
            if changed:
                record.historical_grads.append(name)
            if parameter.requires_grad:
                record.historical_trainable.append(name)

    @hookimpl
    def igsp_after_step(self, learner: ContinualLearner, losses: dict[str, torch.Tensor], phase: str) -> None:
        record = self._record(learner)
        record.loss_names.setdefault(phase, set()).update(losses)
        if phase == "subspace" and self.pending_regulariser is not None and "subspace" in losses:
            record.regulariser_pairs.append((self.pending_regulariser, float(losses["subspace"])))
        self.pending_regulariser = None

    @hookimpl
    def igsp_after_phase(self, learner: ContinualLearner, task, phase: str, steps: int) -> None:
        record = self._record(learner)
        record.phase_steps[phase] = steps
        if phase != "subspace":
            return
        record.features_frozen = self._features(learner, None)
        record.features_before_pruning = self._features(learner, task.name)
        for key, layer in learner.backbone.layers():
            record.router_ids_before[key] = list(layer.routers[task.name].expert_ids)
            for expert_id in record.candidates[key]:
                record.down_phase1_end[(key, expert_id)] = layer.expert(expert_id).A.detach().clone()

    @hookimpl
    def igsp_after_task(self, learner: ContinualLearner) -> None:
        record = self._record(learner)
        for key, survivors in learner.strategy.state.candidates.items():
            layer = learner.backbone.experts[key]
            for expert_id in survivors:
                record.down_task_end[(key, expert_id)] = layer.expert(expert_id).A.detach().clone()

    @hookimpl
    def igsp_after_eval(self, learner: ContinualLearner, task_index: int) -> None:
        self.snapshots[task_index] = learner.backbone.added_state_dict()


@dataclass
class RunRecord:
    """A finished run: its settings, folder, results and the callback that watched it."""

    settings: RunSettings
    out_dir: Path
    results: RunResults
    probe: TrainableProbe

    @property
    def learner(self) -> ContinualLearner:
        return self.probe.learner


def record_run(settings: RunSettings, out_dir: Path, probe: TrainableProbe) -> RunRecord:
    with builtin_plugins_only():
        results = run_settings(settings, out_dir, callbacks=[probe])
    return RunRecord(settings, out_dir, results, probe)


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory) -> RunRecord:
    """A finished 3-task finetune run with a run folder (checkpoint, results)."""
    settings = make_settings("finetune")
    return record_run(settings, tmp_path_factory.mktemp("finetune-run"), TrainableProbe())


@pytest.fixture(scope="session")
def igsp_run(tmp_path_factory) -> RunRecord:
    """A finished 3-task iGSP run (oracle selector, orthogonal projection) with a recorder."""
    settings = make_settings("igsp", steps=8, options=IGSP_TEST_OPTIONS)
    return record_run(settings, tmp_path_factory.mktemp("igsp-run"), IgspRecorder())
