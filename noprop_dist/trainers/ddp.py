"""The data-parallel trainer on Ray Train (``--cluster.backend=ddp``): its TorchTrainer opens
a process group on N workers (gloo on CPU, nccl on GPU) and every worker runs the in-process
loop (:func:`noprop_dist.training.loop.train_units`) as one rank.

Every rank holds every unit of the run; each image-reading unit (a baseline's network,
CT/FM's interval networks, one after another) is trained on the rank's share of every global
batch with DDP applied from outside the loop (:mod:`noprop_dist.training.data_parallel`); a
head (labels only, cheap) is trained in full on every rank. NoProp-DT is distributed by block
instead (``--cluster.backend=ray``; the registry refuses ``dt`` here).

Ray only launches the workers and opens their process group (:func:`_fit`): on a private local
Ray through a file in a private directory, with collectives on loopback
(:class:`LoopbackTorchConfig`: nothing of the run listens beyond 127.0.0.1), on a cluster as
Ray Train does (a TCPStore on rank 0 that every worker reaches). The training split
goes into the object store once and every worker maps it zero-copy (with ``--eval.every`` the
test split too, for rank 0). Rank 0 writes the run directory; the driver evaluates the
finished run. On several nodes the run directory must be on storage every node sees.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from noprop_dist.config import ClusterConfig, Config, worker_request
from noprop_dist.data import ArraySplit, Dataset
from noprop_dist.errors import ClusterError, ConfigError, TrainingDiverged
from noprop_dist.run.lifecycle import Placement, RunTrainer, batch_share, train_run
from noprop_dist.rundir import RunDir
from noprop_dist.trainers.ray.cluster import connect, worker_capacity
from noprop_dist.training.data_parallel import DataParallel, open_loopback_group
from noprop_dist.training.loop import train_units
from noprop_dist.training.preflight import worker_memory
from noprop_dist.training.progress import MetricsTail, RunProgress
from noprop_dist.variants.base import UnitSetup


def plan_workers(cluster: ClusterConfig, batch_size: int, resources: dict[str, float]) -> tuple[int, float]:
    """(workers, GPUs per worker) for a DDP run on a cluster with ``resources``."""
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fits, gpus = worker_capacity(cluster, resources)
    workers = cluster.workers or fits
    if workers < 1 or workers > fits:
        raise ClusterError(
            f"DDP needs {max(workers, 1)} workers of {cluster.threads_per_worker} CPU and {gpus:g} GPU but the "
            f"cluster has {have_cpu:g} CPU and {have_gpu:g} GPU; lower --cluster.workers or "
            "--cluster.threads_per_worker, or add nodes")
    if batch_size < 2 * workers:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch: {workers} DDP workers need at "
                          f"least {2 * workers}; lower --cluster.workers or raise --train.batch_size")
    return workers, gpus


def process_group_backend(cluster: ClusterConfig, gpus: float) -> str:
    """nccl when the workers get GPUs that exist, else gloo.

    A private local Ray may hold logical GPUs without hardware (tests): gloo then. On a
    cluster (``--address``) the driver may have no GPU while its workers do: nccl.
    """
    if gpus > 0 and (torch.cuda.is_available() or cluster.address):
        return "nccl"
    return "gloo"


def worker_error(exc: BaseException) -> str:
    """The worker's own exception line out of Ray Train's multi-line report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("File ", "Traceback", "[", "^"))
              and ("Error" in line or "Exception" in line)]
    text = (errors[-1] if errors else lines[0] if lines else type(exc).__name__).rstrip(")")
    return text[:300]


class DDPTrainer(RunTrainer):
    def place(self, cfg: Config, data: Dataset, setup: UnitSetup) -> Placement:
        connect(cfg.cluster)
        resources = ray.available_resources()
        workers, gpus = plan_workers(worker_request(cfg), cfg.train.batch_size, resources)
        # Every rank holds every unit (one trains at a time); a head is small.
        return Placement(workers, batch_share(cfg, data, workers), *worker_memory(cfg.cluster, workers, gpus, resources),
                         units_held=sum(u.role != "head" for u in setup.units), plan=gpus)

    def train(self, run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
              show_progress: bool) -> tuple[float, dict[str, Any]]:
        gpus = placement.plan
        test_refs = ([ray.put(np.ascontiguousarray(data.test.x)), ray.put(np.ascontiguousarray(data.test.y))]
                     if cfg.eval.every > 0 else [])
        units = setup.units
        done = sum(run.manifest()["units"].get(u.name, {}).get("epochs_done", 0) for u in units)
        shown = RunProgress(cfg.train.epochs * len(units), done, cfg.train.epochs, show_progress)
        with MetricsTail(run, shown):   # Ray does not forward the ranks' output: follow rank 0's records
            seconds = _fit(run, cfg, setup, data.train, placement.workers, gpus, test_refs)
        device = "cuda" if process_group_backend(cfg.cluster, gpus) == "nccl" else "cpu"
        return seconds, {"backend": "ddp", "workers": placement.workers,
                         "threads_per_worker": cfg.cluster.threads_per_worker, "device": device,
                         "sync_batchnorm": cfg.cluster.sync_batchnorm}


