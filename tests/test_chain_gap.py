"""Smoke run of benchmarks/chain_gap.py (issue 10, item 1) as a user runs it: the tiny
preset, one epoch, two settings; the results files carry what docs/chain_gap.md reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chain_gap_smoke(tmp_path):
    out = tmp_path / "chain_gap"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NOPROP_DATA_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "benchmarks/chain_gap.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "tiny"
    settings = results["settings"]
    assert set(settings) == {"baseline", "abar_max_0.99"}
    for name, r in settings.items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("chain_accuracy_noise", "chain_accuracy_no_noise", "best_block_alone", "best_block_in_chain"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
        T = 4  # the tiny preset
        assert list(r["block_in_chain_accuracy"]) == [f"block_{t:02d}" for t in range(1, T + 1)]
        assert len(r["block_alone_accuracy"]) == T
        assert r["train_seconds"] > 0 and r["epochs"] == 1
        assert [p["epoch"] for p in r["curve"]] == [1]
        assert (out / "runs" / name / "summary.json").exists()
        a = r["analysis"]
        # The chain rebuilt from its checkpoints scores, through the package's evaluation, what the summary says.
        assert a["matches_summary"]
        assert len(a["eval_seeds"]["chain_accuracy_noise"]) == a["eval_seeds"]["k"] == 3
        for key in ("as_trained", "batch_statistics", "recomputed_q", "recomputed_chain"):
            assert 0.0 <= a["batchnorm"][key] <= 1.0, key
        assert len(a["sampling"]["block_alone_true_prob"]) == T
        assert 0.0 <= a["sampling"]["chain_vote_accuracy"] <= 1.0
    assert settings["abar_max_0.99"]["schedule"]["alpha_bar"][-1] == pytest.approx(0.99)
    gaps = results["schedule_gaps"]
    assert len(gaps["snr_gaps"]) == 4 and gaps["last_over_previous"] > 1
    md = (out / "results.md").read_text()
    assert "| baseline |" in md and "## Epoch curves" in md and "## Analyses" in md
