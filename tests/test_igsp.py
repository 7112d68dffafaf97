"""The iGSP strategy: regulariser, frozen history, pruning, orthogonal phase 2 and selectors.

Most tests read one shared 3-task run (``igsp_run`` in conftest.py). Its recorder callback
captured the layers at each hook point. The regulariser also has unit tests on hand-built layers.
"""

from __future__ import annotations

import math

import pytest
import torch

from igsp.backbone import Routes
from igsp.learner import ContinualLearner
from igsp.moe import MoELayer
from igsp.regularisers import LayerView, SubspaceRegulariser
from igsp.subspace import subspace_basis

from conftest import IGSP_TEST_OPTIONS, IgspRecorder, RunRecord, builtin_plugins_only, make_settings, record_run

# ---- the regulariser on hand-built layers -----------------------------------------------------


def build_layer(historical: int, candidates: int, seed: int, in_features: int = 16) -> tuple[MoELayer, list[int], list[int]]:
    """Return a layer with ``historical`` frozen experts, ``candidates`` new ones and a router."""
    torch.manual_seed(seed)
    layer = MoELayer(in_features, 8, name=f"layer{seed}")
    old = [layer.add_expert(3) for _ in range(historical)]
    new = [layer.add_expert(3) for _ in range(candidates)]
    with torch.no_grad():
        for expert_id in new:
            layer.expert(expert_id).A.copy_(torch.randn(3, in_features))
    for expert_id in old:
        layer.expert(expert_id).set_trainable(False)
    layer.add_router("task", old + new)
    return layer, old, new


def view_of(layer: MoELayer, old: list[int], new: list[int]) -> LayerView:
    basis = subspace_basis([layer.expert(i).A for i in old])
    return LayerView(layer.name, layer, "task", new, old, basis)


def qr_outside_share(layer: MoELayer, old: list[int], expert_id: int) -> float:
    """Return one candidate's share outside the historical row space, via QR (not igsp.subspace)."""
    stacked = torch.cat([layer.expert(i).A.detach().double() for i in old])
    basis, _ = torch.linalg.qr(stacked.T)
    down = layer.expert(expert_id).A.detach().double()
    outside = down - down @ basis @ basis.T
    return float(outside.pow(2).sum() / down.pow(2).sum())


def test_regulariser_equals_mean_outside_share():
    layers = [build_layer(2, 3, seed=1), build_layer(2, 3, seed=2)]
    views = [view_of(layer, old, new) for layer, old, new in layers]

    value = SubspaceRegulariser()(views)

    shares = [qr_outside_share(layer, old, i) for layer, old, new in layers for i in new]
    assert value is not None
    assert float(value.detach()) == pytest.approx(sum(shares) / len(shares), abs=1e-6)
    assert 0.0 < float(value.detach()) < 1.0


def test_regulariser_none_without_history():
    layer, _, new = build_layer(0, 3, seed=3)
    view = LayerView(layer.name, layer, "task", new, [], None)

    assert SubspaceRegulariser()([view]) is None


def test_regulariser_gradient_reaches_candidates_only():
    layer, old, new = build_layer(2, 3, seed=4)
    for expert_id in old:
        layer.expert(expert_id).set_trainable(True)  # trainable, so only the regulariser can stop a gradient
    router = layer.routers["task"]

    SubspaceRegulariser()([view_of(layer, old, new)]).backward()

    for expert_id in old:
        assert layer.expert(expert_id).A.grad is None, f"historical expert {expert_id} got a gradient on A"
        assert layer.expert(expert_id).B.grad is None, f"historical expert {expert_id} got a gradient on B"
    assert router.weight.grad is None
    for expert_id in new:
        assert layer.expert(expert_id).A.grad is not None
        assert float(layer.expert(expert_id).A.grad.abs().max()) > 0
        assert layer.expert(expert_id).B.grad is None


def test_regulariser_unknown_option_rejected():
    from igsp.exceptions import ConfigError

    with pytest.raises(ConfigError, match="weight"):
        SubspaceRegulariser(weight=2.0)


