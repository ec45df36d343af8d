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

from .config import Config
from .dt import EMBEDDING_FILE, all_units, manifest_fields, save_unit
from .lifecycle import checkpoint_due, finish_run, finished_summary, load_data, open_run, sync_due
from .units import UnitRunner, average_embeddings, make_setup, resolve_device


def train_local(cfg: Config, run_dir: str | Path, resume: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Train all units of a DT run in this process; returns the summary."""
    data = load_data(cfg)
    setup = make_setup(cfg, data)
    run = open_run(cfg, run_dir, resume, manifest_fields(cfg, data, setup))
    if (done := finished_summary(run)) is not None:
        return done
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    runners = [UnitRunner(u, setup, data.train, device) for u in all_units(setup.T)]
    done_units = run.manifest()["units"]
    for runner in runners:
        if runner.name in done_units:
            runner.load_state_tensors(run.load_unit(runner.name))
    epochs = cfg.train.epochs
    bar = tqdm(total=epochs * len(runners), initial=sum(r.epochs_done for r in runners),
               desc="training", unit="unit-epoch", disable=not show_progress)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        pending = [r for r in runners if r.epochs_done < epoch]
        if not pending:
            continue  # finished before a resume
        for runner in pending:
            metrics = runner.run_epoch(epoch)
            run.append_metrics({"event": "unit_epoch", **metrics})
            bar.set_postfix_str(f"{runner.name} loss {metrics['loss']:.4g}")
            bar.update(1)
        if setup.learnable_embedding and sync_due(cfg.train, epoch):
            shared = average_embeddings([r.embedding for r in runners])
            for runner in runners:
                runner.set_embedding(shared)
            run.append_metrics({"event": "embedding_sync", "epoch": epoch})
        if checkpoint_due(cfg.train, epoch, setup.learnable_embedding):
            for runner in runners:
                save_unit(run, runner, finished=runner.epochs_done == epochs)
    bar.close()
    train_seconds = time.perf_counter() - start
    run.save_tensors(EMBEDDING_FILE, {"embedding": runners[-1].embedding.detach()})
    extra = {"backend": "local", "workers": 1, "device": str(device),
             "peak_memory_bytes": {r.name: r.peak_memory_bytes for r in runners}}
    return finish_run(run, cfg, data, train_seconds, extra)
