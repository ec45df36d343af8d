"""Test helpers for ranks that ``torch.multiprocessing.spawn`` starts: join a gloo group the way
the DDP trainer's workers do (a FileStore, loopback), and leave it the way torchrun ranks do
(:func:`noprop_dist.training.data_parallel.exit_without_finalizing`: a plain return let a gloo
thread abort a rank at exit, which CI saw once)."""

from __future__ import annotations

import faulthandler

import torch
import torch.distributed as dist

from noprop_dist.training.data_parallel import exit_without_finalizing, open_loopback_group


def join_gloo(rank: int, world: int, store: str) -> None:
    """Join the default group through a FileStore (no TCP port picked beforehand that another
    process could take first), gloo on loopback, one thread; faulthandler prints this rank's
    Python stack should it die by a signal."""
    faulthandler.enable()
    torch.set_num_threads(1)
    open_loopback_group("gloo", rank, world, store, timeout_s=300.0)


def leave_gloo() -> None:
    """After this rank wrote its results: wait for the others (nobody leaves while another still
    talks to the group), destroy the group and exit at once."""
    dist.barrier()
    dist.destroy_process_group()
    exit_without_finalizing(0)