# ---- one recorded 3-task run ----------------------------------------------------------------------


def test_igsp_trainable_equals_param_groups(igsp_run: RunRecord):
    checks = igsp_run.probe.checks
    assert {(c["task"], c["phase"]) for c in checks} == {(t, p) for t in range(3) for p in ("subspace", "orthogonal")}
    for check in checks:
        assert check["trainable"] == check["expected"], f"task {check['task']} phase {check['phase']}"
        assert check["clip_trainable"] == 0
    recorded = {(r["task"], r["phase"]): r["trainable"] for r in igsp_run.results.trainable}
    names = igsp_run.results.task_names
    for check in checks:
        assert recorded[(names[check["task"]], check["phase"])] == check["expected_count"]


def test_igsp_regulariser_absent_first_task(igsp_run: RunRecord):
    tasks = igsp_run.probe.tasks

    assert tasks[0].loss_names["subspace"] == {"loss"}
    assert "subspace" in tasks[1].loss_names["subspace"]
    assert "subspace" in tasks[2].loss_names["subspace"]
    assert tasks[1].loss_names["orthogonal"] == {"loss"}


def test_igsp_regulariser_value_matches_manual(igsp_run: RunRecord):
    for task_index in (1, 2):
        pairs = igsp_run.probe.tasks[task_index].regulariser_pairs
        assert pairs, f"task {task_index} logged no regulariser"
        for manual, logged in pairs:
            assert logged == pytest.approx(manual, abs=1e-5)


def test_igsp_regulariser_gradient_in_run(igsp_run: RunRecord):
    grads = igsp_run.probe.tasks[1].regulariser_grads

    assert grads["down_nonzero"] and all(grads["down_nonzero"])
    assert not any(grads["up_nonzero"])
    assert grads["routers_checked"] > 0
    assert not any(grads["router_nonzero"])
    assert grads["historical_requiring_grad"] == []


def test_igsp_history_gets_no_gradient(igsp_run: RunRecord):
    for task_index in (1, 2):
        record = igsp_run.probe.tasks[task_index]
        assert record.historical_grads == [], f"task {task_index}"
        assert record.historical_trainable == [], f"task {task_index}"


def test_igsp_history_unchanged_across_tasks(igsp_run: RunRecord):
    final = igsp_run.learner.backbone.added_state_dict()
    first_task = igsp_run.results.task_names[0]

    after_first = igsp_run.probe.snapshots[0]
    assert any(f".routers.{first_task}." in key for key in after_first)
    for key, value in after_first.items():
        assert key in final, f"{key} disappeared after later tasks"
        assert torch.equal(final[key], value), f"{key} changed after later tasks"


def expected_pruning(record, key: str, tau_factor: float) -> tuple[list[int], list[int]]:
    """Return (deleted candidates, masked historical experts) of one layer by the rule p < tau."""
    ids = record.router_ids_before[key]
    means = record.window[key]
    tau = tau_factor / len(ids)
    below = [i for i, p in zip(ids, means) if p < tau]
    return [i for i in below if i in record.candidates[key]], [i for i in below if i in record.historical[key]]


def test_igsp_pruning_removes_experts_under_tau(igsp_run: RunRecord):
    tau_factor = igsp_run.settings.strategy.options["tau_factor"]
    deleted_total = 0
    for task_index, record in igsp_run.probe.tasks.items():
        for key, ids in record.router_ids_before.items():
            assert len(record.window[key]) == len(ids)
            deleted, masked = expected_pruning(record, key, tau_factor)
            deleted_total += len(deleted)
            where = f"task {task_index} layer {key}"
            assert record.router_ids_after[key] == [i for i in ids if i not in deleted], where
            assert record.active_ids_after[key] == [i for i in ids if i not in deleted and i not in masked], where
            assert not set(deleted) & set(record.experts_after[key]), where
            assert set(masked) <= set(record.experts_after[key]), where
            assert record.active_ids_after[key], f"{where}: no expert left"
    assert deleted_total > 0, "no candidate was pruned, so the rule was not exercised"


