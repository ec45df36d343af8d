"""The in-process trainer (``--cluster.backend=local``): every unit of the run, one after
another, in this process (:func:`noprop_dist.training.loop.train_units`), for any variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noprop_dist.config import Config
from noprop_dist.data import Dataset
from noprop_dist.run.lifecycle import Placement, RunTrainer, batch_share, train_run
from noprop_dist.rundir import RunDir
from noprop_dist.training.loop import train_units
from noprop_dist.training.preflight import device_memory_budget
from noprop_dist.variants.base import UnitSetup, resolve_device


class LocalTrainer(RunTrainer):
    def place(self, cfg: Config, data: Dataset, setup: UnitSetup) -> Placement:
        device = resolve_device(cfg.train.device)
        # All units live in this process; one trains at a time; a head is small.
        return Placement(workers=1, batch_share=batch_share(cfg, data, 1), budget=device_memory_budget(device),
                         sharing=1, where=f"this machine ({device})",
                         units_held=sum(u.role != "head" for u in setup.units), plan=device)

    def train(self, run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
              show_progress: bool) -> tuple[float, dict[str, Any]]:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seconds = train_units(run, cfg, setup, data.train, data.test, placement.plan, show_progress=show_progress)
        return seconds, {"backend": "local", "workers": 1, "threads_per_worker": torch.get_num_threads(),
                         "device": str(placement.plan)}


def train_local(cfg: Config, run_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train a run (any variant) in this process; returns the summary."""
    return train_run(LocalTrainer(), cfg, run_dir, resume, show_progress)
