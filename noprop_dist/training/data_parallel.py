"""Data parallelism, applied to a unit from outside its loop (as torchtitan's parallelize
functions apply it to a plain module).

A trainer that runs ``world`` ranks of an open process group hands each
:class:`~noprop_dist.training.runner.UnitRunner` a :class:`DataParallel`; the runner asks it
for a :class:`Parallel` per unit (:meth:`DataParallel.attach`), and without one uses
:data:`SERIAL`, the plain loop. The runner calls the same methods either way, so the loop has
no rank or world branches.

What data parallelism means for a unit that reads images: every rank walks the same seeded
global batches and trains on its contiguous share (:func:`shard`); its loss is scaled by
``len(share) * world / len(global batch)`` so that DDP's average of the ranks' gradients is
the gradient of the global batch's mean, also when shares are uneven; W_embed (the runner's,
outside the module) is averaged by hand; every rank then takes the same step. Dropout masks
differ per rank (stream ``DROPOUT + RANK_STREAM_STRIDE * rank``). A unit without images (a
head: labels only) runs in full and identically on every rank, with no communication.

BatchNorm: with ``sync_batchnorm`` every BatchNorm1d of the unit normalises with statistics of
the global batch (:class:`GlobalBatchNorm1d`, all-reduced per layer; N ranks compute what one
computes on the whole batch, up to float rounding); without it each rank uses its share's
statistics and DDP broadcasts rank 0's buffers before each forward (PyTorch's default).

Groups: :func:`open_loopback_group` (the DDP trainer's default group, through a file, on
loopback), :func:`replica_group` (a unit's replicas), :func:`exit_without_finalizing` (how a
rank whose group DDP kept alive leaves: torchrun ranks, the tests' spawned ranks).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from noprop_dist.variants.base import DROPOUT, RANK_STREAM_STRIDE

# The differentiable all-reduce's deprecation names a private replacement; keep the public one.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")



def shard(global_idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of one global batch (sizes differ by at most one)."""
    n = len(global_idx)
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return global_idx[lo:lo + base + (1 if rank < extra else 0)]


class Serial:
    """A unit trained on whole batches by one process: every hook is the identity."""

    rank, world = 0, 1
    min_batch = 2            # BatchNorm needs two examples
    dropout_stream = DROPOUT

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return runner.objective.batch_loss(runner, x, y, rows)

    def reduce_grad(self, grad: torch.Tensor) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def reduce_losses(self, per_step: torch.Tensor) -> None:
        pass

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics

    def begin_epoch(self) -> None:
        pass


SERIAL = Serial()


class DataParallel:
    """The data-parallel layout of a trainer: this process is ``rank`` of ``world``.

    ``group``: a process group of its own for these ranks (a unit's replica group; see
    :func:`replica_group`), instead of the default one that the DDP trainers open. Gradients are
    then averaged by one flat all-reduce per step in that group (torch's DDP takes only the
    default kind of group); everything else is the same.
    """

    def __init__(self, rank: int, world: int, sync_batchnorm: bool = True, group: Any = None):
        self.rank, self.world, self.sync_batchnorm, self.group = rank, world, sync_batchnorm, group

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run directory (metrics, checkpoints); every rank reads it."""
        return self.rank == 0

    def barrier(self) -> None:
        """No rank goes on (or leaves) before the others reach this point."""
        if self.world > 1:
            dist.barrier(group=self.group) if self.group is not None else dist.barrier()

    def attach(self, runner: Any) -> Serial:
        """The runner's :class:`Parallel` (image-reading units), else :data:`SERIAL`."""
        if self.world < 2 or not runner.objective.needs_images(runner.unit):
            return SERIAL
        if self.group is not None:
            return GroupParallel(runner, self.rank, self.world, self.sync_batchnorm, self.group)
        return Parallel(runner, self.rank, self.world, self.sync_batchnorm)


