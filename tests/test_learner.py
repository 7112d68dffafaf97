"""The continual learner: the three-line use, determinism, trainable parameters, hook errors, resume."""

from __future__ import annotations

import math

import pytest

import igsp
from igsp import checkpoint as checkpoints
from igsp.exceptions import PluginError
from igsp.hookspecs import hookimpl
from igsp.learner import ContinualLearner
from igsp.runner import resume_run, run_settings

from conftest import RunRecord, builtin_plugins_only, make_settings


@pytest.fixture(scope="module")
def readme_results():
    """The README's three lines with a tiny budget: backbone, stream and strategy by name."""
    settings = make_settings("finetune")
    with builtin_plugins_only():
        learner = ContinualLearner("igsp-vit-tiny", "synthetic", "finetune", settings=settings)
        return learner.fit_stream()


def test_learner_readme_script_runs(readme_results):
    assert readme_results.finished
    assert readme_results.task_names == ["colors", "stripes", "quadrants"]
    assert readme_results.rows_done == 3
    assert all(0.0 <= value <= 100.0 for row in readme_results.matrix for value in row)
    assert readme_results.strategy == "finetune"


def test_learner_same_seed_same_matrix(readme_results, finetune_run: RunRecord):
    # The second run goes through run_settings with a run folder and a probe callback; neither
    # may change what is trained.
    assert finetune_run.results.matrix == readme_results.matrix


def test_learner_trainable_equals_param_groups(finetune_run: RunRecord):
    checks = finetune_run.probe.checks
    assert [(c["task"], c["phase"]) for c in checks] == [(0, "train"), (1, "train"), (2, "train")]
    for check in checks:
        assert check["expected"], "finetune trains its shared experts"
        assert check["trainable"] == check["expected"]
        assert check["clip_trainable"] == 0
    counts = [record["trainable"] for record in finetune_run.results.trainable]
    assert counts == [check["expected_count"] for check in checks]


def test_learner_results_written(finetune_run: RunRecord):
    results = igsp.RunResults.read(finetune_run.out_dir)

    assert results.matrix == finetune_run.results.matrix
    assert (finetune_run.out_dir / "accuracy_matrix.csv").is_file()
    assert (finetune_run.out_dir / checkpoints.FILENAME).is_file()


class RaisingCallback:
    """Raises inside one hook."""

    @hookimpl
    def igsp_before_task(self, task_index: int) -> None:
        raise ValueError(f"broken callback at task {task_index}")


def test_learner_hook_error_names_plugin_and_hook(core_plugins_only):
    learner = ContinualLearner("igsp-vit-tiny", "synthetic", "finetune", settings=make_settings("finetune"),
                               callbacks=[RaisingCallback()])

    with pytest.raises(PluginError) as caught:
        learner.fit_stream()

    message = str(caught.value)
    assert "RaisingCallback" in message
    assert "igsp_before_task" in message
    assert "broken callback at task 0" in message
    assert isinstance(caught.value.__cause__, ValueError)
    assert not learner.results.finished


class CancelAfterFirstTask:
    """Stops the run once the first task is evaluated (and checkpointed)."""

    @hookimpl
    def igsp_after_eval(self, task_index: int) -> None:
        if task_index == 0:
            raise igsp.CancelRun()


class CrashInSecondTask:
    """Raises in the middle of the second task's training, after the first checkpoint."""

    @hookimpl
    def igsp_after_step(self, learner: ContinualLearner, step: int) -> None:
        if learner.current_task_index == 1 and step == 3:
            raise RuntimeError("simulated crash")


def stop_run(settings, out_dir, mode: str) -> None:
    """Run until ``mode`` stops it: ``cancel`` after task 0's evaluation, ``crash`` inside task 1."""
    if mode == "cancel":
        stopped = run_settings(settings, out_dir, callbacks=[CancelAfterFirstTask()])
        assert not stopped.finished
        assert stopped.rows_done == 1
        return
    with pytest.raises(PluginError, match="simulated crash"):
        run_settings(settings, out_dir, callbacks=[CrashInSecondTask()])


@pytest.mark.parametrize("mode", ["cancel", "crash"])
@pytest.mark.parametrize("run_name", ["finetune_run", "igsp_run"])
def test_resume_matches_uninterrupted(run_name, mode, tmp_path, request, core_plugins_only):
    reference: RunRecord = request.getfixturevalue(run_name)

    stop_run(reference.settings, tmp_path, mode)
    assert checkpoints.load(tmp_path / checkpoints.FILENAME)["task_index"] == 0
    resumed = resume_run(tmp_path)

    assert resumed.finished
    assert resumed.matrix == reference.results.matrix
    for name in resumed.task_names:
        assert resumed.task_info.get(name) == reference.results.task_info.get(name)


def test_resume_finished_run_adds_nothing(finetune_run: RunRecord, core_plugins_only):
    results = resume_run(finetune_run.out_dir)

    assert results.matrix == finetune_run.results.matrix
    assert results.rows_done == 3
    assert not any(math.isnan(value) for row in results.matrix for value in row)
