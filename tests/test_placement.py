"""The replica planner (issue 16, item 1): pure, no Ray."""

from __future__ import annotations

import math

import pytest

from noprop_dist.trainers.ray.plan import SPLIT_OVERHEAD, plan_replicas, replica_load


def units(T: int, cost: float = 1.0) -> dict[str, float]:
    return {f"block_{t:02d}": cost for t in range(1, T + 1)}


@pytest.mark.parametrize("overhead", [0.0, SPLIT_OVERHEAD])
@pytest.mark.parametrize("T", [3, 5, 10])
def test_every_unit_is_covered_once_and_loads_are_balanced_within_one_share(T, overhead):
    for n in range(1, 3 * T + 1):
        plan = plan_replicas(units(T), n, overhead)
        shares: dict[str, list[tuple[int, int]]] = {}
        for w, held in enumerate(plan.workers):
            for r in held:
                shares.setdefault(r.unit, []).append((r.index, r.replicas))
        assert set(shares) == set(units(T))
        for unit, pieces in shares.items():
            r = pieces[0][1]
            # r replicas, indices 0..r-1, each on its own worker: the unit's shares add up to one
            assert sorted(i for i, _ in pieces) == list(range(r)) and all(rr == r for _, rr in pieces), (n, unit)
        groups = plan.groups()
        assert all(len(set(ws)) == len(ws) for ws in groups.values())
        loads = plan.loads()
        largest_share = max(r.load for held in plan.workers for r in held)
        assert max(loads) - min(loads) <= largest_share + 1e-9, (n, loads)
        assert max(loads) >= T / n - 1e-9                    # no plan beats the ideal
        assert max(loads) <= math.ceil(T / min(n, T)) + 1e-9   # never worse than round-robin


@pytest.mark.parametrize("T, n, ideal", [(5, 2, 2.5), (10, 4, 2.5), (10, 8, 1.25), (10, 20, 0.5), (10, 3, 10 / 3)])
def test_uneven_counts_reach_the_ideal_load(T, n, ideal):
    """Where whole blocks leave loads uneven (round-robin: T = 5 on 2 workers at most 0.83
    efficient, T = 10 on 8 at 0.62), splitting one unit's batches balances them exactly when
    splitting is free, and to within what the split costs when it is not."""
    assert max(plan_replicas(units(T), n, overhead=0.0).loads()) == pytest.approx(ideal, rel=1e-6)
    plan = plan_replicas(units(T), n)
    split = {r.replicas for held in plan.workers for r in held if r.replicas > 1}
    assert split, "an uneven count is balanced by splitting a unit"
    assert max(plan.loads()) <= ideal + max(r.load for held in plan.workers for r in held) * SPLIT_OVERHEAD * 10 + 1e-9
    assert max(plan.loads()) < math.ceil(T / min(n, T))            # better than round-robin


@pytest.mark.parametrize("T, n, replicas, idle", [(10, 64, 6, 4), (10, 128, 12, 8), (10, 20, 2, 0)])
def test_splitting_costs_overhead_so_no_unit_spreads_over_dozens_of_workers(T, n, replicas, idle):
    """Without an overhead, T = 10 on 64 workers gives nine blocks 7 replicas and spreads the
    tenth over all 64 (batch 2 each) to win 5% of compute; each replica's step has a fixed
    part and its group's all-reduces, so with :data:`SPLIT_OVERHEAD` every block gets 6."""
    free = plan_replicas(units(T), n, overhead=0.0)
    plan = plan_replicas(units(T), n)
    assert {len(ws) for ws in plan.groups().values()} == {replicas}
    assert sum(1 for held in plan.workers if not held) == idle
    assert max(plan.loads()) == pytest.approx(replica_load(1.0, replicas), rel=1e-6)
    if n == 64:
        assert max(len(ws) for ws in free.groups().values()) == 64


def test_replica_load_is_the_share_plus_the_overhead():
    assert replica_load(2.0, 1) == 2.0
    assert replica_load(2.0, 4, overhead=0.0) == 0.5
    assert replica_load(2.0, 4, overhead=0.2) == pytest.approx(2.0 * (0.2 + 0.8 / 4))
    with pytest.raises(ValueError, match="overhead"):
        plan_replicas(units(3), 2, overhead=1.0)


def test_more_workers_than_units_give_replicas_in_proportion_to_cost():
    plan = plan_replicas({"big": 3.0, "small": 1.0}, 4, overhead=0.0)
    assert {u: len(ws) for u, ws in plan.groups().items()} == {"big": 3, "small": 1}
    assert plan.loads() == pytest.approx([1.0] * 4)
    assert plan_replicas({"big": 3.0, "small": 1.0}, 4).groups() == plan.groups()


def test_split_units_come_first_in_one_order_on_every_worker_and_the_plan_is_deterministic():
    plan = plan_replicas(units(10), 4)
    assert plan == plan_replicas(units(10), 4)
    order = list(units(10))
    for held in plan.workers:
        split = [r.unit for r in held if r.replicas > 1]
        assert [r.unit for r in held[:len(split)]] == split           # split replicas before whole units
        assert split == sorted(split, key=order.index)                # in the units' fixed order
    assert len(plan.lines()) == 4 and f"load {replica_load(1.0, 2) + 2:.3g}" in plan.lines()[0]


def test_one_worker_trains_everything_and_bad_requests_are_refused():
    assert plan_replicas(units(4), 1).loads() == [4.0]
    with pytest.raises(ValueError):
        plan_replicas(units(4), 0)
