"""Analytic cost model: NoProp-DT beside data-parallel backprop, projected to N = 1 ... 1024 workers.

This machine can only run N = 1 and 2; the question the project asks (does NoProp's absence of
gradient traffic pay off at scale?) needs N in the hundreds. So this module turns figures measured
by ``benchmarks/noprop_vs_ddp.py`` (its ``results.json`` ``profile``: bare step seconds of each
network at two batch sizes, parameter bytes, NoProp's measured coordinator traffic, the local link)
into seconds per epoch, speed-up and parallel efficiency against each method's own N = 1, and
bytes per worker per epoch, for every N and link asked for. It first checks itself against the
measured N = 1, 2 runs over the measured local link.

    python benchmarks/cost_model.py benchmarks/results/vs_ddp/results.json --out DIR
    python benchmarks/cost_model.py results.json --workers 1,2,8,64,1024 --link ib --link wan=0.1:2000

Methods
-------
``noprop``: T independent blocks plus a small output head, placed by the trainer's own planner
(``noprop_dist/trainers/ray/plan.py``: ``plan_replicas``, standard library only). N <= T: whole
blocks where they balance, a block split into r equal-share replicas where whole blocks leave
the loads uneven (T = 5 on 2 workers: 2.5 blocks each). N > T: blocks get replicas in
proportion (r = floor(N/T) or more). A replica trains 1/r of every global batch in ceil(n/B)
steps and all-reduces the block's gradient (and, when the profile counts them, its BatchNorm
statistics) inside its replica group every step. Only the coordinator talks to workers
(control messages, checkpoints).

DDP baselines (every network in ``profile.step_seconds`` other than ``noprop_block``, e.g.
``backprop``, the T blocks chained end to end, and ``backprop_cnn``, a single CNN): the global batch
B is split over N workers and every step ring-all-reduces the whole gradient.

Compute: one step (forward + backward + optimizer) at per-worker batch b takes ``t(b) = t0 + b t1``,
so an epoch of s steps over e examples takes ``s t0 + e t1`` (exact for a short last batch).

Assumptions
-----------
- Step time is affine in the per-worker batch, t(b) = t0 + b*t1, fitted per network by least squares to the measured bare step loop (no data loading, no logging); with one batch size measured, t0 = 0; a negative fitted t0 (or t1) is refitted with it fixed at 0, since it would make small batches cost negative time. Extrapolating to per-worker batches far below the measured ones (e.g. 1 at N = 128) is the model's weakest point: real devices are latency-bound there, so small-batch steps are likely slower than projected.
- The global batch is fixed (B, 128 by default) for every N: DDP splits it over N workers, a NoProp block over its r replicas; the slowest worker takes ceil(B/N) examples per step. When N > B, each worker keeps a batch of 1 and the global batch grows to N (fewer steps per epoch: a different optimisation, flagged "global batch grows").
- All-reduce is a ring: 2(k-1)/k * P / BW + 2(k-1) * L seconds, 2(k-1)/k * P bytes sent per worker; k = 1 costs nothing. Gradients are float32 (the profile's parameter bytes), all-reduced once per step as one bucket.
- No overlap of communication with computation by default: every step is compute, then all-reduce. `--overlap f` hides a fraction f of each all-reduce behind the backward pass, never more than the step's compute time (the model does not know how long the backward pass alone is).
- Small latency-bound all-reduces (global BatchNorm statistics: this project's DDP trainer all-reduces them per layer, forward and backward) are not modelled unless the profile gives `small_allreduces_per_step` per network; without it DDP is projected faster than it is, in its favour.
- Links are full-bisection: concurrent all-reduce groups (one per NoProp block) and coordinator messages do not contend with each other, except that everything the coordinator sends or receives in an epoch crosses its own single link (a floor on the NoProp epoch).
- Coordinator messages use the same link as everything else. Per unit-epoch: the control figure (both directions together) in two messages (two latencies), and one unit checkpoint (worker -> coordinator) every `checkpoint_every` epochs (none if 0); neither overlaps compute. The profile's checkpoint figure is the average over the T + 1 units (blocks and head) measured at N = 1.
- NoProp replicas: control goes to every replica, the checkpoint from one replica per block only. A replica's step costs t(B/r) plus a ring all-reduce of the block's gradient among its r replicas and the profile's `small_allreduces_per_step` for the block (global BatchNorm inside the group); nothing crosses between groups.
- NoProp placement is the trainer's own (`plan_replicas` on T blocks of equal cost): a worker's epoch is the sum of its replicas' epochs and the busiest worker sets the epoch; workers the plan leaves empty idle (T = 10 on 64: six replicas per block, 4 idle workers).
- The head trains on its own extra worker (the coordinator gives it no CPU or GPU) concurrently with the blocks, at the measured per-epoch seconds whatever N; it only lengthens the epoch when it is slower than the busiest block worker. N counts block workers only.
- A NoProp epoch ends when every unit has finished its epoch (the slowest worker, the head or the coordinator's link, whichever is longest); a DDP epoch is steps * (compute + exposed all-reduce).
- Data loading is not modelled: each worker reads the whole training set once at start-up and keeps it in memory (a NoProp block worker uses all n examples; this project's DDP workers also load it all and index their share); start-up, Ray scheduling, evaluation and checkpoint writes to disk are outside the epoch.
- Bytes per worker per epoch are bytes sent by the busiest worker (received bytes are equal for the ring all-reduce); NoProp's few hundred control bytes are counted whole on the worker (both directions, an upper bound).
- Training memory per worker = parameters + gradients + optimizer state of what it trains + saved activations, which scale linearly with its per-step batch (both measured in the profile at batch B). A NoProp worker trains one replica at a time at its share of the batch (B / r); on a GPU the other blocks it hosts wait in host memory (not counted), on the CPU they stay resident at their checkpointed size (counted). A DDP worker holds the whole network's state and the activations of its share B / N. Projections are for GPUs; the check against this machine uses the CPU rule.
- CPU contention: in the check against this machine only, the compute of N >= 2 workers is divided by the measured parallel efficiency of N bare step loops run at once in separate processes (`hardware_parallel`), the machine's own ceiling; contention between compute and communication threads (gloo, Ray) is not modelled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common import fmt, md_table, row_line, write_results
from noprop_dist.trainers.ray.plan import Replica, ReplicaPlan, plan_replicas

NOPROP = "noprop"
NOPROP_BLOCK = "noprop_block"           # profile key of one NoProp block's network
CHECK_TOLERANCE = 0.15                  # relative error that counts as "the model fits"
CHECK_WORKERS = (1, 2)                  # the timed points the model is checked against (logical runs: bytes, memory)
DEFAULT_WORKERS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GB = 1e9                                # link bandwidths are given in GB/s (10^9 bytes per second)


# ---------------------------------------------------------------------------------------
# Links and the ring all-reduce.
# ---------------------------------------------------------------------------------------
class Link(NamedTuple):
    bandwidth_Bps: float    # bytes per second, one direction, per worker
    latency_s: float        # per message


PRESET_LINKS = {
    "nvlink-ish": Link(25.0 * GB, 5e-6),
    "ib": Link(12.5 * GB, 5e-6),
    "ethernet-10g": Link(1.25 * GB, 50e-6),
}


def parse_link(text: str) -> tuple[str, Link]:
    """``NAME=GBps:latency_us`` (or a preset's bare name) -> (name, Link)."""
    if "=" not in text:
        if text not in PRESET_LINKS:
            raise ValueError(f"unknown link {text!r}: give NAME=GBps:latency_us or one of {sorted(PRESET_LINKS)}")
        return text, PRESET_LINKS[text]
    name, spec = text.split("=", 1)
    try:
        gbps, latency_us = (float(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"link {text!r}: expected NAME=GBps:latency_us, e.g. ib=12.5:5") from None
    if not name or gbps <= 0 or latency_us < 0:
        raise ValueError(f"link {text!r}: needs a name, bandwidth > 0 and latency >= 0")
    return name, Link(gbps * GB, latency_us * 1e-6)


def local_link(profile: dict) -> Link | None:
    """The link measured on this machine (a gloo all-reduce between two processes), if recorded."""
    link = profile.get("local_link")
    if not link or link.get("bandwidth_Bps", 0) <= 0:
        return None
    return Link(float(link["bandwidth_Bps"]), float(link.get("latency_s", 0.0)))


def ring_allreduce(nbytes: float, k: int, link: Link) -> tuple[float, float]:
    """(seconds, bytes sent per worker) of a ring all-reduce of ``nbytes`` among ``k`` workers:
    a reduce-scatter then an all-gather, each k - 1 hops of nbytes / k."""
    if k <= 1:
        return 0.0, 0.0
    sent = 2.0 * (k - 1) / k * nbytes
    return sent / link.bandwidth_Bps + 2.0 * (k - 1) * link.latency_s, sent


def message_seconds(nbytes: float, link: Link) -> float:
    """One point-to-point message."""
    return nbytes / link.bandwidth_Bps + link.latency_s


# ---------------------------------------------------------------------------------------
# Compute.
# ---------------------------------------------------------------------------------------
class StepTime(NamedTuple):
    t0: float               # seconds per step whatever the batch (launch, optimizer, ...)
    t1: float               # seconds per example
    note: str               # how the fit was made, when that is worth saying ("" otherwise)


def fit_step_time(step_seconds: dict[str, float]) -> StepTime:
    """Least-squares fit of ``t(b) = t0 + b t1`` to ``{batch: seconds}`` with t0, t1 >= 0.

    Unconstrained least squares often gives t0 < 0 on a CPU (steps are slightly super-linear
    in the batch); that would make a batch-1 step cost negative time at large N, so the fit is
    then redone with t0 = 0 (the constrained optimum), and said so."""
    batches = np.array([float(b) for b in step_seconds], dtype=np.float64)
    seconds = np.array([float(s) for s in step_seconds.values()], dtype=np.float64)
    if len(batches) == 0:
        raise ValueError("no step times to fit")
    if len(np.unique(batches)) == 1:
        return StepTime(0.0, float(seconds.mean() / batches[0]),
                        f"one batch size ({batches[0]:.0f}) measured: assumed t0 = 0")
    t1, t0 = np.polyfit(batches, seconds, 1)
    if t1 < 0:
        return StepTime(float(seconds.mean()), 0.0, "fitted t1 < 0 (noise): refitted with t1 = 0")
    if t0 < 0:
        t1 = float(batches @ seconds / (batches @ batches))
        return StepTime(0.0, t1, "fitted t0 < 0: refitted with t0 = 0")
    return StepTime(float(t0), float(t1), "")


class DataParallelPlan(NamedTuple):
    steps: int                  # optimizer steps per epoch
    batch_per_worker: int       # the slowest worker's examples per full step
    examples_per_worker: int    # the slowest worker's examples per epoch (sum over steps)
    global_batch: int           # examples per step over all k workers
    batch_grows: bool           # k > B: the global batch grew to k


def data_parallel_plan(examples: int, global_batch: int, k: int) -> DataParallelPlan:
    """How ``k`` workers share an epoch of ``examples`` at a fixed global batch: each step's
    batch is split as evenly as possible (the slowest takes the ceiling). With k > B every
    worker keeps one example and the global batch grows to k."""
    batch = max(global_batch, k)
    steps = math.ceil(examples / batch)
    tail = examples - (steps - 1) * batch
    per_worker = math.ceil(batch / k)
    return DataParallelPlan(steps, per_worker, (steps - 1) * per_worker + math.ceil(tail / k),
                            batch, k > global_batch)


def compute_seconds(fit: StepTime, plan: DataParallelPlan) -> float:
    """One epoch of the slowest worker: sum over steps of t0 + b_step t1."""
    return plan.steps * fit.t0 + plan.examples_per_worker * fit.t1


def exposed_seconds(comm: float, compute_per_step: float, overlap: float) -> float:
    """The part of one step's all-reduce not hidden behind its compute."""
    return comm - min(overlap * comm, compute_per_step)


# ---------------------------------------------------------------------------------------
# The two methods.
# ---------------------------------------------------------------------------------------
def _data_parallel_step_comm(profile: dict, network: str, k: int, link: Link) -> tuple[float, float]:
    """(seconds, bytes sent per worker) of one step's gradient all-reduce among k workers, plus
    the network's small latency-bound all-reduces when the profile counts them."""
    seconds, sent = ring_allreduce(profile["param_bytes"][network], k, link)
    small = profile.get("small_allreduces_per_step", {}).get(network, 0)
    return seconds + small * ring_allreduce(0.0, k, link)[0], sent


def _with_ratios(record: dict, base_seconds: float) -> dict:
    record["speedup"] = base_seconds / record["epoch_seconds"]
    record["efficiency"] = record["speedup"] / record["workers"]
    return record


def _unit_messages(profile: dict, link: Link) -> tuple[float, float, float, float]:
    """(control bytes, checkpoint bytes, control seconds, checkpoint seconds) per NoProp unit-epoch
    between a worker and the coordinator: the control figure covers both directions (two
    messages); a checkpoint of the profile's size goes up once every ``checkpoint_every``
    epochs, amortised per epoch."""
    control = profile.get("noprop_control_bytes_per_unit_epoch", 0.0)
    size = profile.get("noprop_checkpoint_bytes_per_unit_epoch", 0.0)
    every = profile.get("checkpoint_every", 1)
    per_epoch = 1.0 / every if every > 0 and size > 0 else 0.0
    control_s = control / link.bandwidth_Bps + 2 * link.latency_s
    return control, per_epoch * size, control_s, per_epoch * message_seconds(size, link)


def noprop_plan(T: int, n: int) -> ReplicaPlan:
    """The trainer's own plan for T equal blocks on n workers (``plan_replicas``, the function
    the Ray trainer runs): whole blocks where they balance, equal-share replicas where not."""
    return plan_replicas({f"block_{t:02d}": 1.0 for t in range(1, T + 1)}, n)


class _ReplicaCost(NamedTuple):
    plan: DataParallelPlan       # the replica's share of every global batch
    compute: float               # seconds per epoch
    comm: float                  # exposed in-group all-reduce seconds per epoch
    allreduce_bytes: float       # sent per epoch (gradients; BatchNorm statistics are latency only)


def _replica_cost(profile: dict, fit: StepTime, r: int, link: Link, overlap: float) -> _ReplicaCost:
    plan = data_parallel_plan(profile["train_examples"], profile["global_batch"], r)
    compute = compute_seconds(fit, plan)
    seconds, sent = _data_parallel_step_comm(profile, NOPROP_BLOCK, r, link)
    return _ReplicaCost(plan, compute, plan.steps * exposed_seconds(seconds, compute / plan.steps, overlap),
                        plan.steps * sent)


def _noprop_figures(profile: dict, n: int, link: Link, overlap: float) -> dict[str, Any]:
    T = profile["T"]
    fit = fit_step_time(profile["step_seconds"][NOPROP_BLOCK])
    layout = noprop_plan(T, n)
    costs = {r: _replica_cost(profile, fit, r, link, overlap)
             for r in {rep.replicas for held in layout.workers for rep in held}}
    control, checkpoint, control_s, checkpoint_s = _unit_messages(profile, link)

    def worker(held: list[Replica]) -> dict[str, float]:
        messages = sum(control_s + (checkpoint_s if rep.index == 0 else 0.0) for rep in held)
        return {"compute": sum(costs[rep.replicas].compute for rep in held),
                "comm": sum(costs[rep.replicas].comm for rep in held) + messages,
                "peer_bytes": sum(costs[rep.replicas].allreduce_bytes for rep in held),
                "coordinator_bytes": sum(control + (checkpoint if rep.index == 0 else 0.0) for rep in held)}

    per_worker = [worker(held) for held in layout.workers]
    busiest = max(per_worker, key=lambda w: w["compute"] + w["comm"])
    worker_s = busiest["compute"] + busiest["comm"]
    head_s = profile.get("head_epoch_seconds", 0.0) + control_s + checkpoint_s
    # Everything the coordinator sends and receives crosses its one link.
    replicas_total = sum(len(held) for held in layout.workers)
    coordinator_bytes = (T + 1) * (control + checkpoint) + (replicas_total - T) * control
    coordinator_s = coordinator_bytes / link.bandwidth_Bps
    epoch = max(worker_s, head_s, coordinator_s)

    counts = sorted({rep.replicas for held in layout.workers for rep in held})
    idle = sum(1 for held in layout.workers if not held)
    max_load = max(layout.loads())
    notes = []
    if max_load > T / n * (1 + 1e-9):
        notes.append(f"busiest worker trains {max_load:.3g} blocks' work (ideal {T / n:.3g})")
    split = [c for c in counts if c > 1]
    if split:
        notes.append("blocks split into " + "/".join(map(str, split)) + " replicas, per-replica batch "
                     + "/".join(str(costs[c].plan.batch_per_worker) for c in split))
    if idle:
        notes.append(f"{idle} of {n} workers idle")
    if any(costs[c].plan.batch_grows for c in counts):
        notes.append(f"block global batch grows to {max(costs[c].plan.global_batch for c in counts)}")
    if epoch == head_s and head_s > worker_s:
        notes.append("the head sets the epoch")
    if epoch == coordinator_s and coordinator_s > max(worker_s, head_s):
        notes.append("the coordinator's link sets the epoch")
    return {
        "method": NOPROP, "workers": n, "epoch_seconds": epoch,
        "compute_seconds": busiest["compute"], "comm_seconds": busiest["comm"],
        "comm_bytes_per_epoch_per_worker": max(w["coordinator_bytes"] + w["peer_bytes"] for w in per_worker),
        "peer_bytes_per_epoch_per_worker": max(w["peer_bytes"] for w in per_worker),
        "allreduce_bytes_per_step_per_worker": max(costs[c].allreduce_bytes / costs[c].plan.steps for c in counts),
        "coordinator_bytes_per_epoch": coordinator_bytes,
        "total_bytes_per_epoch": coordinator_bytes + sum(w["peer_bytes"] for w in per_worker),
        "batch_per_worker": min(costs[c].plan.batch_per_worker for c in counts),
        "global_batch": max(costs[c].plan.global_batch for c in counts),
        "steps_per_epoch": max(costs[c].plan.steps for c in counts), "replicas": max(counts),
        "blocks_per_worker": max_load, "idle_workers": idle, "plan": layout.lines(),
        "head_seconds": head_s, "coordinator_seconds": coordinator_s, "notes": notes,
    }


def project_noprop(profile: dict, n: int, link: Link, overlap: float = 0.0) -> dict[str, Any]:
    """NoProp-DT on ``n`` block workers (plus the head's worker) over ``link``: one record."""
    base = _noprop_figures(profile, 1, link, overlap)["epoch_seconds"]
    return _with_ratios(_noprop_figures(profile, n, link, overlap), base)


def _ddp_figures(profile: dict, method: str, n: int, link: Link, overlap: float) -> dict[str, Any]:
    batch = profile["global_batch"]
    fit = fit_step_time(profile["step_seconds"][method])
    plan = data_parallel_plan(profile["train_examples"], batch, n)
    compute = compute_seconds(fit, plan)
    allreduce_s, allreduce_bytes = _data_parallel_step_comm(profile, method, n, link)
    comm = plan.steps * exposed_seconds(allreduce_s, compute / plan.steps, overlap)
    notes = []
    if plan.batch_grows:
        notes.append(f"global batch grows to {plan.global_batch} (batch 1 per worker)")
    elif batch % n:
        notes.append(f"uneven shares: the slowest worker takes {plan.batch_per_worker} per step")
    if 2 * n > batch:
        notes.append("beyond this project's DDP trainer (it needs global batch >= 2N)")
    return {
        "method": method, "workers": n, "epoch_seconds": compute + comm,
        "compute_seconds": compute, "comm_seconds": comm,
        "comm_bytes_per_epoch_per_worker": plan.steps * allreduce_bytes,
        "peer_bytes_per_epoch_per_worker": plan.steps * allreduce_bytes,
        "allreduce_bytes_per_step_per_worker": allreduce_bytes,
        "total_bytes_per_epoch": n * plan.steps * allreduce_bytes,
        "batch_per_worker": plan.batch_per_worker, "global_batch": plan.global_batch,
        "steps_per_epoch": plan.steps, "notes": notes,
    }


def project_ddp(profile: dict, method: str, n: int, link: Link, overlap: float = 0.0) -> dict[str, Any]:
    """The DDP baseline ``method`` on ``n`` workers over ``link``: one record."""
    base = _ddp_figures(profile, method, 1, link, overlap)["epoch_seconds"]
    return _with_ratios(_ddp_figures(profile, method, n, link, overlap), base)


def ddp_methods(profile: dict) -> list[str]:
    """The baselines the profile can project: measured step times and parameter bytes."""
    return [m for m in profile.get("step_seconds", {})
            if m != NOPROP_BLOCK and m in profile.get("param_bytes", {})]


def has_noprop(profile: dict) -> bool:
    """Whether the profile holds what NoProp's projection needs."""
    return NOPROP_BLOCK in profile.get("step_seconds", {}) and NOPROP_BLOCK in profile.get("param_bytes", {})


def profile_notes(profile: dict) -> list[str]:
    """What the reader of a projection must know about its inputs: fits, skipped methods, gaps."""
    notes = []
    for network, seconds in profile.get("step_seconds", {}).items():
        if network not in profile.get("param_bytes", {}):
            notes.append(f"{network}: no parameter bytes in the profile, skipped")
            continue
        fit = fit_step_time(seconds)
        notes.append(f"{network}: t(b) = {fit.t0 * 1e3:.3f} ms + b * {fit.t1 * 1e3:.4f} ms"
                     + (f" ({fit.note})" if fit.note else ""))
    if not has_noprop(profile):
        notes.append("noprop: no noprop_block step times or parameter bytes in the profile, skipped")
    if not ddp_methods(profile):
        notes.append("no DDP baseline in the profile")
    if local_link(profile) is None:
        notes.append("no local link in the profile: the check against measured runs is skipped")
    if not profile.get("small_allreduces_per_step"):
        notes.append("small (BatchNorm) all-reduces per step not given: not modelled (in DDP's favour)")
    return notes


def memory_per_worker(profile: dict, method: str, n: int, on_gpu: bool = True) -> float | None:
    """Peak training bytes of the busiest worker (see the memory assumption), or None when the
    profile has no memory figures for ``method``."""
    memory = profile.get("memory", {})
    batch = profile["global_batch"]
    if method == NOPROP:
        block = memory.get(NOPROP_BLOCK)
        if not block:
            return None
        worst = 0.0
        for held in noprop_plan(profile["T"], n).workers:
            for rep in held:     # one replica trains at a time; on the CPU the others stay resident
                share = math.ceil(max(batch, rep.replicas) / rep.replicas) / batch
                resident = 0.0 if on_gpu else (len(held) - 1) * block["resident_bytes"]
                worst = max(worst, block["state_bytes"] + share * block["activation_bytes"] + resident)
        return worst
    net = memory.get(method)
    if not net:
        return None
    share = math.ceil(max(batch, n) / n) / batch
    return net["state_bytes"] + share * net["activation_bytes"]


def project(profile: dict, links: dict[str, Link], workers: list[int], overlap: float = 0.0) -> list[dict]:
    """Every (link, N, method) record; methods the profile cannot project are left out (see
    :func:`profile_notes`)."""
    records = []
    for link_name, link in links.items():
        for n in workers:
            found = [project_noprop(profile, n, link, overlap)] if has_noprop(profile) else []
            found += [project_ddp(profile, m, n, link, overlap) for m in ddp_methods(profile)]
            records += [{**r, "link": link_name,
                         "memory_bytes_per_worker": memory_per_worker(profile, r["method"], n, on_gpu=True)}
                        for r in found]
    return records


# ---------------------------------------------------------------------------------------
# The check against measured runs.
# ---------------------------------------------------------------------------------------
def _relative_error(predicted: float, measured: float) -> float | None:
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / measured


def check_against_measured(profile: dict, runs: list[dict], overlap: float = 0.0) -> list[dict]:
    """Predicted vs measured seconds per epoch (and bytes, when the run counted them) of every
    measured N = 1, 2 point, over the local link. NoProp runs count the whole cluster's
    coordinator traffic, DDP runs the all-reduce payload per worker: each is compared with
    the matching prediction."""
    link = local_link(profile)
    rows = []
    for run in runs:
        method, n = run.get("method"), run.get("workers")
        if "epoch_seconds" not in run or (n not in CHECK_WORKERS and not run.get("logical")):
            continue
        row: dict[str, Any] = {"method": method, "workers": n, "measured_seconds": run["epoch_seconds"],
                               "predicted_seconds": None, "rel_error": None, "within_tolerance": None}
        if link is None:
            rows.append({**row, "note": "no local link in the profile"})
            continue
        if method == NOPROP and has_noprop(profile):
            # Measured: what crossed the coordinator (the groups' all-reduces are apart).
            pred, bytes_key = project_noprop(profile, n, link, overlap), "coordinator_bytes_per_epoch"
        elif method in ddp_methods(profile):
            pred, bytes_key = project_ddp(profile, method, n, link, overlap), "comm_bytes_per_epoch_per_worker"
        else:
            rows.append({**row, "note": "not in the profile"})
            continue
        ceiling = (profile.get("hardware_parallel") or {})
        if n >= 2 and ceiling.get("processes") == n and ceiling.get("efficiency"):
            slowdown = pred["compute_seconds"] * (1.0 / ceiling["efficiency"] - 1.0)
            pred = {**pred, "compute_seconds": pred["compute_seconds"] + slowdown,
                    "epoch_seconds": pred["epoch_seconds"] + slowdown}
        error = _relative_error(pred["epoch_seconds"], run["epoch_seconds"])
        row.update(predicted_seconds=pred["epoch_seconds"], predicted_compute_seconds=pred["compute_seconds"],
                   predicted_comm_seconds=pred["comm_seconds"], rel_error=error,
                   within_tolerance=error is not None and abs(error) <= CHECK_TOLERANCE, note="")
        if run.get("logical"):      # more workers than cores: bytes and memory, not speed
            row.update(rel_error=None, within_tolerance=None, note="logical workers: speed not compared")
        memory = memory_per_worker(profile, method, n, on_gpu=bool((profile.get("device") or "cpu") != "cpu"))
        if memory is not None and run.get("peak_train_bytes_per_worker"):
            row.update(measured_memory=run["peak_train_bytes_per_worker"], predicted_memory=memory,
                       memory_rel_error=_relative_error(memory, run["peak_train_bytes_per_worker"]))
        if "comm_bytes_per_epoch" in run:
            row.update(measured_bytes=run["comm_bytes_per_epoch"], predicted_bytes=pred[bytes_key],
                       bytes_rel_error=_relative_error(pred[bytes_key], run["comm_bytes_per_epoch"]))
        if method == NOPROP and "peer_bytes_per_epoch_per_worker" in run:
            row.update(measured_peer_bytes=run["peer_bytes_per_epoch_per_worker"],
                       predicted_peer_bytes=pred["peer_bytes_per_epoch_per_worker"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------
def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def format_check(rows: list[dict]) -> str:
    """The check as a markdown table."""
    head = ["method", "N", "measured s/epoch", "predicted s/epoch", "compute s", "comm s", "rel. error",
            f"within {CHECK_TOLERANCE:.0%}", "measured MB", "predicted MB", "bytes rel. error",
            "measured mem. MB/worker", "predicted mem. MB/worker", "mem. rel. error",
            "measured in-group MB/worker", "predicted in-group MB/worker"]
    cells = []
    for r in rows:
        within = {None: "-", True: "yes", False: "NO"}[r["within_tolerance"]]
        cells.append([
            r["method"], r["workers"], fmt(r["measured_seconds"], ".2f"), fmt(r["predicted_seconds"], ".2f"),
            fmt(r.get("predicted_compute_seconds"), ".2f"), fmt(r.get("predicted_comm_seconds"), ".3f"),
            fmt(r["rel_error"], "+.1%"), within + (f" ({r['note']})" if r.get("note") else ""),
            fmt(_mb(r.get("measured_bytes")), ".3f"), fmt(_mb(r.get("predicted_bytes")), ".3f"),
            fmt(r.get("bytes_rel_error"), "+.1%"), fmt(_mb(r.get("measured_memory")), ".1f"),
            fmt(_mb(r.get("predicted_memory")), ".1f"), fmt(r.get("memory_rel_error"), "+.1%"),
            fmt(_mb(r.get("measured_peer_bytes")), ".3f"), fmt(_mb(r.get("predicted_peer_bytes")), ".3f")])
    lines = [f"Cost model vs measured (local link; within {CHECK_TOLERANCE:.0%} counts as a fit)", ""]
    return "\n".join(lines + md_table(head, cells)) + "\n"


def format_projection(records: list[dict], link_name: str, link: Link) -> str:
    """One link's projection as a markdown table, its notes listed under it, one line per N."""
    rows = [r for r in records if r["link"] == link_name]
    baselines = list(dict.fromkeys(r["method"] for r in rows if r["method"] != NOPROP))
    with_noprop = any(r["method"] == NOPROP for r in rows)
    head = ["N"] + (["NoProp s/epoch", "NoProp eff."] if with_noprop else [])
    for m in baselines:
        head += [f"{m} s/epoch", f"{m} eff."] + ([f"{m}/NoProp"] if with_noprop else [])
    every = ([NOPROP] if with_noprop else []) + baselines
    head += [f"{m} comm MB/worker/epoch" for m in every]
    head += [f"{m} mem. MB/worker" for m in every]
    lines = [f"### {link_name}: {link.bandwidth_Bps / GB:g} GB/s, {link.latency_s * 1e6:g} us", ""]
    lines += md_table(head, [])
    notes: list[str] = []
    for n in sorted({r["workers"] for r in rows}):
        by = {r["method"]: r for r in rows if r["workers"] == n}
        cells = [str(n)]
        if with_noprop:
            cells += [f"{by[NOPROP]['epoch_seconds']:.3f}", f"{by[NOPROP]['efficiency']:.2f}"]
        for m in baselines:
            cells += [f"{by[m]['epoch_seconds']:.3f}", f"{by[m]['efficiency']:.2f}"]
            if with_noprop:
                cells.append(f"{by[m]['epoch_seconds'] / by[NOPROP]['epoch_seconds']:.2f}x")
        cells += [f"{by[m]['comm_bytes_per_epoch_per_worker'] / 1e6:.2f}" for m in every]
        cells += [fmt(_mb(by[m].get("memory_bytes_per_worker")), ".1f") for m in every]
        lines.append(row_line(cells))
        said = "; ".join(f"{m}: {', '.join(r['notes'])}" for m, r in by.items() if r["notes"])
        if said:
            notes.append(f"- N = {n}: {said}")
    lines += [""] + notes
    return "\n".join(lines) + "\n"


def assumptions() -> list[str]:
    """The module docstring's assumption bullets: one source for the code, the README and reports."""
    section = __doc__.split("Assumptions\n-----------\n", 1)[1]
    return [line[2:].strip() for line in section.splitlines() if line.startswith("- ")]


def plot(records: list[dict], path: Path, global_batch: int | None = None) -> None:
    """Seconds per epoch against N, log-log: a colour per method, a line style per link; a
    vertical line where DDP's global batch starts to grow (beyond it the points train differently)."""
    from matplotlib.figure import Figure     # no pyplot: no global figure state, no GUI backend

    methods = list(dict.fromkeys(r["method"] for r in records))
    links = list(dict.fromkeys(r["link"] for r in records))
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for i, method in enumerate(methods):
        for j, link in enumerate(links):
            rs = sorted((r for r in records if r["method"] == method and r["link"] == link), key=lambda r: r["workers"])
            ax.plot([r["workers"] for r in rs], [r["epoch_seconds"] for r in rs], color=f"C{i}",
                    linestyle=styles[j % len(styles)], marker=".", label=f"{method}, {link}")
    if global_batch:
        ax.axvline(global_batch, color="grey", linewidth=0.8)
        ax.annotate("N > B: DDP global batch grows", (global_batch, 0.98), xycoords=("data", "axes fraction"),
                    fontsize=7, color="grey", rotation=90, ha="right", va="top")
    ax.set(xscale="log", yscale="log", xlabel="workers N", ylabel="projected seconds per epoch",
           title="Cost model: epoch time vs workers (fixed global batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(out: Path, projection: dict, markdown: str) -> None:
    write_results(out, projection, markdown, name="projection")
    plot(projection["records"], out / "projection.png", projection.get("global_batch"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json written by benchmarks/noprop_vs_ddp.py")
    parser.add_argument("--workers", default=",".join(map(str, DEFAULT_WORKERS)),
                        help="comma-separated worker counts to project (default: %(default)s)")
    parser.add_argument("--link", action="append", default=[], metavar="NAME=GBps:us",
                        help="a link to project over (repeatable), or a preset's name "
                             f"({', '.join(PRESET_LINKS)}); given links replace the presets. "
                             "The measured local link is always included")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="fraction (0..1) of each all-reduce hidden behind the backward pass (default 0)")
    parser.add_argument("--out", help="write projection.json, projection.md and projection.png here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.overlap <= 1.0:
        parser.error("--overlap must be in [0, 1]")
    try:
        args.workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
        args.links = dict(parse_link(text) for text in args.link) if args.link else dict(PRESET_LINKS)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.workers or args.workers[0] < 1:
        parser.error("--workers: positive integers, e.g. 1,2,8,64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    profile = results["profile"]
    links = dict(args.links)
    if (measured := local_link(profile)) is not None:
        links = {"local": measured, **links}
    records = project(profile, links, args.workers, args.overlap)
    check = check_against_measured(profile, results.get("runs", []), args.overlap)
    notes = profile_notes(profile)
    sections = [format_check(check)] + [format_projection(records, name, link) for name, link in links.items()]
    body = (f"## Cost model projection (overlap {args.overlap:g}; fixed global batch "
            f"{profile.get('global_batch')}, T = {profile.get('T')})\n\n"
            + "\n".join(sections) + "\nInputs:\n" + "".join(f"- {n}\n" for n in notes))
    print(body)
    if args.out:
        markdown = body + "\nAssumptions:\n" + "".join(f"- {a}\n" for a in assumptions())
        projection = {"source": str(args.results), "overlap": args.overlap,
                      "global_batch": profile.get("global_batch"), "T": profile.get("T"),
                      "links": {name: link._asdict() for name, link in links.items()},
                      "assumptions": assumptions(), "profile_notes": notes, "check": check, "records": records}
        write_outputs(Path(args.out), projection, markdown)
        print(f"[cost_model] wrote {Path(args.out) / 'projection.json'}, projection.md, projection.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
