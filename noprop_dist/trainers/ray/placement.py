"""Where the Ray trainer's units go and what crosses the wire: pure functions and records,
no Ray (the coordinator, :mod:`noprop_dist.trainers.ray.coordinator`, is the loop that uses them).

* :func:`plan_layout`: which worker hosts which units (one per unit when the cluster has
  room, fewer when it has not, a one-line error when even the request cannot be met).
* :func:`plan_replicas`: block x data parallelism: each unit a replica group, each worker its
  replicas, so that the busiest worker's load is as small as the planner can make it (the
  coordinator does not run such plans yet: see the function).
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


@dataclass(frozen=True)
class Replica:
    """One worker's share of a unit: replica ``index`` of ``replicas`` (an equal share of every
    global batch: :func:`~noprop_dist.training.data_parallel.shard`)."""

    unit: str
    index: int
    replicas: int
    load: float          # the unit's cost / replicas


@dataclass
class ReplicaPlan:
    workers: list[list[Replica]]     # per worker, in the order it trains them (split units first)

    def loads(self) -> list[float]:
        return [sum(r.load for r in w) for w in self.workers]

    def groups(self) -> dict[str, list[int]]:
        """unit -> the workers of its replica group, by replica index."""
        out: dict[str, list[tuple[int, int]]] = {}
        for w, held in enumerate(self.workers):
            for r in held:
                out.setdefault(r.unit, []).append((r.index, w))
        return {u: [w for _, w in sorted(pairs)] for u, pairs in out.items()}

    def lines(self) -> list[str]:
        """One line per worker, for the start of a run."""
        return [f"worker {w}: " + ", ".join(r.unit if r.replicas == 1 else f"{r.unit} ({r.index + 1}/{r.replicas})"
                                            for r in held) + f"  load {sum(r.load for r in held):.3g}"
                for w, held in enumerate(self.workers)]


def plan_replicas(costs: dict[str, float], workers: int, tolerance: float = 1e-9) -> ReplicaPlan:
    """Spread units of per-epoch cost ``costs`` (in the trainers' fixed order) over ``workers``.

    A unit trained by ``r`` replicas costs ``cost / r`` on each of ``r`` distinct workers (they
    train equal shares of every global batch together, step by step). The plan is the packing
    of the smallest makespan ``L`` found by bisection for which :func:`_pack` succeeds: units,
    largest first, go whole onto the least-loaded worker that stays within ``L``, else split into
    the fewest equal replicas that fit on distinct workers. So ``N >= T`` gives units replicas
    in proportion to their cost, and ``N < T`` packs whole units and splits a unit only where
    whole units leave the loads uneven (T = 5 on 2 workers: 2.5 units each). Deterministic.

    Each worker trains its replicas of split units first, in the units' fixed order (the same
    order on every worker, so that no two groups wait for each other), then its whole units.
    """
    if workers < 1 or not costs:
        raise ValueError(f"plan_replicas needs units and at least one worker (got {len(costs)}, {workers})")
    total = sum(costs.values())
    low, high = max(total / workers, min(costs.values()) / workers), total
    best = _pack(costs, workers, high, tolerance)
    for _ in range(60):
        if high - low <= tolerance * max(total, 1.0):
            break
        mid = (low + high) / 2
        plan = _pack(costs, workers, mid, tolerance)
        if plan is None:
            low = mid
        else:
            best, high = plan, mid
    return best


def _pack(costs: dict[str, float], workers: int, limit: float, tolerance: float) -> ReplicaPlan | None:
    order = list(costs)
    loads = [0.0] * workers
    held: list[list[Replica]] = [[] for _ in range(workers)]
    room = limit * (1 + tolerance) + tolerance
    for unit in sorted(order, key=lambda u: (-costs[u], order.index(u))):
        cost = costs[unit]
        by_load = sorted(range(workers), key=lambda w: (loads[w], w))
        for r in range(1, workers + 1):
            chosen = [w for w in by_load if loads[w] + cost / r <= room][:r]
            if len(chosen) == r:
                for i, w in enumerate(sorted(chosen)):
                    loads[w] += cost / r
                    held[w].append(Replica(unit, i, r, cost / r))
                break
        else:
            return None
    rank = {u: i for i, u in enumerate(order)}
    for w in range(workers):
        held[w].sort(key=lambda r: (r.replicas == 1, rank[r.unit]))
    return ReplicaPlan(held)


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
