"""The MTIL recipes end to end on a miniature copy of the 11 datasets, and published-matrix import."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from igsp.config import apply_overrides, load_recipe, resolve_settings
from igsp.data.mtil import MTIL_ORDER_1
from igsp.exceptions import DataError
from igsp.metrics import summary
from igsp.published import import_matrix
from igsp.runner import FEWSHOT_FILE, run_settings
from mtil_fixtures import make_miniature_mtil

DATA = Path(__file__).parent / "data"


def tiny_overrides(root: Path) -> list[str]:
    return [
        f"data.root={root}",
        "backbone=igsp-vit-tiny",
        "backbone.precision=fp32",
        "steps=2",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.num_workers=0",
        "eval.batch_size=64",
        "rank=2",
        "strategy=finetune",
    ]


@pytest.mark.slow
def test_mtil_recipe_runs_all_tasks(tmp_path):
    root = make_miniature_mtil(tmp_path / "mtil")
    settings = resolve_settings(apply_overrides(load_recipe("mtil"), tiny_overrides(root)))
    results = run_settings(settings, tmp_path / "run")
    assert results.task_names == list(MTIL_ORDER_1)
    assert results.rows_done == 11
    assert not any(math.isnan(value) for row in results.matrix for value in row)
    assert (tmp_path / "run" / "results.json").is_file()


def test_fewshot_recipe_saves_indices(tmp_path):
    root = make_miniature_mtil(tmp_path / "mtil")
    overrides = tiny_overrides(root) + ["stream.tasks=['DTD', 'Flowers']", "stream.shots=1"]
    settings = resolve_settings(apply_overrides(load_recipe("mtil-fewshot5"), overrides))
    run_settings(settings, tmp_path / "run")
    chosen = json.loads((tmp_path / "run" / FEWSHOT_FILE).read_text())
    assert sorted(chosen) == ["DTD", "Flowers"]
    assert all(len(indices) >= 1 for indices in chosen.values())


def test_mtil_recipe_missing_dataset_stops_before_training(tmp_path):
    root = make_miniature_mtil(tmp_path / "mtil")
    for path in (root / "dtd").rglob("*"):
        if path.is_file():
            path.unlink()
    settings = resolve_settings(apply_overrides(load_recipe("mtil"), tiny_overrides(root)))
    with pytest.raises(DataError, match="DTD"):
        run_settings(settings, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_import_published_matrix_metrics():
    matrix = import_matrix(DATA / "zscl-order1-zscl.csv")
    result = summary(matrix, per_task_decimals=1)
    assert matrix.shape == (11, 11)
    assert round(result["transfer"], 1) == 68.1
    assert round(result["avg"], 1) == 75.4
    assert round(result["last"], 1) == 83.6


def test_import_drops_cifar10_column(tmp_path):
    matrix = np.loadtxt(DATA / "zscl-order1-zscl.csv", delimiter=",")
    wide = np.insert(matrix, 2, 99.0, axis=1)
    path = tmp_path / "wide.npy"
    np.save(path, wide)
    assert np.allclose(import_matrix(path), matrix)


def test_import_rejects_bad_shape(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,3,4\n5,6,7,8\n")
    with pytest.raises(DataError, match="2 x 4"):
        import_matrix(path)
