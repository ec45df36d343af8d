"""The DDP trainers on Ray Train: its TorchTrainer runs one Ray-free worker loop on N
workers (gloo on CPU, nccl on GPU).

* Back-propagation baselines (:func:`train_ddp`): every worker runs
  :func:`noprop_dist.variants.backprop.train_worker`, the loop that also runs in-process and under
  ``torchrun``.
* NoProp-CT/FM, data-parallel (:func:`train_noprop_ddp`, issue 9 item 4b): every worker runs
  :func:`noprop_dist.trainers.local.train_units`, the in-process trainer's loop, as one rank: each
  interval network (``continuous.intervals`` of them, one after another) is trained with
  DDP on shares of every global batch; CT's head (labels only, cheap) is trained in full on
  every rank. NoProp-DT is distributed by block instead (``--cluster.backend=ray``); its
  BatchNorm blocks are not DDP-ready, and the config refuses ``dt`` here.

Ray only launches the workers and opens their process group (:func:`_fit`, shared by both).
The training split goes into the object store once and every worker maps it zero-copy
(with ``--eval.every`` the test split too, for rank 0). Rank 0 writes the run directory;
the driver evaluates the finished run (``finish_run``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import torch

from noprop_dist.variants.backprop import build_network, ddp_summary, make_network_setup, manifest_fields, network_step_probe, train_worker
from noprop_dist.run.rundir import RunDir
from noprop_dist.data import ArraySplit
from noprop_dist.training.preflight import check_unit, worker_memory
from noprop_dist.config import ClusterConfig, Config
from noprop_dist.errors import ClusterError, ConfigError, TrainingDiverged
from noprop_dist.run.lifecycle import finish_run, finished_summary, load_data, open_run
from noprop_dist.trainers.ray.cluster import connect, worker_capacity


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


def _device(cluster: ClusterConfig, gpus: float) -> str:
    """The workers' device type, as they choose it (logical GPUs without hardware: the CPU)."""
    return "cuda" if process_group_backend(cluster, gpus) == "nccl" else "cpu"


def worker_error(exc: BaseException) -> str:
    """The worker's own exception line out of Ray Train's multi-line report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("File ", "Traceback", "[", "^"))
              and ("Error" in line or "Exception" in line)]
    text = (errors[-1] if errors else lines[0] if lines else type(exc).__name__).rstrip(")")
    return text[:300]


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (its process group is already open): ``config["body"]``
    on this rank's device with the training split from the object store."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    x, y = ray.get(config["train_refs"])
    # Logical GPUs without hardware (tests) fall back to the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        config["body"](config, ArraySplit(x, y), ctx.get_world_rank(), ctx.get_world_size(), device)
    except TrainingDiverged:
        return   # every rank stops at the same epoch; rank 0 recorded why; retrying cannot help


def _backprop_body(config: dict[str, Any], train: ArraySplit, rank: int, world: int, device: torch.device) -> None:
    train_worker(config["setup"], train, config["run_dir"], rank, world, device)


def _noprop_body(config: dict[str, Any], train: ArraySplit, rank: int, world: int, device: torch.device) -> None:
    from noprop_dist.trainers.local import train_units

    test = ArraySplit(*ray.get(config["test_refs"])) if config["test_refs"] else None
    train_units(RunDir(config["run_dir"]), config["cfg"], config["setup"], train, test, device, rank, world)


def _fit(run: RunDir, cfg: Config, train: ArraySplit, workers: int, gpus: float,
         body: Callable[..., None], loop: dict[str, Any]) -> tuple[float, float]:
    """Run ``body(config, train split, rank, world, device)`` on ``workers`` Ray Train workers
    (``loop`` joins its ``config``); returns (training seconds, wall-clock start).

    Failures become one-line errors naming ``--resume``; a divergence recorded by rank 0
    during this session is raised as such (Ray Train does not retry it)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = cfg.cluster.threads_per_worker
    train_refs = [ray.put(np.ascontiguousarray(train.x)), ray.put(np.ascontiguousarray(train.y))]
    storage = tempfile.mkdtemp(prefix="noprop-ddp-")   # Ray Train's own bookkeeping, not the run
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"body": body, "train_refs": train_refs, "run_dir": str(Path(run.path).resolve()),
                           "threads": threads, **loop},
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
    return train_seconds, started


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
        if (done := finished_summary(run)) is not None:
            return done
        train_seconds, _ = _fit(run, cfg, data.train, workers, gpus, _backprop_body, {"setup": setup})
        epochs = [r for r in run.read_metrics() if r.get("event") == "unit_epoch" and r.get("unit") == "network"]
        figures = {"epochs": epochs, "peak_train_bytes": max((e["peak_memory_bytes"] for e in epochs), default=0),
                   "rss_bytes": max((e["rss_bytes"] for e in epochs), default=0)}
        extra = ddp_summary(figures, workers, cfg.cluster.threads_per_worker, _device(cfg.cluster, gpus), "ddp")
        return finish_run(run, cfg, data, train_seconds, extra, step)


