"""The replica planner: which worker trains which share of which unit, so that the busiest
worker's load is as small as it can be made (block x data parallelism). Pure and standard
library only, so that the cost model (``benchmarks/cost_model.py``) plans exactly as the
trainer does without importing torch or Ray; :mod:`~.placement` turns a plan into the Ray
trainer's layout."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replica:
    """One worker's share of a unit: replica ``index`` of ``replicas`` (an equal share of every
    global batch: :func:`~noprop_dist.training.data_parallel.shard`)."""

    unit: str
    index: int
    replicas: int
    load: float          # what it costs its worker: replica_load(cost, replicas)


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


SPLIT_OVERHEAD = 0.1
"""What a replica of a split unit costs on top of its share, as a fraction of the whole unit:
the per-step work that does not shrink with the batch (kernel launches, the optimizer step,
the group's gradient and BatchNorm all-reduces). A replica of ``r`` costs
``cost * (SPLIT_OVERHEAD + (1 - SPLIT_OVERHEAD) / r)``, so the planner splits only where the
balance gained pays for it and never spreads one unit over dozens of workers to shave a few
percent of compute. 0.1 is near the cost model's estimate for the demo block over a 12.5 GB/s
link (0.07); on this project's 2-vCPU test machine a split block's replica measured 0.86 of a
whole block (overhead 0.72: gloo's 1.2 ms per call, 13 calls a step), where splitting gains
little."""


def replica_load(cost: float, replicas: int, overhead: float = SPLIT_OVERHEAD) -> float:
    """Per-worker load of one of ``replicas`` equal-share replicas of a unit of ``cost``."""
    return cost if replicas == 1 else cost * (overhead + (1.0 - overhead) / replicas)


def plan_replicas(costs: dict[str, float], workers: int, overhead: float = SPLIT_OVERHEAD,
                  tolerance: float = 1e-9) -> ReplicaPlan:
    """Spread units of per-epoch cost ``costs`` (in the trainers' fixed order) over ``workers``.

    A unit trained by ``r`` replicas loads each of ``r`` distinct workers with
    :func:`replica_load` (they train equal shares of every global batch together, step by
    step; ``overhead`` is what splitting costs, :data:`SPLIT_OVERHEAD`). The plan is the
    packing of the smallest makespan ``L`` found by bisection for which :func:`_pack` succeeds:
    units, largest first, go whole onto the least-loaded worker that stays within ``L``, else
    split into the fewest equal replicas that fit on distinct workers. So ``N >= T`` gives
    units replicas in proportion to their cost, and ``N < T`` packs whole units and splits a
    unit only where whole units leave the loads uneven (T = 5 on 2 workers: 2 whole units and
    half of the fifth each). Deterministic.

    Each worker trains its replicas of split units first, in the units' fixed order (the same
    order on every worker, so that no two groups wait for each other), then its whole units.
    """
    if workers < 1 or not costs:
        raise ValueError(f"plan_replicas needs units and at least one worker (got {len(costs)}, {workers})")
    if not 0.0 <= overhead < 1.0:
        raise ValueError(f"plan_replicas: overhead is a fraction in [0, 1), got {overhead}")
    total = sum(costs.values())
    low, high = max(total / workers, min(costs.values()) / workers), total
    best = _pack(costs, workers, high, overhead, tolerance)
    for _ in range(60):
        if high - low <= tolerance * max(total, 1.0):
            break
        mid = (low + high) / 2
        plan = _pack(costs, workers, mid, overhead, tolerance)
        if plan is None:
            low = mid
        else:
            best, high = plan, mid
    return best


def _pack(costs: dict[str, float], workers: int, limit: float, overhead: float,
          tolerance: float) -> ReplicaPlan | None:
    order = list(costs)
    loads = [0.0] * workers
    held: list[list[Replica]] = [[] for _ in range(workers)]
    room = limit * (1 + tolerance) + tolerance
    for unit in sorted(order, key=lambda u: (-costs[u], order.index(u))):
        cost = costs[unit]
        by_load = sorted(range(workers), key=lambda w: (loads[w], w))
        for r in range(1, workers + 1):
            share = replica_load(cost, r, overhead)
            if loads[by_load[r - 1]] + share <= room:    # the r least loaded all fit
                for i, w in enumerate(sorted(by_load[:r])):
                    loads[w] += share
                    held[w].append(Replica(unit, i, r, share))
                break
        else:
            return None
    rank = {u: i for i, u in enumerate(order)}
    for w in range(workers):
        held[w].sort(key=lambda r: (r.replicas == 1, rank[r.unit]))
    return ReplicaPlan(held)
