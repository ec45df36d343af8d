"""NoProp-DT on Ray beside back-propagation under DDP: same data, blocks, T, epochs, batch.

For N = 1, 2, ... workers (one thread each on CPU) it trains

* ``noprop``: NoProp-DT through the Ray coordinator, ``cluster.workers = N`` (blocks queue
  when N < T);
* ``backprop``: the structure-matched baseline (Eqs. 17-19) with DDP on Ray Train (N = 1:
  the same loop in this process, no process group: DDP with one worker adds nothing);
* ``backprop_cnn``: the single-tower CNN, the same way;

and records per run: wall time per epoch, samples/s, speed-up and efficiency against its
own N = 1, peak training memory per worker (parameters + gradients + optimizer state +
saved activations; GPU: ``max_memory_allocated``) and process RSS, bytes communicated per
epoch (DDP: the all-reduce payload per worker, counted in a DDP communication hook and in
the BatchNorm all-reduces; NoProp: pickled messages between coordinator and workers,
checkpoints apart from control), and test accuracy. It also profiles the bare step loop of
each network (each step the unit loop's own loss, ``batch_loss``, and optimizer step; for the
lean-loop target and the cost model) and the local link (a gloo all-reduce between two
processes).

    python benchmarks/noprop_vs_ddp.py --out benchmarks/results/vs_ddp      # demo preset, 2 epochs
    python benchmarks/noprop_vs_ddp.py --smoke --out /tmp/smoke             # < 2 minutes
    python benchmarks/noprop_vs_ddp.py --config mnist --epochs 1 --workers 1 2 4 8 --address auto \
        --data.root=/shared/torchvision                                         # on a GPU cluster

Writes ``--out``: results.json, results.md, and PNG plots; then runs the cost model's check
(``benchmarks/cost_model.py``) against the measured points.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import (
    SMOKE_NOTE, add_overrides, add_smoke, fmt, fresh_dir, parse_args, ray_environment, read_run, run_together, train,
    write_results
)
from noprop_dist import config

METHODS = ("noprop", "backprop", "backprop_cnn")


# ---------------------------------------------------------------------------------------
# Profile: bare step loops and the local link.
# ---------------------------------------------------------------------------------------
def _timed_steps(step, batches: int, warmup: int = 2, repeats: int = 3) -> float:
    """Seconds per step: the best of ``repeats`` timed runs (the least disturbed)."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            step()
        best = min(best, (time.perf_counter() - start) / batches)
    return best


def unit_runner(cfg: config.Config, data, variant: str | None = None, index: int = 1):
    """The unit loop's runner (module, optimizer, embedding copy) of one trained unit: DT's
    block ``index`` (``variant`` None: the config's own), or a baseline ``variant``'s network."""
    from noprop_dist.training.runner import UnitRunner
    from noprop_dist.variants.base import make_setup

    if variant is not None:
        cfg = config.apply_overrides(cfg, {"variant": variant, "cluster.backend": "local"}, "benchmark")
    setup = make_setup(cfg, data)
    unit = [u for u in setup.units if u.role != "head"][index - 1]
    runner = UnitRunner(unit, setup, data.train)
    runner.module.train()
    return runner