def train_noprop_ddp(cfg: Config, run_dir: str | Path, resume: bool = False,
                     show_progress: bool = True) -> dict[str, Any]:
    """Train NoProp-CT/FM data-parallel with DDP on Ray Train workers; returns the summary.

    The config allows only the variants that declare ``ddp`` (:mod:`noprop_dist.variants.registry`).
    """
    from noprop_dist.variants.base import make_setup

    data = load_data(cfg)
    setup = make_setup(cfg, data)
    objective = setup.objective
    connect(cfg.cluster)
    workers, gpus = plan_workers(cfg.cluster, cfg.train.batch_size, ray.available_resources())
    share = -(-min(cfg.train.batch_size, len(data.train)) // workers)   # the largest rank's share of a batch
    # Every rank holds every unit (one trains at a time); the head is small.
    step = check_unit(objective.step_probe(setup, len(data.train)), share, data.input_shape,
                      *worker_memory(cfg.cluster, workers, gpus, ray.available_resources()),
                      units_held=sum(u.role != "head" for u in setup.units))
    with open_run(cfg, run_dir, resume, objective.manifest_fields(cfg, data, setup)) as run:
        if (done := finished_summary(run)) is not None:
            return done
        test_refs = ([ray.put(np.ascontiguousarray(data.test.x)), ray.put(np.ascontiguousarray(data.test.y))]
                     if cfg.eval.every > 0 else [])
        train_seconds, started = _fit(run, cfg, data.train, workers, gpus, _noprop_body,
                                      {"cfg": cfg, "setup": setup, "test_refs": test_refs})
        extra = noprop_ddp_summary([r for r in run.read_metrics() if r.get("time", 0) >= started], workers,
                                   cfg.cluster.threads_per_worker, _device(cfg.cluster, gpus))
        return finish_run(run, cfg, data, train_seconds, extra, step)


def noprop_ddp_summary(records: list[dict[str, Any]], workers: int, threads: int, device: str) -> dict[str, Any]:
    """The trainer-specific part of summary.json for a data-parallel NoProp run, from rank 0's
    metrics of this session: per epoch, the seconds of all units; per worker and epoch, the
    bytes all-reduced (gradients of the DDP units, W_embed's, the epoch's losses; counted);
    peak training memory per unit (rank 0's)."""
    unit_epochs = [r for r in records if r.get("event") == "unit_epoch"]
    last: dict[str, dict[str, Any]] = {}
    seconds: dict[int, float] = {}
    peak: dict[str, int] = {}
    for r in unit_epochs:
        last[r["unit"]] = r
        seconds[r["epoch"]] = seconds.get(r["epoch"], 0.0) + r["seconds"]
        peak[r["unit"]] = max(peak.get(r["unit"], 0), r["peak_memory_bytes"])
    return {"backend": "ddp", "workers": workers, "threads_per_worker": threads, "device": device,
            "epoch_seconds": [seconds[e] for e in sorted(seconds)],
            "allreduce_bytes_per_worker_per_epoch": sum(r.get("allreduce_bytes", 0) for r in last.values()),
            "eval_every_seconds": sum(r["eval_seconds"] for r in records if r.get("event") == "eval"),
            "peak_memory_bytes": peak, "rss_bytes": max((r["rss_bytes"] for r in unit_epochs), default=0)}
