"""The analytic cost model (benchmarks/cost_model.py): its formulas against hand values, the
shape of its projections (NoProp's speed-up T at N = T, DDP slower on slower links), its
self-consistency check, and the command line as a user runs it."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cost_model as cm  # noqa: E402

from noprop_dist.trainers.ray.plan import plan_replicas, replica_load  # noqa: E402

pytestmark = pytest.mark.fast

T, EXAMPLES, BATCH = 10, 4096, 128          # 4096 = 32 full batches: step counts are exact
BLOCK_BYTES, CHAIN_BYTES, CNN_BYTES = 2_000_000, 20_000_000, 1_000_000
BLOCK_T0, BLOCK_T1 = 0.002, 1e-4            # one block step: 2 ms + 0.1 ms per example


def affine(t0: float, t1: float, batches=(64, 128)) -> dict[str, float]:
    return {str(b): t0 + b * t1 for b in batches}


@pytest.fixture
def profile() -> dict:
    return {
        "T": T, "train_examples": EXAMPLES, "global_batch": BATCH,
        "param_bytes": {"noprop_block": BLOCK_BYTES, "noprop_head": 440, "backprop": CHAIN_BYTES,
                        "backprop_cnn": CNN_BYTES},
        "step_seconds": {"noprop_block": affine(BLOCK_T0, BLOCK_T1), "backprop": affine(0.02, 1e-3),
                         "backprop_cnn": affine(0.001, 1e-4)},
        "head_epoch_seconds": 0.05,
        "noprop_control_bytes_per_unit_epoch": 900,
        "noprop_checkpoint_bytes_per_unit_epoch": 2_500_000,
        "checkpoint_every": 1,
        "local_link": {"bandwidth_Bps": 2.0e9, "latency_s": 6.0e-5},
    }


FAST = cm.Link(25e9, 5e-6)


# ---------------------------------------------------------------------------------------
# Formulas.
# ---------------------------------------------------------------------------------------
def test_ring_allreduce_hand_values():
    link = cm.Link(1e9, 1e-5)
    assert cm.ring_allreduce(1e6, 1, link) == (0.0, 0.0)
    seconds, sent = cm.ring_allreduce(1e6, 2, link)          # 2*(1/2)*P = P; 1 ms + 2 latencies
    assert sent == pytest.approx(1e6, rel=1e-12) and seconds == pytest.approx(1e-3 + 2e-5, rel=1e-12)
    seconds, sent = cm.ring_allreduce(1e6, 4, link)          # 2*(3/4)*P = 1.5 P; 6 latencies
    assert sent == pytest.approx(1.5e6, rel=1e-12) and seconds == pytest.approx(1.5e-3 + 6e-5, rel=1e-12)


def test_affine_fit_recovers_exact_data():
    fit = cm.fit_step_time(affine(0.004, 2.5e-4, batches=(32, 64, 128)))
    assert fit.t0 == pytest.approx(0.004, abs=1e-12) and fit.t1 == pytest.approx(2.5e-4, abs=1e-12)
    assert fit.note == ""


def test_affine_fit_one_batch_and_negative_intercept_are_said():
    one = cm.fit_step_time({"128": 0.64})
    assert (one.t0, one.t1) == (0.0, pytest.approx(0.005)) and "t0 = 0" in one.note
    # Super-linear in the batch: the free fit's intercept is negative; refitted through the origin.
    bent = cm.fit_step_time({"64": 0.45, "128": 0.95})
    assert bent.t0 == 0.0 and bent.t1 == pytest.approx((64 * 0.45 + 128 * 0.95) / (64**2 + 128**2))
    assert "t0 < 0" in bent.note


def test_data_parallel_plan_shares_the_fixed_global_batch():
    assert cm.data_parallel_plan(4000, 128, 1) == (32, 128, 4000, 128, False)
    assert cm.data_parallel_plan(4000, 128, 2) == (32, 64, 2000, 128, False)
    # Uneven shares: the slowest of 3 takes 43 of each 128 and 11 of the last 32.
    assert cm.data_parallel_plan(4000, 128, 3) == (32, 43, 31 * 43 + 11, 128, False)
    # More workers than the batch: one example each, the global batch grows to N.
    assert cm.data_parallel_plan(4000, 128, 256) == (16, 1, 16, 256, True)


def test_parse_link():
    assert cm.parse_link("wan=0.1:2000") == ("wan", cm.Link(1e8, 2e-3))
    assert cm.parse_link("ib") == ("ib", cm.PRESET_LINKS["ib"])
    for bad in ("nope", "x=1", "x=0:5", "=1:1"):
        with pytest.raises(ValueError):
            cm.parse_link(bad)


# ---------------------------------------------------------------------------------------
# NoProp.
# ---------------------------------------------------------------------------------------
def test_noprop_at_n_equals_t_speeds_up_t_with_no_worker_traffic(profile):
    r = cm.project_noprop(profile, T, FAST)
    assert r["speedup"] == pytest.approx(T, rel=1e-12) and r["efficiency"] == pytest.approx(1.0, rel=1e-12)
    assert r["peer_bytes_per_epoch_per_worker"] == 0 and r["allreduce_bytes_per_step_per_worker"] == 0
    # The worker sends only its block's control and checkpoint.
    assert r["comm_bytes_per_epoch_per_worker"] == pytest.approx(900 + 2_500_000)
    block_compute = 32 * BLOCK_T0 + EXAMPLES * BLOCK_T1
    assert r["compute_seconds"] == pytest.approx(block_compute, rel=1e-12)


def test_noprop_checkpoints_are_amortised_over_checkpoint_every(profile):
    sent = {every: cm.project_noprop({**profile, "checkpoint_every": every}, T, FAST)["comm_bytes_per_epoch_per_worker"]
            for every in (1, 2, 0)}
    assert sent == {1: pytest.approx(900 + 2_500_000), 2: pytest.approx(900 + 1_250_000), 0: pytest.approx(900)}
    seconds = [cm.project_noprop({**profile, "checkpoint_every": e}, T, FAST)["epoch_seconds"] for e in (1, 2, 0)]
    assert seconds[0] > seconds[1] > seconds[2]


def test_noprop_head_bounds_the_epoch(profile):
    slow_head = {**profile, "head_epoch_seconds": 100.0}
    r = cm.project_noprop(slow_head, T, FAST)
    assert r["epoch_seconds"] == pytest.approx(r["head_seconds"]) and r["head_seconds"] >= 100.0
    assert r["speedup"] < T and "the head sets the epoch" in r["notes"]


def test_noprop_uneven_counts_follow_the_trainers_plan(profile):
    """N = 4, T = 10: the trainer's planner gives each worker 2 whole blocks and one replica of
    a block split in two (round-robin would put 3 blocks on two workers). The busiest worker
    is one that also sends its split block's checkpoint (replica 0)."""
    four, ten = cm.project_noprop(profile, 4, FAST), cm.project_noprop(profile, T, FAST)
    assert four["plan"] == cm.noprop_plan(T, 4).lines() == plan_replicas({f"block_{t:02d}": 1.0 for t in range(1, T + 1)}, 4).lines()
    assert four["blocks_per_worker"] == pytest.approx(2 + replica_load(1.0, 2))
    whole, half = 32 * BLOCK_T0 + EXAMPLES * BLOCK_T1, 32 * BLOCK_T0 + EXAMPLES // 2 * BLOCK_T1
    assert four["compute_seconds"] == pytest.approx(2 * whole + half, rel=1e-12)
    allreduce = 32 * cm.ring_allreduce(BLOCK_BYTES, 2, FAST)[0]
    control = 900 / FAST.bandwidth_Bps + 2 * FAST.latency_s
    checkpoint = cm.message_seconds(2_500_000, FAST)
    assert four["epoch_seconds"] == pytest.approx(2 * whole + half + allreduce + 3 * (control + checkpoint), rel=1e-12)
    assert four["epoch_seconds"] < 3 * ten["epoch_seconds"]                 # round-robin's busiest worker
    assert four["peer_bytes_per_epoch_per_worker"] == pytest.approx(32 * BLOCK_BYTES, rel=1e-12)
    assert any("busiest worker trains 2.55 blocks' work (ideal 2.5)" in n for n in four["notes"])


