"""Tests of the baseline strategies of the igsp-baselines distribution and of `igsp compare`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from igsp import CancelRun, ContinualLearner, PluginError, RunSettings, Task, TaskStream, hookimpl
from igsp.cli_compare import compare
from igsp.compare import (
    FAILED,
    FIGURE_FILE,
    FINISHED,
    SUMMARY_FILE,
    TABLE_FILE,
    comparison_settings,
    load_plan,
    run_comparison,
)
from igsp.data.synthetic import build_synthetic_stream
from igsp.exceptions import ConfigError
from igsp.plugins import get_registry
from igsp.results import RunResults
try:
    from igsp_baselines import LoraPerTask, MoEAdapters, SimilarityMoE, decide_sharing, most_selected
except ModuleNotFoundError as missing:
    raise ImportError(
        "The igsp-baselines distribution is not installed; run `.venv/bin/pip install --no-deps -e plugins/igsp-baselines`."
    ) from missing

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 4
RANK = 4
POOL = {"num_experts": 4, "width": 8}

# Random-weight features of all drawn images are close (cosine about 0.97), so these thresholds
# make only tasks with identical training images count as similar.
ONLY_IDENTICAL = {"share_tau": 0.999, "reuse_tau": 0.9999}


def make_settings(steps: int = 2) -> RunSettings:
    settings = RunSettings(name="baselines-test")
    settings.backbone.model = "igsp-vit-tiny"
    settings.backbone.device = "cpu"
    settings.stream.name = "synthetic"
    settings.stream.options = {"train_per_class": TRAIN_PER_CLASS, "test_per_class": TEST_PER_CLASS}
    settings.train.steps = steps
    settings.train.batch_size = 8
    settings.train.warmup_steps = 0
    settings.adapter.rank = RANK
    settings.eval.batch_size = 64
    return settings


@pytest.fixture(scope="module")
def stream() -> TaskStream:
    return build_synthetic_stream(train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS)


def renamed(task: Task, name: str) -> Task:
    """Return ``task``'s images and classes under another task name."""
    return Task(name, list(task.classnames), list(task.templates), task.train, task.test)


class Recorder:
    """Records the added parameters and every expert's weights after each task's evaluation."""

    def __init__(self) -> None:
        self.total: list[int] = []
        self.expert_total: list[int] = []
        self.weights: list[dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]] = []
        self.structure: list[dict] = []

    @hookimpl
    def igsp_after_eval(self, learner: ContinualLearner) -> None:
        layers = learner.backbone.layers()
        self.total.append(learner.backbone.count_added_parameters())
        self.expert_total.append(sum(p.numel() for _, layer in layers for p in layer.experts.parameters()))
        self.weights.append({
            (key, expert_id): (layer.expert(expert_id).A.detach().clone(), layer.expert(expert_id).B.detach().clone())
            for key, layer in layers
            for expert_id in layer.expert_ids
        })
        self.structure.append(learner.backbone.structure())


def fit(strategy, stream: TaskStream, out_dir: Path | None = None, callbacks=()) -> tuple[ContinualLearner, Recorder]:
    recorder = Recorder()
    learner = ContinualLearner("igsp-vit-tiny", stream, strategy, settings=make_settings(),
                               callbacks=[recorder, *callbacks], out_dir=out_dir)
    learner.fit_stream()
    return learner, recorder


