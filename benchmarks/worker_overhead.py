"""What a Ray worker adds to a block-epoch: the same unit's epochs in this process and in the
trainer's own worker actor, alternated, beside the bare step loop.

One block of the preset is trained epoch by epoch twice, from the same seed: by a
:class:`~noprop_dist.training.runner.UnitRunner` in this process, and by a
:class:`~noprop_dist.trainers.ray.worker.UnitWorker` on a private local Ray (the training split
from the object store, one thread, as the trainer starts it). Epoch e of one and epoch e of the
other are the same computation (same seed, order, targets and dropout), run one after the
other, so their ratio is the worker's own cost, whatever else the machine is doing at that
moment; the bare step loop (no data gathering, logging or accounting) is timed beside them.
Nothing else trains meanwhile: unlike a benchmark run of the trainer, no other unit (the head)
or worker shares the machine.

    python benchmarks/worker_overhead.py                   # demo preset, 5 epochs
    python benchmarks/worker_overhead.py --epochs 8 --config mnist
    python benchmarks/worker_overhead.py --smoke           # tiny preset, 2 epochs

Writes worker_overhead.json and .md to ``--out`` (default: a fresh temporary directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    add_overrides, add_smoke, default_out, fmt, md_table, parse_args, ray_environment, report
)
from noprop_dist import config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    add_smoke(parser, "tiny preset, 2 epochs")
    add_overrides(parser)
    args = parse_args(parser)
    preset, epochs = ("tiny", 2) if args.smoke else (args.config, args.epochs)
    cfg = config.resolve(preset, {**args.overrides, "train.threads": "1", "cluster.backend": "ray"})
    out = args.out or default_out("worker_overhead").parent

    ray_environment()
    import ray

    from noprop_dist.config import ClusterConfig
    from noprop_dist.data import load_dataset
    from noprop_dist.trainers.ray.cluster import connect
    from noprop_dist.trainers.ray.worker import UnitWorker
    from noprop_dist.training.runner import UnitRunner
    from noprop_dist.variants.base import make_setup
    from noprop_vs_ddp import bare_block_epoch_seconds

    torch.set_num_threads(1)
    data = load_dataset(cfg.data)
    setup = make_setup(cfg, data)
    unit = [u for u in setup.units if u.role != "head"][1]
    connect(ClusterConfig(backend="ray", local_cpus=2))     # the trainer's private Ray, its workers' priority
    try:
        refs = (ray.put(np.ascontiguousarray(data.train.x)), ray.put(np.ascontiguousarray(data.train.y)))
        worker = UnitWorker.options(num_cpus=1, max_restarts=0).remote(setup, *refs, 1)
        ray.get(worker.start_unit.remote(unit, None))
        ray.get(worker.join_run.remote(None, None))
        here = UnitRunner(unit, setup, data.train)
        rows = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            here.run_epoch(epoch)
            in_process = time.perf_counter() - start
            result = ray.get(worker.run_epoch.remote(unit.name, epoch, None, None, False, False))
            in_worker = result["metrics"]["seconds"]
            bare = bare_block_epoch_seconds(cfg, data)
            rows.append({"epoch": epoch, "in_process_s": in_process, "in_worker_s": in_worker, "bare_s": bare,
                         "worker_over_process": in_worker / in_process, "process_over_bare": in_process / bare,
                         "worker_over_bare": in_worker / bare})
            print(f"[worker_overhead] epoch {epoch}: in process {in_process:.3f} s, in the worker "
                  f"{in_worker:.3f} s, bare loop {bare:.3f} s", flush=True)
    finally:
        ray.shutdown()
    counted = rows[1:] if len(rows) > 1 else rows     # the first epoch warms caches and allocators
    med = {k: statistics.median(r[k] for r in counted)
           for k in ("in_process_s", "in_worker_s", "bare_s", "worker_over_process", "process_over_bare",
                     "worker_over_bare")}
    result = {"preset": preset, "unit": unit.name, "epochs": epochs, "rows": rows, "median": med}
    lines = [f"# A Ray worker's block-epoch against the same epoch in process ({preset}, {unit.name}, "
             f"1 thread, median of epochs 2-{epochs})" if len(rows) > 1 else f"# ({preset}, 1 epoch)", "",
             *md_table(["", "seconds", "ratio"],
                       [["bare step loop", fmt(med["bare_s"]), "1.000"],
                        ["unit loop in this process", fmt(med["in_process_s"]), fmt(med["process_over_bare"])],
                        ["unit loop in a Ray worker", fmt(med["in_worker_s"]), fmt(med["worker_over_bare"])]]),
             "", f"Ray worker / in process, epoch by epoch: median {med['worker_over_process']:.3f} "
                 f"(range {min(r['worker_over_process'] for r in counted):.3f}-"
                 f"{max(r['worker_over_process'] for r in counted):.3f})"]
    report(out, result, lines, "worker_overhead", args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
