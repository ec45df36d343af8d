"""The in-process trainer, and the NoProp training loop that every rank of a DDP run shares.

:func:`train_units` is the loop: every unit of a run, one after another, epoch by epoch
(:class:`~noprop_dist.training.runner.UnitRunner`), with the shared-tensor synchronisation, the
checkpoints, ``--eval.every`` and the final W_embed. It runs

* in this process, as rank 0 of a world of 1 (:func:`train_local`, ``--cluster.backend=local``):
  the same seeds and synchronisation points as the Ray workers, so both give the same weights;
* on every rank of a process group (:mod:`noprop_dist.trainers.ddp`, NoProp-CT/FM with
  ``--cluster.backend=ddp``): each image-reading unit trained data-parallel across the ranks
  in turn, the others (CT's head) in full on every rank; every rank holds the same units, and
  only rank 0 writes the run directory. The ranks meet at a barrier after every epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from noprop_dist.run.rundir import RunDir
from noprop_dist.config import Config
from noprop_dist.data import ArraySplit
from noprop_dist.errors import TrainingDiverged
from noprop_dist.run.lifecycle import checkpoint_due, finish_run, finished_summary, load_data, open_run, sync_due
from noprop_dist.training.preflight import check_unit, device_memory_budget
from noprop_dist.training.common import EMBEDDING_FILE, embedding_owner, eval_due, evaluate_during_training, save_unit, synchronise
from noprop_dist.variants.base import UnitSetup, make_setup, resolve_device
from noprop_dist.training.runner import UnitRunner


def train_local(cfg: Config, run_dir: str | Path, resume: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Train all units of a NoProp run (any variant) in this process; returns the summary."""
    data = load_data(cfg)
    setup = make_setup(cfg, data)
    device = resolve_device(cfg.train.device)
    objective = setup.objective
    # All units live in this process; one trains at a time.
    step = check_unit(objective.step_probe(setup, len(data.train)), min(cfg.train.batch_size, len(data.train)),
                      data.input_shape, device_memory_budget(device), 1, f"this machine ({device})",
                      units_held=sum(u.role != "head" for u in setup.units))  # the head is small
    with open_run(cfg, run_dir, resume, objective.manifest_fields(cfg, data, setup)) as run:
        if (done := finished_summary(run)) is not None:
            return done
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        figures = train_units(run, cfg, setup, data.train, data.test, device, show_progress=show_progress)
        extra = {"backend": "local", "workers": 1, "device": str(device),
                 "eval_every_seconds": figures["eval_seconds"], "peak_memory_bytes": figures["peak_memory_bytes"]}
        return finish_run(run, cfg, data, figures["train_seconds"], extra, step)


def train_units(run: RunDir, cfg: Config, setup: UnitSetup, train: ArraySplit, test: ArraySplit | None,
                device: torch.device, rank: int = 0, world: int = 1, show_progress: bool = False) -> dict[str, Any]:
    """Train every unit of the run from its checkpoint (if any) to ``train.epochs``.

    ``world > 1``: this is rank ``rank`` of an open process group, every rank calls this with
    the same arguments; image-reading units train data-parallel (see :class:`UnitRunner`).
    Only rank 0 writes (metrics, checkpoints, ``--eval.every`` records, the final W_embed);
    every rank reads the checkpoints on resume. ``test`` is needed by rank 0 for
    ``--eval.every`` only. Returns this rank's figures: ``train_seconds``, ``eval_seconds``,
    ``peak_memory_bytes`` per unit.
    """
    writes = rank == 0
    runners = [UnitRunner(u, setup, train, device, rank, world) for u in setup.units]
    done_units = run.manifest()["units"]
    for runner in runners:
        if runner.name in done_units:
            runner.load_state_tensors(run.load_unit(runner.name))
    epochs = cfg.train.epochs
    bar = tqdm(total=epochs * len(runners), initial=sum(r.epochs_done for r in runners),
               desc="training", unit="unit-epoch", disable=not (show_progress and writes))
    owner = embedding_owner(run, setup)
    start = time.perf_counter()
    eval_seconds = 0.0
    for epoch in range(1, epochs + 1):
        pending = [r for r in runners if r.epochs_done < epoch]
        if not pending:
            continue  # finished before a resume (the same on every rank)
        for runner in pending:
            try:
                metrics = runner.run_epoch(epoch)
            except TrainingDiverged as exc:   # every rank stops here: the checked loss is all-reduced
                if writes:
                    run.append_metrics({"event": "diverged", "unit": runner.name, "epoch": epoch, "reason": str(exc)})
                raise
            if writes:
                run.append_metrics({"event": "unit_epoch", **metrics})
            bar.set_postfix_str(f"{runner.name} loss {metrics['loss']:.4g}")
            bar.update(1)
        if setup.syncs_shared and sync_due(cfg.train, epoch):
            # Every rank holds the same copies (data-parallel units take the same averaged
            # steps): each computes the same synchronised tensors, with no communication.
            grads = [r.take_embedding_grads() for r in runners] if owner is not None else None
            shared = synchronise([r.shared_tensors() for r in runners], grads, owner)
            for runner in runners:
                runner.set_shared(shared)
            if writes:
                run.append_metrics({"event": "embedding_sync", "epoch": epoch})
        if writes and checkpoint_due(cfg.train, epoch, setup.syncs_shared):
            for runner in runners:
                save_unit(run, runner, finished=runner.epochs_done == epochs, owner=owner)
        if writes and eval_due(cfg.eval, epoch, epochs):
            states = {r.name: r.model_tensors() for r in runners}
            record = evaluate_during_training(run, setup, states, test, cfg.eval, epoch, device)
            eval_seconds += record["eval_seconds"]
            bar.set_postfix_str(f"epoch {epoch} test accuracy {record['test_accuracy']:.4f}")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank starts the next epoch (or leaves) before the checkpoint is on disk
    bar.close()
    train_seconds = time.perf_counter() - start
    if writes:
        run.save_tensors(EMBEDDING_FILE, {"embedding": runners[-1].embedding.detach()})
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "peak_memory_bytes": {r.name: r.peak_memory_bytes for r in runners}}
