"""Runs the example strategy of plugins/README.md, so the plugin author's guide stays correct."""

from __future__ import annotations

import re
import sys
import tomllib
import types
from pathlib import Path

import pluggy
import pytest

from igsp import ConfigError, ContinualLearner, RunSettings, hookimpl
from igsp.data.synthetic import build_synthetic_stream
from igsp.hookspecs import PROJECT, RegistrySpec

GUIDE = Path(__file__).resolve().parent.parent / "plugins" / "README.md"
EXAMPLE_MARKER = "<!-- example: task_adapters.py -->"
MODULE_NAME = "task_adapters"
RANK = 4
STEPS = 3


def fenced_block(text: str, language: str, after: str = "") -> str:
    """Return the first fenced code block of ``language`` that follows the text ``after``."""
    start = text.index(after) if after else 0
    match = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(text, start)
    assert match is not None, f"no ```{language} block after {after!r} in {GUIDE}"
    return match.group(1)


@pytest.fixture(scope="module")
def example():
    """Import the guide's example as the module ``task_adapters``, as its pyproject would."""
    code = fenced_block(GUIDE.read_text(encoding="utf-8"), "python", after=EXAMPLE_MARKER)
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = str(GUIDE)
    sys.modules[MODULE_NAME] = module
    try:
        exec(compile(code, f"{GUIDE}:{MODULE_NAME}", "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(MODULE_NAME, None)


class AddedCounter:
    """Collects the added parameter count after each task's evaluation."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    @hookimpl
    def igsp_after_eval(self, learner: ContinualLearner) -> None:
        self.counts.append(learner.backbone.count_added_parameters())


@pytest.fixture(scope="module")
def example_run(example):
    settings = RunSettings(name="guide")
    settings.backbone.device = "cpu"
    settings.train.steps = STEPS
    settings.train.batch_size = 8
    settings.train.warmup_steps = 0
    settings.adapter.rank = RANK
    stream = build_synthetic_stream(train_per_class=8, test_per_class=4)
    counter = AddedCounter()
    learner = ContinualLearner("igsp-vit-tiny", stream, example.TaskAdapters(l2=0.01), settings=settings,
                               callbacks=[counter])
    results = learner.fit_stream()
    return learner, results, counter


def test_guide_example_registers_through_pluggy(example):
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(RegistrySpec)
    manager.register(example, name="task-adapters")
    registered = {}

    manager.hook.igsp_register_strategies(
        register=lambda name, factory, description="": registered.setdefault(name, factory)
    )

    assert registered == {"task-adapters": example.TaskAdapters}


def test_guide_example_rejects_bad_options(example):
    with pytest.raises(ConfigError, match="colour"):
        example.TaskAdapters(colour="red")
    with pytest.raises(ConfigError, match="l2"):
        example.TaskAdapters(l2=-1.0)


def test_guide_example_runs_stream(example_run):
    _, results, _ = example_run

    assert results.finished
    assert results.rows_done == 3


def test_guide_example_growth_linear(example_run):
    learner, _, counter = example_run
    per_task = sum(RANK * (layer.in_features + layer.out_features) for _, layer in learner.backbone.layers())

    assert counter.counts == [per_task, 2 * per_task, 3 * per_task]


def test_guide_example_logs_l2_term(example_run):
    _, results, _ = example_run

    assert any("train/l2" in record for record in results.history)


def test_guide_pyproject_declares_entry_point():
    pyproject = tomllib.loads(fenced_block(GUIDE.read_text(encoding="utf-8"), "toml"))

    assert pyproject["project"]["entry-points"]["igsp"] == {"task-adapters": MODULE_NAME}
    assert pyproject["tool"]["setuptools"]["py-modules"] == [MODULE_NAME]