def test_igsp_pruning_info_recorded(igsp_run: RunRecord):
    tau_factor = igsp_run.settings.strategy.options["tau_factor"]
    for task_index, record in igsp_run.probe.tasks.items():
        info = igsp_run.results.task_info[igsp_run.results.task_names[task_index]]
        deleted = sum(len(expected_pruning(record, key, tau_factor)[0]) for key in record.router_ids_before)
        masked = sum(len(expected_pruning(record, key, tau_factor)[1]) for key in record.router_ids_before)
        assert info["candidates_added"] - info["candidates_kept"] == deleted
        assert info["historical_masked"] == masked
        assert info["phase1_end"] in ("converged", "capped")


def test_igsp_pruning_changes_output_little(core_plugins_only):
    # The strategy's own hooks add 8 candidates and prune them with the default tau (half of the
    # uniform share, 0.5 / 8). Instead of training, the test gives the candidates random
    # up-projections and the router random weights (std 0.1), so that some experts fall under
    # tau. At one layer, deleting experts of total mean mass P and renormalising the rest moves
    # the experts' sum by at most about 2 P times the size of one expert's output. The bound
    # applies that to the image features: the largest change stays under 2 P_max times the
    # largest change that the experts make to the frozen features at all. Measured with seed 0:
    # P_max 0.135, change 0.011, bound 0.018. Pruning the wrong experts (the ones with most mass)
    # or breaking a router's expert list moves the features by about the whole expert effect.
    settings = make_settings("igsp", tasks=["colors"], options={"candidates_first": 8})
    learner = ContinualLearner("igsp-vit-tiny", "synthetic", "igsp", settings=settings)
    strategy = learner.strategy
    task = learner.task(0)
    strategy.igsp_setup_model(learner=learner, backbone=learner.backbone)
    strategy.igsp_before_task(learner=learner, task=task, task_index=0)
    strategy.igsp_before_phase(learner=learner, phase="subspace")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in learner.backbone.layers():
            router = layer.routers[task.name]
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.1)
            for expert_id in layer.expert_ids:
                up = layer.expert(expert_id).B
                up.copy_(torch.randn(up.shape, generator=generator) * 0.05)

    images, _ = learner.train_tensors(task)
    routes = Routes.uniform(task.name, images.shape[0])
    with torch.no_grad():
        frozen = learner.backbone.encode_images(images, None)
        before = learner.backbone.encode_images(images, routes)
    strategy.igsp_after_phase(learner=learner, task=task, phase="subspace", steps=0)
    with torch.no_grad():
        after = learner.backbone.encode_images(images, routes)

    tau = 0.5 / 8
    removed = [sum(p for p in means if p < tau) for means in strategy.routing_stats[task.name].values()]
    effect = float((before - frozen).norm(dim=-1).max())
    change = float((after - before).norm(dim=-1).max())
    assert learner.results.task_info[task.name]["candidates_kept"] < learner.results.task_info[task.name]["candidates_added"]
    assert max(removed) > 0
    assert change > 0
    assert change < 2 * max(removed) * effect, f"change {change:.4g}, removed mass {max(removed):.3g}, effect {effect:.4g}"


def inside_history(record) -> list[float]:
    """Return, per survivor, the largest component of its phase-2 change of A inside the history."""
    values = []
    for (key, expert_id), end in record.down_task_end.items():
        basis = record.bases[key]
        change = end - record.down_phase1_end[(key, expert_id)]
        values.append(float((change.double() @ basis.double()).abs().max()))
    return values


def phase2_movement(record) -> float:
    return max(float((end - record.down_phase1_end[k]).abs().max()) for k, end in record.down_task_end.items())


