"""End to end: the tiny preset learns, is deterministic (golden run), resumes exactly, and its
evaluation never looks at labels except to score (NOPROP.md mistake 6)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from noprop_dist.rundir import RunDir
from noprop_dist.cli import main
from noprop_dist.data import ArraySplit
from noprop_dist.trainers.local import train_local
from noprop_dist.run.results import evaluate_run
from noprop_dist.training.runner import UnitRunner

UNIT_NAMES = ["block_01", "block_02", "block_03", "block_04", "head"]
CHANCE = 0.1  # 10 digit classes
ACCURACY_FLOOR = 0.6  # the tiny preset reaches 0.84-0.90 (seeds 0-4); chance is 0.1


def unit_hashes(run_dir) -> dict[str, str]:
    """SHA-256 of every unit file and of the embedding, read from disk (not from the manifest)."""
    files = sorted((run_dir / "units").glob("*.safetensors")) + [run_dir / "embedding.safetensors"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def scores(summary: dict) -> dict:
    keys = ("test_accuracy", "chain_accuracy_noise", "chain_accuracy_no_noise",
            "nearest_accuracy_noise", "nearest_accuracy_no_noise", "block_alone_accuracy")
    return {k: summary[k] for k in keys}


def test_tiny_run_learns(trained_run):
    """The chain's test accuracy is far above chance, with and without the Eq. 3 noise."""
    _, summary = trained_run
    assert summary["test_accuracy"] >= ACCURACY_FLOOR, summary
    assert summary["chain_accuracy_no_noise"] >= ACCURACY_FLOOR
    assert summary["nearest_accuracy_no_noise"] >= ACCURACY_FLOOR
    # Each block alone on fresh noise is also a classifier from x (NOPROP.md section 5).
    assert all(acc > 2 * CHANCE for acc in summary["block_alone_accuracy"].values())


