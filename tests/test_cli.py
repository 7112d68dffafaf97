"""The igsp command line, driven in-process with typer's CliRunner on real smoke runs (3 steps a task)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import igsp
from igsp.cli import app, hook_call_order, recipe_description, run_with_progress, to_toml
from igsp.cli_progress import RichProgress
from igsp.config import apply_overrides, load_recipe, resolve_settings, settings_to_dict
from igsp.exceptions import ConfigError
from igsp.plugins import get_registry
from igsp.results import RunResults
from igsp.runner import build_learner

SMOKE = ["recipe", "run", "smoke", "--set", "steps=3", "--quiet"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    # A wide console keeps table cells on one line, so a row can be found by one of its cells.
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def smoke_run(runner, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "smoke"
    result = runner.invoke(app, [*SMOKE, "--out", str(run_dir)])
    return run_dir, result


class StopAfterFirstTask:
    """Cancels the run once the first task is trained, evaluated and checkpointed."""

    @igsp.hookimpl
    def igsp_after_eval(self, task_index: int) -> None:
        if task_index == 0:
            raise igsp.CancelRun()


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """Return a run folder that holds only the first task, and what a forced-terminal progress drew."""
    run_dir = tmp_path_factory.mktemp("cli") / "cut"
    settings = resolve_settings(apply_overrides(load_recipe("smoke"), ["steps=3"]))
    drawn = io.StringIO()
    progress = RichProgress(Console(file=drawn, force_terminal=True, width=120))
    # The callback registered last is called first, so the progress receives the first evaluation.
    learner = build_learner(settings, run_dir, callbacks=[StopAfterFirstTask(), progress])
    learner.fit_stream()
    return run_dir, drawn.getvalue()


def find_line(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle in line]
    assert lines, f"no line contains {needle!r} in:\n{text}"
    return lines[0]


def test_recipe_list_names_recipes(runner):
    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0, result.output
    assert "smoke" in result.stdout
    assert "mtil-lite" in result.stdout
    assert "one-minute run" in find_line(result.stdout, "smoke.toml")


def test_recipe_show_applies_override(runner):
    result = runner.invoke(app, ["recipe", "show", "smoke", "--set", "train.steps=7", "--set", "strategy=zeroshot"])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.stdout)
    assert shown["train"]["steps"] == 7
    assert shown["strategy"]["name"] == "zeroshot"
    assert shown["backbone"]["model"] == "igsp-vit-tiny"


def test_recipe_show_json(runner):
    result = runner.invoke(app, ["recipe", "show", "smoke", "--set", "steps=5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["steps"] == 5


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.stepz=3", "stepz"), ("train.steps=abc", "steps"), ("strategy=nope", "nope"), ("selector=nope", "nope")],
)
def test_recipe_show_invalid_override(runner, override, named):
    result = runner.invoke(app, ["recipe", "show", "smoke", "--set", override])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert named in result.stderr
    assert "Traceback" not in result.output


def test_recipe_run_unknown_strategy(runner, tmp_path):
    run_dir = tmp_path / "never"
    result = runner.invoke(app, ["recipe", "run", "smoke", "--set", "strategy=nope", "--out", str(run_dir)])
    assert result.exit_code == 2
    assert "'nope'" in result.stderr
    assert "finetune" in result.stderr
    assert "zeroshot" in result.stderr
    assert not run_dir.exists()


def test_recipe_run_unknown_recipe(runner):
    result = runner.invoke(app, ["recipe", "run", "no-such-recipe"])
    assert result.exit_code == 2
    assert "no-such-recipe" in result.stderr
    assert "smoke" in result.stderr


def test_recipe_run_writes_files(smoke_run):
    run_dir, result = smoke_run
    assert result.exit_code == 0, result.output
    for name in ("results.json", "accuracy_matrix.csv", "checkpoint.pt", "recipe.json"):
        assert (run_dir / name).is_file(), name
    assert RunResults.read(run_dir).finished


def test_recipe_run_prints_tables(smoke_run):
    run_dir, result = smoke_run
    summary = find_line(result.stdout, "Forgetting")
    for label in ("Transfer", "Avg", "Last", "BWT"):
        assert label in summary
    assert "Accuracy (%) after each task" in result.stdout
    assert "Trainable (train)" in result.stdout
    assert f"Run folder: {run_dir}" in result.stdout


def test_recipe_run_rejects_used_folder(runner, smoke_run):
    run_dir, _ = smoke_run
    result = runner.invoke(app, [*SMOKE, "--out", str(run_dir)])
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr


def test_report_prints_matrix(runner, smoke_run):
    run_dir, _ = smoke_run
    results = RunResults.read(run_dir)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    last_row = find_line(result.stdout, "3. quadrants")
    for value in results.matrix[2]:
        assert f"{value:.1f}" in last_row
    assert "Own task selected" in result.stdout
    assert "Partial run" not in result.stdout
    assert "igsp resume" not in result.stdout


def test_report_partial_run_blanks(runner, cut_run):
    run_dir, _ = cut_run
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Partial run: 1 of 3 tasks trained" in result.stdout
    unfilled = find_line(result.stdout, "2. stripes")
    assert not any(character.isdigit() for character in unfilled.replace("2. stripes", ""))
    assert f"igsp resume {run_dir}" in result.stdout


def test_report_empty_folder(runner, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "No results.json" in result.stderr
    assert str(tmp_path) in result.stderr


def test_report_missing_folder(runner, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "absent")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_resume_finishes_cut_run(runner, cut_run, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(cut_run[0], run_dir)
    assert RunResults.read(run_dir).rows_done == 1
    result = runner.invoke(app, ["resume", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    results = RunResults.read(run_dir)
    assert results.rows_done == 3
    assert results.finished
    assert "Transfer" in result.stdout


def test_resume_finished_run(runner, smoke_run):
    run_dir, _ = smoke_run
    result = runner.invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.stdout


def test_progress_draws_bars(cut_run):
    _, drawn = cut_run
    assert "Tasks" in drawn
    assert "colors" in drawn
    assert "loss " in drawn
    assert "1/3" in drawn


def test_progress_off_without_terminal():
    progress = RichProgress(Console(file=io.StringIO()))
    assert not progress.enabled


def test_plugins_lists_builtins(runner):
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("finetune", "zeroshot", "prototype", "oracle", "synthetic"):
        assert name in result.stdout
    assert "param_groups" in find_line(result.stdout, "zeroshot")


def test_hooks_lists_implementations(runner):
    result = runner.invoke(app, ["hooks", "--strategy", "finetune", "--selector", "prototype"])
    assert result.exit_code == 0, result.output
    forward = find_line(result.stdout, "igsp_forward")
    assert "defaults" in forward
    assert "firstresult" in forward
    assert "strategy (finetune)" in find_line(result.stdout, "igsp_param_groups")
    assert "selector (prototype)" in find_line(result.stdout, "igsp_after_task")


def test_hooks_unknown_selector(runner):
    result = runner.invoke(app, ["hooks", "--selector", "nope"])
    assert result.exit_code == 2
    assert "prototype" in result.stderr


def test_hook_call_order_strategy_first():
    registry = get_registry()
    strategy = registry.get("strategy", "finetune").factory()
    selector = registry.get("selector", "prototype").factory()
    selector.name = "prototype"
    order = {name: (firstresult, plugins) for name, firstresult, plugins in hook_call_order(strategy, selector)}
    assert list(order)[:2] == ["igsp_configure", "igsp_setup_model"]
    assert order["igsp_task_route"] == (True, ["strategy (finetune)", "defaults [trylast]"])
    assert order["igsp_after_run"] == (False, [])


def test_debug_shows_traceback(runner):
    result = runner.invoke(app, ["--debug", "recipe", "show", "smoke", "--set", "train.stepz=3"])
    assert isinstance(result.exception, ConfigError)


def test_run_interrupt_exit_code(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"")

    def interrupted(callbacks):
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as caught:
        run_with_progress(interrupted, tmp_path, quiet=False)
    assert caught.value.exit_code == 130
    assert f"igsp resume {tmp_path}" in capsys.readouterr().err


def test_version_prints_package(runner):
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0, result.output
    assert f"igsp {igsp.__version__}" in result.stdout


def test_to_toml_round_trip():
    data = settings_to_dict(resolve_settings(load_recipe("mtil-lite")))
    data["eval"]["selector_options"] = {"threshold": 0.5, "odd key": [1, 2]}
    assert tomllib.loads(to_toml(data)) == data


def test_recipe_description_sources(tmp_path):
    keyed = tmp_path / "keyed.toml"
    keyed.write_text('# a comment\ndescription = "from the key"\n', encoding="utf-8")
    commented = tmp_path / "commented.toml"
    commented.write_text("\n# first comment\n# second\nname = 'x'\n", encoding="utf-8")
    bare = tmp_path / "bare.toml"
    bare.write_text("name = 'x'\n# late comment\n", encoding="utf-8")
    assert recipe_description(keyed) == "from the key"
    assert recipe_description(commented) == "first comment"
    assert recipe_description(bare) == ""


def test_module_entry_error_line():
    completed = subprocess.run(
        [sys.executable, "-m", "igsp", "recipe", "show", "smoke", "--set", "train.stepz=3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: ")
    assert "stepz" in completed.stderr
    assert "Traceback" not in completed.stderr


REFERENCE = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("zscl-order1-zscl.csv", "Transfer 68.1   Avg 75.4   Last 83.6"),
     ("zscl-order1-sequential-finetune.csv", "Transfer 44.6   Avg 55.9   Last 77.3")],
)
def test_report_import_published_matrix(runner, name, expected):
    result = runner.invoke(app, ["report", "--import", str(REFERENCE / name)])
    assert result.exit_code == 0, result.output
    assert expected in result.stdout
    assert "SUN397" in result.stdout


def test_report_import_bad_matrix(runner, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,3,4\n5,6,7,8\n")
    result = runner.invoke(app, ["report", "--import", str(path)])
    assert result.exit_code == 2
    assert "2 x 4" in result.stderr


def test_report_reference_rows(runner, smoke_run):
    run_dir, _ = smoke_run
    result = runner.invoke(app, ["report", str(run_dir), "--reference"])
    assert result.exit_code == 0, result.output
    assert "MoE-Adapters" in result.stdout
    assert "this run (finetune)" in result.stdout


def test_report_needs_folder_or_import(runner):
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 2
    assert "--import" in result.stderr


def test_info_value_rounds_list_floats():
    from igsp.cli_tables import format_info_value

    assert format_info_value([0.20415653338034948, 0.0939605961961206]) == "[0.2042, 0.09396]"


def test_info_value_rounds_nested_floats():
    from igsp.cli_tables import format_info_value

    assert format_info_value({"layer": [1.23456789], "kept": 3}) == '{"layer": [1.235], "kept": 3}'
    assert format_info_value(0.61272758) == "0.6127"
    assert format_info_value("capped") == "capped"
