"""Pure functions of iGSP: historical subspaces, projections, router convergence and pruning rules.

Down-projections ``A`` are (rank, d) matrices whose rows live in the layer's input space. The
historical subspace of a layer is the row space of its frozen experts' stacked ``A``. None of these
functions touches a learner, so each is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "subspace_basis",
    "project_out",
    "outside_share",
    "subspace_penalty",
    "total_variation",
    "ConvergenceDetector",
    "PruneDecision",
    "prune_decision",
]


def subspace_basis(down_projections: Sequence[torch.Tensor], relative_tolerance: float = 1e-6) -> torch.Tensor | None:
    """Return an orthonormal basis U (d, k) of the row space of the stacked matrices, or None if empty.

    Directions whose singular value is below ``relative_tolerance`` times the largest are dropped,
    so k is the numerical rank.
    """
    if not down_projections:
        return None
    stacked = torch.cat([a.detach().float() for a in down_projections], dim=0)
    _, singular_values, right = torch.linalg.svd(stacked, full_matrices=False)
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return None
    keep = singular_values > relative_tolerance * singular_values[0]
    return right[keep].T.contiguous()


def project_out(matrix: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Return ``matrix (I - U U^T)``: the rows of ``matrix`` with their component in span(U) removed."""
    if basis is None:
        return matrix
    basis = basis.to(device=matrix.device, dtype=matrix.dtype)
    return matrix - (matrix @ basis) @ basis.T


def outside_share(matrix: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Return ``||A (I - P)||_F^2 / ||A||_F^2``: the share of A's energy outside span(U), in [0, 1]."""
    if basis is None:
        return matrix.new_ones(())
    residual = project_out(matrix.float(), basis)
    return residual.pow(2).sum() / matrix.float().pow(2).sum().clamp_min(1e-12)


def subspace_penalty(candidates: Sequence[torch.Tensor], basis: torch.Tensor | None) -> torch.Tensor | None:
    """Return the mean outside share over candidate down-projections; None when there is no history."""
    if basis is None or not candidates:
        return None
    stacked = torch.stack([a.float() for a in candidates])
    residual = project_out(stacked, basis)
    shares = residual.pow(2).sum(dim=(1, 2)) / stacked.pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
    return shares.mean()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Return the total-variation distance ``0.5 * sum |p - q|`` of two distributions."""
    return 0.5 * float((p.float() - q.float()).abs().sum())


@dataclass
class ConvergenceDetector:
    """Decides when the routers of a task have converged, from windowed mean routing distributions.

    Feed :meth:`check` the per-layer mean distributions of each window of ``check_every`` steps.
    The change between two windows is the mean over layers of their total-variation distances.
    The phase ends when the change stays below ``tolerance`` for ``patience`` consecutive checks
    (``"converged"``) or when ``max_steps`` is reached (``"capped"``), never before ``min_steps``.
    """

    check_every: int = 20
    tolerance: float = 0.05
    patience: int = 2
    min_steps: int = 40
    max_steps: int = 300
    previous: dict[str, torch.Tensor] | None = None
    calm_checks: int = 0
    changes: list[float] = field(default_factory=list)

    def check(self, step: int, distributions: dict[str, torch.Tensor]) -> str | None:
        """Record one window ending at ``step``; return ``"converged"``, ``"capped"`` or None."""
        if self.previous is not None:
            shared = [key for key in distributions if key in self.previous and self.previous[key].shape == distributions[key].shape]
            if shared:
                change = sum(total_variation(distributions[k], self.previous[k]) for k in shared) / len(shared)
                self.changes.append(change)
                self.calm_checks = self.calm_checks + 1 if change < self.tolerance else 0
        self.previous = {key: value.detach().clone() for key, value in distributions.items()}
        return self.verdict(step)

    def verdict(self, step: int) -> str | None:
        if step >= self.max_steps:
            return "capped"
        if step >= self.min_steps and self.calm_checks >= self.patience:
            return "converged"
        return None


@dataclass
class PruneDecision:
    """Pruning outcome for one layer: candidates to delete, historical experts to mask, experts kept."""

    threshold: float
    delete: list[int]
    mask_out: list[int]
    keep: list[int]


def prune_decision(
    expert_ids: Sequence[int],
    mean_probabilities: torch.Tensor,
    candidate_ids: Sequence[int],
    tau: float | None = None,
    tau_factor: float = 0.5,
) -> PruneDecision:
    """Apply the rule ``p_j < tau``: candidates under it are deleted, historical experts masked out.

    ``mean_probabilities`` is aligned with ``expert_ids`` (the experts the router may use). The
    default threshold is ``tau_factor / len(expert_ids)``.
    """
    if len(expert_ids) != mean_probabilities.numel():
        raise ValueError(f"{len(expert_ids)} expert ids but {mean_probabilities.numel()} probabilities.")
    threshold = tau if tau is not None else tau_factor / max(len(expert_ids), 1)
    candidates = set(candidate_ids)
    delete, mask_out, keep = [], [], []
    for expert_id, probability in zip(expert_ids, mean_probabilities.tolist()):
        if probability >= threshold:
            keep.append(expert_id)
        elif expert_id in candidates:
            delete.append(expert_id)
        else:
            mask_out.append(expert_id)
    return PruneDecision(threshold, delete, mask_out, keep)
