"""Smoke runs of every benchmark script (their --smoke-test mode), as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NOPROP_DATA_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_scaling_benchmark_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run(["benchmarks/scaling.py", "--smoke-test", "--workers", "1", "2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["train_seconds"] > 0 and 0 <= r["target_share"] < 1 for r in rows)
    assert "speed-up" in proc.stdout


def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    proc = run(["benchmarks/memory.py", "--smoke-test", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["block"]: r for r in json.loads(out.read_text())}
    # The paper block holds more than the small one, which holds more than the tiny one.
    assert rows["paper"]["peak_bytes"] > rows["small"]["peak_bytes"] > rows["tiny"]["peak_bytes"] > 0
    # At least parameters + gradients + two AdamW moments (4 copies of float32 weights).
    assert rows["paper"]["peak_bytes"] >= 4 * 4 * rows["paper"]["parameters"]


def test_report_on_a_run(tmp_path):
    env_cache = f"--data.cache_dir={tmp_path / 'cache'}"
    proc = run(["-m", "noprop_dist.cli", "train", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
                "--cluster.backend=local", "--no-progress", "--train.epochs=1", env_cache], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(["benchmarks/report.py", str(tmp_path / "run"), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["seconds_per_epoch_per_block"] > 0 and report["T"] == 4
