"""The run plot: per-unit training loss by epoch and the final test accuracies (any variant)."""

from __future__ import annotations

import io
import json

from noprop_dist.rundir import RunDir, atomic_write


def plot_run(run: RunDir) -> None:
    """Write training.png into the run directory from metrics.jsonl and summary.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses: dict[str, dict[int, float]] = {}
    records = run.read_metrics()
    for rec in records:
        if rec.get("event") == "unit_epoch":
            losses.setdefault(rec["unit"], {})[rec["epoch"]] = rec["loss"]
    summary = json.loads((run.path / "summary.json").read_text())
    curve = accuracy_curve(records, summary)

    if curve:
        fig, axes = plt.subplots(2, 2, figsize=(12, 9))
        (ax_loss, ax_acc), (ax_epoch, ax_time) = axes
        _plot_curve(ax_epoch, ax_time, curve)
    else:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for unit in sorted(losses):
        if unit == "head":
            continue
        epochs = sorted(losses[unit])
        ax_loss.plot(epochs, [losses[unit][e] for e in epochs], marker="o", label=unit)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    chain_run = "chain_accuracy_noise" in summary
    ax_loss.set_ylabel("weighted denoising loss" if chain_run else "cross-entropy")
    ax_loss.set_title("per-block training loss" if chain_run else f"{summary.get('variant', '')} training loss")
    ax_loss.legend(fontsize=7, ncol=2)

    if chain_run:
        names = ["chain, Eq.3 noise", "chain, no noise", "nearest emb."]
        values = [summary["chain_accuracy_noise"], summary["chain_accuracy_no_noise"],
                  summary["nearest_accuracy_no_noise"]]
    else:
        names, values = ["network"], [summary["test_accuracy"]]
    highlighted = len(values)
    for block, acc in sorted(summary.get("block_alone_accuracy", {}).items()):
        names.append(block.replace("block_", "b"))
        values.append(acc)
    ax_acc.bar(range(len(values)), values, color=["C0"] * highlighted + ["C7"] * (len(values) - highlighted))
    ax_acc.set_xticks(range(len(values)), names, fontsize=7, rotation=45, ha="right")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel("test accuracy")
    subtitle = "\ngrey: each block alone, fed fresh noise" if chain_run else ""
    ax_acc.set_title(f"test accuracy ({summary['dataset']}){subtitle}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(run.path / "training.png", buf.getvalue())


def accuracy_curve(records: list[dict], summary: dict) -> list[dict]:
    """(epoch, seconds since training started, chain accuracies, best block alone) at each
    ``--eval.every`` point, then the final evaluation; empty without ``eval`` events."""
    evals = [r for r in records if r.get("event") == "eval"]
    if not evals or "chain_accuracy_noise" not in summary:
        return []
    starts = [r["time"] - r["seconds"] for r in records if r.get("event") == "unit_epoch" and "seconds" in r]
    t0 = min(starts) if starts else evals[0]["time"]
    last = next((r for r in reversed(records) if r.get("event") == "evaluation"), None)
    points = [{**r, "at": r["time"] - t0} for r in evals]
    if last is not None:
        final = {"epoch": summary["epochs"], "at": last["time"] - t0,
                 "chain_accuracy_noise": summary["chain_accuracy_noise"],
                 "chain_accuracy_no_noise": summary["chain_accuracy_no_noise"]}
        if "block_alone_accuracy" in summary:   # DT only (CT has no blocks to score alone)
            final["best_block_alone"] = max(summary["block_alone_accuracy"].values())
        points.append(final)
    return points


def _plot_curve(ax_epoch, ax_time, curve: list[dict]) -> None:
    series = [("chain_accuracy_noise", "chain, Eq.3 noise"), ("chain_accuracy_no_noise", "chain, no noise"),
              ("best_block_alone", "best block alone")]
    for ax, x, label in ((ax_epoch, "epoch", "epoch"), (ax_time, "at", "seconds since training started")):
        for key, name in series:
            if all(key in p for p in curve):
                ax.plot([p[x] for p in curve], [p[key] for p in curve], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
    ax_epoch.set_title("test accuracy during training (--eval.every)", fontsize=10)
    ax_time.set_title("against wall time (training and evaluation)", fontsize=10)
