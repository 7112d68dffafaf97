"""Pure functions of iGSP: subspace bases, projections, router convergence and pruning rules."""

from __future__ import annotations

import pytest
import torch

from igsp.subspace import (
    ConvergenceDetector,
    outside_share,
    project_out,
    prune_decision,
    subspace_basis,
    subspace_penalty,
    total_variation,
)


def random_rows(rows: int, columns: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


# ---- bases and projections --------------------------------------------------------------------


def test_basis_spans_rows():
    first, second = random_rows(4, seed=1), random_rows(3, seed=2)

    basis = subspace_basis([first, second])

    assert basis.shape == (16, 7)
    assert torch.allclose(basis.T @ basis, torch.eye(7), atol=1e-5)
    for rows in (first, second):
        assert torch.allclose(rows @ basis @ basis.T, rows, atol=1e-5)


def test_basis_drops_dependent_rows():
    first = random_rows(4, seed=3)
    dependent = 2.0 * first[:2] - first[2:4]

    basis = subspace_basis([first, dependent])

    assert basis.shape == (16, 4)


def test_basis_empty_or_zero_is_none():
    assert subspace_basis([]) is None
    assert subspace_basis([torch.zeros(3, 16)]) is None


def test_project_out_orthogonal_to_basis():
    basis = subspace_basis([random_rows(5, seed=4)])
    matrix = random_rows(6, seed=5)

    residual = project_out(matrix, basis)

    assert residual.abs().max() > 0.1
    assert (residual @ basis).abs().max() < 1e-5
    removed = matrix - residual
    assert torch.allclose(removed @ basis @ basis.T, removed, atol=1e-5)


def test_project_out_without_basis_is_identity():
    matrix = random_rows(3, seed=6)

    assert torch.equal(project_out(matrix, None), matrix)


def test_outside_share_inside_is_zero():
    history = random_rows(5, seed=7)
    basis = subspace_basis([history])
    inside = random_rows(3, 5, seed=8) @ history

    assert float(outside_share(inside, basis)) == pytest.approx(0.0, abs=1e-6)


def test_outside_share_orthogonal_is_one():
    basis = subspace_basis([random_rows(5, seed=9)])
    orthogonal = project_out(random_rows(3, seed=10), basis)

    assert float(outside_share(orthogonal, basis)) == pytest.approx(1.0, abs=1e-6)


def test_outside_share_between():
    # Rows a * inside + b * outside with unit, orthogonal directions have share b^2 / (a^2 + b^2).
    basis = subspace_basis([random_rows(5, seed=11)])
    inside = torch.nn.functional.normalize(random_rows(1, 5, seed=12) @ basis.T, dim=-1)
    outside = torch.nn.functional.normalize(project_out(random_rows(1, seed=13), basis), dim=-1)
    matrix = 2.0 * inside + 1.0 * outside

    assert float(outside_share(matrix, basis)) == pytest.approx(1.0 / 5.0, abs=1e-5)


def test_outside_share_without_history_is_one():
    assert float(outside_share(random_rows(2, seed=14), None)) == 1.0


def test_subspace_penalty_is_mean_share():
    basis = subspace_basis([random_rows(5, seed=15)])
    candidates = [random_rows(3, seed=16), random_rows(3, seed=17)]

    penalty = subspace_penalty(candidates, basis)

    expected = (outside_share(candidates[0], basis) + outside_share(candidates[1], basis)) / 2
    assert float(penalty) == pytest.approx(float(expected), abs=1e-6)
    assert subspace_penalty(candidates, None) is None
    assert subspace_penalty([], basis) is None


def test_total_variation_distance():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.5, 0.5])

    assert total_variation(p, q) == pytest.approx(0.5)
    assert total_variation(p, p) == 0.0


# ---- convergence of the routers ---------------------------------------------------------------


