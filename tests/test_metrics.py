"""Metrics on the published MTIL reference matrices and on small hand-made cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from igsp import metrics

REFERENCE = Path(__file__).parent / "data"
PUBLISHED = {
    "zscl-order1-zscl.csv": (68.1, 75.4, 83.6),
    "zscl-order1-sequential-finetune.csv": (44.6, 55.9, 77.3),
}


def load_reference(name: str) -> np.ndarray:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference matrix {path} is not present in this checkout")
    return np.loadtxt(path, delimiter=",")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_summary_matches_published_numbers(name):
    matrix = load_reference(name)
    result = metrics.summary(matrix, per_task_decimals=1)
    expected_transfer, expected_avg, expected_last = PUBLISHED[name]
    assert round(result["transfer"], 1) == expected_transfer
    assert round(result["avg"], 1) == expected_avg
    assert round(result["last"], 1) == expected_last


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_unrounded_summary_close_to_published(name):
    matrix = load_reference(name)
    result = metrics.summary(matrix)
    for key, expected in zip(("transfer", "avg", "last"), PUBLISHED[name]):
        assert abs(result[key] - expected) < 0.06


def test_metrics_on_hand_computed_matrix():
    matrix = [[90.0, 20.0, 30.0], [80.0, 70.0, 40.0], [60.0, 65.0, 50.0]]
    assert metrics.transfer(matrix) == pytest.approx((20.0 + (30.0 + 40.0) / 2) / 2)
    assert metrics.average(matrix) == pytest.approx(sum(sum(row) for row in matrix) / 9)
    assert metrics.last(matrix) == pytest.approx((60.0 + 65.0 + 50.0) / 3)
    assert metrics.backward_transfer(matrix) == pytest.approx(((60 - 90) + (65 - 70)) / 2)
    assert metrics.forgetting(matrix) == pytest.approx(((90 - 60) + (70 - 65)) / 2)


def test_partial_matrix_ignores_unfilled_rows():
    nan = math.nan
    matrix = [[90.0, 20.0, 30.0], [80.0, 70.0, 40.0], [nan, nan, nan]]
    assert metrics.last(matrix) == pytest.approx((80 + 70 + 40) / 3)
    assert metrics.average(matrix) == pytest.approx((90 + 20 + 30 + 80 + 70 + 40) / 6)
    assert metrics.transfer(matrix) == pytest.approx((20.0 + (30.0 + 40.0) / 2) / 2)
    assert metrics.backward_transfer(matrix) == pytest.approx(80 - 90)


def test_single_task_has_no_transfer_or_bwt():
    assert math.isnan(metrics.transfer([[50.0]]))
    assert math.isnan(metrics.backward_transfer([[50.0]]))
    assert metrics.last([[50.0]]) == 50.0


def test_non_square_matrix_rejected():
    with pytest.raises(ValueError, match="square"):
        metrics.summary([[1.0, 2.0]])
