"""NoProp-DT, -CT and -FM at the same wall-time budget, and CT/FM inference against steps.

Every setting trains on the embedded MNIST subset (4,000 train / 1,000 test, ``small``
block, one-hot, no dropout: the ``demo`` family of presets) with the command a user runs
(``noprop-dist train``, in a subprocess). For an equal budget the script first trains
``PROBE_EPOCHS`` (3) epochs of the setting to time a steady epoch (wall seconds from the end
of the first epoch to the end of the last, :func:`epoch_wall`: the first epoch's one-off
costs left out), then trains ``max(1, floor(budget / epoch seconds))`` epochs from scratch
and reports the test accuracy and the training time it took (with the one-off costs: the
DDP trainer's includes Ray Train's start-up; the epochs alone are shown beside it). Settings:

* ``dt``: NoProp-DT on Ray (the ``demo`` preset: 10 blocks and the head on the workers).
* ``ct_time_K1`` / ``fm_time_K1``: one network (``continuous.intervals=1``), one worker.
* ``ct_time_K2`` / ``fm_time_K2``: time-partitioned, two interval networks on two Ray workers.
* ``ct_ddp_1`` / ``ct_ddp_2``, ``fm_ddp_1`` / ``fm_ddp_2``: one network, data-parallel with
  DDP on 1 or 2 Ray Train workers (``--cluster.backend=ddp``).

Then, for each finished CT/FM run, inference at ``--steps`` integration steps (default 10,
100, 1000): accuracy and seconds per 1,000 test images (``eval.batch_size`` 500, this
process's torch threads). ``--eval-every N`` also evaluates every N epochs during the timed
run (``--eval.every``; the epochs are fixed by the probe before, so the points do not change
them) and reports the curve and its largest fall between consecutive points after the first.

    python benchmarks/variants.py --out benchmarks/results/variants                  # all, 150 s
    python benchmarks/variants.py --out DIR --budget 60 --only dt fm_time_K1          # a subset
    python benchmarks/variants.py --out DIR --budget 120 --only ct_time_K1 --eval-every 4   # with CT's curve
    python benchmarks/variants.py --smoke --out /tmp/variants                         # tiny, CI

Results are written after every run (``DIR/results.json``, ``DIR/results.md``). Timing on a
shared machine is meaningless: run it alone (2 cores here: one setting at a time).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common import add_smoke, fmt, md_table, read_json, read_run, ray_environment, run_or_reuse, write_results
from noprop_dist import config
from noprop_dist.cli import parse_overrides

COMMON = ["--model.dropout=0"]
SETTINGS: dict[str, list[str]] = {
    "dt": ["--config", "demo"],
    "ct_time_K1": ["--config", "demo_ct", "--variant=ct", "--continuous.intervals=1", "--cluster.backend=ray", "--cluster.workers=1"],
    "ct_time_K2": ["--config", "demo_ct", "--variant=ct", "--continuous.intervals=2", "--cluster.backend=ray", "--cluster.workers=2"],
    "ct_ddp_1": ["--config", "demo_ct", "--variant=ct", "--continuous.intervals=1", "--cluster.backend=ddp", "--cluster.workers=1"],
    "ct_ddp_2": ["--config", "demo_ct", "--variant=ct", "--continuous.intervals=1", "--cluster.backend=ddp", "--cluster.workers=2"],
    "fm_time_K1": ["--config", "demo_fm", "--variant=fm", "--continuous.intervals=1", "--cluster.backend=ray", "--cluster.workers=1"],
    "fm_time_K2": ["--config", "demo_fm", "--variant=fm", "--continuous.intervals=2", "--cluster.backend=ray", "--cluster.workers=2"],
    "fm_ddp_1": ["--config", "demo_fm", "--variant=fm", "--continuous.intervals=1", "--cluster.backend=ddp", "--cluster.workers=1"],
    "fm_ddp_2": ["--config", "demo_fm", "--variant=fm", "--continuous.intervals=1", "--cluster.backend=ddp", "--cluster.workers=2"],
}


def command(name: str, epochs: int, smoke: bool, eval_every: int = 0) -> tuple[list[str], config.Config]:
    """The ``noprop-dist train`` arguments of a setting and the config they resolve to (through
    the command's own parser of overrides)."""
    argv = [*SETTINGS[name], *COMMON, f"--train.epochs={epochs}"]
    if eval_every:
        argv.append(f"--eval.every={eval_every}")
    if smoke:
        argv[argv.index("--config") + 1] = "tiny"
        argv += ["--continuous.steps=8"]
    at = argv.index("--config")
    return argv, config.resolve(argv[at + 1], parse_overrides(argv[:at] + argv[at + 2:]))


def train(name: str, run_dir: Path, epochs: int, smoke: bool, eval_every: int = 0) -> dict[str, Any]:
    """One ``noprop-dist train`` run, in a subprocess; returns its summary.json (with the
    subprocess's ``wall_seconds``). A finished run of the same config in ``run_dir`` is read,
    not retrained (``wall_seconds`` None); anything else there is removed first."""
    argv, cfg = command(name, epochs, smoke, eval_every)

    def in_subprocess(_cfg, path: Path, _resume: bool) -> tuple[dict[str, Any], float]:
        cmd = [sys.executable, "-m", "noprop_dist.cli", "train", *argv, "--no-progress", "--run-dir", str(path)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return read_run(path).summary, time.perf_counter() - start

    summary, wall = run_or_reuse(cfg, run_dir, replace=True, trainer=in_subprocess)
    return {**summary, "wall_seconds": wall}


PROBE_EPOCHS = 3
"""Epochs of the probe run that times a setting: the first one's one-off costs (workers'
start, a first epoch's warm-up) are left out of the epoch time (:func:`epoch_wall`)."""


def epoch_wall(run_dir: Path) -> float:
    """Wall seconds of one steady training epoch of a finished run: from the end of its first
    epoch to the end of its last (an epoch ends when its last unit reports), divided by the
    epochs between. The units of a Ray epoch overlap and a DDP run's start-up (Ray Train's,
    10-15 s here) comes before its first epoch's end, so this is the same figure for every
    trainer. A one-epoch run (the smoke test) falls back to its training seconds."""
    finished = read_run(run_dir)
    ends: dict[int, float] = {}
    for r in finished.metrics:
        if r.get("event") == "unit_epoch":
            ends[r["epoch"]] = max(ends.get(r["epoch"], 0.0), r["time"])
    if len(ends) < 2:
        return finished.summary["train_seconds"] / finished.summary["epochs"]
    first, last = min(ends), max(ends)
    return (ends[last] - ends[first]) / (last - first)


def accuracy_curve(run_dir: Path) -> dict[str, Any]:
    """The ``--eval.every`` points of a run (epoch, accuracy with the run's headline noise
    setting, and CT's without the step noise) and the largest fall between consecutive points
    after the first (the issue-17 criterion: at most 0.02)."""
    points = [{"epoch": r["epoch"], "accuracy": r["test_accuracy"], "no_noise": r.get("chain_accuracy_no_noise")}
              for r in read_run(run_dir).metrics if r.get("event") == "eval" and r.get("epoch") is not None]
    falls = [a["accuracy"] - b["accuracy"] for a, b in zip(points[1:], points[2:])]
    return {"points": points, "largest_fall": max([0.0, *falls])}


def steps_sweep(run_dir: Path, steps: list[int]) -> list[dict[str, Any]]:
    """Accuracy and seconds per 1,000 images of a CT/FM run at each number of steps."""
    from noprop_dist.data import load_dataset
    from noprop_dist.nets.time_conditioned import CTChain, evaluate_continuous
    from noprop_dist.rundir import RunDir
    from noprop_dist.variants.base import load_run_units

    setup, cfg, _, states, embedding = load_run_units(RunDir(run_dir))
    test = load_dataset(cfg.data).test
    rows = []
    for s in steps:
        chain = setup.objective.chain(replace(setup, continuous=replace(setup.continuous, steps=s)), states, embedding)
        noisy = evaluate_continuous(chain, test, cfg.eval.batch_size, cfg.eval.seed, "cpu", True)
        row = {"steps": s, "accuracy": noisy["accuracy"], "seconds_per_1000": 1000 * noisy["seconds"] / len(test)}
        if isinstance(chain, CTChain):
            row["accuracy_no_noise"] = evaluate_continuous(chain, test, cfg.eval.batch_size, cfg.eval.seed, "cpu",
                                                           False)["accuracy"]
        rows.append(row)
    return rows


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = [[name, fmt(r["probe_seconds"], ".1f"), r["epochs"],
             f"{fmt(r['summary']['train_seconds'], '.1f')} ({fmt(r.get('epochs_seconds'), '.1f')})",
             fmt(r["summary"]["test_accuracy"]), fmt(r["summary"].get("chain_accuracy_no_noise")),
             r["summary"].get("workers", "")]
            for name, r in results.items() if "summary" in r]
    steps = [[name, row["steps"], fmt(row["accuracy"]), fmt(row.get("accuracy_no_noise")),
              fmt(row["seconds_per_1000"], ".2f")]
             for name, r in results.items() for row in r.get("steps", [])]
    lines = [f"# NoProp variants at {meta['budget']} s of training (MNIST subset)", "",
             f"Machine: {meta['machine']}; command: `{meta['command']}`", ""]
    lines += md_table(["setting", "epoch s (probe)", "epochs", "train s (epochs alone)", "test accuracy",
                       "CT: no noise", "workers"], rows)
    curves = [[name, " ".join(f"{p['epoch']}: {fmt(p['accuracy'])}" for p in r["curve"]["points"]),
               fmt(r["curve"]["largest_fall"])] for name, r in results.items() if r.get("curve")]
    if curves:
        lines += ["", "## Test accuracy during the timed run (--eval-every)", ""]
        lines += md_table(["setting", "epoch: accuracy", "largest fall after the first point"], curves)
    lines += ["", "## Inference against integration steps (seconds per 1,000 test images)", ""]
    lines += md_table(["setting", "steps", "accuracy", "CT: no noise", "s / 1,000 images"], steps)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/variants")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per setting")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N epochs of the timed run and report the curve (0: at the end only)")
    add_smoke(parser, "tiny preset, 1 epoch, 2 settings: seconds")
    args = parser.parse_args()
    ray_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or (["fm_time_K1", "ct_time_K2"] if args.smoke else list(SETTINGS))
    steps = [2, 4] if args.smoke else args.steps
    meta = {"budget": args.budget, "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, cuda={torch.cuda.is_available()}"}
    results: dict[str, Any] = dict(read_json(out / "results.json", {}).get("results", {}))
    for name in names:
        if args.smoke:
            epoch_seconds, epochs = 0.0, 1
        else:
            train(name, out / "runs" / f"{name}-probe", PROBE_EPOCHS, smoke=False)
            epoch_seconds = epoch_wall(out / "runs" / f"{name}-probe")
            epochs = max(1, math.floor(args.budget / epoch_seconds))
        summary = train(name, out / "runs" / name, epochs, args.smoke, args.eval_every)
        results[name] = {"args": SETTINGS[name], "probe_seconds": epoch_seconds, "epochs": epochs,
                         "summary": {k: summary.get(k) for k in (
                             "test_accuracy", "chain_accuracy_noise", "chain_accuracy_no_noise", "train_seconds",
                             "wall_seconds", "workers", "backend", "steps", "seconds_per_1000_images")},
                         "epochs_seconds": epoch_wall(out / "runs" / name) * epochs}
        if args.eval_every:
            results[name]["curve"] = accuracy_curve(out / "runs" / name)
        if not name.startswith("dt"):
            results[name]["steps"] = steps_sweep(out / "runs" / name, steps)
        write_results(out, {"meta": meta, "results": results}, markdown(results, meta))
        print(f"{name}: {epochs} epochs, {summary['train_seconds']:.1f} s, accuracy {summary['test_accuracy']:.3f}",
              flush=True)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
