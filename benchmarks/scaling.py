"""Scaling of the Ray trainer: the same T blocks trained by 1 worker versus W workers.

Each configuration trains every block of the same run (same data, seed and epochs) with
``threads_per_worker`` threads per worker; only the number of block workers changes. We
report the training phase's wall time (first dispatch to last result), the speed-up, the
time from launch to the first training step, and the share of the training phase the
coordinator spent sampling and dispatching targets.

    python benchmarks/scaling.py                      # demo data, T=10, 1 vs 2 workers
    python benchmarks/scaling.py --smoke              # seconds: tiny preset (--smoke-test: the same)
    python benchmarks/scaling.py --workers 1 2 4 --epochs 2 --ship-targets tensors
    python benchmarks/scaling.py --epochs 1 --workers 2 --override model.dropout=0.2

Writes scaling.json into a fresh temporary directory and prints where (or to --out FILE).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import SMOKE_NOTE, add_overrides, add_smoke, default_out, parse_args, ray_environment, train, write_json
from noprop_dist import config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ship-targets", default="recipe", choices=["recipe", "tensors"])
    parser.add_argument("--address", default="", help="Ray cluster to use (default: a private local Ray)")
    add_smoke(parser, "tiny preset, for CI")
    add_overrides(parser)
    parser.add_argument("--out", help="results file (default: scaling.json in a new temporary directory)")
    args = parse_args(parser)
    ray_environment(args.address)   # before anything imports Ray: closed as the CLI's
    preset = "tiny" if args.smoke else args.config

    from noprop_dist.trainers.ray.cluster import connect

    rows = []
    with tempfile.TemporaryDirectory(prefix="noprop-scaling-") as tmp:
        for workers in args.workers:
            cfg = config.resolve(preset, {
                "cluster.backend": "ray", "cluster.workers": workers, "cluster.address": args.address,
                "cluster.threads_per_worker": args.threads_per_worker, "cluster.ship_targets": args.ship_targets,
                "train.epochs": args.epochs, **args.overrides})
            connect(cfg.cluster)        # Ray's start-up stays out of the wall time
            summary, wall = train(cfg, Path(tmp) / f"w{workers}")
            rows.append({"workers": workers, "threads_per_worker": args.threads_per_worker,
                         "train_seconds": summary["train_seconds"],
                         "wall_seconds": wall,
                         "launch_to_first_step_s": summary["launch_to_first_step_s"],
                         "dispatch_share": summary["dispatch_share"],
                         "target_share": summary["target_share"],
                         "bytes_to_workers": summary["bytes_to_workers"],
                         "bytes_from_workers": summary["bytes_from_workers"],
                         "test_accuracy": summary["test_accuracy"]})
    base = rows[0]["train_seconds"]
    print(f"preset {preset}, T={cfg.schedule.T}, epochs {args.epochs}, targets {args.ship_targets}")
    print(f"{'workers':>7} {'train s':>8} {'speed-up':>8} {'launch->step s':>14} {'dispatch %':>10} {'targets %':>9} {'acc':>6}")
    for row in rows:
        row["speedup_vs_first"] = base / row["train_seconds"]
        print(f"{row['workers']:>7} {row['train_seconds']:>8.1f} {row['speedup_vs_first']:>8.2f} "
              f"{row['launch_to_first_step_s']:>14.1f} {100 * row['dispatch_share']:>10.3f} "
              f"{100 * row['target_share']:>9.3f} {row['test_accuracy']:>6.3f}")
    if args.smoke:
        print(SMOKE_NOTE)
    out = write_json(args.out or default_out("scaling.json"), {"preset": preset, "epochs": args.epochs, "rows": rows})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
