"""`noprop-dist eval` checks its memory as `train` does (issue 19, item 5): its forward passes are
sized to this machine's free memory, as a run's final evaluation's are (the scores do not depend
on that size), and it refuses in one line where not even one example fits."""

from __future__ import annotations

import pytest

from noprop_dist.cli import main
from noprop_dist.run import results
from noprop_dist.rundir import RunDir
from noprop_dist.training.preflight import MEMORY_HEADROOM, estimate_step
from noprop_dist.variants.registry import get_variant


def pass_budget(run_dir, examples: int) -> int:
    """Free bytes in which a forward pass of ``examples`` (and not one more) fits, from the run's probe."""
    predictor = get_variant("dt").load(RunDir(run_dir))
    setup = predictor.setup
    step = estimate_step(setup.objective.step_probe(setup, 0), predictor.cfg.eval.batch_size, "images")
    fixed = step.activation_bytes - step.per_example_bytes * step.batch_size
    return int((fixed + examples * step.per_example_bytes) / MEMORY_HEADROOM) + 1


def test_eval_runs_in_passes_that_fit_a_tight_memory_and_scores_the_same(trained_run, monkeypatch, capsys):
    run_dir, summary = trained_run
    budget = pass_budget(run_dir, 7)
    monkeypatch.setattr(results, "device_memory_budget", lambda device: budget)
    scores = results.evaluate_run(run_dir)
    assert scores["eval_forward_batch"] == 7 < scores["eval_batch_size"]
    assert scores["test_accuracy"] == summary["test_accuracy"]
    assert scores["chain_accuracy_noise"] == summary["chain_accuracy_noise"]
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (f"forward passes of 7 examples: eval.batch_size={scores['eval_batch_size']} does not fit this "
            "machine's free memory (the scores do not depend on the pass size)") in out.splitlines()


def test_eval_with_room_for_the_whole_batch_says_nothing_of_it(trained_run, capsys):
    run_dir, _ = trained_run
    assert main(["eval", str(run_dir)]) == 0
    assert "forward passes" not in capsys.readouterr().out


@pytest.mark.parametrize("room", [0, 1])
def test_eval_refuses_in_one_line_where_not_one_example_fits(trained_run, monkeypatch, capsys, room):
    run_dir, _ = trained_run
    budget = pass_budget(run_dir, 1) - 2 if room else 1000     # -2: its share is below one example's pass
    monkeypatch.setattr(results, "device_memory_budget", lambda device: budget)
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("noprop-dist: error: one evaluation pass of the ") and "for a single example but " \
        "this machine has about " in err[0] and err[0].endswith("free; free memory (or evaluate on a machine with "
                                                              "more) and run eval again")