def train_ddp(cfg: Config, run_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train a run data-parallel on Ray Train workers (CT/FM, the baselines); returns the summary."""
    return train_run(DDPTrainer(), cfg, run_dir, resume, show_progress)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (its process group is already open): the in-process loop
    as this rank, on its device, with the training split from the object store."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    train = ArraySplit(*ray.get(config["train_refs"]))
    test = ArraySplit(*ray.get(config["test_refs"])) if config["test_refs"] else None
    # Logical GPUs without hardware (tests) fall back to the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = config["cfg"]
    parallel = DataParallel(ctx.get_world_rank(), ctx.get_world_size(), cfg.cluster.sync_batchnorm)
    try:
        train_units(RunDir(config["run_dir"]), cfg, config["setup"], train, test, device, parallel)
    except TrainingDiverged:
        return   # every rank stops at the same epoch; rank 0 recorded why; retrying cannot help


def _fit(run: RunDir, cfg: Config, setup: UnitSetup, train: ArraySplit, workers: int, gpus: float,
         test_refs: list) -> float:
    """Run :func:`_worker_loop` on ``workers`` Ray Train workers; returns the training seconds.

    Failures become one-line errors naming ``--resume``; a divergence recorded by rank 0
    during this session is raised as such (Ray Train does not retry it)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    threads = cfg.cluster.threads_per_worker
    train_refs = [ray.put(np.ascontiguousarray(train.x)), ray.put(np.ascontiguousarray(train.y))]
    storage = tempfile.mkdtemp(prefix="noprop-ddp-")   # Ray Train's own bookkeeping, not the run (mode 0700)
    backend = process_group_backend(cfg.cluster, gpus)
    if cfg.cluster.address:
        torch_config = TorchConfig(backend=backend)
    else:   # a private local Ray: every worker is on this machine
        store_dir = os.path.join(storage, "rendezvous")
        os.mkdir(store_dir, 0o700)
        torch_config = LoopbackTorchConfig(backend=backend, store_dir=store_dir)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "setup": setup, "train_refs": train_refs, "test_refs": test_refs,
                           "run_dir": str(Path(run.path).resolve()), "threads": threads},
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": threads, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=f"{run.path.resolve().name}-ddp", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_restarts)),
    )
    start, started = time.perf_counter(), time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001  Ray Train wraps worker errors in its own types
        raise ClusterError(f"DDP training failed ({worker_error(exc)}); checkpoints are kept in {run.path}; "
                           f"continue with `noprop-dist train --resume {run.path}`") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    train_seconds = time.perf_counter() - start
    if result.error is not None:
        raise ClusterError(f"DDP training failed ({worker_error(result.error)}); continue with "
                           f"`noprop-dist train --resume {run.path}`")
    records = run.read_metrics()
    if any(r.get("event") == "diverged" and r.get("time", 0) >= started for r in records):
        raise TrainingDiverged(next(r["reason"] for r in reversed(records) if r.get("event") == "diverged"))
    return train_seconds


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's torch set-up for workers that all run on this machine (a private local Ray):
    the default process group is met through a file in ``store_dir`` (a fresh one per start or
    restart of the workers) instead of Ray Train's TCPStore on rank 0, which listens on all
    interfaces; gloo (and nccl's bootstrap) talk over the loopback interface only. The same
    collectives as Ray Train's set-up, so the same weights."""

    store_dir: str = ""
    """A private directory (mode 0700) for the rendezvous files."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend


class LoopbackTorchBackend(Backend):
    """Opens and closes the process group of :class:`LoopbackTorchConfig` on the Ray Train workers."""

    share_cuda_visible_devices = True    # as Ray Train's torch backend: nccl needs to see its peers' GPUs

    def on_start(self, worker_group: Any, backend_config: LoopbackTorchConfig) -> None:
        store = os.path.join(backend_config.store_dir, f"store-{uuid.uuid4().hex}")
        world = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, open_loopback_group, backend_config.backend, rank, world,
                                                   store, backend_config.timeout_s) for rank in range(world)])

    def on_shutdown(self, worker_group: Any, backend_config: LoopbackTorchConfig) -> None:
        try:
            ray.get(worker_group.execute_async(close_group), timeout=30)
        except ray.exceptions.GetTimeoutError:
            pass   # a worker that does not answer is killed with its group


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
