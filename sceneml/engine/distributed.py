"""Data-parallel training under ``torchrun``: process group, shards, and the few collectives `train` needs.

One process per device; each trains on its shard of every epoch (DistributedSampler order, padded so
every rank runs the same number of batches) through DistributedDataParallel. Only rank 0 talks to
MLflow and validates, on the whole val split; the other ranks wait at a barrier meanwhile. Losses are
all-reduced, so the logged train loss is the mean over every rank's images.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sceneml.errors import SceneMLError
from sceneml.models import pick_device

_timeout_s = 1800  # set by setup(): how long a rank waits at a collective


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, timeout_s: int = 1800) -> tuple[DistContext | None, str]:
    """Join the process group when started by torchrun. Returns the context (None for a single
    process) and the device name this rank should use (``cuda:<local_rank>`` on GPUs).

    ``timeout_s`` bounds every wait for the other ranks, joining included: the other ranks wait at a
    barrier while rank 0 decodes the data, validates and logs each epoch."""
    global _timeout_s
    if not launched_by_torchrun():
        return None, device_name
    _timeout_s = timeout_s
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = pick_device(device_name).type == "cuda"  # also checks the name and that CUDA is there
    if not dist.is_initialized():
        with waiting_for_ranks("joining the process group"):
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    return ctx, f"cuda:{local_rank}" if use_cuda else "cpu"


def shard_order(n: int, ctx: DistContext, seed: int, epoch: int) -> torch.Tensor:
    """This rank's indices for ``epoch``: a DistributedSampler shuffle (padded to equal shards)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank,
                                                  shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


@contextlib.contextmanager
def waiting_for_ranks(what: str) -> Iterator[None]:
    """Turn a failed wait for the other ranks (a timeout, or a rank that died: gloo and NCCL raise
    RuntimeError, the rendezvous DistError) into one line that says what to do."""
    try:
        yield
    except RuntimeError as exc:  # DistError is one
        rank = os.environ.get("RANK", "?")
        raise SceneMLError(
            f"rank {rank} of {os.environ.get('WORLD_SIZE', '?')}: {what} failed after waiting up to "
            f"dist_timeout={_timeout_s}s for the other ranks ({str(exc).splitlines()[0][:200]}); another rank "
            "has stopped (see its error) or is slower than that: raise dist_timeout") from None


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a tensor over all ranks (every rank calls this with the same shape)."""
    reduced = values.detach().clone()
    with waiting_for_ranks("the loss all-reduce"):
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def weighted_mean_over_ranks(mean: float, count: int, device: torch.device) -> float:
    """The mean over every rank's items, from each rank's mean and count."""
    t = torch.tensor([mean * count, float(count)], dtype=torch.float64, device=device)
    with waiting_for_ranks("the epoch-loss all-reduce"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0] / t[1])


def main_process_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a decision only the main process can take, as early stopping)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    with waiting_for_ranks("rank 0's decision"):
        dist.broadcast(t, src=0)
    return bool(t.item())


def is_main_process() -> bool:
    """Rank 0, or the only process: a single process is just the trivial distributed case."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        with waiting_for_ranks("the barrier"):
            dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