def unchanged(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def expert_size(learner: ContinualLearner, rank: int) -> int:
    """Return the parameters of one rank-``rank`` expert in every injected layer together."""
    return sum(rank * (layer.in_features + layer.out_features) for _, layer in learner.backbone.layers())


# ---- lora-per-task -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(stream):
    return fit(LoraPerTask(), stream)


def test_lora_per_task_growth_linear(lora_run):
    learner, recorder = lora_run
    per_task = expert_size(learner, RANK)

    assert recorder.total == [per_task, 2 * per_task, 3 * per_task]


def test_lora_per_task_trains_own_expert(lora_run):
    learner, _ = lora_run
    trainable = [record["trainable"] for record in learner.results.trainable]

    assert trainable == [expert_size(learner, RANK)] * 3


def test_lora_per_task_earlier_experts_frozen(lora_run):
    _, recorder = lora_run
    first, last = recorder.weights[0], recorder.weights[-1]

    assert first
    for key, weights in first.items():
        assert unchanged(weights, last[key]), key


def test_lora_per_task_router_per_task(lora_run, stream):
    _, recorder = lora_run
    final = recorder.structure[-1]

    for layer in final.values():
        assert sorted(layer["routers"]) == sorted(stream.task_names)
        for router in layer["routers"].values():
            assert len(router["expert_ids"]) == 1
            assert router["learnable"] is False


# ---- similarity-moe ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reuse_run(stream):
    """Task 3 shows task 1's training images again under another name, so their prototypes coincide."""
    repeated = TaskStream("repeat", [stream[0], stream[1], renamed(stream[0], "colors-again")])
    return fit(SimilarityMoE(**ONLY_IDENTICAL), repeated)


def test_similarity_moe_reuse_adds_no_experts(reuse_run):
    _, recorder = reuse_run

    assert recorder.expert_total[2] == recorder.expert_total[1]
    assert recorder.expert_total[1] == 2 * recorder.expert_total[0]


def test_similarity_moe_reuse_adds_only_router(reuse_run):
    learner, recorder = reuse_run
    router_size = sum(2 * layer.in_features for _, layer in learner.backbone.layers())

    assert recorder.total[2] - recorder.total[1] == router_size


def test_similarity_moe_reuse_recorded(reuse_run):
    learner, _ = reuse_run
    info = learner.results.task_info

    assert info["colors"]["shared_tasks"] == []
    assert info["stripes"]["shared_tasks"] == []
    assert info["colors-again"]["reused_task"] == "colors"
    assert info["colors-again"]["new_experts_per_layer"] == 0
    assert info["colors-again"]["similarity"]["colors"] >= ONLY_IDENTICAL["reuse_tau"]


def test_similarity_moe_reuse_router_uses_first_task_experts(reuse_run):
    _, recorder = reuse_run

    for layer in recorder.structure[-1].values():
        assert layer["routers"]["colors-again"]["expert_ids"] == layer["routers"]["colors"]["expert_ids"]
        assert not set(layer["routers"]["stripes"]["expert_ids"]) & set(layer["routers"]["colors"]["expert_ids"])


def test_similarity_moe_reuse_keeps_shared_experts(reuse_run):
    _, recorder = reuse_run

    for key, weights in recorder.weights[0].items():
        assert unchanged(weights, recorder.weights[-1][key]), key


def test_similarity_moe_shares_similar_task(stream):
    strategy = SimilarityMoE(share_tau=-1.0, reuse_tau=0.9999, experts_per_task=2)
    learner, recorder = fit(strategy, TaskStream("two", [stream[0], stream[1]]))

    assert learner.results.task_info["stripes"]["shared_tasks"] == ["colors"]
    assert learner.results.task_info["stripes"]["reused_task"] is None
    for layer in recorder.structure[-1].values():
        own = layer["routers"]["stripes"]["expert_ids"]
        borrowed = layer["routers"]["colors"]["expert_ids"]
        assert len(own) == 4
        assert own[2:] == borrowed
        for expert_id in borrowed:
            assert layer["experts"][str(expert_id)]["frozen"] is True


@pytest.mark.parametrize(
    ("similarities", "shared", "reused"),
    [
        ({}, [], None),
        ({"a": 0.5, "b": 0.7}, [], None),
        ({"a": 0.85, "b": 0.9}, ["b", "a"], None),
        ({"a": 0.96, "b": 0.2}, ["a"], "a"),
        ({"a": 0.8}, ["a"], None),
    ],
)
def test_decide_sharing_rule(similarities, shared, reused):
    decision = decide_sharing(similarities, share_tau=0.8, reuse_tau=0.95)

    assert decision.shared == shared
    assert decision.reused == reused


# ---- moe-adapters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_run(stream):
    return fit(MoEAdapters(**POOL), stream)


def test_moe_adapters_expert_count_fixed(moe_run):
    _, recorder = moe_run

    assert recorder.expert_total == [recorder.expert_total[0]] * 3


def test_moe_adapters_growth_only_routers(moe_run):
    learner, recorder = moe_run
    router_size = sum(POOL["num_experts"] * layer.in_features for _, layer in learner.backbone.layers())

    assert recorder.total[0] == recorder.expert_total[0] + router_size
    assert recorder.total[1] - recorder.total[0] == router_size
    assert recorder.total[2] - recorder.total[1] == router_size


def test_moe_adapters_freezes_two_per_task(moe_run):
    learner, _ = moe_run
    info = learner.results.task_info

    for layer_key in info["colors"]["frozen_experts"]:
        first = info["colors"]["frozen_experts"][layer_key]
        second = info["stripes"]["frozen_experts"][layer_key]
        assert len(first) == 2
        assert len(second) == 2
        assert not set(first) & set(second)
        assert info["quadrants"]["frozen_experts"][layer_key] == []


def test_moe_adapters_frozen_experts_unchanged(moe_run):
    learner, recorder = moe_run
    info = learner.results.task_info

    for task_index, task_name in enumerate(["colors", "stripes"]):
        for layer_key, expert_ids in info[task_name]["frozen_experts"].items():
            for expert_id in expert_ids:
                before = recorder.weights[task_index][(layer_key, expert_id)]
                assert unchanged(before, recorder.weights[-1][(layer_key, expert_id)]), (task_name, layer_key, expert_id)


def test_moe_adapters_unfrozen_experts_train(moe_run):
    learner, recorder = moe_run
    frozen_first = {(key, i) for key, ids in learner.results.task_info["colors"]["frozen_experts"].items() for i in ids}
    still_trainable = [key for key in recorder.weights[0] if key not in frozen_first]

    changed = [key for key in still_trainable if not unchanged(recorder.weights[0][key], recorder.weights[1][key])]
    assert changed


def test_moe_adapters_trainable_shrinks(moe_run):
    learner, _ = moe_run
    trainable = [record["trainable"] for record in learner.results.trainable]

    assert trainable[0] > trainable[1] > trainable[2] > 0


def test_most_selected_skips_frozen():
    probabilities = torch.tensor([0.4, 0.3, 0.2, 0.1])

    assert most_selected(probabilities, [10, 11, 12, 13], {11, 12, 13}, 2) == [11, 12]
    assert most_selected(probabilities, [10, 11, 12, 13], {13}, 2) == [13]
    assert most_selected(torch.full((3,), 1 / 3), [5, 6, 7], {5, 6, 7}, 2) == [5, 6]


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora-per-task", "similarity-moe", "moe-adapters"])
def test_strategy_unknown_option_named(name):
    factory = get_registry().get("strategy", name).factory

    with pytest.raises(ConfigError, match="colour"):
        factory(colour="red")


@pytest.mark.parametrize(
    ("strategy", "options", "key"),
    [
        (SimilarityMoE, {"share_tau": 0.97, "reuse_tau": 0.9}, "share_tau"),
        (SimilarityMoE, {"experts_per_task": 0}, "experts_per_task"),
        (MoEAdapters, {"num_experts": 0}, "num_experts"),
        (MoEAdapters, {"noise_std": -1.0}, "noise_std"),
        (LoraPerTask, {"init": "zeros"}, "init"),
    ],
)
def test_strategy_invalid_value_named(strategy, options, key):
    with pytest.raises(ConfigError, match=key):
        strategy(**options)


# ---- resume -------------------------------------------------------------------------------------


class StopAfterFirstTask:
    """A callback that ends the run after the first task's checkpoint."""

    @hookimpl
    def igsp_after_eval(self, task_index: int) -> None:
        if task_index == 0:
            raise CancelRun()


@pytest.mark.parametrize(
    ("run_fixture", "make_strategy"),
    [
        ("lora_run", lambda: LoraPerTask()),
        ("reuse_run", lambda: SimilarityMoE(**ONLY_IDENTICAL)),
        ("moe_run", lambda: MoEAdapters(**POOL)),
    ],
)
def test_resume_matches_uninterrupted(request, tmp_path, run_fixture, make_strategy):
    """A run stopped after task 1 and resumed ends with the same experts as one that never stopped."""
    uninterrupted, _ = request.getfixturevalue(run_fixture)
    stream = uninterrupted.stream
    ContinualLearner("igsp-vit-tiny", stream, make_strategy(), settings=make_settings(),
                     callbacks=[StopAfterFirstTask()], out_dir=tmp_path).fit_stream()

    resumed = ContinualLearner("igsp-vit-tiny", stream, make_strategy(), settings=make_settings(), out_dir=tmp_path)
    results = resumed.resume_from(tmp_path)

    assert results.rows_done == 3
    assert resumed.backbone.structure() == uninterrupted.backbone.structure()
    expected = uninterrupted.backbone.added_state_dict()
    for key, value in resumed.backbone.added_state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert results.task_info == uninterrupted.results.task_info


# ---- plugin errors and discovery ---------------------------------------------------------------


class RaiseAtSecondTask:
    """A callback whose ``igsp_after_step`` raises during the second task."""

    @hookimpl
    def igsp_after_step(self, learner: ContinualLearner) -> None:
        if learner.current_task_index == 1:
            raise RuntimeError("broken callback")


def test_plugin_error_names_plugin_and_hook(tmp_path, stream):
    with pytest.raises(PluginError) as caught:
        fit(LoraPerTask(), stream, out_dir=tmp_path, callbacks=[RaiseAtSecondTask()])

    assert "RaiseAtSecondTask" in str(caught.value)
    assert "igsp_after_step" in str(caught.value)
    assert (tmp_path / "checkpoint.pt").is_file()
    results = RunResults.read(tmp_path)
    assert results.rows_done == 1
    assert results.finished is False


def registered_strategies(load_plugins: str | None) -> dict:
    """Return ``{strategy: plugin}`` from a fresh interpreter, with IGSP_LOAD_PLUGINS set or unset."""
    env = {key: value for key, value in os.environ.items() if key not in ("IGSP_LOAD_PLUGINS", "IGSP_DISABLE_PLUGINS")}
    env["OMP_NUM_THREADS"] = "1"
    if load_plugins is not None:
        env["IGSP_LOAD_PLUGINS"] = load_plugins
    code = (
        "import json\n"
        "from igsp.plugins import get_registry\n"
        "registry = get_registry()\n"
        "registry.get('strategy', 'finetune').factory()\n"
        "print(json.dumps({name: entry.plugin for name, entry in registry.strategies.items()}))\n"
    )
    completed = subprocess.run([PYTHON, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_entry_point_lists_baselines():
    strategies = registered_strategies(None)

    for name in ("lora-per-task", "similarity-moe", "moe-adapters"):
        assert strategies.get(name) == "baselines"


def test_entry_point_blocked_by_env():
    strategies = registered_strategies("")

    assert "lora-per-task" not in strategies
    assert "zeroshot" in strategies
    assert "finetune" in strategies


# ---- igsp compare ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_comparison(tmp_path_factory):
    """lora-per-task fails during its second task; zeroshot trains nothing, so the callback never fires."""
    out_dir = tmp_path_factory.mktemp("comparison")
    comparison = run_comparison(make_settings(), ["lora-per-task", "zeroshot"], out_dir, callbacks=[RaiseAtSecondTask()])
    return comparison, out_dir


def test_compare_records_failure_and_continues(failed_comparison):
    comparison, out_dir = failed_comparison
    failed, finished = comparison.get("lora-per-task"), comparison.get("zeroshot")

    assert failed.status == FAILED
    assert "igsp_after_step" in failed.error
    assert failed.tasks_done == 1
    assert (out_dir / "lora-per-task" / "checkpoint.pt").is_file()
    assert finished.status == FINISHED
    assert finished.tasks_done == 3


def test_compare_writes_table_files(failed_comparison):
    _, out_dir = failed_comparison

    for name in (TABLE_FILE, SUMMARY_FILE, FIGURE_FILE):
        assert (out_dir / name).is_file(), name
    header = (out_dir / TABLE_FILE).read_text().splitlines()[0].split(",")
    for column in ("transfer", "avg", "last", "bwt", "mean_trainable", "total_added", "train_seconds",
                   "images_per_second", "peak_memory_mib", "selector_accuracy", "error"):
        assert column in header
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    assert [row["strategy"] for row in summary["results"]] == ["lora-per-task", "zeroshot"]
    assert summary["task_names"] == ["colors", "stripes", "quadrants"]


def test_compare_cost_columns(failed_comparison):
    comparison, _ = failed_comparison
    lora, zeroshot = comparison.get("lora-per-task"), comparison.get("zeroshot")

    assert lora.images_per_second > 0
    assert lora.mean_trainable > 0
    assert lora.total_added > 0
    assert lora.peak_memory_mib > 0
    assert zeroshot.mean_trainable == 0
    assert math.isnan(zeroshot.images_per_second)


def test_compare_unknown_strategy_rejected_early(tmp_path):
    with pytest.raises(ConfigError, match="no-such-strategy"):
        run_comparison(make_settings(), ["zeroshot", "no-such-strategy"], tmp_path / "cmp")

    assert not (tmp_path / "cmp").exists()


def test_compare_plan_file_resolves():
    plan = load_plan(REPO / "recipes" / "compare" / "mtil-lite.toml")
    settings = comparison_settings(plan.recipe, plan.overrides)
    registry = get_registry()

    assert settings.stream.name == "mtil-lite"
    for name in plan.strategies:
        registry.get("strategy", name)
    for name, options in plan.options.items():
        registry.get("strategy", name).factory(**options)


def test_compare_plan_unknown_key(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text('recipe = "smoke"\nstrategy = ["zeroshot"]\n')

    with pytest.raises(ConfigError, match="strategy"):
        load_plan(path)


def test_compare_cli_prints_table(tmp_path):
    app = typer.Typer()
    app.command()(compare)
    out = tmp_path / "cli"

    result = CliRunner().invoke(app, ["smoke", "--strategies", "zeroshot", "--set", "train.steps=0",
                                      "--set", "stream.train_per_class=4", "--set", "stream.test_per_class=2",
                                      "--out", str(out), "--quiet"])

    assert result.exit_code == 0, result.output
    assert "zeroshot" in result.output
    assert (out / TABLE_FILE).is_file()
