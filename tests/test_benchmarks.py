"""Smoke runs of every benchmark script (their --smoke-test mode), as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NOPROP_DATA_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_scaling_benchmark_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run(["benchmarks/scaling.py", "--smoke-test", "--workers", "1", "2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["train_seconds"] > 0 and 0 <= r["target_share"] < 1 for r in rows)
    assert "speed-up" in proc.stdout


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    proc = run(["benchmarks/memory.py", "--smoke-test", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["block"]: r for r in json.loads(out.read_text())}
    # The paper block holds more than the small one, which holds more than the tiny one.
    assert rows["paper"]["peak_bytes"] > rows["small"]["peak_bytes"] > rows["tiny"]["peak_bytes"] > 0
    # At least parameters + gradients + two AdamW moments (4 copies of float32 weights).
    assert rows["paper"]["peak_bytes"] >= 4 * 4 * rows["paper"]["parameters"]


@pytest.mark.slow
def test_report_on_a_run(tmp_path):
    env_cache = f"--data.cache_dir={tmp_path / 'cache'}"
    proc = run(["-m", "noprop_dist.cli", "train", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
                "--cluster.backend=local", "--no-progress", "--train.epochs=1", env_cache], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(["benchmarks/report.py", str(tmp_path / "run"), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["seconds_per_epoch_per_block"] > 0 and report["T"] == 4


@pytest.mark.slow
def test_noprop_vs_ddp_benchmark_smoke(tmp_path):
    """The comparison benchmark as a user runs it: every method at N = 1 and 2, well-formed
    records, the markdown table, the plot, and the cost model's check against the runs."""
    out = tmp_path / "vs_ddp"
    proc = run(["benchmarks/noprop_vs_ddp.py", "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["workers"]): r for r in results["runs"]}
    assert set(runs) == {(m, n) for m in ("noprop", "backprop", "backprop_cnn") for n in (1, 2)}
    for r in runs.values():
        for key in ("epoch_seconds", "samples_per_second", "peak_train_bytes_per_worker", "comm_bytes_per_epoch",
                    "test_accuracy", "speedup", "efficiency", "rss_bytes_per_worker"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, (r["method"], r["workers"], key)
        assert 0 <= r["test_accuracy"] <= 1
    # With one worker nothing is all-reduced; with two every gradient is, each step.
    assert runs[("backprop", 1)]["comm_bytes_per_epoch"] == 0
    assert runs[("backprop", 2)]["comm_bytes_per_epoch"] >= results["profile"]["param_bytes"]["backprop"]
    # NoProp: control messages are small, checkpoints are the bulk.
    assert 0 < runs[("noprop", 2)]["comm_control_bytes_per_epoch"] < runs[("noprop", 2)]["comm_checkpoint_bytes_per_epoch"]
    for name in ("results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    assert "| noprop | 2 |" in (out / "results.md").read_text()
    assert "within 15%" in proc.stdout


@pytest.mark.slow
def test_variants_benchmark_smoke(tmp_path):
    """benchmarks/variants.py end to end on the tiny preset: FM with one network on one Ray
    worker, CT time-partitioned on two; each with its accuracy and the steps sweep."""
    out = tmp_path / "variants"
    proc = run(["benchmarks/variants.py", "--smoke", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"fm_time_K1", "ct_time_K2"}
    assert results["ct_time_K2"]["summary"]["workers"] == 2 and results["fm_time_K1"]["summary"]["workers"] == 1
    for r in results.values():
        assert 0 <= r["summary"]["test_accuracy"] <= 1
        assert [row["steps"] for row in r["steps"]] == [2, 4]
        assert all(row["seconds_per_1000"] > 0 for row in r["steps"])
    assert "accuracy_no_noise" in results["ct_time_K2"]["steps"][0]
    assert "| ct_time_K2 |" in (out / "results.md").read_text()
