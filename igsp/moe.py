"""Mixture-of-experts low-rank layers: expert pools, per-task routers and the batched forward.

One :class:`MoELayer` sits beside one transformer block's MLP (or one convolutional block) and
adds ``sum_j g_j(z) * s_j * B_j act(A_j u)`` to that module's output. Here ``u`` is the module's
input, ``z`` the sample's routing token and ``g`` the gates of the router chosen for the sample.
Experts live in a pool that strategies grow and shrink; each task owns routers over a subset of
the pool. The forward pass computes every expert that a batch uses in two matrix products, so
its cost does not depend on a Python loop over experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LowRankExpert",
    "Router",
    "MoELayer",
    "RoutingContext",
    "orthonormal_rows",
]

ACTIVATIONS = {"none": None, "relu": F.relu, "gelu": F.gelu}
GATINGS = ("dense", "topk")


def orthonormal_rows(rows: int, columns: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a ``rows x columns`` matrix with orthonormal rows (``rows <= columns``)."""
    if rows > columns:
        raise ValueError(f"Cannot build {rows} orthonormal rows in dimension {columns}.")
    gaussian = torch.randn(columns, rows, generator=generator)
    basis, _ = torch.linalg.qr(gaussian)
    return basis.T.contiguous()


class LowRankExpert(nn.Module):
    """One expert: ``B act(A u) * scale`` with ``A`` of shape (rank, in) and ``B`` of (out, rank).

    ``B`` starts at zero, so a new expert never changes the layer's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scale: float = 1.0,
        activation: str = "none",
        init: str = "orthonormal",
        owner: str = "",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"Expert rank must be at least 1, got {rank}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown expert activation {activation!r}; use one of {sorted(ACTIVATIONS)}.")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scale = float(scale)
        self.activation = activation
        self.owner = owner
        self.A = nn.Parameter(self._initial_down(init))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def _initial_down(self, init: str) -> torch.Tensor:
        if init == "orthonormal":
            if self.rank <= self.in_features:
                return orthonormal_rows(self.rank, self.in_features)
            init = "kaiming"
        if init == "kaiming":
            weight = torch.empty(self.rank, self.in_features)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            return weight
        raise ValueError(f"Unknown expert init {init!r}; use 'orthonormal' or 'kaiming'.")

    @property
    def group(self) -> tuple[int, str]:
        """Experts that share rank and activation are computed in one matrix product."""
        return (self.rank, self.activation)

    @property
    def frozen(self) -> bool:
        return not (self.A.requires_grad or self.B.requires_grad)

    def set_trainable(self, trainable: bool) -> None:
        self.A.requires_grad_(trainable)
        self.B.requires_grad_(trainable)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Compute this expert alone; the reference for the batched path in tests."""
        low = u @ self.A.to(u.dtype).T
        activation = ACTIVATIONS[self.activation]
        if activation is not None:
            low = activation(low)
        return self.scale * (low @ self.B.to(u.dtype).T)

    def describe(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "scale": self.scale,
            "activation": self.activation,
            "owner": self.owner,
            "frozen": self.frozen,
        }


