"""Start-up: where the seconds from launching ``noprop-dist train`` to its first training step go.

Each repeat launches the CLI as a user does (a fresh process; the Ray backend starts its own
closed private Ray) on a fresh run directory and reads back:

* launch -> first step, timed from here: the moment before the process was started to the
  earliest ``first_step_at`` in its metrics (what a user waits for; needs nothing of the run
  but its metrics, so it also measures an older checkout, ``--repo``);
* the run's own phases (summary.json ``startup_s``: interpreter and imports, data, setup,
  connect, place, start workers, preflight, open, workers, to the first step) and, on Ray,
  the start-up of the worker that was ready last (``worker_startup_s``: process, imports,
  data, units, join).

    python benchmarks/startup.py                                  # demo, Ray, 3 repeats
    python benchmarks/startup.py --backend local --repeats 5
    python benchmarks/startup.py --repo /tmp/old-checkout         # the same for another checkout
    python benchmarks/startup.py --smoke                          # tiny preset, 1 repeat

The first repeat also warms the dataset cache and the OS page cache; the table gives the
median of the repeats after it (all of them with ``--repeats 1``). Writes startup.json and
startup.md to ``--out`` (default: a fresh temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_overrides, add_smoke, default_out, fmt, md_table, parse_args, report
from noprop_dist.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


def launch_once(repo: Path, python: str, preset: str, backend: str, overrides: dict[str, str],
                run_dir: Path) -> dict[str, Any]:
    args = [python, "-m", "noprop_dist.cli", "train", "--config", preset, f"--cluster.backend={backend}",
            "--train.epochs=1", "--run-dir", str(run_dir), "--no-progress",
            *[f"--{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    launched = time.time()
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"startup: the run failed ({' '.join(args)}):\n{done.stderr[-2000:]}")
    run = RunDir(run_dir)
    firsts = [r["first_step_at"] for r in run.read_metrics()
              if r.get("event") == "unit_epoch" and r.get("first_step_at")]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"launch_to_first_step_s": min(firsts) - launched,
            "phases": [list(p) for p in summary.get("startup_s", [])],
            "worker_phases": [list(p) for p in summary.get("worker_startup_s", [])]}


def medians(rows: list[list[list]]) -> list[tuple[str, float]]:
    """Per phase (in the order of the first row), the median over rows that have it."""
    if not rows or not rows[0]:
        return []
    names = [name for name, _ in rows[0]]
    return [(name, statistics.median(dict(map(tuple, r)).get(name, 0.0) for r in rows)) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--backend", default="ray", choices=["ray", "local"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to launch (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="its interpreter (default: this one)")
    parser.add_argument("--out", type=Path, default=None)
    add_smoke(parser, "tiny preset, 1 repeat")
    add_overrides(parser)
    args = parse_args(parser)
    preset, repeats = ("tiny", 1) if args.smoke else (args.config, args.repeats)
    out = args.out or default_out("startup").parent
    runs = []
    with tempfile.TemporaryDirectory(prefix="noprop-startup-") as tmp:
        for i in range(repeats):
            record = launch_once(args.repo.resolve(), args.python, preset, args.backend, args.overrides,
                                 Path(tmp) / f"run{i}")
            print(f"[startup] repeat {i + 1}/{repeats}: launch -> first step {record['launch_to_first_step_s']:.2f} s",
                  flush=True)
            runs.append(record)
    counted = runs[1:] if len(runs) > 1 else runs
    result = {"preset": preset, "backend": args.backend, "repo": str(args.repo.resolve()), "repeats": repeats,
              "overrides": args.overrides, "runs": runs,
              "median_launch_to_first_step_s": statistics.median(r["launch_to_first_step_s"] for r in counted),
              "median_phases": medians([r["phases"] for r in counted]),
              "median_worker_phases": medians([r["worker_phases"] for r in counted])}
    lines = [f"# Start-up: {preset}, {args.backend} backend, median of {len(counted)} launch(es)"
             + (" after a warm-up launch" if len(runs) > 1 else ""), "",
             f"Launch -> first step: **{result['median_launch_to_first_step_s']:.2f} s** (timed by the benchmark)", ""]
    if result["median_phases"]:
        lines += md_table(["phase (driver)", "seconds"], [[n, fmt(s, ".2f")] for n, s in result["median_phases"]])
    if result["median_worker_phases"]:
        lines += ["", *md_table(["phase (the last worker ready, from its spawn)", "seconds"],
                                [[n, fmt(s, ".2f")] for n, s in result["median_worker_phases"]])]
    report(out, result, lines, "startup", args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
