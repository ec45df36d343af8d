"""The Ray trainer's worker: a thin actor around :class:`~noprop_dist.training.runner.UnitRunner`.

A worker hosts one or more units and trains them epoch by epoch on the device Ray assigned; it
answers each epoch with its metrics and, when asked, the unit's state and shared tensors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.queue import Queue

from noprop_dist.data import ArraySplit
from noprop_dist.errors import TrainingDiverged
from noprop_dist.rundir import RunDir
from noprop_dist.run.startup import process_start_time
from noprop_dist.training.data_parallel import DataParallel, replica_group
from noprop_dist.training.runner import UnitRunner
from noprop_dist.variants.base import UnitSetup, UnitSpec


@ray.remote
class UnitWorker:
    """Hosts one or more units; trains them epoch by epoch on the device Ray assigned."""

    def __init__(self, setup: UnitSetup, train_x: np.ndarray, train_y: np.ndarray, threads: int):
        # Started as soon as the driver has placed the run (before its preflight and before the
        # run directory is open): the imports and the data fetch overlap the driver's work.
        self.timeline = {"process_start": process_start_time(), "imported": time.time()}
        torch.set_num_threads(threads)
        gpu_ids = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES for this actor: its GPU is cuda:0. Logical GPUs
        # without hardware (tests) fall back to the CPU.
        self.device = torch.device("cuda:0" if gpu_ids and torch.cuda.is_available() else "cpu")
        self.setup = setup
        self.train = ArraySplit(train_x, train_y)   # zero-copy views of the object store
        self.progress: Queue | None = None
        self.runners: dict[str, UnitRunner] = {}
        self.timeline["constructed"] = time.time()   # the data are views of the object store: no copy

    def join_run(self, probe: tuple[str, str] | None = None, progress: Queue | None = None) -> dict[str, Any]:
        """Join the open run: take its progress queue (None: no step events) and say where this
        worker runs; ``sees_run_dir``: whether it sees the coordinator's run directory
        (``probe``: its path and a token the coordinator wrote there), so that it can write its
        own checkpoints."""
        self.progress = progress
        self.timeline["joined"] = time.time()
        return {"timeline": self.timeline, "niceness": os.nice(0),"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "sees_run_dir": probe is not None and sees_run_dir(*probe)}

    def start_unit(self, unit: UnitSpec, state: dict[str, torch.Tensor] | None,
                   replica: tuple[int, int, str, bool] | None = None) -> int:
        """Create a unit from its seed, or from its last checkpoint; returns its epochs done.

        ``replica = (index, replicas, store path, loopback)``: this worker trains share ``index``
        of the unit's replica group, whose process group the replicas meet to build here (every
        member must be starting it: the coordinator starts groups in one order on every worker);
        ``loopback``: a private Ray's group talks over 127.0.0.1 only."""
        parallel = None
        if replica is not None:
            index, size, store, loopback = replica
            if loopback:
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            parallel = DataParallel(index, size, sync_batchnorm=True, group=replica_group(store, index, size))
        runner = UnitRunner(unit, self.setup, self.train, self.device, parallel)
        if state is not None:
            runner.load_state_tensors(state)
        self.runners[unit.name] = runner
        self.timeline["units_built"] = time.time()
        if self.device.type == "cuda" and len(self.runners) > 1:
            for hosted in self.runners.values():
                if not hosted.data_parallel:   # a replica stays on its device
                    hosted.to("cpu")     # moved to the GPU for its own epochs only
        return runner.epochs_done

    def run_epoch(self, unit: str, epoch: int, noise: np.ndarray | None,
                  shared: dict[str, torch.Tensor] | None, want_state: bool, want_shared: bool,
                  stage_in: str | None = None) -> dict:
        """Train ``unit``'s epoch. Its state goes back when ``want_state``; with ``stage_in`` (the
        run directory, which this worker sees) the worker writes its checkpoint there itself
        (:meth:`~noprop_dist.rundir.RunDir.stage_unit`) and sends only its record."""
        runner = self.runners[unit]
        offload = self.device.type == "cuda" and len(self.runners) > 1 and not runner.data_parallel
        if offload:
            runner.to(self.device)   # only the unit being trained lives on the GPU
        if shared is not None:
            runner.set_shared(shared)
        try:
            metrics = runner.run_epoch(epoch, None if noise is None else torch.from_numpy(noise),
                                       progress=self._report if self.progress is not None else None)
        except TrainingDiverged as exc:
            return {"diverged": str(exc)}   # a fact about the run, not a worker death: no restart
        if offload:
            runner.to("cpu")
        out: dict[str, Any] = {"metrics": metrics}
        if stage_in is not None:
            state = runner.state_tensors()
            out["checkpoint"] = RunDir(stage_in).stage_unit(unit, state, int(state["epochs_done"]))
        elif want_state:
            out["state"] = runner.state_tensors()
        if want_shared:
            out["shared"] = runner.shared_tensors()
            if runner.records_embedding_grads:
                out["embedding_grads"] = runner.take_embedding_grads()   # (steps, m, d) since the last sync
        return out

    def _report(self, event: dict) -> None:
        if self.progress is not None:
            try:
                self.progress.put_nowait(event)
            except Exception:  # noqa: BLE001  progress is best-effort; training must not stop
                pass


PROBE_FILE = ".workers-probe"


def sees_run_dir(path: str, token: str) -> bool:
    """Does this process see the run directory at ``path`` (the coordinator wrote ``token`` into
    its probe file)? False on another node without shared storage, or a different directory
    that happens to have the same path there."""
    try:
        return (Path(path) / PROBE_FILE).read_text() == token
    except OSError:
        return False
