"""NoProp-DT, -CT and -FM at the same wall-time budget, and CT/FM inference against steps.

Every setting trains on the embedded MNIST subset (4,000 train / 1,000 test, ``small``
block, one-hot, no dropout: the ``demo`` family of presets) with the command a user runs
(``noprop-dist train``, in a subprocess). For an equal budget the script first trains one
epoch of the setting to time it, then trains ``max(1, floor(budget / epoch seconds))``
epochs from scratch and reports the test accuracy and the training time it took (the DDP
trainer's includes Ray Train's start-up; the epochs alone are shown beside it). Settings:

* ``dt``: NoProp-DT on Ray (the ``demo`` preset: 10 blocks and the head on the workers).
* ``ct_time_K1`` / ``fm_time_K1``: one network (``continuous.intervals=1``), one worker.
* ``ct_time_K2`` / ``fm_time_K2``: time-partitioned, two interval networks on two Ray workers.
* ``ct_ddp_1`` / ``ct_ddp_2``, ``fm_ddp_1`` / ``fm_ddp_2``: one network, data-parallel with
  DDP on 1 or 2 Ray Train workers (``--cluster.backend=ddp``).

Then, for each finished CT/FM run, inference at ``--steps`` integration steps (default 10,
100, 1000): accuracy and seconds per 1,000 test images (``eval.batch_size`` 500, this
process's torch threads).

    python benchmarks/variants.py --out benchmarks/results/variants                  # all, 150 s
    python benchmarks/variants.py --out DIR --budget 60 --only dt fm_time_K1          # a subset
    python benchmarks/variants.py --smoke --out /tmp/variants                         # tiny, CI

Results are written after every run (``DIR/results.json``, ``DIR/results.md``). Timing on a
shared machine is meaningless: run it alone (2 cores here: one setting at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

COMMON = ["--model.dropout=0", "--no-progress"]
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
SMOKE = {"--config": "tiny"}


def cli() -> list[str]:
    return [sys.executable, "-m", "noprop_dist.cli"]


def train(args: list[str], run_dir: Path, epochs: int, smoke: bool) -> dict[str, Any]:
    """One ``noprop-dist train`` run; returns its summary.json. A finished run of the same
    epochs in ``run_dir`` is read, not retrained; an unfinished one (this script's own) is
    started again."""
    if (run_dir / "summary.json").exists():
        done = json.loads((run_dir / "summary.json").read_text())
        if done.get("epochs") == epochs:
            return done
    if run_dir.exists():
        shutil.rmtree(run_dir)
    argv = list(args)
    if smoke:
        argv[argv.index("--config") + 1] = "tiny"
        argv += ["--continuous.steps=8"]
    cmd = cli() + ["train", *argv, *COMMON, f"--train.epochs={epochs}", "--run-dir", str(run_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def epoch_cost(summary: dict[str, Any]) -> float:
    """Seconds of one training epoch: the DDP trainer's own per-epoch figure (its
    ``train_seconds`` also holds Ray Train's start-up, 10-15 s here), else the training
    phase's seconds per epoch (the Ray and local trainers time only their training phase)."""
    if summary.get("epoch_seconds"):
        return sum(summary["epoch_seconds"]) / len(summary["epoch_seconds"])
    return summary["train_seconds"] / summary["epochs"]


def steps_sweep(run_dir: Path, steps: list[int]) -> list[dict[str, Any]]:
    """Accuracy and seconds per 1,000 images of a CT/FM run at each number of steps."""
    from noprop_dist.run.rundir import RunDir
    from noprop_dist.nets.time_conditioned import CTChain, evaluate_continuous
    from noprop_dist.training.common import load_run_units

    setup, cfg, _, states, embedding = load_run_units(RunDir(run_dir))
    from noprop_dist.data import load_dataset

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


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def write(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# NoProp variants at {meta['budget']} s of training (MNIST subset)", "",
             f"Machine: {meta['machine']}; command: `{meta['command']}`", "",
             "| setting | epoch s (probe) | epochs | train s (epochs alone) | test accuracy | CT: no noise | workers |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "summary" not in r:
            continue
        s = r["summary"]
        lines.append(f"| {name} | {fmt(r['probe_seconds'], '.1f')} | {r['epochs']} | {fmt(s['train_seconds'], '.1f')} "
                     f"({fmt(r.get('epochs_seconds'), '.1f')}) | "
                     f"{fmt(s['test_accuracy'])} | {fmt(s.get('chain_accuracy_no_noise'))} | {s.get('workers', '')} |")
    lines += ["", "## Inference against integration steps (seconds per 1,000 test images)", "",
              "| setting | steps | accuracy | CT: no noise | s / 1,000 images |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for row in r.get("steps", []):
            lines.append(f"| {name} | {row['steps']} | {fmt(row['accuracy'])} | "
                         f"{fmt(row.get('accuracy_no_noise'))} | {fmt(row['seconds_per_1000'], '.2f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/variants")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per setting")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1 epoch, 2 settings: seconds")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or (["fm_time_K1", "ct_time_K2"] if args.smoke else list(SETTINGS))
    steps = [2, 4] if args.smoke else args.steps
    meta = {"budget": args.budget, "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, cuda={torch.cuda.is_available()}"}
    previous = json.loads((out / "results.json").read_text())["results"] if (out / "results.json").exists() else {}
    results: dict[str, Any] = dict(previous)
    for name in names:
        probe = train(SETTINGS[name], out / "runs" / f"{name}-probe", 1, args.smoke) if not args.smoke else None
        epoch_seconds = epoch_cost(probe) if probe else 0.0
        epochs = 1 if args.smoke else max(1, math.floor(args.budget / epoch_seconds))
        summary = train(SETTINGS[name], out / "runs" / name, epochs, args.smoke)
        results[name] = {"args": SETTINGS[name], "probe_seconds": epoch_seconds, "epochs": epochs,
                         "summary": {k: summary.get(k) for k in (
                             "test_accuracy", "chain_accuracy_noise", "chain_accuracy_no_noise", "train_seconds",
                             "wall_seconds", "workers", "backend", "steps", "seconds_per_1000_images")},
                         "epochs_seconds": epoch_cost(summary) * epochs}
        if not name.startswith("dt"):
            results[name]["steps"] = steps_sweep(out / "runs" / name, steps)
        write(out, results, meta)
        print(f"{name}: {epochs} epochs, {summary['train_seconds']:.1f} s, accuracy {summary['test_accuracy']:.3f}",
              flush=True)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