def test_igsp_phase2_orthogonal_to_history(igsp_run: RunRecord):
    for task_index in (1, 2):
        record = igsp_run.probe.tasks[task_index]
        assert record.phase_steps["orthogonal"] > 0
        assert record.down_task_end, f"task {task_index} kept no candidate"
        assert phase2_movement(record) > 1e-4, f"task {task_index}: phase 2 did not move A"
        assert max(inside_history(record)) < 1e-5, f"task {task_index}"


def test_igsp_oracle_no_forgetting(igsp_run: RunRecord):
    matrix = igsp_run.results.matrix
    for column in range(3):
        for row in range(column, 3):
            assert matrix[row][column] == matrix[column][column], f"task {column} after task {row}"


def test_igsp_run_finished(igsp_run: RunRecord):
    results = igsp_run.results

    assert results.finished
    assert results.rows_done == 3
    assert all(0.0 <= value <= 100.0 for row in results.matrix for value in row)


# ---- variants: no projection, the routing-mass regulariser, the two selectors -----------------------


@pytest.fixture(scope="module")
def no_projection_run(tmp_path_factory) -> RunRecord:
    """Two tasks with ``orthogonal=none`` and the router selector."""
    options = {**IGSP_TEST_OPTIONS, "orthogonal": "none"}
    settings = make_settings("igsp", steps=8, tasks=["colors", "stripes"], selector="router", options=options)
    return record_run(settings, tmp_path_factory.mktemp("igsp-none"), IgspRecorder())


@pytest.fixture(scope="module")
def routing_mass_run(tmp_path_factory) -> RunRecord:
    """Two tasks with the routing-mass regulariser, chosen by an override, and the prototype selector."""
    settings = make_settings(
        "igsp", steps=6, tasks=["colors", "stripes"], selector="prototype",
        options=IGSP_TEST_OPTIONS, overrides=["strategy.regulariser=routing-mass"],
    )
    return record_run(settings, tmp_path_factory.mktemp("igsp-mass"), IgspRecorder())


def test_igsp_no_projection_keeps_history_component(no_projection_run: RunRecord):
    record = no_projection_run.probe.tasks[1]

    assert record.down_task_end, "task 1 kept no candidate"
    assert max(inside_history(record)) > 1e-4


def test_routing_mass_replaces_default(routing_mass_run: RunRecord):
    strategy = routing_mass_run.learner.strategy
    names = routing_mass_run.probe.tasks[1].loss_names["subspace"]

    assert type(strategy.regulariser).__name__ == "RoutingMassRegulariser"
    assert "routing-mass" in names
    assert "subspace" not in names
    logged = [r["train/routing-mass"] for r in routing_mass_run.results.history if "train/routing-mass" in r]
    assert logged, "the routing-mass term was never logged"
    assert all(0.0 <= value <= 1.0 for value in logged)


@pytest.mark.parametrize("run_name", ["no_projection_run", "routing_mass_run"])
def test_selector_reports_selection_accuracy(run_name, request):
    run: RunRecord = request.getfixturevalue(run_name)
    selection = run.results.selection
    names = run.results.task_names

    assert len(selection) == 2
    assert math.isnan(selection[0][names[1]]["selected_correct"]), "an untrained task has no selection accuracy"
    for row in range(2):
        for column in range(row + 1):
            value = selection[row][names[column]]["selected_correct"]
            assert 0.0 <= value <= 100.0, f"row {row} task {names[column]}: {value}"
    assert 0.0 <= run.results.mean_selection_accuracy() <= 100.0
    assert run.learner.selector.task_indices == [0, 1]


def test_igsp_unknown_option_rejected():
    from igsp.exceptions import ConfigError
    from igsp.strategies.igsp import IGSP

    with builtin_plugins_only():
        with pytest.raises(ConfigError, match="candidatez"):
            IGSP(candidatez=3)
        with pytest.raises(ConfigError, match="orthogonal"):
            IGSP(orthogonal="sometimes")
        with pytest.raises(ConfigError, match="nope"):
            IGSP(regulariser="nope")
