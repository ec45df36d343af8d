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