def test_noprop_never_spreads_a_block_over_dozens_of_workers(profile):
    """T = 10 on 64: six replicas per block and 4 idle workers, as the trainer plans it
    (without the planner's split overhead one block would be split 64 ways)."""
    r = cm.project_noprop(profile, 64, FAST)
    assert r["replicas"] == 6 and r["idle_workers"] == 4 and r["batch_per_worker"] == math.ceil(BATCH / 6)


def test_noprop_replicas_all_reduce_the_block(profile):
    r = cm.project_noprop(profile, 2 * T, FAST)
    assert r["replicas"] == 2 and r["idle_workers"] == 0 and r["batch_per_worker"] == BATCH // 2
    assert r["allreduce_bytes_per_step_per_worker"] == pytest.approx(2 * (1 / 2) * BLOCK_BYTES, rel=1e-12)
    assert r["peer_bytes_per_epoch_per_worker"] == pytest.approx(32 * BLOCK_BYTES, rel=1e-12)
    leftover = cm.project_noprop(profile, 2 * T + 3, FAST)
    assert leftover["replicas"] == 2 and leftover["idle_workers"] == 3
    assert leftover["epoch_seconds"] == pytest.approx(r["epoch_seconds"], rel=1e-12)
    assert any("3 of 23 workers idle" in n for n in leftover["notes"])