def converging(step_index: int) -> dict[str, torch.Tensor]:
    """Two layers whose distributions approach uniform, halving the gap at every window."""
    gap = 0.4 * 0.5 ** step_index
    return {
        "a": torch.tensor([0.5 + gap, 0.5 - gap]),
        "b": torch.tensor([1 / 3 - gap / 2, 1 / 3 - gap / 2, 1 / 3 + gap]),
    }


def feed(detector: ConvergenceDetector, sequence, windows: int) -> tuple[str | None, int]:
    """Feed one distribution per window; return the first verdict and the step it came at."""
    for index in range(windows):
        step = (index + 1) * detector.check_every
        verdict = detector.check(step, sequence(index))
        if verdict is not None:
            return verdict, step
    return None, -1


def test_convergence_stops_converged():
    detector = ConvergenceDetector(check_every=5, tolerance=0.05, patience=2, min_steps=10, max_steps=200)

    verdict, step = feed(detector, converging, windows=40)

    assert verdict == "converged"
    # Changes: 0.2, 0.1, 0.05, 0.025, 0.0125 ... the 4th and 5th are under 0.05 (checks 5 and 6).
    assert step == 30
    assert detector.changes[-1] < 0.05
    assert detector.changes[-2] < 0.05


def test_convergence_waits_for_min_steps():
    detector = ConvergenceDetector(check_every=5, tolerance=0.05, patience=2, min_steps=50, max_steps=200)

    verdict, step = feed(detector, lambda index: converging(0), windows=40)

    assert verdict == "converged"
    assert step == 50


def test_convergence_caps_oscillation():
    flip = {0: {"a": torch.tensor([0.8, 0.2])}, 1: {"a": torch.tensor([0.2, 0.8])}}
    detector = ConvergenceDetector(check_every=5, tolerance=0.05, patience=2, min_steps=10, max_steps=60)

    verdict, step = feed(detector, lambda index: flip[index % 2], windows=40)

    assert verdict == "capped"
    assert step == 60
    assert all(change == pytest.approx(0.6) for change in detector.changes)


def test_convergence_patience_resets():
    # One calm window followed by a jump must not count as converged.
    sequence = {0: [0.5, 0.5], 1: [0.5, 0.5], 2: [0.9, 0.1], 3: [0.9, 0.1], 4: [0.9, 0.1]}
    detector = ConvergenceDetector(check_every=1, tolerance=0.05, patience=2, min_steps=0, max_steps=100)

    verdicts = [detector.check(i + 1, {"a": torch.tensor(sequence[i])}) for i in range(5)]

    assert verdicts == [None, None, None, None, "converged"]


# ---- pruning rule ------------------------------------------------------------------------------


def test_prune_decision_under_default_tau():
    # Five experts: tau = 0.5 / 5 = 0.1. Historical 0 and 1, candidates 2, 3 and 4.
    probabilities = torch.tensor([0.05, 0.30, 0.04, 0.50, 0.11])

    decision = prune_decision([0, 1, 2, 3, 4], probabilities, candidate_ids=[2, 3, 4])

    assert decision.threshold == pytest.approx(0.1)
    assert decision.delete == [2]
    assert decision.mask_out == [0]
    assert decision.keep == [1, 3, 4]


def test_prune_decision_keeps_expert_at_tau():
    probabilities = torch.tensor([0.25, 0.25, 0.5])

    decision = prune_decision([7, 8, 9], probabilities, candidate_ids=[8, 9], tau=0.25)

    assert decision.delete == []
    assert decision.mask_out == []
    assert decision.keep == [7, 8, 9]


def test_prune_decision_explicit_tau():
    probabilities = torch.tensor([0.2, 0.3, 0.5])

    decision = prune_decision([0, 1, 2], probabilities, candidate_ids=[1, 2], tau=0.4)

    assert decision.delete == [1]
    assert decision.mask_out == [0]
    assert decision.keep == [2]


def test_prune_decision_length_mismatch():
    with pytest.raises(ValueError, match="3 expert ids but 2 probabilities"):
        prune_decision([0, 1, 2], torch.tensor([0.5, 0.5]), candidate_ids=[2])
