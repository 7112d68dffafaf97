"""Data-parallel runs under torchrun: process-group setup, rank queries and the learner's collectives.

``torchrun --nproc_per_node N -m igsp recipe run ...`` starts N copies of the same run and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. Every rank
builds the same model, draws the same seeded batch order and trains on its own slice of each global
batch. The learner averages the trainable parameters' gradients after every backward pass, so all
ranks keep identical weights. Evaluation splits each test set across the ranks and sums the counts.
Only rank 0 writes files.

NOTE: randomness inside the forward pass (router noise) draws from each rank's generator. All ranks
seed theirs alike, so the noise differs from a single process's draws although its law is the same.

Every function here is a no-op (or returns its input) when no process group is initialised, so the
learner calls them unconditionally.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
import torch.distributed as dist

from .exceptions import ConfigError

if TYPE_CHECKING:
    from .backbone import Backbone
    from .moe import MoELayer

__all__ = [
    "DistributedContext",
    "init_from_env",
    "is_distributed",
    "world_size",
    "rank",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "shard",
    "average_gradients",
    "reduce_layer_stats",
]

logger = logging.getLogger(__name__)

MASTER_KEYS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a run: its rank, the number of ranks and its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_host_group: dist.ProcessGroup | None = None


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        if default is None:
            raise ConfigError(f"Environment variable {name} is not set. Start multi-process runs with torchrun.")
        return default
    try:
        return int(text)
    except ValueError as error:
        raise ConfigError(f"Environment variable {name}={text!r} is not an integer. Start the run with torchrun, which sets it.") from error


def wants_cuda(device: str) -> bool:
    """Return whether a ``backbone.device`` setting resolves to CUDA on this machine."""
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init_from_env(device: str = "auto") -> DistributedContext:
    """Join the process group that torchrun describes in the environment.

    With ``WORLD_SIZE`` unset or 1 this returns a one-process context and touches nothing. Otherwise
    it initialises ``torch.distributed`` with NCCL when ``device`` resolves to CUDA (after selecting
    GPU ``LOCAL_RANK``) and with gloo on the CPU. Calling it again returns the existing context.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return DistributedContext()
    process_rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", process_rank)
    _check_environment(process_rank, size)
    use_cuda = wants_cuda(device)
    if use_cuda:
        _select_gpu(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        return _existing_context(process_rank, size, local_rank)
    dist.init_process_group(backend, rank=process_rank, world_size=size)
    _make_host_group(backend)
    atexit.register(_destroy)
    logger.info("Joined process group: rank %d of %d (%s, local rank %d).", process_rank, size, backend, local_rank)
    return DistributedContext(process_rank, size, local_rank, backend)


def _check_environment(process_rank: int, size: int) -> None:
    if not 0 <= process_rank < size:
        raise ConfigError(f"RANK={process_rank} is outside range(0, WORLD_SIZE={size}). Start the run with torchrun.")
    missing = [key for key in MASTER_KEYS if not os.environ.get(key)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} but {missing} are not set. Start multi-process runs with "
            "`torchrun --nproc_per_node N -m igsp recipe run ...`."
        )


def _select_gpu(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA devices. Pass --nproc_per_node {count} or fewer."
        )
    torch.cuda.set_device(local_rank)


def _existing_context(process_rank: int, size: int, local_rank: int) -> DistributedContext:
    if dist.get_rank() != process_rank or dist.get_world_size() != size:
        raise ConfigError(
            f"A process group is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but the environment says rank {process_rank} of {size}."
        )
    return DistributedContext(process_rank, size, local_rank, dist.get_backend())


def _make_host_group(backend: str) -> None:
    """Create a gloo group for host-side integers when the default group is NCCL (GPU tensors only)."""
    global _host_group
    _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None


def _destroy() -> None:
    """Leave the process group at exit, after every rank got here.

    Without the barrier a rank that tears gloo down while its peer is still sending aborts with
    "terminate called without an active exception" (seen with 2 gloo ranks on a 2-core CPU).
    """
    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError as error:
            logger.warning("Barrier before leaving the process group failed: %s", error)
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Return whether this process belongs to an initialised group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Return whether this process is rank 0, the one that writes checkpoints, results and logs."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place and return it. Under NCCL it must be on this rank's GPU."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(index: torch.Tensor) -> torch.Tensor:
    """Return this rank's contiguous slice of ``index``; the first ``len % world`` ranks get one more."""
    if not is_distributed():
        return index
    return index.tensor_split(world_size())[rank()]


