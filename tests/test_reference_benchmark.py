"""The single-task reference benchmark: seeds, merged records and real runs on the smoke recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "single_task_reference.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("single_task_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_record(path: Path, recipe: str, strategy: str, overrides: list[str], seeds: list[int]) -> str:
    runs = [{"seed": seed, "per_task": [["a", 50.0, 52.0], ["b", 70.0, 70.0]]} for seed in seeds]
    record = {"recipe": recipe, "strategy": strategy, "overrides": overrides, "runs": runs}
    path.write_text(json.dumps(record))
    return str(path)


def test_parse_seeds_reads_list(reference):
    assert reference.parse_seeds("0, 1,2", merging=False) == [0, 1, 2]


def test_parse_seeds_rejects_words(reference):
    with pytest.raises(SystemExit, match="'one' is not a comma-separated list"):
        reference.parse_seeds("one", merging=False)


def test_parse_seeds_empty_needs_merge(reference):
    with pytest.raises(SystemExit, match="--seeds is empty"):
        reference.parse_seeds("", merging=False)
    assert reference.parse_seeds("", merging=True) == []


def test_merge_accepts_same_setting(reference, tmp_path):
    path = write_record(tmp_path / "a.json", "smoke", "igsp", ["steps=2"], [3, 4])

    runs = reference.merge_records([path], "smoke", "igsp", ["steps=2"])

    assert [run["seed"] for run in runs] == [3, 4]


@pytest.mark.parametrize("recipe, strategy, overrides", [
    ("mtil-lite", "igsp", ["steps=2"]),
    ("smoke", "finetune", ["steps=2"]),
    ("smoke", "igsp", []),
])
def test_merge_rejects_other_setting(reference, tmp_path, recipe, strategy, overrides):
    path = write_record(tmp_path / "a.json", "smoke", "igsp", ["steps=2"], [3])

    with pytest.raises(SystemExit, match="merge only records of the same setting"):
        reference.merge_records([path], recipe, strategy, overrides)


def test_table_gap_per_seed(reference, capsys):
    runs = [
        {"seed": 0, "per_task": [["a", 50.0, 52.0], ["b", 70.0, 70.0]]},
        {"seed": 1, "per_task": [["a", 54.0, 54.0], ["b", 70.0, 72.0]]},
    ]

    mean_last, mean_alone = reference.print_table(runs)

    assert mean_last == pytest.approx(61.0)
    assert mean_alone == pytest.approx(62.0)
    printed = capsys.readouterr().out
    assert "gap per seed (0: +1.0, 1: +1.0); mean +1.0" in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()}
    assert rows["a"] == ["52.0", "53.0", "+1.0"]
    assert rows["b"] == ["70.0", "71.0", "+1.0"]


def test_cli_rejects_repeated_seed(reference, tmp_path, monkeypatch):
    path = write_record(tmp_path / "a.json", "smoke", "igsp", [], [0])
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "smoke", "--seeds", "0", "--merge", path, "--out", str(tmp_path / "out")])

    with pytest.raises(SystemExit, match="repeat across --seeds and --merge"):
        reference.main()
    assert not (tmp_path / "out").exists()


def test_run_seed_smoke_oracle(reference):
    record = reference.run_seed("smoke", ["strategy=igsp", "selector=oracle", "steps=4"], seed=0)

    names = [row[0] for row in record["per_task"]]
    assert len(names) == len(set(names)) >= 2
    for name, last, alone in record["per_task"]:
        assert 0.0 <= last <= 100.0, name
        assert 0.0 <= alone <= 100.0, name
    assert set(record["task_info"]) == set(names)
    assert record["seed"] == 0


def test_first_task_matches_alone(reference):
    # The first task has no history and the same task seed in both runs. With the oracle selector
    # no later task changes its accuracy, so its last-row accuracy equals its single-task accuracy.
    record = reference.run_seed("smoke", ["strategy=igsp", "selector=oracle", "steps=4"], seed=1)

    _, last, alone = record["per_task"][0]
    assert last == alone