# ---------------------------------------------------------------------------------------
# DDP.
# ---------------------------------------------------------------------------------------
def test_ddp_one_worker_is_pure_compute(profile):
    r = cm.project_ddp(profile, "backprop", 1, FAST)
    assert r["epoch_seconds"] == pytest.approx(32 * 0.02 + EXAMPLES * 1e-3, rel=1e-12)
    assert r["comm_bytes_per_epoch_per_worker"] == 0 and r["speedup"] == 1.0


def test_ddp_efficiency_falls_with_a_slow_link_and_rises_with_bandwidth(profile):
    for n in (2, 8, 64):
        fast = cm.project_ddp(profile, "backprop", n, FAST)
        slow = cm.project_ddp(profile, "backprop", n, cm.Link(0.1e9, 5e-6))
        assert slow["efficiency"] < fast["efficiency"] <= 1.0
    efficiencies = [cm.project_ddp(profile, "backprop", 8, cm.Link(bw, 5e-6))["efficiency"]
                    for bw in (0.1e9, 1e9, 10e9, 100e9)]
    assert all(a < b for a, b in zip(efficiencies, efficiencies[1:]))
    r = cm.project_ddp(profile, "backprop", 8, FAST)
    assert r["comm_bytes_per_epoch_per_worker"] == pytest.approx(32 * 2 * 7 / 8 * CHAIN_BYTES, rel=1e-12)


def test_ddp_overlap_hides_communication(profile):
    slow = cm.Link(1e9, 5e-6)
    seconds = [cm.project_ddp(profile, "backprop", 8, slow, overlap=f)["epoch_seconds"] for f in (0.0, 0.5, 1.0)]
    assert seconds[0] > seconds[1] > seconds[2]
    none_hidden = cm.project_ddp(profile, "backprop", 8, slow)
    all_hidden = cm.project_ddp(profile, "backprop", 8, slow, overlap=1.0)
    # Compute per step (20 ms + 16 * 1 ms) exceeds this all-reduce (~35 ms), so it all hides.
    assert all_hidden["epoch_seconds"] == pytest.approx(none_hidden["compute_seconds"], rel=1e-12)