def unit_step(runner, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
    """One optimizer step of a unit on one batch: the variant's own loss, as the unit loop
    computes it (``objective.batch_loss``: DT's Eq. 8 term, the baselines' cross-entropy),
    then the optimizer's step."""
    loss = runner.objective.batch_loss(runner, x, y, rows)
    runner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    runner.optimizer.step()


def _memory(runner, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> dict[str, int]:
    """Parameters + gradients + optimizer state, saved activations of one loss at batch B,
    and the resident (checkpointed) size: weights, buffers and optimizer state."""
    from noprop_dist.training.meters import SavedTensorMeter, training_state_bytes

    with SavedTensorMeter(True, runner.module) as meter:
        runner.objective.batch_loss(runner, x, y, rows)
    resident = sum(t.numel() * t.element_size() for t in runner.module.state_dict().values())
    resident += sum(v.numel() * v.element_size() for st in runner.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v))
    return {"state_bytes": training_state_bytes(list(runner.module.parameters()), runner.optimizer),
            "activation_bytes": meter.bytes, "resident_bytes": resident}


def profile_steps(cfg: config.Config, data, batch_sizes: list[int], steps: int) -> dict[str, Any]:
    """Seconds per optimizer step of each network at each per-worker batch (this process,
    ``train.threads`` threads), the bare loop: no data loading, logging or accounting, each
    step the unit loop's own loss (:func:`unit_step`)."""
    B = max(batch_sizes)
    x_all = torch.randn(B, *data.input_shape)
    y_all = torch.randint(0, data.num_classes, (B,))
    out: dict[str, dict[str, float]] = {}
    params: dict[str, int] = {}
    memory: dict[str, dict[str, int]] = {}
    small: dict[str, int] = {}
    for network, variant in (("noprop_block", None), ("backprop", "backprop"), ("backprop_cnn", "backprop_cnn")):
        runner = unit_runner(cfg, data, variant)
        rows_all = torch.randn(B, runner.setup.embedding.shape[1])       # DT: the target noise; baselines: z_0
        params[network] = sum(p.numel() * 4 for p in runner.module.parameters())
        out[network] = {}
        for b in batch_sizes:
            x, y, rows = x_all[:b], y_all[:b], rows_all[:b]
            out[network][str(b)] = _timed_steps(lambda: unit_step(runner, x, y, rows),
                                                max(2, steps // 4) if network == "backprop" else steps)
            if b == B:
                memory[network] = _memory(runner, x, y, rows)
        # Global BatchNorm all-reduces its statistics per layer, forward and backward: always in a
        # block split into replicas (within its group), in a baseline when DDP synchronises it.
        batchnorms = 2 * sum(isinstance(m, torch.nn.BatchNorm1d) for m in runner.module.modules())
        if variant is None:
            setup = runner.setup
            head = next(u for u in setup.units if u.role == "head")
            params["noprop_head"] = sum(p.numel() * 4 for p in setup.objective.build_module(head, setup).parameters())
            small[network] = batchnorms
        elif cfg.cluster.sync_batchnorm:
            small[network] = batchnorms
    return {"step_seconds": out, "param_bytes": params, "memory": memory, "small_allreduces_per_step": small,
            "device": "cpu"}


def bare_block_epoch_seconds(cfg: config.Config, data) -> float:
    """One epoch of the bare step loop of one block over the real training split (data
    pre-normalised in memory, the epoch's target noise drawn as the unit loop draws it, each
    step :func:`unit_step`): the floor a NoProp block-epoch is held to."""
    from noprop_dist.data import normalize

    runner = unit_runner(cfg, data, index=2)
    setup = runner.setup
    x_all = normalize(np.asarray(data.train.x), setup.mean, setup.std)
    y_all = torch.from_numpy(np.array(data.train.y))
    order = torch.randperm(len(y_all))
    start = time.perf_counter()
    noise = runner.objective.epoch_noise(runner.unit, setup, 1, len(y_all))
    for s in range(0, len(order), cfg.train.batch_size):
        idx = order[s:s + cfg.train.batch_size]
        unit_step(runner, x_all[idx], y_all[idx], noise[idx])
    return time.perf_counter() - start


def lean_loop(cfg: config.Config, data, repeats: int = 3) -> dict[str, float]:
    """The unit loop (UnitRunner.run_epoch: data gathering, closed-form targets, seeded
    dropout, memory accounting, metrics) against the bare step loop, in this process,
    alternated ``repeats`` times; the best of each."""
    bare, unit = [], []
    for _ in range(repeats):
        bare.append(bare_block_epoch_seconds(cfg, data))
        runner = unit_runner(cfg, data, index=2)
        start = time.perf_counter()
        runner.run_epoch(1)
        unit.append(time.perf_counter() - start)
    return {"bare_seconds": min(bare), "unit_seconds": min(unit), "ratio": min(unit) / min(bare)}


def _bare_epoch_process(cfg_dict: dict, barrier, queue) -> None:
    from noprop_dist.data import load_dataset

    torch.set_num_threads(1)
    cfg = config.from_dict(cfg_dict)
    data = load_dataset(cfg.data)
    bare_block_epoch_seconds(cfg, data)   # warm up (allocator, caches) before the common start
    barrier.wait(timeout=600)             # start together
    queue.put(bare_block_epoch_seconds(cfg, data))


def hardware_parallel_efficiency(cfg: config.Config, processes: int) -> dict[str, Any]:
    """The machine's own ceiling: the bare block loop in 1 process, then in ``processes``
    processes at once (no Ray, no communication). Efficiency = alone / slowest concurrent."""
    out = {k: run_together(_bare_epoch_process, [(config.to_dict(cfg),)] * k) for k in (1, processes)}
    return {"processes": processes, "alone_seconds": out[1][0], "concurrent_seconds": out[processes],
            "efficiency": out[1][0] / max(out[processes])}


def _link_worker(rank: int, port: int, sizes: list[int], out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    times = {}
    for size in sizes:
        t = torch.ones(size // 4)
        for _ in range(2):
            dist.all_reduce(t)
        reps = 10
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        times[size] = (time.perf_counter() - start) / reps
    if rank == 0:
        Path(out_path).write_text(json.dumps(times))
    dist.barrier()   # rank 0 hosts the store: nobody leaves while another still talks to it
    dist.destroy_process_group()


def measure_local_link() -> dict[str, float]:
    """Bandwidth and latency of a gloo all-reduce between two local processes, fitted to
    the ring model ``t = 2 (k-1)/k * P / BW + 2 (k-1) L`` with k = 2."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [4 * 1024, 1 << 20, 8 << 20]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "link.json")
        mp.spawn(_link_worker, args=(port, sizes, out), nprocs=2)
        times = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    # k = 2: t = P / BW + 2 L  -> a straight line in P.
    p = np.array(sorted(times), dtype=float)
    t = np.array([times[int(v)] for v in p])
    slope, intercept = np.polyfit(p, t, 1)
    return {"bandwidth_Bps": float(1.0 / max(slope, 1e-15)), "latency_s": float(max(intercept, 0.0) / 2),
            "allreduce_seconds_by_bytes": {str(int(k)): v for k, v in times.items()}}


# ---------------------------------------------------------------------------------------
# The runs.
# ---------------------------------------------------------------------------------------
def run_method(method: str, workers: int, cfg: config.Config, run_dir: Path) -> dict[str, Any]:
    """Train one (method, N) from scratch with the trainer the registry gives it (NoProp: the
    Ray coordinator; a baseline: this process at N = 1, DDP on Ray Train above) and return
    its record."""
    if method == "noprop":
        overrides = {"cluster.backend": "ray", "cluster.workers": workers}
    else:
        overrides = {"variant": method, "cluster.backend": "local" if workers == 1 else "ddp",
                     "cluster.workers": workers}
    mcfg = config.apply_overrides(cfg, overrides, "benchmark")
    _, wall = train(mcfg, fresh_dir(run_dir))
    return make_record(method, workers, mcfg, run_dir, wall)


def make_record(method: str, workers: int, cfg: config.Config, run_dir: Path, wall: float) -> dict[str, Any]:
    run = read_run(run_dir)
    summary = run.summary
    epochs = cfg.train.epochs
    n = summary["train_examples"]
    record: dict[str, Any] = {"method": method, "workers": workers, "epochs": epochs,
                              "test_accuracy": summary["test_accuracy"], "wall_seconds": wall}
    if method == "noprop":
        epoch_seconds = summary["train_seconds"] / epochs
        comm = run.events("communication")
        control = np.mean([r["control_to_workers"] + r["control_from_workers"] for r in comm])
        ckpt = np.mean([r["checkpoint_from_workers"] + r["checkpoint_to_workers"] for r in comm])
        unit_epochs = run.events("unit_epoch")
        block_seconds = [r["seconds"] for r in unit_epochs if r["unit"] != "head"]
        record.update({
            "comm_bytes_per_epoch": float(control + ckpt), "comm_control_bytes_per_epoch": float(control),
            "comm_checkpoint_bytes_per_epoch": float(ckpt),
            "block_epoch_seconds": float(np.median(block_seconds)),
            "head_epoch_seconds": float(np.median([r["seconds"] for r in unit_epochs if r["unit"] == "head"])),
            "peak_train_bytes_per_worker": noprop_worker_peak(summary, run.manifest),
            "rss_bytes_per_worker": max(r.get("rss_bytes", 0) for r in unit_epochs if r["unit"] != "head"),
            "launch_seconds": summary.get("launch_to_first_step_s"),
            "peer_bytes_per_epoch_per_worker": in_group_bytes(summary, unit_epochs),
            "coordinator_cpu_share": summary.get("coordinator_cpu_share"),
            "checkpoints_by_workers": summary.get("checkpoints_by_workers"),
            "plan": summary.get("plan", []),
        })
    else:
        per_epoch = summary["epoch_seconds"]
        epoch_seconds = float(np.mean(per_epoch))
        record.update({
            "comm_bytes_per_epoch": float(summary["allreduce_bytes_per_worker_per_epoch"]),
            "allreduce_calls_per_epoch": int(np.mean([r.get("allreduce_calls_per_worker", 0)
                                                      for r in run.events("unit_epoch")])),
            "peak_train_bytes_per_worker": int(summary["peak_memory_bytes"]["network"]),
            "rss_bytes_per_worker": int(summary["rss_bytes"]),
            "launch_seconds": wall - summary["train_seconds"] - summary["eval_seconds"],
        })
    record.update({"epoch_seconds": epoch_seconds, "samples_per_second": n / epoch_seconds})
    return record


def in_group_bytes(summary: dict, unit_epochs: list[dict]) -> float:
    """Gradient bytes the busiest NoProp worker sends per epoch inside its replica groups: each
    of its replicas all-reduces the gradient payload its unit counted in a ring of the group's
    r members, 2 (r - 1) / r of it per member (the BatchNorm statistics, a few kB, are apart).
    0 when no unit is split."""
    sent: dict[str, list[float]] = {}
    for r in unit_epochs:
        k = r.get("workers", 1)
        if k > 1 and "allreduce_grad_bytes_per_worker" in r:
            sent.setdefault(r["unit"], []).append(2 * (k - 1) / k * r["allreduce_grad_bytes_per_worker"])
    per_worker = [sum(float(np.mean(sent[n.split("[")[0]])) for n in label.split("+") if n.split("[")[0] in sent)
                  for label in summary.get("worker_devices", {})]
    return max(per_worker, default=0.0)


def noprop_worker_peak(summary: dict, manifest: dict) -> int:
    """Peak training bytes of the busiest NoProp worker: the block it trains at its peak,
    plus, on the CPU, the resident state (checkpointed tensors) of the other blocks it hosts
    (on a GPU those are moved off the device between their epochs)."""
    peaks = summary["peak_memory_bytes"]
    units = manifest["units"]
    on_gpu = any(str(d).startswith("cuda") for d in summary.get("worker_devices", {}).values())
    worst = 0
    for hosted in summary.get("worker_devices", {}):
        names = [n.split("[")[0] for n in hosted.split("+") if n != "head"]   # "block_05[1of2]": a replica
        if not names:
            continue
        resident = 0 if on_gpu else sum(units[n]["bytes"] for n in names)
        for name in names:
            worst = max(worst, peaks[name] + resident - (0 if on_gpu else units[name]["bytes"]))
    return int(worst)


def median_record(trials: list[dict]) -> dict:
    """The trial with the median epoch time, carrying every trial's epoch time."""
    ordered = sorted(trials, key=lambda r: r["epoch_seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": len(trials),
            "epoch_seconds_trials": [r["epoch_seconds"] for r in trials]}


def add_ratios(records: list[dict]) -> None:
    """Speed-up and efficiency of each run against its own method's N = 1."""
    base = {r["method"]: r["epoch_seconds"] for r in records if r["workers"] == 1}
    for r in records:
        if r["method"] in base and not r.get("logical"):      # logical workers share the cores: no speed figure
            r["speedup"] = base[r["method"]] / r["epoch_seconds"]
            r["efficiency"] = r["speedup"] / r["workers"]


# ---------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------
def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def markdown_table(records: list[dict]) -> str:
    head = ("| method | N | s / epoch (median; all runs) | samples/s | speed-up | efficiency | "
            "peak train MB / worker | RSS MB / worker | comm MB / epoch | in-group MB / worker / epoch | test acc. |")
    rows = [head, "|" + "---|" * 11]
    for r in records:
        trials = ", ".join(f"{t:.2f}" for t in r.get("epoch_seconds_trials", [r["epoch_seconds"]]))
        rows.append(
            f"| {r['method']} | {r['workers']}{' (logical)' if r.get('logical') else ''} | "
            f"{r['epoch_seconds']:.2f} ({trials}) | {r['samples_per_second']:.0f} | "
            f"{r.get('speedup', float('nan')):.2f}x | {r.get('efficiency', float('nan')):.2f} | "
            f"{r['peak_train_bytes_per_worker'] / 1e6:.1f} | {r['rss_bytes_per_worker'] / 1e6:.0f} | "
            f"{r['comm_bytes_per_epoch'] / 1e6:.3f} | {fmt(_mb(r.get('peer_bytes_per_epoch_per_worker')), '.2f')} | "
            f"{r['test_accuracy']:.4f} |")
    return "\n".join(rows) + "\n"


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in records}, key=METHODS.index)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for m in methods:
        rs = sorted((r for r in records if r["method"] == m), key=lambda r: r["workers"])
        n = [r["workers"] for r in rs]
        axes[0].plot(n, [r.get("speedup", np.nan) for r in rs], marker="o", label=m)
        axes[1].plot(n, [r["peak_train_bytes_per_worker"] / 1e6 for r in rs], marker="o", label=m)
        sent = [(r["workers"], r["comm_bytes_per_epoch"] / 1e6) for r in rs if r["comm_bytes_per_epoch"] > 0]
        axes[2].plot([w for w, _ in sent], [b for _, b in sent], marker="o", label=m)   # 0 bytes: no point
        axes[3].plot([r["epoch_seconds"] * r["epochs"] for r in rs], [r["test_accuracy"] for r in rs],
                     marker="o", linestyle="none", label=m)
        for r in rs:
            axes[3].annotate(f"N={r['workers']}", (r["epoch_seconds"] * r["epochs"], r["test_accuracy"]),
                             fontsize=7, xytext=(3, 3), textcoords="offset points")
    ns = sorted({r["workers"] for r in records})
    axes[0].plot(ns, ns, color="grey", linestyle=":", label="ideal")
    axes[0].set(xlabel="workers N", ylabel="speed-up vs own N = 1", title="speed-up")
    axes[1].set(xlabel="workers N", ylabel="MB", title="peak training memory per worker")
    axes[2].set(xlabel="workers N", ylabel="MB per epoch (per DDP worker; NoProp: all)",
                title="bytes communicated per epoch (none: no point)", yscale="log")
    axes[3].set(xlabel="training wall time (s)", ylabel="test accuracy", title="accuracy vs wall time")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (method, N); the median is reported")
    add_smoke(parser, "tiny preset, 1 epoch: < 2 minutes")
    parser.add_argument("--out", default="benchmarks/results/vs_ddp")
    parser.add_argument("--address", default="", help="Ray cluster to run on (default: a private local Ray)")
    parser.add_argument("--logical-cpus", type=int, default=0,
                        help="give the private local Ray this many logical CPUs, so that N beyond this machine's "
                             "cores can run (e.g. T = 10 on 20 workers): such points are marked logical and "
                             "measure correctness, bytes and memory, not speed")
    add_overrides(parser)
    args = parse_args(parser)            # config overrides too, e.g. --data.root=/shared/torchvision
    ray_environment(args.address)   # before anything imports Ray: closed as the CLI's
    preset = "tiny" if args.smoke else args.config
    epochs = 1 if args.smoke else args.epochs
    cfg = config.resolve(preset, {"train.epochs": epochs, "train.threads": 1, "cluster.threads_per_worker": 1,
                                  "cluster.address": args.address,
                                  **({"cluster.local_cpus": args.logical_cpus} if args.logical_cpus else {}),
                                  **args.overrides})
    cores = os.cpu_count() or 1
    timed = [n for n in args.workers if n <= cores] if not args.address else args.workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from noprop_dist.data import load_dataset
    from noprop_dist.trainers.ray.cluster import connect

    data = load_dataset(cfg.data)
    torch.set_num_threads(1)
    print(f"[vs_ddp] profiling bare step loops ({preset}, batch {cfg.train.batch_size})", flush=True)
    profile = profile_steps(cfg, data, [cfg.train.batch_size, cfg.train.batch_size // 2], args.profile_steps)
    lean = lean_loop(cfg, data)
    bare_epoch = lean["bare_seconds"]
    link = measure_local_link()
    ceiling = hardware_parallel_efficiency(cfg, max(timed)) if timed and max(timed) > 1 else None
    connect(cfg.cluster)
    runs_dir = out / "runs"
    trials: dict[tuple[str, int], list[dict]] = {}
    # Repeats go round-robin over the configurations, so that a slow spell of a shared
    # machine spreads over all of them instead of hitting one.
    for repeat in range(args.repeats):
        for method in args.methods:
            for workers in args.workers:
                tag = f"{method}-{workers}" + (f"-r{repeat}" if args.repeats > 1 else "")
                print(f"[vs_ddp] {tag} ...", flush=True)
                rec = {**run_method(method, workers, cfg, fresh_dir(runs_dir / tag)), "logical": workers not in timed}
                trials.setdefault((method, workers), []).append(rec)
                print(f"[vs_ddp] {tag}: {rec['epoch_seconds']:.2f} s/epoch, acc {rec['test_accuracy']:.4f}, "
                      f"{rec['peak_train_bytes_per_worker'] / 1e6:.1f} MB/worker", flush=True)
    records = [median_record(trials[(m, n)]) for m in args.methods for n in args.workers]
    add_ratios(records)
    # Per-unit coordinator bytes and the head's epoch do not depend on N: the fewest workers' run.
    noprop_1 = min((r for r in records if r["method"] == "noprop"), key=lambda r: r["workers"], default=None)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor(),
                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "ray": __import__("ray").__version__},
        "config": config.to_dict(cfg),
        "profile": {
            "T": cfg.schedule.T, "train_examples": len(data.train), "global_batch": cfg.train.batch_size,
            **profile,
            "head_epoch_seconds": noprop_1["head_epoch_seconds"] if noprop_1 else 0.0,
            "noprop_control_bytes_per_unit_epoch": (noprop_1["comm_control_bytes_per_epoch"] / (cfg.schedule.T + 1)
                                                    if noprop_1 else 0.0),
            "noprop_checkpoint_bytes_per_unit_epoch": (noprop_1["comm_checkpoint_bytes_per_epoch"] / (cfg.schedule.T + 1)
                                                       if noprop_1 else 0.0),
            "checkpoint_every": cfg.train.checkpoint_every,
            "local_link": link,
            "bare_block_epoch_seconds": bare_epoch,
            "lean_loop_in_process": lean,
            "hardware_parallel": ceiling,
        },
        "runs": records,
    }
    table = markdown_table(records)
    lean_text = (f"\nUnit loop in this process: {lean['unit_seconds']:.3f} s per block-epoch; bare step loop "
                 f"{lean['bare_seconds']:.3f} s; ratio {lean['ratio']:.3f}\n")
    if noprop_1 and noprop_1["workers"] <= cores:
        lean_text += (f"\nNoProp block-epoch (median, Ray worker, 1 thread, N = {noprop_1['workers']}): "
                      f"{noprop_1['block_epoch_seconds']:.3f} s; "
                f"bare step loop of the same block: {bare_epoch:.3f} s; ratio "
                f"{noprop_1['block_epoch_seconds'] / bare_epoch:.3f}\n")
    for r in records:
        if r["method"] == "noprop" and r.get("coordinator_cpu_share") is not None:
            lean_text += (f"\nNoProp N = {r['workers']}: coordinator CPU {r['coordinator_cpu_share']:.2%} of the training "
                          f"phase; {r.get('checkpoints_by_workers') or 0} checkpoints written by the workers, "
                          f"{r['comm_checkpoint_bytes_per_epoch'] / 1e6:.3f} MB of checkpoints and "
                          f"{r['comm_control_bytes_per_epoch'] / 1e3:.1f} kB of control through the coordinator per epoch\n")
    if ceiling:
        lean_text += (f"\nMachine ceiling: the bare block loop alone {ceiling['alone_seconds']:.3f} s; "
                 f"{ceiling['processes']} at once (no Ray) {max(ceiling['concurrent_seconds']):.3f} s: "
                 f"parallel efficiency {ceiling['efficiency']:.2f}\n")
    if args.smoke:
        results["note"] = SMOKE_NOTE
        lean_text += f"\n{SMOKE_NOTE}\n"
    write_results(out, results, f"# NoProp-DT vs DDP backprop ({results['date']}, {preset})\n\n{table}{lean_text}")
    plot(records, out)
    print(table + lean_text)
    try:
        import cost_model

        print(cost_model.format_check(cost_model.check_against_measured(results["profile"], records)))
    except (ImportError, AttributeError) as exc:
        print(f"[vs_ddp] cost model check skipped ({exc})")
    if args.smoke:
        print(SMOKE_NOTE)
    print(f"[vs_ddp] wrote {out / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