def average_gradients(parameters: Iterable[torch.Tensor], weight: float) -> None:
    """Replace each parameter's ``.grad`` with ``sum over ranks of weight_r * grad_r``.

    ``weight`` is this rank's share of the global batch (local size / global size). A loss that is
    a mean over samples then gets the gradient of its mean over the global batch, even when shards
    differ in size, and a term that is identical on every rank (a regulariser on the parameters)
    keeps its gradient. A gradient missing on some ranks counts as zero there. One missing on every
    rank stays None, as it would in a single process. Gradients travel as one
    flat buffer per (device, dtype), so a step costs one collective per bucket plus one small
    host-side collective that agrees on which gradients exist.
    """
    if not is_distributed():
        return
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    present = all_reduce_host([int(parameter.grad is not None) for parameter in trainable])
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for parameter, count in zip(trainable, present):
        if count > 0:
            buckets.setdefault((parameter.device, parameter.dtype), []).append(parameter)
    for members in buckets.values():
        _reduce_bucket(members, weight)


def _reduce_bucket(parameters: list[torch.Tensor], weight: float) -> None:
    pieces = []
    for parameter in parameters:
        if parameter.grad is None:
            pieces.append(parameter.new_zeros(parameter.numel()))
        else:
            pieces.append(parameter.grad.reshape(-1).to(parameter.dtype) * weight)
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset:offset + size].view_as(parameter)
        offset += size


def all_reduce_host(values: list[int]) -> list[int]:
    """Sum a list of host integers over the ranks without touching a GPU (gloo, on the CPU)."""
    if not is_distributed() or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_host_group)
    return tensor.tolist()


# Per layer and statistic key: the stats entry (the list object) seen at the last reduction, its
# total after that reduction and its count, so that the next call sends only what was added since.
_synced: weakref.WeakKeyDictionary[MoELayer, dict[str, tuple[list, torch.Tensor, int]]] = weakref.WeakKeyDictionary()


def reduce_layer_stats(backbone: Backbone) -> None:
    """Turn every MoE layer's routing statistics into sums over all ranks.

    Strategies record each router's summed dense probabilities and sample count in ``layer.stats``
    and read the mean through ``layer.mean_probabilities``. After this call every rank has the
    statistics of the global batches, as a single process would. Only what a rank added since the
    previous call travels, so calling it after every step neither double counts nor drops samples,
    and a reset (``layer.reset_stats``) starts afresh. Every rank must call it at the same point and
    hold the same layers and keys, which is the case when all ranks route their shards through
    the same routers; the training loop calls it after each optimiser step.
    """
    if not is_distributed():
        return
    entries = _local_increments(backbone)
    if not entries:
        return
    totals = torch.cat([total.reshape(-1) for _, _, _, total, _ in entries])
    all_reduce_sum(totals)
    counts = all_reduce_host([count for _, _, _, _, count in entries])

    offset = 0
    for (layer, key, entry, increment, _), count in zip(entries, counts):
        size = increment.numel()
        reduced = totals[offset:offset + size].view_as(increment)
        offset += size
        previous = _synced.get(layer, {}).get(key)
        fresh = previous is None or previous[0] is not entry
        entry[0] = reduced.clone() if fresh else previous[1] + reduced
        entry[1] = count if fresh else previous[2] + count
        _synced.setdefault(layer, {})[key] = (entry, entry[0].clone(), entry[1])


def _local_increments(backbone: Backbone) -> list[tuple[MoELayer, str, list, torch.Tensor, int]]:
    """Return (layer, key, entry, total added, count added) since the last reduction, in a fixed order."""
    entries = []
    for _, layer in backbone.layers():
        previous = _synced.get(layer, {})
        for key in sorted(layer.stats):
            entry = layer.stats[key]
            total, count = entry
            seen = previous.get(key)
            if seen is not None and seen[0] is entry and seen[1].shape == total.shape:
                # The subtraction rounds in float32; its error is below 1e-6 of the total.
                entries.append((layer, key, entry, total - seen[1], count - seen[2]))
            else:
                _synced.get(layer, {}).pop(key, None)
                entries.append((layer, key, entry, total.clone(), count))
    return entries
