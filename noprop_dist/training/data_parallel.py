"""Data parallelism applied to a unit from outside its loop: the share of a global batch a rank
trains (:func:`shard`), the unit's loss as a module for DDP to wrap (:class:`UnitLoss`) and
the count of bytes it all-reduces (:class:`ByteCounter`, :func:`counting_allreduce`)."""

from __future__ import annotations

import torch
from torch import nn


def shard(global_idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of one global batch (sizes differ by at most one)."""
    n = len(global_idx)
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return global_idx[lo:lo + base + (1 if rank < extra else 0)]


class UnitLoss(nn.Module):
    """A runner's loss as a module (what DDP wraps): ``forward(x, y, rows)`` is the objective's
    ``batch_loss``, which reads the runner's own module, registered here as a submodule."""

    def __init__(self, runner):
        super().__init__()
        self.unit_module = runner.module
        self.runner = runner

    def forward(self, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.runner.objective.batch_loss(self.runner, x, y, rows)


class ByteCounter:
    """What one rank all-reduces: DDP's gradient buckets (as its communication hook's state,
    :func:`counting_allreduce`), what is reduced by hand (:meth:`count`), and the buffers
    DDP broadcasts before each forward (``per_step``, when it does)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.per_step = 0

    def count(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


def counting_allreduce(counter, bucket):  # no annotations: DDP checks them against real types
    """All-reduce one gradient bucket (DDP's default) after counting its bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter.count(bucket.buffer())
    return allreduce_hook(None, bucket)
