"""Print the figures of a finished run directory: accuracies, seconds per epoch per block,
memory and traffic. Used for the README's results and the closing notes of issues.

    python benchmarks/report.py RUN_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from common import FinishedRun, read_run
from noprop_dist.errors import NoPropError


def report(run_dir: str) -> dict:
    run = read_run(run_dir)
    summary = run.summary
    per_unit: dict[str, list[float]] = {}
    for rec in run.events("unit_epoch"):
        per_unit.setdefault(rec["unit"], []).append(rec["seconds"])
    blocks = {u: statistics.mean(s) for u, s in per_unit.items() if u != "head"}
    return {
        **worker_busy(run),
        "variant": summary.get("variant", "dt"), "intervals": summary.get("intervals"), "steps": summary.get("steps"),
        "dataset": summary["dataset"], "block": summary["block"], "T": summary["T"],
        "epochs": summary["epochs"], "backend": summary["backend"], "workers": summary["workers"],
        "test_accuracy": summary["test_accuracy"],
        "chain_accuracy_noise": summary.get("chain_accuracy_noise"),
        "chain_accuracy_no_noise": summary.get("chain_accuracy_no_noise"),
        "block_alone_accuracy": summary.get("block_alone_accuracy", {}),
        "train_seconds": summary["train_seconds"],
        "seconds_per_epoch_per_block": statistics.mean(blocks.values()) if blocks else None,
        "seconds_per_epoch_by_block": blocks,
        "peak_memory_mb": {u: b / 2**20 for u, b in summary.get("peak_memory_bytes", {}).items()},
        "bytes_to_workers": summary.get("bytes_to_workers"),
        "bytes_from_workers": summary.get("bytes_from_workers"),
        "launch_to_first_step_s": summary.get("launch_to_first_step_s"),
        "target_share": summary.get("target_share"),
    }


def worker_busy(run: FinishedRun) -> dict:
    """How busy each Ray block worker was: the sum of its unit-epochs' seconds against the
    training phase, and the gaps between one unit-epoch's end and the next one's start (both
    from the metrics' wall-clock times), over this session's records."""
    by_worker: dict[int, list[dict]] = {}
    for rec in run.events("unit_epoch"):
        if rec.get("worker") and rec.get("unit") != "head":
            by_worker.setdefault(rec["worker"], []).append(rec)
    if not by_worker:
        return {"worker_busy_seconds": {}, "worker_gap_seconds_max": None}
    gaps = []
    for recs in by_worker.values():
        recs.sort(key=lambda r: r["time"])
        gaps += [b["time"] - b["seconds"] - a["time"] for a, b in zip(recs, recs[1:])]
    return {"worker_busy_seconds": {str(w): sum(r["seconds"] for r in recs) for w, recs in by_worker.items()},
            "worker_gap_seconds_max": max(gaps) if gaps else 0.0,
            "worker_gap_seconds_median": statistics.median(gaps) if gaps else 0.0}


def shape(r: dict[str, Any]) -> str:
    """What the run trains, for the report's first line: DT's T blocks, CT/FM's interval
    networks, or a back-propagation baseline's one network."""
    variant = r.get("variant", "dt")
    if variant == "dt":
        return f"T={r['T']}"
    if variant in ("ct", "fm"):
        return f"{r.get('intervals') or 1} interval network(s), {r.get('steps')} integration steps"
    return "one network trained end to end by back-propagation"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        r = report(args.run_dir)
    except NoPropError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r.get('variant', 'dt')}: {r['dataset']}, block {r['block']}, {shape(r)}, {r['epochs']} epochs, "
          f"{r['backend']} backend, {r['workers']} worker(s)")
    print(f"test accuracy: {r['test_accuracy']:.4f}")
    if r["chain_accuracy_noise"] is not None:
        noise = "Eq. 3 noise" if r.get("variant", "dt") == "dt" else "step noise "
        print(f"test accuracy (chain, {noise}): {r['chain_accuracy_noise']:.4f}")
        print(f"test accuracy (chain, no noise):    {r['chain_accuracy_no_noise']:.4f}")
        if r.get("block_alone_accuracy"):
            print("each block alone on fresh noise:    " + " ".join(
                f"{v:.2f}" for _, v in sorted(r["block_alone_accuracy"].items())))
    print(f"training phase: {r['train_seconds']:.1f} s; seconds per epoch per unit: "
          f"{r['seconds_per_epoch_per_block']:.2f}")
    if r["worker_busy_seconds"]:
        busy = ", ".join(f"{v:.1f}" for v in r["worker_busy_seconds"].values())
        print(f"block workers busy {busy} s of the {r['train_seconds']:.1f} s training phase; gap between "
              f"unit-epochs on a worker: median {r['worker_gap_seconds_median'] * 1e3:.0f} ms, "
              f"max {r['worker_gap_seconds_max'] * 1e3:.0f} ms")
    mem = [v for u, v in r["peak_memory_mb"].items() if u != "head"]
    if mem:
        print(f"peak training memory per block worker: {max(mem):.1f} MB")
    if r["bytes_to_workers"] is not None:
        print(f"bytes to workers {r['bytes_to_workers']:,}, from workers {r['bytes_from_workers']:,}; "
              f"launch to first step {r['launch_to_first_step_s']:.1f} s")
    if r["target_share"] is not None:
        print(f"target sampling + dispatch: {100 * r['target_share']:.3f}% of the training phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
