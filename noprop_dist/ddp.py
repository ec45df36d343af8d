"""The DDP trainer of the back-propagation baselines: Ray Train's TorchTrainer runs
:func:`noprop_dist.backprop.train_worker` on N workers (gloo on CPU, nccl on GPU).

Ray only launches the workers and opens their process group; the loop is the Ray-free one
that also runs in-process and under ``torchrun``. The training split goes into the object
store once and every worker maps it zero-copy. Rank 0 writes the run directory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from .backprop import (NetworkSetup, build_network, ddp_summary, make_network_setup, manifest_fields, network_step_probe,
                       train_worker)
from .checkpoint import RunDir
from .data import Dataset
from .preflight import StepEstimate, check_unit, worker_memory
from .config import ClusterConfig, Config
from .errors import ClusterError, ConfigError, TrainingDiverged
from .lifecycle import finish_run, finished_summary, load_data, open_run
from .ray_cluster import connect, worker_capacity


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


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (its process group is already open)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    x, y = ray.get(config["train_refs"])
    from .data import ArraySplit

    # Logical GPUs without hardware (tests) fall back to the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        train_worker(config["setup"], ArraySplit(x, y), config["run_dir"], ctx.get_world_rank(),
                     ctx.get_world_size(), device)
    except TrainingDiverged:
        return   # every rank stops at the same epoch; rank 0 recorded why; retrying cannot help


def train_ddp(cfg: Config, run_dir: str | Path, resume: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
    """Train a back-propagation baseline with DDP on Ray Train workers; returns the summary."""
    data = load_data(cfg)
    setup = make_network_setup(cfg, data)
    connect(cfg.cluster)
    workers, gpus = plan_workers(cfg.cluster, cfg.train.batch_size, ray.available_resources())
    share = -(-min(cfg.train.batch_size, len(data.train)) // workers)   # the largest rank's share of a batch
    step = check_unit(network_step_probe(setup), share, data.input_shape,
                      *worker_memory(cfg.cluster, workers, gpus, ray.available_resources()))
    with open_run(cfg, run_dir, resume, manifest_fields(cfg, data, setup, build_network(setup))) as run:
        return _train(run, cfg, data, setup, workers, gpus, step)


def _train(run: RunDir, cfg: Config, data: Dataset, setup: NetworkSetup, workers: int, gpus: float,
           step: StepEstimate) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if (done := finished_summary(run)) is not None:
        return done
    threads = cfg.cluster.threads_per_worker
    train_refs = [ray.put(np.ascontiguousarray(data.train.x)), ray.put(np.ascontiguousarray(data.train.y))]
    storage = tempfile.mkdtemp(prefix="noprop-ddp-")   # Ray Train's own bookkeeping, not the run
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"setup": setup, "train_refs": train_refs, "run_dir": str(Path(run.path).resolve()),
                           "threads": threads},
        torch_config=TorchConfig(backend=process_group_backend(cfg.cluster, gpus)),
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
    epochs = [r for r in records if r.get("event") == "unit_epoch" and r.get("unit") == "network"]
    figures = {"epochs": epochs, "peak_train_bytes": max((e["peak_memory_bytes"] for e in epochs), default=0),
               "rss_bytes": max((e["rss_bytes"] for e in epochs), default=0)}
    device = "cuda" if gpus > 0 else "cpu"
    return finish_run(run, cfg, data, train_seconds, ddp_summary(figures, workers, threads, device, "ddp"), step)
