"""Scaling of the Ray trainer: the same T blocks trained by 1 worker versus W workers.

Each configuration trains every block of the same run (same data, seed and epochs) with
``threads_per_worker`` threads per worker; only the number of block workers changes. We
report the training phase's wall time (first dispatch to last result), the speed-up, the
time from launch to the first training step, and the share of the training phase the
coordinator spent sampling and dispatching targets.

    python benchmarks/scaling.py                      # demo data, T=10, 1 vs 2 workers
    python benchmarks/scaling.py --smoke-test         # seconds: tiny preset
    python benchmarks/scaling.py --workers 1 2 4 --epochs 2 --ship-targets tensors

Writes benchmarks/results/scaling.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noprop_dist import config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ship-targets", default="recipe", choices=["recipe", "tensors"])
    parser.add_argument("--address", default="", help="Ray cluster to use (default: a private local Ray)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny preset, for CI")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.dropout=0.2 (the demo preset's value before issue 10)")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    preset = "tiny" if args.smoke_test else args.config

    from noprop_dist.trainers.ray.coordinator import connect
    from noprop_dist.trainers.ray.coordinator import train_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="noprop-scaling-") as tmp:
        for workers in args.workers:
            cfg = config.resolve(preset, {
                "cluster.backend": "ray", "cluster.workers": workers, "cluster.address": args.address,
                "cluster.threads_per_worker": args.threads_per_worker, "cluster.ship_targets": args.ship_targets,
                "train.epochs": args.epochs, **dict(kv.split("=", 1) for kv in args.override)})
            connect(cfg.cluster)
            start = time.perf_counter()
            summary = train_ray(cfg, Path(tmp) / f"w{workers}", show_progress=False)
            rows.append({"workers": workers, "threads_per_worker": args.threads_per_worker,
                         "train_seconds": summary["train_seconds"],
                         "wall_seconds": time.perf_counter() - start,
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": preset, "epochs": args.epochs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