def test_ddp_beyond_the_batch_grows_the_global_batch(profile):
    r = cm.project_ddp(profile, "backprop_cnn", 4 * BATCH, FAST)
    assert r["global_batch"] == 4 * BATCH and r["batch_per_worker"] == 1
    assert any("global batch grows" in n for n in r["notes"])


def test_small_allreduces_add_latency_only(profile):
    base = cm.project_ddp(profile, "backprop", 8, FAST)
    with_bn = cm.project_ddp({**profile, "small_allreduces_per_step": {"backprop": 120}}, "backprop", 8, FAST)
    assert with_bn["epoch_seconds"] - base["epoch_seconds"] == pytest.approx(32 * 120 * 2 * 7 * 5e-6, rel=1e-9)
    assert with_bn["comm_bytes_per_epoch_per_worker"] == base["comm_bytes_per_epoch_per_worker"]


# ---------------------------------------------------------------------------------------
# Projection, check, robustness.
# ---------------------------------------------------------------------------------------
def test_project_covers_every_link_n_and_method(profile):
    records = cm.project(profile, {"a": FAST, "b": cm.Link(1e9, 5e-5)}, [1, 2, 16])
    keys = {(r["link"], r["workers"], r["method"]) for r in records}
    assert keys == {(link, n, m) for link in "ab" for n in (1, 2, 16) for m in ("noprop", "backprop", "backprop_cnn")}
    for r in records:
        assert {"epoch_seconds", "speedup", "efficiency", "comm_bytes_per_epoch_per_worker", "notes"} <= set(r)


def test_missing_method_is_skipped_with_a_note(profile):
    partial = copy.deepcopy(profile)
    del partial["param_bytes"]["backprop"], partial["step_seconds"]["noprop_block"]
    methods = {r["method"] for r in cm.project(partial, {"a": FAST}, [1, 2])}
    assert methods == {"backprop_cnn"}
    notes = " ".join(cm.profile_notes(partial))
    assert "backprop: no parameter bytes" in notes and "noprop: no noprop_block" in notes


def model_runs(profile: dict) -> list[dict]:
    link = cm.local_link(profile)
    runs = []
    for n in (1, 2, 4):
        noprop = cm.project_noprop(profile, n, link)
        runs.append({"method": "noprop", "workers": n, "epoch_seconds": noprop["epoch_seconds"],
                     "comm_bytes_per_epoch": noprop["coordinator_bytes_per_epoch"], "test_accuracy": 0.9,
                     "peer_bytes_per_epoch_per_worker": noprop["peer_bytes_per_epoch_per_worker"]})
        for m in ("backprop", "backprop_cnn"):
            ddp = cm.project_ddp(profile, m, n, link)
            runs.append({"method": m, "workers": n, "epoch_seconds": ddp["epoch_seconds"],
                         "comm_bytes_per_epoch": ddp["comm_bytes_per_epoch_per_worker"]})
    return runs


def test_check_reports_zero_error_on_its_own_predictions(profile):
    rows = cm.check_against_measured(profile, model_runs(profile))
    assert {(r["method"], r["workers"]) for r in rows} == {(m, n) for m in ("noprop", "backprop", "backprop_cnn")
                                                             for n in (1, 2)}
    for r in rows:
        assert r["rel_error"] == pytest.approx(0.0, abs=1e-12) and r["within_tolerance"] is True
        assert r["bytes_rel_error"] == pytest.approx(0.0, abs=1e-12)


