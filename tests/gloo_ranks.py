"""Test helpers for ranks that ``torch.multiprocessing.spawn`` starts: join a gloo group through a
FileStore on loopback, and leave it without the interpreter's own exit.

Why not a plain return: the DDP module and torch.distributed.nn's autograd collectives keep the
process group alive past ``destroy_process_group()`` (torch 2.14; a plain ``all_reduce`` does not),
so its gloo worker threads still run when the interpreter finalizes. If one of them is still
dropping the barrier's finished work at that moment (the work holds tensors whose Python objects
need the GIL), the thread is torn down with ``std::terminate`` and the rank dies by SIGABRT
("terminate called without an active exception") after it did its work. Seen in CI and in about
3 of 100 runs of the DDP gradient test on this machine; a core dump showed that stack
(``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
``pthread_exit``). A rank that wrote its results leaves by ``os._exit(0)`` instead.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
import torch.distributed as dist


def join_gloo(rank: int, world: int, store: str) -> None:
    """Join the default group through a FileStore (no TCP port picked beforehand that another
    process could take first), gloo on loopback, one thread; faulthandler prints this rank's
    Python stack should it die by a signal."""
    faulthandler.enable()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def leave_gloo() -> None:
    """After this rank wrote its results: wait for the others (nobody leaves while another still
    talks to the group), destroy the group and exit at once (see the module's docstring)."""
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """End this spawned rank with exit status 0, skipping the interpreter's finalization (its
    files are written and closed; see the module's docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