class Parallel(Serial):
    """One unit trained data-parallel: DDP around the unit's loss (the default process group),
    counted all-reduces. :class:`GroupParallel` is the same in a group of its own."""

    def __init__(self, runner: Any, rank: int, world: int, sync_batchnorm: bool, group: Any = None):
        self.rank, self.world, self.group = rank, world, group     # group None: the default one
        self.min_batch = max(2, world)       # every rank needs an example
        self.dropout_stream = DROPOUT + RANK_STREAM_STRIDE * rank
        self.counter = ByteCounter()
        self.loss_bytes = self.loss_calls = 0
        self.device = runner.device          # a data-parallel unit stays on its device
        self._prepare(runner, sync_batchnorm)

    def _prepare(self, runner: Any, sync_batchnorm: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        batchnorms = [m for m in runner.module.modules() if isinstance(m, nn.BatchNorm1d)]
        broadcast = bool(batchnorms) and not sync_batchnorm
        if sync_batchnorm:
            use_global_batchnorm(runner.module)
        if broadcast:
            # DDP broadcasts rank 0's buffers at every forward (counted per step).
            self.counter.per_step = sum(b.numel() * b.element_size() for b in runner.module.buffers())
        device = self.device
        # Building DDP broadcasts rank 0's weights and buffers (the same on every rank: one seed,
        # or one checkpoint).
        self.ddp = DistributedDataParallel(UnitLoss(runner), device_ids=[device.index] if device.type == "cuda" else None,
                                           **forward_buffer_sync(broadcast))
        self.ddp.register_comm_hook(self.counter, counting_allreduce)

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        return shard(idx, self.rank, self.world)

    def loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.counter.bytes += self.counter.per_step
        return self.ddp(x, y, rows)

    def reduce_grad(self, grad: torch.Tensor) -> None:
        """Average a gradient held outside the DDP module (the runner's W_embed)."""
        dist.all_reduce(grad, group=self.group)
        grad.div_(self.world)
        self.counter.count(grad)

    def reduce_losses(self, per_step: torch.Tensor) -> None:
        """Each rank holds its share's part of every step's global-batch mean: the sum over
        ranks is that mean, the same on every rank (so all ranks stop at the same epoch)."""
        dist.all_reduce(per_step, group=self.group)
        self.loss_bytes += per_step.numel() * per_step.element_size()
        self.loss_calls += 1

    def begin_epoch(self) -> None:
        self.counter.bytes = self.counter.calls = self.loss_bytes = self.loss_calls = 0
        GlobalBatchNorm1d.payload_bytes = GlobalBatchNorm1d.calls = 0

    def epoch_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """This rank's all-reduce figures, and the slowest rank's seconds and memory (one
        all-reduce of three numbers, outside the timed loop; on the unit's device for nccl)."""
        worst = torch.tensor([metrics["seconds"], float(metrics["peak_memory_bytes"]), float(metrics["rss_bytes"])],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.group)
        seconds, peak, rss = worst.cpu().tolist()
        grad, bn, losses = self.counter.bytes, GlobalBatchNorm1d.payload_bytes, self.loss_bytes
        # Per worker and epoch: gradients (DDP's buckets or the flat all-reduce, W_embed by hand,
        # buffers DDP broadcasts), global BatchNorm's statistics, the epoch's losses; and all of it.
        return {**metrics, "seconds": seconds, "samples_per_s": metrics["samples_per_s"] * metrics["seconds"] / seconds,
                "peak_memory_bytes": int(peak), "rss_bytes": int(rss), "workers": self.world,
                "allreduce_bytes": grad + bn + losses, "allreduce_grad_bytes_per_worker": grad,
                "allreduce_batchnorm_bytes_per_worker": bn, "allreduce_loss_bytes_per_worker": losses,
                "allreduce_calls_per_worker": self.counter.calls + GlobalBatchNorm1d.calls + self.loss_calls}


class GroupParallel(Parallel):
    """One unit trained by the replicas of its own process group (block x data parallelism):
    the same shares, dropout streams, global BatchNorm and counts as :class:`Parallel`, with the
    module's gradients averaged by one flat all-reduce in ``group`` after each backward (torch's
    DDP takes only the default kind of group)."""

    def _prepare(self, runner: Any, sync_batchnorm: bool) -> None:
        if sync_batchnorm:
            use_global_batchnorm(runner.module, self.group)
        self.params = [p for p in runner.module.parameters() if p.requires_grad]
        with torch.no_grad():   # every replica starts from replica 0's weights (one seed, or one checkpoint)
            for tensor in list(runner.module.parameters()) + list(runner.module.buffers()):
                dist.broadcast(tensor, group=self.group, group_src=0)

    def loss(self, runner: Any, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return runner.objective.batch_loss(runner, x, y, rows)

    def after_backward(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world)
        self.counter.count(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()


def forward_buffer_sync(broadcast: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting rank 0's buffers before every forward: ``forward_sync_buffers``
    where torch has it (2.13 on; ``broadcast_buffers`` then warns as deprecated on every build),
    else ``broadcast_buffers``. The new flag still syncs buffers once at build, which the old
    ``False`` skipped; the ranks' buffers are equal then (one seed, or one checkpoint), so the
    weights are the same either way."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": broadcast}
    return {"broadcast_buffers": broadcast}


def open_loopback_group(backend: str, rank: int, world: int, store_path: str, timeout_s: float) -> None:
    """On a worker: join the default process group through ``store_path`` (a file every rank
    sees), its transport bound to the loopback interface (gloo's pairs; nccl's bootstrap and
    socket transport)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if backend == "nccl":
        os.environ["NCCL_SOCKET_IFNAME"] = "lo"
        # As Ray Train does: a timed-out collective fails the worker instead of hanging it.
        if "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def exit_without_finalizing(code: int) -> None:
    """End a rank's process with ``code``, skipping the interpreter's finalization, once all it
    wrote is closed (checkpoints and metrics are written atomically).

    torch's DDP and torch.distributed.nn's autograd collectives (global BatchNorm) keep the
    process group alive past ``destroy_process_group()`` (torch 2.14; a plain ``all_reduce``
    does not), so its gloo worker threads still run when the interpreter finalizes. One still
    dropping the last barrier's finished work needs the GIL, is torn down by ``std::terminate``
    and the rank dies by SIGABRT after it did its work (about 3 of 100 two-rank runs of
    test_backprop's DDP gradient test; core dump: ``ProcessGroupGloo::runLoop`` ->
    ``~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def replica_group(store_path: str, rank: int, size: int, timeout_s: float = 300.0) -> Any:
    """A gloo process group of its own for ``size`` replicas, met through a file every replica
    sees (``store_path``; a fresh path per group and attempt). No default process group is
    needed, and a process may belong to several such groups. On a private local Ray set
    ``GLOO_SOCKET_IFNAME=lo`` so that its transport stays on loopback."""
    store = dist.FileStore(store_path, size)
    return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))


class UnitLoss(nn.Module):
    """A runner's loss as a module (what DDP wraps): ``forward(x, y, rows)`` is the objective's
    ``batch_loss``, which reads the runner's own module, registered here as a submodule."""

    def __init__(self, runner: Any):
        super().__init__()
        self.unit_module = runner.module
        self.runner = runner

    def forward(self, x: torch.Tensor | None, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.runner.objective.batch_loss(self.runner, x, y, rows)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks.

    One differentiable all-reduce of (sum, sum of squares, count) per layer and step; the
    buffers and state-dict keys are those of BatchNorm1d, so checkpoints load into the
    plain network. ``payload_bytes`` counts what these layers all-reduce (forward+backward).
    """

    payload_bytes = 0
    calls = 0
    group = None
    """A replica group's own process group (else the default one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.group is None and not (dist.is_available() and dist.is_initialized()
                                                             and dist.get_world_size() > 1)):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        packed = torch.cat([x.sum(0), (x * x).sum(0), count])                   # (2C + 1,)
        packed = all_reduce(packed) if self.group is None else all_reduce(packed, group=self.group)   # sum over ranks
        GlobalBatchNorm1d.payload_bytes += 2 * packed.numel() * packed.element_size()
        GlobalBatchNorm1d.calls += 2                                             # forward and backward
        c = x.shape[1]
        total, n = packed[:c], packed[2 * c]
        mean = total / n                                                         # (C,)
        var = packed[c:2 * c] / n - mean * mean                                  # (C,) biased
        with torch.no_grad():
            # As BatchNorm1d: running variance is the unbiased one, momentum-averaged.
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach() * n / (n - 1))
        x_hat = (x - mean) / torch.sqrt(var + self.eps)                          # (B, C)
        return x_hat * self.weight + self.bias


def use_global_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """Make every BatchNorm1d of ``module`` a :class:`GlobalBatchNorm1d`, in place: the same
    parameters and buffers (an optimizer built on them stays valid), global statistics (over
    ``group``'s ranks when given)."""
    for bn in module.modules():
        if type(bn) is nn.BatchNorm1d:
            bn.__class__ = GlobalBatchNorm1d
            if group is not None:
                bn.group = group
    return module


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
