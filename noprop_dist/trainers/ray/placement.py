"""Where the Ray trainer's units go and what crosses the wire: pure functions and records,
no Ray (the coordinator, :mod:`noprop_dist.trainers.ray.coordinator`, is the loop that uses them).

* :func:`plan_layout`: which worker hosts which units (one per unit when the cluster has
  room, fewer when it has not, a one-line error when even the request cannot be met).
* which worker trains which share of which unit is :func:`~.plan.plan_replicas`'s plan
  (block x data parallelism; pure, no torch, shared with the cost model).
* :class:`Traffic`: bytes between coordinator and workers, by kind and by epoch, counted as
  the messages' pickled size (:func:`serialized_bytes`), not estimated.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from noprop_dist.config import ClusterConfig
from noprop_dist.errors import ClusterError
from noprop_dist.trainers.ray.cluster import worker_capacity
from noprop_dist.trainers.ray.plan import Replica, plan_replicas
from noprop_dist.variants.base import UnitSpec


# ---------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Which worker hosts which units (and which replica of each), and what each worker reserves."""

    groups: list[list[UnitSpec]]     # units per worker, e.g. blocks [[1, 3, 5], [2, 4]]
    cpus: int
    gpus: float
    note: str = ""
    replicas: list[list["Replica"]] = field(default_factory=list)   # per worker, aligned with groups


def plan_layout(units: list[UnitSpec], cluster: ClusterConfig, resources: dict[str, float]) -> Layout:
    """One worker per unit (block or time interval) when the cluster has room; fewer (units
    share workers) when asked or when it has not; more when asked (units get replica groups);
    a clear error when even the request cannot be met. Which worker trains what is
    :func:`plan_replicas`'s plan for units of equal cost (every DT block and CT/FM interval
    has the same shapes)."""
    T = len(units)
    have_cpu = resources.get("CPU", 0.0)
    have_gpu = resources.get("GPU", 0.0)
    cpus = cluster.threads_per_worker
    fits, gpus = worker_capacity(cluster, resources)
    note = ""
    if cluster.workers:
        workers = cluster.workers
        if workers > fits:
            raise ClusterError(
                f"placement needs {workers} workers of {cpus} CPU and {gpus:g} GPU "
                f"({workers * cpus} CPU, {workers * gpus:g} GPU) but the cluster has {have_cpu:g} CPU and "
                f"{have_gpu:g} GPU; lower --cluster.workers or --cluster.threads_per_worker, pack blocks with "
                "--cluster.gpus_per_worker=0.5, or add nodes")
    else:
        if fits < 1:
            raise ClusterError(
                f"one worker needs {cpus} CPU and {gpus:g} GPU but the cluster has {have_cpu:g} CPU and "
                f"{have_gpu:g} GPU; lower --cluster.threads_per_worker or --cluster.gpus_per_worker")
        workers = min(T, fits)
        if workers < T:
            note = (f"the cluster fits {workers} workers of {cpus} CPU/{gpus:g} GPU: "
                    f"{T} units queue on them")
    plan = plan_replicas({u.name: 1.0 for u in units}, workers)
    by_name = {u.name: u for u in units}
    groups = [[by_name[r.unit] for r in held] for held in plan.workers]
    return Layout(groups=groups, cpus=cpus, gpus=gpus, note=note, replicas=plan.workers)


def worker_name(run_tag: str, label: str, attempt: int) -> str:
    """The worker's actor name in the Ray dashboard: ``<run>/block_03+block_05[1of2]``."""
    return f"{run_tag}/{label}" + (f"/restart{attempt}" if attempt else "")


def serialized_bytes(obj: Any) -> int:
    """Bytes of ``obj`` as pickled for the wire (0 for None): counted, not estimated."""
    if obj is None:
        return 0
    return len(pickle.dumps(obj, protocol=5))


@dataclass
class Traffic:
    """Bytes between coordinator and workers, by kind and by epoch (0 = start-up)."""

    KINDS = ("control_to_workers", "control_from_workers", "checkpoint_to_workers", "checkpoint_from_workers")
    by_epoch: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, epoch: int, kind: str, nbytes: int) -> None:
        counts = self.by_epoch.setdefault(epoch, dict.fromkeys(self.KINDS, 0))
        counts[kind] += nbytes

    def epoch(self, epoch: int) -> dict[str, int]:
        return dict(self.by_epoch.get(epoch, dict.fromkeys(self.KINDS, 0)))

    def total(self, kind: str) -> int:
        return sum(c[kind] for c in self.by_epoch.values())
