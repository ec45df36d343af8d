"""The training loop of a run held in one process: every unit, one after another, epoch by
epoch (:class:`~noprop_dist.training.runner.UnitRunner`), with the shared-tensor
synchronisation, the checkpoints, ``--eval.every`` and the final W_embed.

It runs in the in-process trainer (:mod:`noprop_dist.trainers.local`, a world of one: the same
seeds and synchronisation points as the Ray workers, so both give the same weights) and on
every rank of a data-parallel run (:mod:`noprop_dist.trainers.ddp`,
:mod:`noprop_dist.trainers.torchrun`): every rank holds every unit and calls this with the same
arguments; image-reading units train on the rank's share of each global batch
(:mod:`noprop_dist.training.data_parallel`). Only rank 0 writes; every rank reads the
checkpoints on resume; the ranks meet at a barrier after every epoch.
"""

from __future__ import annotations

import time

import torch

from noprop_dist.config import Config
from noprop_dist.data import ArraySplit
from noprop_dist.errors import TrainingDiverged
from noprop_dist.rundir import RunDir
from noprop_dist.training.common import (
    checkpoint_due, embedding_owner, eval_due, evaluate_during_training, save_unit, sync_due, synchronise
)
from noprop_dist.training.data_parallel import DataParallel
from noprop_dist.training.embedding_sync import EmbeddingOwner
from noprop_dist.training.progress import RunProgress
from noprop_dist.training.runner import UnitRunner
from noprop_dist.variants.base import EMBEDDING_FILE, UnitSetup


def train_units(run: RunDir, cfg: Config, setup: UnitSetup, train: ArraySplit, test: ArraySplit | None,
                device: torch.device, parallel: DataParallel | None = None, show_progress: bool = False) -> float:
    """Train every unit of the run from its checkpoint (if any) to ``train.epochs``; returns
    the training phase's seconds. ``test`` is needed (by rank 0) for ``--eval.every`` only."""
    parallel = parallel or DataParallel(0, 1)
    runners = [UnitRunner(u, setup, train, device, parallel) for u in setup.units]
    done_units = run.manifest()["units"]
    for runner in runners:
        if runner.name in done_units:
            runner.load_state_tensors(run.load_unit(runner.name))
    epochs = cfg.train.epochs
    bar = RunProgress(epochs * len(runners), sum(r.epochs_done for r in runners), epochs,
                      show_progress and parallel.writes)
    owner = embedding_owner(run, setup)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        pending = [r for r in runners if r.epochs_done < epoch]
        if not pending:
            continue  # finished before a resume (the same on every rank)
        for runner in pending:
            _train_epoch(run, runner, epoch, parallel.writes, bar)
        _after_epoch(run, cfg, setup, runners, owner, epoch, parallel.writes, bar, test, device)
        parallel.barrier()  # no rank starts the next epoch (or leaves) before the checkpoint is on disk
    bar.close()
    seconds = time.perf_counter() - start
    if parallel.writes and setup.objective.shares_embedding:
        run.save_tensors(EMBEDDING_FILE, {"embedding": runners[-1].embedding.detach()})
    return seconds


def _train_epoch(run: RunDir, runner: UnitRunner, epoch: int, writes: bool, bar: RunProgress) -> None:
    try:
        metrics = runner.run_epoch(epoch)
    except TrainingDiverged as exc:   # every rank stops here: the checked loss is all-reduced
        if writes:
            run.append_metrics({"event": "diverged", "unit": runner.name, "epoch": epoch, "reason": str(exc)})
        raise
    if writes:
        run.append_metrics({"event": "unit_epoch", **metrics})
    bar.unit_epoch(metrics)


def _after_epoch(run: RunDir, cfg: Config, setup: UnitSetup, runners: list[UnitRunner], owner: EmbeddingOwner | None,
                 epoch: int, writes: bool, bar: RunProgress, test: ArraySplit | None, device: torch.device) -> None:
    """Synchronise the shared tensors, checkpoint and evaluate, as the epoch's policies say."""
    if setup.syncs_shared and sync_due(cfg.train, epoch):
        # Every rank holds the same copies (data-parallel units take the same averaged
        # steps): each computes the same synchronised tensors, with no communication.
        grads = [r.take_embedding_grads() for r in runners] if owner is not None else None
        shared = synchronise([r.shared_tensors() for r in runners], grads, owner, epoch)
        for runner in runners:
            runner.set_shared(shared)
        if writes:
            run.append_metrics({"event": "embedding_sync", "epoch": epoch})
    if writes and checkpoint_due(cfg.train, epoch, setup.syncs_shared):
        for runner in runners:
            save_unit(run, runner, finished=runner.epochs_done == cfg.train.epochs, owner=owner)
    if writes and eval_due(cfg.eval, epoch, cfg.train.epochs):
        states = {r.name: r.model_tensors() for r in runners}
        record = evaluate_during_training(run, setup, states, test, cfg.eval, epoch, device)
        bar.evaluated(record)