def test_golden_determinism(trained_run, tiny_cfg, tmp_path):
    """Training the same config again gives bit-identical unit files and identical scores."""
    run_dir, summary = trained_run
    again = train_local(tiny_cfg, tmp_path / "again", show_progress=False)
    assert scores(again) == scores(summary)
    first, second = RunDir(run_dir), RunDir(tmp_path / "again")
    for name in UNIT_NAMES:
        a, b = first.load_unit(name), second.load_unit(name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert unit_hashes(tmp_path / "again") == unit_hashes(run_dir)  # byte-reproducible files


def test_resume_of_a_finished_run_retrains_nothing(run_copy, capsys):
    """`train --resume` on a finished run trains no epoch and rewrites no unit file."""
    before_hashes = unit_hashes(run_copy)
    before_units = json.loads((run_copy / "manifest.json").read_text())["units"]
    before_epochs = len([r for r in RunDir(run_copy).read_metrics() if r["event"] == "unit_epoch"])
    summary_before = json.loads((run_copy / "summary.json").read_text())
    assert main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert unit_hashes(run_copy) == before_hashes
    assert json.loads((run_copy / "manifest.json").read_text())["units"] == before_units
    after_epochs = len([r for r in RunDir(run_copy).read_metrics() if r["event"] == "unit_epoch"])
    assert after_epochs == before_epochs
    summary_after = json.loads((run_copy / "summary.json").read_text())
    assert summary_after["test_accuracy"] == summary_before["test_accuracy"]
    assert summary_after["unit_epochs_done"] == summary_before["unit_epochs_done"]


class SimulatedCrash(Exception):
    pass


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
def test_resume_after_a_crash_equals_an_uninterrupted_run(trained_run, tiny_cfg, tmp_path, monkeypatch):
    """A run killed in epoch 4 (after blocks 1-2 trained it, before block 3) and resumed ends with
    the same unit files and scores as the uninterrupted run."""
    run_dir, summary = trained_run
    crash_at = (3, 4)
    assert tiny_cfg.train.epochs > crash_at[1] and tiny_cfg.train.checkpoint_every == 1
    original = UnitRunner.run_epoch

    def crashing(self, epoch, *args, **kwargs):
        if (self.unit.index, epoch) == crash_at:
            raise SimulatedCrash
        return original(self, epoch, *args, **kwargs)

    target = tmp_path / "crashed"
    monkeypatch.setattr(UnitRunner, "run_epoch", crashing)
    with pytest.raises(SimulatedCrash):
        train_local(tiny_cfg, target, show_progress=False)
    monkeypatch.undo()
    units = RunDir(target).manifest()["units"]
    assert {entry["epochs_done"] for entry in units.values()} == {crash_at[1] - 1}
    resumed = train_local(tiny_cfg, target, resume=True, show_progress=False)
    assert unit_hashes(target) == unit_hashes(run_dir)
    assert scores(resumed) == scores(summary)


def test_evaluation_does_not_peek_at_labels(trained_run, digits):
    """Scored against permuted labels, the same images give chance accuracy: the labels only
    score the predictions, no latent is built from them (NOPROP.md mistake 6)."""
    run_dir, summary = trained_run
    x, y = np.asarray(digits.test.x), np.asarray(digits.test.y)
    real = evaluate_run(run_dir, ArraySplit(x, y.copy()))
    assert real["test_accuracy"] == summary["test_accuracy"] >= ACCURACY_FLOOR
    permuted_y = np.random.default_rng(0).permutation(y)
    assert (permuted_y != y).mean() > 0.8
    fake = evaluate_run(run_dir, ArraySplit(x, permuted_y))
    for key in ("test_accuracy", "chain_accuracy_no_noise", "nearest_accuracy_no_noise"):
        assert fake[key] < 0.25, (key, fake[key])
    assert all(acc < 0.25 for acc in fake["block_alone_accuracy"].values())


def test_predictions_do_not_depend_on_the_labels(trained_run, digits):
    """Scored against constant labels k = 0..9, the accuracies are the shares of predictions equal
    to k; if the predictions ignore the labels, these shares sum to exactly 1 for every metric."""
    run_dir, _ = trained_run
    x = np.asarray(digits.test.x)
    shares = [evaluate_run(run_dir, ArraySplit(x, np.full(len(x), k, dtype=np.int64)))
              for k in range(digits.num_classes)]
    for key in ("chain_accuracy_noise", "chain_accuracy_no_noise", "nearest_accuracy_noise"):
        assert sum(s[key] for s in shares) == pytest.approx(1.0, abs=1e-6), key
    for block in shares[0]["block_alone_accuracy"]:
        assert sum(s["block_alone_accuracy"][block] for s in shares) == pytest.approx(1.0, abs=1e-6)
    assert max(s["test_accuracy"] for s in shares) < 0.5  # no single class dominates



def test_resume_of_a_finished_run_changes_nothing_in_the_run_directory(run_copy, capsys):
    """Issue 7, item 4: a resume with nothing to do used to re-evaluate and rewrite
    summary.json with peak_memory_bytes reset to 0. Now every file keeps its bytes."""
    before = {p: p.read_bytes() for p in sorted(run_copy.rglob("*")) if p.is_file()}
    assert json.loads((run_copy / "summary.json").read_text())["peak_memory_bytes"]["block_01"] > 0
    assert main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in sorted(run_copy.rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
@pytest.mark.parametrize("embedding", ["one_hot", "learned"])
def test_eval_every_scores_the_chain_of_that_epoch(embedding, tiny_config, tmp_path):
    """``--eval.every 1`` on a 2-epoch run records at epoch 1 exactly the scores of a 1-epoch run
    of the same seed (same weights, same evaluation), and does not change the training."""
    over = {"model.embedding": embedding}
    two = train_local(tiny_config({**over, "train.epochs": "2", "eval.every": "1"}), tmp_path / "two",
                      show_progress=False)
    one = train_local(tiny_config({**over, "train.epochs": "1"}), tmp_path / "one", show_progress=False)
    plain = train_local(tiny_config({**over, "train.epochs": "2"}), tmp_path / "plain", show_progress=False)
    evals = [r for r in RunDir(tmp_path / "two").read_metrics() if r.get("event") == "eval"]
    assert [r["epoch"] for r in evals] == [1]
    assert evals[0]["chain_accuracy_noise"] == one["chain_accuracy_noise"]
    assert evals[0]["chain_accuracy_no_noise"] == one["chain_accuracy_no_noise"]
    assert evals[0]["best_block_alone"] == max(one["block_alone_accuracy"].values())
    assert two["test_accuracy"] == plain["test_accuracy"] and two["eval_every_seconds"] > 0
    assert (tmp_path / "two" / "training.png").stat().st_size > (tmp_path / "plain" / "training.png").stat().st_size