def test_check_compares_logical_runs_by_bytes_and_memory_only(profile):
    """N = 20 logical workers on a 2-core machine: the time says nothing; the bytes inside the
    replica groups (T = 10: two replicas per block) and what crossed the coordinator do."""
    link = cm.local_link(profile)
    pred = cm.project_noprop(profile, 2 * T, link)
    run = {"method": "noprop", "workers": 2 * T, "epoch_seconds": 99.0, "logical": True,
           "comm_bytes_per_epoch": pred["coordinator_bytes_per_epoch"],
           "peer_bytes_per_epoch_per_worker": 32 * BLOCK_BYTES}
    (row,) = cm.check_against_measured(profile, [run])
    assert row["rel_error"] is None and row["within_tolerance"] is None and "logical" in row["note"]
    assert row["bytes_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert row["predicted_peer_bytes"] == pytest.approx(row["measured_peer_bytes"], rel=1e-12)
    assert cm.check_against_measured(profile, [{**run, "logical": False}]) == []   # untimed N: skipped


def test_check_flags_a_run_the_model_misses(profile):
    runs = model_runs(profile)
    runs[0] = {**runs[0], "epoch_seconds": runs[0]["epoch_seconds"] / 1.3}       # measured faster
    runs.append({"method": "mystery", "workers": 2, "epoch_seconds": 1.0})
    rows = cm.check_against_measured(profile, runs)
    missed = next(r for r in rows if (r["method"], r["workers"]) == ("noprop", 1))
    assert missed["rel_error"] == pytest.approx(0.3) and missed["within_tolerance"] is False
    mystery = next(r for r in rows if r["method"] == "mystery")
    assert mystery["predicted_seconds"] is None and mystery["note"]
    table = cm.format_check(rows)
    assert "within 15%" in table and "| noprop | 1 |" in table and "NO" in table


def test_assumptions_are_listed():
    bullets = cm.assumptions()
    assert len(bullets) >= 10 and all(len(b) > 40 for b in bullets)
    text = " ".join(bullets).lower()
    for topic in ("ring", "overlap", "global batch", "affine", "idle", "head", "coordinator", "checkpoint",
                  "data loading"):
        assert topic in text, topic


# ---------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------
def test_cli_writes_projection(profile, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"profile": profile, "runs": model_runs(profile)}))
    out = tmp_path / "projection"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py"), str(results),
                           "--workers", "1,2,16,1024", "--link", "slow=0.5:100", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "within 15%" in proc.stdout and "### slow: 0.5 GB/s, 100 us" in proc.stdout
    assert "| N | NoProp s/epoch | NoProp eff. |" in proc.stdout and "| 1024 |" in proc.stdout
    projection = json.loads((out / "projection.json").read_text())
    assert {r["link"] for r in projection["records"]} == {"local", "slow"}          # --link replaced the presets
    assert len(projection["records"]) == 2 * 4 * 3 and projection["assumptions"] == cm.assumptions()
    assert "| 16 |" in (out / "projection.md").read_text()
    assert (out / "projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_bad_link(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py"), str(tmp_path / "x.json"),
                           "--link", "broken"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown link" in proc.stderr


def test_imports_neither_torch_nor_ray():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import cost_model; "
            "print(sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_memory_per_worker_follows_what_each_worker_holds(profile):
    """NoProp: one block's state and full-batch activations, plus (CPU only) the resident
    state of the other blocks it hosts; DDP: the whole network's state plus its share of
    the activations."""
    profile["memory"] = {
        "noprop_block": {"state_bytes": 8e6, "activation_bytes": 40e6, "resident_bytes": 6e6},
        "backprop": {"state_bytes": 80e6, "activation_bytes": 400e6, "resident_bytes": 60e6},
    }
    assert cm.memory_per_worker(profile, "noprop", 1, on_gpu=True) == pytest.approx(48e6)
    assert cm.memory_per_worker(profile, "noprop", 1, on_gpu=False) == pytest.approx(48e6 + 9 * 6e6)
    assert cm.memory_per_worker(profile, "noprop", 2, on_gpu=False) == pytest.approx(48e6 + 4 * 6e6)
    assert cm.memory_per_worker(profile, "noprop", 2 * T, on_gpu=True) == pytest.approx(8e6 + 20e6)
    assert cm.memory_per_worker(profile, "backprop", 1) == pytest.approx(480e6)
    assert cm.memory_per_worker(profile, "backprop", 2) == pytest.approx(280e6)
    assert cm.memory_per_worker(profile, "backprop_cnn", 2) is None