class Router(nn.Module):
    """A task's gate over a list of experts of one layer.

    ``expert_ids`` fixes which experts the router may use and in which order; ``mask`` switches
    single experts off without deleting them. A router built with ``learnable=False`` has no
    weights and spreads its mass uniformly over the unmasked experts, so a router over one expert
    gives it weight 1.
    """

    def __init__(
        self,
        in_features: int,
        expert_ids: Sequence[int],
        learnable: bool = True,
        gating: str = "dense",
        top_k: int = 2,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"Unknown gating {gating!r}; use one of {GATINGS}.")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        if len(set(expert_ids)) != len(expert_ids):
            raise ValueError(f"Router expert ids must be unique, got {list(expert_ids)}.")
        self.in_features = in_features
        self.expert_ids = [int(i) for i in expert_ids]
        self.learnable = learnable
        self.gating = gating
        self.top_k = top_k
        self.noise_std = float(noise_std)
        self.weight = nn.Parameter(torch.zeros(len(self.expert_ids), in_features)) if learnable else None
        self.register_buffer("mask", torch.ones(len(self.expert_ids), dtype=torch.bool))
        self._active_cache: tuple[torch.Tensor, int, tuple[int, ...], list[int]] | None = None

    @property
    def active_ids(self) -> list[int]:
        """The unmasked expert ids, in router order.

        The list is cached until the mask changes (a new tensor, or an in-place write such as a
        state-dict load, which bumps the tensor's version counter), so reading it each forward
        pass does not wait for the device.
        """
        cached = self._active_cache
        ids = tuple(self.expert_ids)
        if cached is not None and cached[0] is self.mask and cached[1] == self.mask._version and cached[2] == ids:
            return cached[3]
        active = [i for i, on in zip(ids, self.mask.tolist()) if on]
        self._active_cache = (self.mask, self.mask._version, ids, active)
        return active

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            logits = z.new_zeros(z.shape[0], len(self.expert_ids), dtype=torch.float32)
        else:
            # Routing stays in float32 under autocast: top-k choices and pruning compare these values.
            with torch.autocast(z.device.type, enabled=False):
                logits = z.float() @ self.weight.float().T
        return logits.masked_fill(~self.mask, float("-inf"))

    def probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """Return the dense routing distribution (N, len(expert_ids)); masked experts get 0."""
        if not self.active_ids:
            return z.new_zeros(z.shape[0], len(self.expert_ids), dtype=torch.float32)
        return torch.softmax(self.logits(z), dim=-1)

    def gates(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(gates, dense_probabilities)``, both (N, len(expert_ids)).

        Gates equal the dense probabilities under dense gating. Under top-k gating they keep the
        k largest (after optional training noise) and renormalise them to sum to 1.
        """
        dense = self.probabilities(z)
        active = len(self.active_ids)
        if active == 0:
            return dense, dense
        logits = self.logits(z)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        noisy = torch.softmax(logits, dim=-1) if self.noise_std > 0 and self.training else dense
        if self.gating == "dense":
            return noisy, dense
        k = min(self.top_k, active)
        top_values, top_index = noisy.topk(k, dim=-1)
        gates = torch.zeros_like(noisy).scatter(-1, top_index, top_values)
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return gates, dense

    def remove_experts(self, expert_ids: Iterable[int]) -> None:
        """Delete experts from this router together with their weight rows."""
        drop = set(int(i) for i in expert_ids)
        keep = [k for k, i in enumerate(self.expert_ids) if i not in drop]
        self.expert_ids = [self.expert_ids[k] for k in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index].clone()
        if self.weight is not None:
            trainable = self.weight.requires_grad
            self.weight = nn.Parameter(self.weight.detach()[index].clone(), requires_grad=trainable)

    def set_mask(self, active_ids: Iterable[int]) -> None:
        """Keep only ``active_ids`` switched on; every other expert of the router is masked."""
        active = set(int(i) for i in active_ids)
        unknown = active - set(self.expert_ids)
        if unknown:
            raise ValueError(f"Experts {sorted(unknown)} are not in this router ({self.expert_ids}).")
        values = [i in active for i in self.expert_ids]
        self.mask = torch.tensor(values, dtype=torch.bool, device=self.mask.device)

    def describe(self) -> dict[str, Any]:
        return {
            "expert_ids": list(self.expert_ids),
            "mask": [bool(v) for v in self.mask.tolist()],
            "learnable": self.learnable,
            "gating": self.gating,
            "top_k": self.top_k,
            "noise_std": self.noise_std,
        }


@dataclass
class RoutingContext:
    """Per-forward routing state shared by the MoE layers of one tower.

    ``assignment[n]`` indexes ``route_keys`` for sample ``n``; -1 sends the sample through the
    frozen backbone only. ``token_index`` gives each sample's routing-token position where the
    tower needs it (the end-of-text token of a prompt). With ``record`` set, layers add their
    dense routing probabilities to their statistics; with ``capture`` set, they keep the
    routing tokens of the last forward pass.
    """

    route_keys: list[str] = field(default_factory=list)
    assignment: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    record: bool = False
    capture: bool = False
    _partition: tuple[Any, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def active(self) -> bool:
        return self.assignment is not None and bool(self.route_keys)

    def partition(self, device: torch.device) -> list[tuple[str, torch.Tensor | None, int]]:
        """Return ``(key, rows, count)`` for every route that has samples, in ``route_keys`` order.

        ``rows`` indexes the route's samples on ``device``, or is None when the route takes the
        whole batch. The result is computed once per forward pass and shared by the tower's layers.
        An assignment on the CPU (as :meth:`Routes.uniform` makes by default) costs no device
        sync, and one on the GPU costs one.
        """
        assignment = self.assignment
        signature = (assignment._version, tuple(self.route_keys), device)
        cached = self._partition
        if cached is not None and cached[0] is assignment and cached[1] == signature:
            return cached[2]
        parts = []
        for index, key in enumerate(self.route_keys):
            rows = (assignment == index).nonzero(as_tuple=True)[0]
            count = rows.numel()
            if count == 0:
                continue
            parts.append((key, None if count == assignment.shape[0] else rows.to(device), count))
        self._partition = (assignment, signature, parts)
        return parts


class MoELayer(nn.Module):
    """The expert pool and routers of one block, with the batched forward pass."""

    def __init__(self, in_features: int, out_features: int, name: str = "") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.name = name
        self.experts = nn.ModuleDict()
        self.routers = nn.ModuleDict()
        self.next_expert_id = 0
        self.stats: dict[str, list[Any]] = {}
        self.captured_tokens: torch.Tensor | None = None
        self.last_probabilities: dict[str, torch.Tensor] = {}
        self._columns: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- structure -------------------------------------------------------------------------

    def add_expert(
        self,
        rank: int,
        scale: float = 1.0,
        activation: str = "none",
        init: str = "orthonormal",
        owner: str = "",
        expert_id: int | None = None,
    ) -> int:
        """Add an expert with ``B = 0`` and return its id; ids are never reused."""
        if expert_id is None:
            expert_id = self.next_expert_id
        if str(expert_id) in self.experts:
            raise ValueError(f"Expert id {expert_id} already exists in layer {self.name!r}.")
        expert = LowRankExpert(self.in_features, self.out_features, rank, scale, activation, init, owner)
        reference = next(self.parameters(), None)
        if reference is not None:
            expert = expert.to(reference.device)
        self.experts[str(expert_id)] = expert
        self.next_expert_id = max(self.next_expert_id, expert_id + 1)
        return expert_id

    def remove_expert(self, expert_id: int) -> None:
        """Delete an expert from the pool and from every router that lists it."""
        if str(expert_id) not in self.experts:
            raise KeyError(f"Expert {expert_id} does not exist in layer {self.name!r}.")
        del self.experts[str(expert_id)]
        for router in self.routers.values():
            if expert_id in router.expert_ids:
                router.remove_experts([expert_id])

    def expert(self, expert_id: int) -> LowRankExpert:
        return self.experts[str(expert_id)]

    @property
    def expert_ids(self) -> list[int]:
        return sorted(int(key) for key in self.experts.keys())

    def add_router(
        self,
        key: str,
        expert_ids: Sequence[int],
        learnable: bool = True,
        gating: str = "dense",
        top_k: int = 2,
        noise_std: float = 0.0,
    ) -> Router:
        """Add the router named ``key`` over existing experts and return it."""
        if key in self.routers:
            raise ValueError(f"Router {key!r} already exists in layer {self.name!r}.")
        missing = [i for i in expert_ids if str(i) not in self.experts]
        if missing:
            raise KeyError(f"Experts {missing} do not exist in layer {self.name!r}.")
        router = Router(self.in_features, expert_ids, learnable, gating, top_k, noise_std)
        reference = next(self.parameters(), None)
        if reference is not None:
            router = router.to(reference.device)
        self.routers[key] = router
        return router

    def remove_router(self, key: str) -> None:
        del self.routers[key]
        self.stats.pop(key, None)

    def describe(self) -> dict[str, Any]:
        """Return the layer's structure as plain data, enough to rebuild it before a weight load."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "next_expert_id": self.next_expert_id,
            "experts": {key: expert.describe() for key, expert in self.experts.items()},
            "routers": {key: router.describe() for key, router in self.routers.items()},
        }

    def rebuild(self, structure: dict[str, Any]) -> None:
        """Recreate experts and routers from :meth:`describe` output; weights load afterwards."""
        for key in list(self.routers.keys()):
            del self.routers[key]
        for key in list(self.experts.keys()):
            del self.experts[key]
        for key, spec in structure["experts"].items():
            self.add_expert(spec["rank"], spec["scale"], spec["activation"], owner=spec["owner"], expert_id=int(key))
            self.expert(int(key)).set_trainable(not spec["frozen"])
        for key, spec in structure["routers"].items():
            router = self.add_router(
                key, spec["expert_ids"], spec["learnable"], spec["gating"], spec["top_k"], spec["noise_std"]
            )
            router.set_mask([i for i, on in zip(spec["expert_ids"], spec["mask"]) if on])
        self.next_expert_id = int(structure["next_expert_id"])

    # ---- statistics ----------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.stats = {}

    def mean_probabilities(self, key: str) -> torch.Tensor | None:
        """Return router ``key``'s mean dense distribution since the last reset, or None."""
        if key not in self.stats:
            return None
        total, count = self.stats[key]
        return total / max(count, 1)

    def _record(self, key: str, dense: torch.Tensor) -> None:
        total = dense.detach().sum(dim=0)
        if key in self.stats and self.stats[key][0].shape == total.shape:
            self.stats[key][0] += total
            self.stats[key][1] += dense.shape[0]
        else:
            self.stats[key] = [total, dense.shape[0]]

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, u: torch.Tensor, z: torch.Tensor, context: RoutingContext) -> torch.Tensor | None:
        """Return the experts' contribution for input ``u`` (N, ..., in), or None if no sample uses one.

        ``z`` (N, in) contains each sample's routing token.
        """
        if context.capture:
            self.captured_tokens = z.detach()
        if not context.active:
            return None
        gates, used_ids = self._gate_matrix(z, context)
        if not used_ids:
            return None
        return self._mix(u, gates, used_ids)

    def _gate_matrix(self, z: torch.Tensor, context: RoutingContext) -> tuple[torch.Tensor, list[int]]:
        """Build the (N, E) gate matrix over the experts any sample of the batch may use."""
        routes = [(key, rows, count) for key, rows, count in context.partition(z.device) if key in self.routers]
        used_ids = sorted({i for key, _, _ in routes for i in self.routers[key].active_ids})
        gates = z.new_zeros(z.shape[0], len(used_ids), dtype=torch.float32)
        for key, rows, count in routes:
            router = self.routers[key]
            route_gates, dense = router.gates(z if rows is None else z[rows])
            if self.training:
                self.last_probabilities[key] = dense
            if context.record:
                self._record(key, dense)
            source, target = self._column_map(key, router, used_ids, z.device)
            block = torch.zeros(count, len(used_ids), dtype=torch.float32, device=z.device)
            block.index_copy_(1, target, route_gates.index_select(1, source).to(block.dtype))
            gates = block if rows is None else gates.index_put((rows,), block)
        return gates, used_ids

    def _column_map(self, key: str, router: Router, used_ids: list[int],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (router columns, gate-matrix columns) of the router's experts that are in use.

        The index tensors are cached per router layout and used set, so a forward pass builds
        no tensor from a Python list once the layout has been seen.
        """
        signature = (key, tuple(router.expert_ids), tuple(used_ids), device)
        if signature not in self._columns:
            column = {expert_id: c for c, expert_id in enumerate(used_ids)}
            pairs = [(k, column[i]) for k, i in enumerate(router.expert_ids) if i in column]
            source = torch.tensor([k for k, _ in pairs], dtype=torch.long, device=device)
            target = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
            if len(self._columns) >= 256:
                self._columns.clear()
            self._columns[signature] = (source, target)
        return self._columns[signature]

    def _mix(self, u: torch.Tensor, gates: torch.Tensor, used_ids: list[int]) -> torch.Tensor:
        """Apply all used experts in one down and one up product per (rank, activation) group."""
        flat = u.reshape(u.shape[0], -1, u.shape[-1])
        out = None
        groups: dict[tuple[int, str], list[int]] = {}
        for c, expert_id in enumerate(used_ids):
            groups.setdefault(self.expert(expert_id).group, []).append(c)
        for (rank, activation), columns in groups.items():
            experts = [self.expert(used_ids[c]) for c in columns]
            down = torch.cat([e.A for e in experts], dim=0).to(flat.dtype)
            up = torch.cat([e.B * e.scale for e in experts], dim=1).to(flat.dtype)
            low = flat @ down.T
            if ACTIVATIONS[activation] is not None:
                low = ACTIVATIONS[activation](low)
            weights = select_columns(gates, columns).to(flat.dtype).repeat_interleave(rank, dim=1)
            low = low * weights[:, None, :]
            part = low @ up.T
            out = part if out is None else out + part
        return out.reshape(*u.shape[:-1], self.out_features)


def select_columns(matrix: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """Return ``matrix[:, columns]``, as a view without an index tensor when the columns are a range."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return matrix[:, columns[0]:columns[0] + len(columns)]
    return matrix[:, columns]
