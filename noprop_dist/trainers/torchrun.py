"""The data-parallel trainer under ``torchrun``, without Ray: the same ranks as
``--cluster.backend=ddp`` (:mod:`noprop_dist.trainers.ddp`), launched by PyTorch::

    torchrun --nproc-per-node 2 -m noprop_dist.trainers.torchrun --config demo --variant backprop --run-dir runs/bp

Every rank goes through the run template (:func:`noprop_dist.run.lifecycle.train_run`): rank 0
creates (or, with ``--resume``, reopens) the run directory and holds its lock, the others wait
for it; every rank trains its share; rank 0 evaluates and writes the summary. This is the only
trainer that opens a process group itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from noprop_dist.cli import parse_overrides, train_config
from noprop_dist.config import Config
from noprop_dist.data import Dataset
from noprop_dist.errors import ConfigError, DeviceUnavailable, NoPropError
from noprop_dist.run.lifecycle import Placement, RunTrainer, batch_share, open_run, train_run
from noprop_dist.rundir import RunDir
from noprop_dist.training.data_parallel import DataParallel, exit_without_finalizing
from noprop_dist.training.loop import train_units
from noprop_dist.training.preflight import device_memory_budget
from noprop_dist.variants.base import UnitSetup, local_gpus, resolve_device


class TorchrunTrainer(RunTrainer):
    """This process is rank ``rank`` of ``world`` (an open process group) on ``device``."""
    def __init__(self, rank: int, world: int, local_world: int, device: torch.device):
        self.rank, self.world, self.local_world, self.device = rank, world, local_world, device
        self.writes = rank == 0

    def place(self, cfg: Config, data: Dataset, setup: UnitSetup) -> Placement:
        sharing = 1 if self.device.type == "cuda" else self.local_world
        return Placement(self.world, batch_share(cfg, data, self.world), device_memory_budget(self.device), sharing,
                         f"this machine ({self.device})", units_held=sum(u.role != "head" for u in setup.units))

    def check_devices(self, cfg: Config) -> None:
        """Done by :func:`_device` before the process group opened: this rank's GPU, no Ray."""

    @contextlib.contextmanager
    def open(self, cfg: Config, run_dir: str | Path, resume: bool, fields: dict[str, Any]) -> Iterator[RunDir]:
        """Rank 0 opens the run (and holds its lock until the end); every rank learns whether it could."""
        with contextlib.ExitStack() as held:
            refused: NoPropError | None = None
            if self.rank == 0:
                try:
                    held.enter_context(open_run(cfg, run_dir, resume, fields))
                except NoPropError as exc:
                    refused = exc
            flag = torch.tensor([float(refused is not None)], device=self.device)
            dist.all_reduce(flag)
            if refused is not None:
                raise refused
            if flag.item():
                raise NoPropError(f"rank 0 could not open {run_dir} (its error is above)")
            yield RunDir(run_dir)
            dist.barrier()   # rank 0 evaluates before anyone leaves

    def train(self, run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
              show_progress: bool) -> tuple[float, dict[str, Any]]:
        parallel = DataParallel(self.rank, self.world, cfg.cluster.sync_batchnorm)
        seconds = train_units(run, cfg, setup, data.train, data.test, self.device, parallel,
                              show_progress=show_progress)
        return seconds, {"backend": "torchrun", "workers": self.world,
                         "threads_per_worker": cfg.cluster.threads_per_worker, "device": str(self.device),
                         "sync_batchnorm": cfg.cluster.sync_batchnorm}


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m noprop_dist.trainers.torchrun [--resume] [train options]``."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m noprop_dist.trainers.torchrun")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--run-dir", help="run directory to create")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    args, extra = parser.parse_known_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if not (args.run_dir or args.resume):
            raise ConfigError("torchrun needs --run-dir DIR (a new run) or --resume DIR")
        overrides = {"cluster.backend": "ddp", **parse_overrides(extra)}
        cfg, run_dir = train_config(args.config, overrides, args.resume, args.run_dir, check_new=rank == 0)
        device = _device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.set_num_threads(cfg.cluster.threads_per_worker)
        trainer = TorchrunTrainer(rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), device)
        try:
            summary = train_run(trainer, cfg, run_dir, bool(args.resume), show_progress=rank == 0)
        finally:
            dist.destroy_process_group()
        if summary is not None:
            print(f"test accuracy: {summary['test_accuracy']:.4f}")
        return 0
    except NoPropError as exc:
        print(f"noprop-dist: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _device(cfg: Config, local_rank: int) -> torch.device:
    """This rank's device: ``train.device``'s type, a CUDA rank on GPU ``LOCAL_RANK`` (refused,
    one line, before the process group opens, where this machine has too few GPUs)."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        gpus, where = local_gpus()
        if local_rank >= gpus:
            raise DeviceUnavailable(
                f"train.device={cfg.train.device}: the torchrun process of LOCAL_RANK={local_rank} needs GPU "
                f"{local_rank} but {where} has {gpus} GPU(s); start at most {gpus} per node "
                "(--nproc-per-node) or pass --train.device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


if __name__ == "__main__":
    exit_without_finalizing(main())   # see there: a gloo thread could abort a finished rank at exit
