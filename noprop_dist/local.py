"""The in-process trainer: every unit in this process, one after another, epoch by epoch.

It runs the same :class:`~noprop_dist.units.UnitRunner` as the Ray workers, with the same
seeds and the same embedding synchronisation points, so both trainers give the same weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import RunDir
from .config import Config
from .data import Dataset
from .errors import TrainingDiverged
from .lifecycle import checkpoint_due, finish_run, finished_summary, load_data, open_run, sync_due
from .preflight import StepEstimate, check_unit, device_memory_budget
from .unit_runs import EMBEDDING_FILE, embedding_owner, eval_due, evaluate_during_training, save_unit, synchronise
from .units import UnitRunner, UnitSetup, make_setup, resolve_device


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
        return _train(run, cfg, data, setup, device, step, show_progress)


def _train(run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, device: torch.device,
           step: StepEstimate, show_progress: bool) -> dict[str, Any]:
    if (done := finished_summary(run)) is not None:
        return done
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runners = [UnitRunner(u, setup, data.train, device) for u in setup.units]
    done_units = run.manifest()["units"]
    for runner in runners:
        if runner.name in done_units:
            runner.load_state_tensors(run.load_unit(runner.name))
    epochs = cfg.train.epochs
    bar = tqdm(total=epochs * len(runners), initial=sum(r.epochs_done for r in runners),
               desc="training", unit="unit-epoch", disable=not show_progress)
    owner = embedding_owner(run, setup)
    start = time.perf_counter()
    eval_seconds = 0.0
    for epoch in range(1, epochs + 1):
        pending = [r for r in runners if r.epochs_done < epoch]
        if not pending:
            continue  # finished before a resume
        for runner in pending:
            try:
                metrics = runner.run_epoch(epoch)
            except TrainingDiverged as exc:
                run.append_metrics({"event": "diverged", "unit": runner.name, "epoch": epoch, "reason": str(exc)})
                raise
            run.append_metrics({"event": "unit_epoch", **metrics})
            bar.set_postfix_str(f"{runner.name} loss {metrics['loss']:.4g}")
            bar.update(1)
        if setup.syncs_shared and sync_due(cfg.train, epoch):
            grads = [r.take_embedding_grads() for r in runners] if owner is not None else None
            shared = synchronise([r.shared_tensors() for r in runners], grads, owner)
            for runner in runners:
                runner.set_shared(shared)
            run.append_metrics({"event": "embedding_sync", "epoch": epoch})
        if checkpoint_due(cfg.train, epoch, setup.syncs_shared):
            for runner in runners:
                save_unit(run, runner, finished=runner.epochs_done == epochs, owner=owner)
        if eval_due(cfg.eval, epoch, epochs):
            states = {r.name: r.state_tensors() for r in runners}
            record = evaluate_during_training(run, setup, states, data.test, cfg.eval, epoch, device)
            eval_seconds += record["eval_seconds"]
            bar.set_postfix_str(f"epoch {epoch} test accuracy {record['test_accuracy']:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    run.save_tensors(EMBEDDING_FILE, {"embedding": runners[-1].embedding.detach()})
    extra = {"backend": "local", "workers": 1, "device": str(device), "eval_every_seconds": eval_seconds,
             "peak_memory_bytes": {r.name: r.peak_memory_bytes for r in runners}}
    return finish_run(run, cfg, data, train_seconds, extra, step)
