"""The Ray trainer on a private local Ray with logical GPUs (no hardware needed).

One Ray instance serves the whole module (ray.init costs seconds). Never `ray stop`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from noprop_dist import config  # noqa: E402
from noprop_dist.rundir import RunDir  # noqa: E402
from noprop_dist.config import ClusterConfig  # noqa: E402
from noprop_dist.trainers.ray.coordinator import Coordinator, train_ray  # noqa: E402
from noprop_dist.trainers.ray.placement import plan_layout  # noqa: E402
from noprop_dist.variants.dt import block  # noqa: E402
from noprop_dist.errors import ClusterError  # noqa: E402
from noprop_dist.trainers.local import train_local  # noqa: E402
from noprop_dist.data import load_dataset  # noqa: E402
from noprop_dist.nets.blocks import initial_embedding  # noqa: E402
from noprop_dist.variants.base import EMBED_SEED_UNIT, INIT, derive_seed  # noqa: E402
from run_weights import max_weight_diff, unit_tensors  # noqa: E402

LOGICAL_CPUS = 8
LOGICAL_GPUS = 4
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=LOGICAL_CPUS, num_gpus=LOGICAL_GPUS,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="noprop_dist")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ray-data-cache"))


def tiny(cache: str, **overrides) -> config.Config:
    base = {"data.cache_dir": cache, "cluster.backend": "ray", "train.threads": 1}
    base.update({k: str(v) for k, v in overrides.items()})
    return config.resolve("tiny", base)


def unit_epochs(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["unit"], r["epoch"]) for r in RunDir(run_dir).read_metrics() if r.get("event") == "unit_epoch"]


# ---- placement --------------------------------------------------------------------------
def test_plan_layout_one_worker_per_block_queues_and_errors():
    """Layout arithmetic: one per block when room, queueing when not, errors when asked for too much."""
    cl = ClusterConfig()

    def blocks(T):
        return [block(t) for t in range(1, T + 1)]

    def indices(layout):
        return [[u.index for u in group] for group in layout.groups]

    assert indices(plan_layout(blocks(4), cl, {"CPU": 8, "GPU": 4})) == [[1], [2], [3], [4]]
    lay = plan_layout(blocks(10), cl, {"CPU": 2})
    assert indices(lay) == [[1, 3, 5, 7, 9], [2, 4, 6, 8, 10]] and lay.gpus == 0 and "queue" in lay.note
    lay = plan_layout(blocks(4), ClusterConfig(gpus_per_worker=0.5), {"CPU": 8, "GPU": 2})
    assert len(lay.groups) == 4 and lay.gpus == 0.5
    assert len(plan_layout(blocks(4), cl, {"CPU": 8, "GPU": 2}).groups) == 2   # GPUs limit: blocks queue
    with pytest.raises(ClusterError, match="placement needs 6 workers"):
        plan_layout(blocks(10), ClusterConfig(workers=6, gpus_per_worker=1), {"CPU": 8, "GPU": 4})
    with pytest.raises(ClusterError, match="one worker needs 4 CPU"):
        plan_layout(blocks(10), ClusterConfig(threads_per_worker=4), {"CPU": 2})


def test_each_block_gets_its_own_gpu_bundle(ray_session, cache, tmp_path):
    """num_gpus=1: T workers, each on a distinct logical GPU; the head takes none."""
    summary = train_ray(tiny(cache, **{"train.epochs": 1, "cluster.gpus_per_worker": 1}),
                        tmp_path / "run", show_progress=False)
    assert summary["workers"] == 4 and summary["gpus_per_worker"] == 1
    devices = summary["worker_devices"]
    assert set(devices) == {"block_01", "block_02", "block_03", "block_04", "head"}
    gpu_ids = summary["worker_gpu_ids"]
    block_gpus = [tuple(gpu_ids[f"block_0{t}"]) for t in range(1, 5)]
    assert all(len(g) == 1 for g in block_gpus) and len(set(block_gpus)) == 4
    assert gpu_ids["head"] == []


def test_half_gpus_pack_two_blocks_per_gpu(ray_session, cache, tmp_path):
    """num_gpus=0.5 on a 2-GPU budget: four workers share two GPUs, two each."""
    cfg = tiny(cache, **{"train.epochs": 1, "cluster.gpus_per_worker": 0.5})
    pg = ray.util.placement_group([{"GPU": 2}])   # leave only 2 of the 4 logical GPUs free
    ray.get(pg.ready())
    try:
        summary = train_ray(cfg, tmp_path / "run", show_progress=False)
    finally:
        ray.util.remove_placement_group(pg)
    gpu_ids = [tuple(summary["worker_gpu_ids"][f"block_0{t}"]) for t in range(1, 5)]
    assert summary["workers"] == 4
    assert sorted(gpu_ids.count(g) for g in set(gpu_ids)) == [2, 2]


def test_unsatisfiable_placement_fails_fast(ray_session, cache, tmp_path):
    cfg = tiny(cache, **{"cluster.workers": 4, "cluster.gpus_per_worker": 2})
    start = time.perf_counter()
    with pytest.raises(ClusterError, match="placement needs 4 workers"):
        train_ray(cfg, tmp_path / "run", show_progress=False)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_workers_started_before_a_refused_preflight_are_released(ray_session, cache, tmp_path, monkeypatch):
    """The workers spawn before the preflight (their start-up overlaps it): a run refused there
    writes nothing and gives back every worker and its placement group."""
    from noprop_dist.errors import ConfigError
    from noprop_dist.run import lifecycle

    def refuse(*args, **kwargs):
        raise ConfigError("refused by the test's preflight")

    monkeypatch.setattr(lifecycle, "check_unit", refuse)
    with pytest.raises(ConfigError, match="refused by the test"):
        train_ray(tiny(cache, **{"cluster.workers": 2}), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < LOGICAL_CPUS:
        assert time.monotonic() < deadline, f"workers not released: {ray.available_resources()}"
        time.sleep(0.2)
    mine = [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"run-{os.getpid()}/")]
    assert not mine, mine


def test_workers_that_die_before_they_start_are_started_again(ray_session, cache, tmp_path, monkeypatch):
    """A replacement can land on a node that is gone but not yet declared dead and die before it
    starts (the compose tier's killed container): not a death of a training worker, the batch
    starts again shortly. Here the first spawn's worker is killed at once; the run ends on the
    in-process weights and the worker_started events say the start took two tries."""
    from noprop_dist.trainers.ray.pool import WorkerPool

    real, killed = WorkerPool.spawn, []

    def spawn_then_kill_the_first(self, slots):
        real(self, slots)
        if not killed:
            killed.append(slots[0])
            ray.kill(self.slots[slots[0]].handle)

    monkeypatch.setattr(WorkerPool, "spawn", spawn_then_kill_the_first)
    train_ray(tiny(cache, **{"cluster.workers": 2, "train.epochs": 2}), tmp_path / "ray", show_progress=False)
    train_local(config.resolve("tiny", {"data.cache_dir": cache, "cluster.backend": "local", "train.threads": "1",
                                        "train.epochs": "2"}), tmp_path / "local", show_progress=False)
    assert max_weight_diff(tmp_path / "local", tmp_path / "ray") <= 1e-5
    events = RunDir(tmp_path / "ray").read_metrics()
    assert {r["start_tries"] for r in events if r.get("event") == "worker_started"} == {2}
    assert not [r for r in events if r.get("event") == "worker_died"]


def test_a_run_that_does_not_fit_now_queues_until_other_jobs_free_the_room(ray_session, cache, tmp_path, capsys):
    """Another job holds 7 of the 8 CPUs: a run asking for 2 workers waits (one line says so)
    and trains once the room is freed; with --cluster.queue_timeout=0 it is refused at once,
    and a run the whole cluster could never hold is refused at once whatever the timeout."""
    held = ray.util.placement_group([{"CPU": LOGICAL_CPUS - 1}])
    ray.get(held.ready())
    try:
        with pytest.raises(ClusterError, match="placement needs 2 workers"):
            train_ray(tiny(cache, **{"cluster.workers": 2, "cluster.queue_timeout": 0}), tmp_path / "now",
                      show_progress=False)
        with pytest.raises(ClusterError, match="placement needs 9 workers"):
            start = time.monotonic()
            train_ray(tiny(cache, **{"cluster.workers": 9, "cluster.queue_timeout": 600}), tmp_path / "never",
                      show_progress=False)
        assert time.monotonic() - start < 30
        threading.Timer(12.0, ray.util.remove_placement_group, args=(held,)).start()
        start = time.monotonic()
        summary = train_ray(tiny(cache, **{"cluster.workers": 2, "cluster.queue_timeout": 120, "train.epochs": 1}),
                            tmp_path / "queued", show_progress=False)
    finally:
        ray.util.remove_placement_group(held)
    assert time.monotonic() - start >= 12 and summary["workers"] == 2
    assert "waiting up to 120 s for it (--cluster.queue_timeout)" in capsys.readouterr().out


# ---- equivalence --------------------------------------------------------------------------
def test_ray_and_in_process_trainers_give_the_same_weights(ray_session, cache, tmp_path):
    """Our best guard: same seed, fixed embedding -> same weights (<= 1e-5), both target modes.

    Slow tier (like the whole module): measured 29-72 s plus 4-14 s of Ray start-up on a
    shared 2-core machine, against a fast tier of about a minute in all. The fast tier's
    guards are in test_guards.py."""
    cfg_local = config.resolve("tiny", {"data.cache_dir": cache, "cluster.backend": "local",
                                        "train.threads": "1"})
    train_local(cfg_local, tmp_path / "local", show_progress=False)
    summary = train_ray(tiny(cache, **{"cluster.workers": 2}), tmp_path / "ray", show_progress=False)
    train_ray(tiny(cache, **{"cluster.ship_targets": "tensors"}), tmp_path / "ray-tensors",
              show_progress=False)
    assert max_weight_diff(tmp_path / "local", tmp_path / "ray") <= 1e-5
    assert max_weight_diff(tmp_path / "ray", tmp_path / "ray-tensors") <= 1e-5
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(local_summary["test_accuracy"], abs=0.01)
    # Nothing but recipes, metrics and checkpoints crossed: no activations, no gradients.
    assert summary["bytes_to_workers"] < 10_000
    assert summary["bytes_from_workers"] > 0
    # Where the start-up went: every phase in the order it ran, adding up to the launch figure.
    for s, trainer_phases in ((summary, ["connect", "place", "start workers", "preflight", "open", "workers"]),
                              (local_summary, ["place", "start workers", "preflight", "open"])):
        phases = [name for name, _ in s["startup_s"] if name != "interpreter and imports"]
        assert phases == ["data", "setup", *trainer_phases, "to the first step"], phases
        assert all(seconds >= 0 for _, seconds in s["startup_s"])
        assert sum(seconds for _, seconds in s["startup_s"]) == pytest.approx(s["launch_to_first_step_s"], abs=0.01)
    assert [name for name, _ in summary["worker_startup_s"]] == ["process", "imports", "data", "units", "join"]
    assert sum(seconds for _, seconds in summary["worker_startup_s"]) <= summary["launch_to_first_step_s"]


def test_learned_embedding_is_synchronised_like_in_process(ray_session, cache, tmp_path):
    """With shared state (learned embedding) both trainers average copies at the same epochs."""
    over = {"model.embedding": "learned", "model.embed_dim": "8", "train.embed_sync_every": "1"}
    train_local(config.resolve("tiny", {"data.cache_dir": cache, "cluster.backend": "local",
                                        "train.threads": "1", **over}), tmp_path / "local",
                show_progress=False)
    summary = train_ray(tiny(cache, **over), tmp_path / "ray", show_progress=False)
    assert max_weight_diff(tmp_path / "local", tmp_path / "ray") <= 1e-5
    emb_local = RunDir(tmp_path / "local").load_tensors("embedding")["embedding"]
    emb_ray = RunDir(tmp_path / "ray").load_tensors("embedding")["embedding"]
    assert float((emb_local - emb_ray).abs().max()) <= 1e-5
    # Every unit's checkpoint carries the synchronised embedding, and it has learned.
    for name, tensors in unit_tensors(tmp_path / "ray").items():
        assert torch.equal(tensors["embedding"], emb_ray), name
    initial = initial_embedding("learned", 10, 8, derive_seed(0, EMBED_SEED_UNIT, 0, INIT))
    assert float((emb_ray - initial).abs().max()) > 1e-3
    syncs = [r for r in RunDir(tmp_path / "ray").read_metrics() if r.get("event") == "embedding_sync"]
    assert [r["epoch"] for r in syncs] == list(range(1, config.resolve("tiny").train.epochs + 1))

    # A driver crash after a few unit-epochs, then --resume: the same weights as without it.
    original = Coordinator._on_result
    calls = {"n": 0}

    def crashing(self, track, result):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated driver crash")
        return original(self, track, result)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Coordinator, "_on_result", crashing)
        with pytest.raises(KeyboardInterrupt):
            train_ray(tiny(cache, **over), tmp_path / "crash", show_progress=False)
    assert 0 < min(e["epochs_done"] for e in RunDir(tmp_path / "crash").manifest()["units"].values()) < 5
    train_ray(tiny(cache, **over), tmp_path / "crash", resume=True, show_progress=False)
    assert max_weight_diff(tmp_path / "crash", tmp_path / "ray") <= 1e-5
    assert summary["bytes_from_workers"] > 0


# ---- fault tolerance ----------------------------------------------------------------------
def _pid_of(run_dir: Path, unit: str, timeout: float = 120.0) -> int:
    """PID of the worker process hosting ``unit``, as the coordinator logged it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists():
            for rec in RunDir(run_dir).read_metrics():
                if rec.get("event") == "worker_started" and unit in rec["units"]:
                    return rec["pid"]
        time.sleep(0.05)
    raise AssertionError(f"no worker_started event for {unit}")


def _train_killing(cfg: config.Config, run_dir: Path, unit: str) -> dict:
    """Train on Ray and SIGKILL the worker of ``unit`` after its first epoch; the run's summary."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_ray(cfg, run_dir, show_progress=False)))
    thread.start()
    pid = _pid_of(run_dir, unit)
    _wait_for(lambda: (unit, 1) in (unit_epochs(run_dir) if (run_dir / "metrics.jsonl").exists() else []))
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert result, "the run did not complete after the kill"
    return result


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_killed_block_worker_restarts_only_that_block(ray_session, cache, tmp_path):
    """SIGKILL a real worker process mid-training: only its block restarts, from its own
    checkpoint, and the final weights equal an uninterrupted run's."""
    cfg = tiny(cache, **{"train.epochs": 6})
    run_dir = tmp_path / "killed"
    result = _train_killing(cfg, run_dir, "block_02")
    assert [r["worker"] for r in result["restarts"]] == ["block_02"]
    epochs = unit_epochs(run_dir)
    for unit in ("block_01", "block_03", "block_04", "head"):
        assert sorted(e for u, e in epochs if u == unit) == list(range(1, 7)), unit  # untouched
    # The interrupted epoch was never recorded; the restart continued after the checkpoint.
    assert sorted(e for u, e in epochs if u == "block_02") == list(range(1, 7))
    train_ray(cfg, tmp_path / "clean", show_progress=False)
    assert max_weight_diff(run_dir, tmp_path / "clean") <= 1e-5


def test_exhausted_restarts_fail_clearly_and_keep_checkpoints(ray_session, cache, tmp_path):
    cfg = tiny(cache, **{"train.epochs": 8, "cluster.max_restarts": 0})
    run_dir = tmp_path / "doomed"
    error: list[BaseException] = []

    def target():
        try:
            train_ray(cfg, run_dir, show_progress=False)
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    pid = _pid_of(run_dir, "block_03")
    _wait_for(lambda: ("block_03", 1) in (unit_epochs(run_dir) if (run_dir / "metrics.jsonl").exists() else []))
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert error and isinstance(error[0], ClusterError)
    message = str(error[0])
    assert "block_03" in message and "--resume" in message and "\n" not in message
    units = RunDir(run_dir).manifest()["units"]
    assert units["block_03"]["epochs_done"] >= 1
    for name in units:
        RunDir(run_dir).load_unit(name)   # every checkpoint written stays valid


def test_resume_after_driver_crash_retrains_nothing_finished(ray_session, cache, tmp_path):
    """Kill the driver (a real CLI process) mid-run, then --resume: finished units are not
    retrained and the others continue from their checkpoints."""
    run_dir = tmp_path / "crashed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [str(VENV_BIN / "noprop-dist"), "train", "--config", "tiny", "--run-dir", str(run_dir),
           "--no-progress", f"--address={ray_session}", f"--data.cache_dir={cache}",
           "--cluster.backend=ray", "--cluster.workers=2", "--train.epochs=8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def partly_done() -> bool:
        try:
            units = RunDir(run_dir).manifest()["units"]
        except Exception:  # noqa: BLE001  not created yet
            return False
        return (units.get("head", {}).get("finished") and any(
            1 <= units.get(f"block_0{t}", {}).get("epochs_done", 0) < 8 for t in range(1, 5)))

    _wait_for(partly_done, timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = RunDir(run_dir).manifest()["units"]
    seen_before = unit_epochs(run_dir)
    started_before = sum(1 for r in RunDir(run_dir).read_metrics() if r.get("event") == "worker_started")
    code = subprocess.run([str(VENV_BIN / "noprop-dist"), "train", "--resume", str(run_dir), "--no-progress",
                           f"--address={ray_session}"], env=env, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    after = RunDir(run_dir).manifest()["units"]
    new = unit_epochs(run_dir)[len(seen_before):]
    finished_before = [n for n, e in before.items() if e["finished"]]
    assert "head" in finished_before
    for name in finished_before:
        assert not [e for u, e in new if u == name], f"{name} was retrained"
        assert after[name]["sha256"] == before[name]["sha256"]
    for name, entry in before.items():
        if not entry["finished"]:
            redone = sorted(e for u, e in new if u == name)
            assert redone and redone[0] == entry["epochs_done"] + 1 and redone[-1] == 8
    assert all(e["finished"] for e in after.values()) and len(after) == 5
    assert json.loads((run_dir / "summary.json").read_text())["test_accuracy"] > 0.3
    # Only the workers of unfinished units started again, and the run said what was left.
    started = [r["units"] for r in RunDir(run_dir).read_metrics() if r.get("event") == "worker_started"]
    left = [f"block_0{t}" for t in range(1, 5) if f"block_0{t}" not in finished_before]
    assert started[started_before:] and all(any(u in left for u in units) for units in started[started_before:])
    assert f"resuming: {len(left)} of 5 units left to train" in code.stdout
    assert code.stdout.count("run directory:") == 1 and "queue" not in code.stdout


# ---- connection errors ----------------------------------------------------------------------
def test_unreachable_cluster_address_is_a_clear_error(tmp_path, cache):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([str(VENV_BIN / "noprop-dist"), "train", "--config", "tiny", "--run-dir",
                          str(tmp_path / "x"), "--address=127.0.0.1:9", "--cluster.backend=ray",
                          f"--data.cache_dir={cache}"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Ray cluster at 127.0.0.1:9" in lines[0]
    assert not (tmp_path / "x").exists()


# ---- the DDP baseline on Ray Train ---------------------------------------------------------
def test_ddp_on_ray_matches_one_worker_on_the_full_batch(ray_session, cache, tmp_path):
    """2 DDP workers (TorchTrainer, gloo, global BatchNorm, dropout off) train the network
    one worker trains on the whole batch: the same function, up to float rounding. Weights
    are compared through train-mode outputs: Adam turns the rounding noise of directions
    BatchNorm cannot see (a bias in front of it, exact gradient 0) into steps of size lr,
    and those directions do not change the output."""
    from noprop_dist.variants.backprop import NetworkPredictor
    from noprop_dist.data import load_dataset, normalize
    from noprop_dist.trainers.ddp import train_ddp

    over = {"data.cache_dir": cache, "variant": "backprop_cnn", "model.dropout": "0", "train.epochs": "2",
            "train.threads": "1"}
    one = tmp_path / "one"
    train_local(config.resolve("tiny", {**over, "cluster.backend": "local"}), one, show_progress=False)
    two = tmp_path / "two"
    summary = train_ddp(config.resolve("tiny", {**over, "cluster.backend": "ddp", "cluster.workers": "2"}), two,
                        show_progress=False)
    assert summary["backend"] == "ddp" and summary["workers"] == 2
    nets = [NetworkPredictor(RunDir(d)) for d in (one, two)]
    data = load_dataset(nets[0].cfg.data)
    x = normalize(data.test.x[:200], nets[0].network.mean, nets[0].network.std)
    with torch.no_grad():
        outs = [p.network.net.train()(x) for p in nets]
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4 * float(outs[0].abs().max())
    # The all-reduce payload is counted, not estimated: every step all-reduces every gradient.
    steps = -(-len(data.train) // nets[0].cfg.train.batch_size)
    param_bytes = sum(p.numel() * 4 for p in nets[0].network.net.parameters())
    epochs = [r for r in RunDir(two).read_metrics() if r.get("event") == "unit_epoch"]
    assert [e["allreduce_grad_bytes_per_worker"] for e in epochs] == [steps * param_bytes] * 2
    assert all(e["allreduce_batchnorm_bytes_per_worker"] > 0 for e in epochs)


def test_ddp_asking_for_more_workers_than_the_cluster_has_fails_before_any_work(ray_session, cache, tmp_path):
    from noprop_dist.trainers.ddp import train_ddp

    cfg = config.resolve("tiny", {"data.cache_dir": cache, "variant": "backprop", "cluster.backend": "ddp",
                                  "cluster.workers": str(LOGICAL_CPUS + 1)})
    with pytest.raises(ClusterError, match="DDP needs"):
        train_ddp(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_diverging_block_on_a_ray_worker_stops_the_run_without_restarts(ray_session, cache, tmp_path):
    """Issue 7, item 11 on the Ray trainer: the worker reports the non-finite loss (it is not a
    worker death, so nothing restarts); the run stops with the unit's message."""
    from noprop_dist.errors import TrainingDiverged

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step \d+ of epoch 1"):
        train_ray(tiny(cache, **{"train.lr": "1e30"}), run_dir, show_progress=False)
    events = [r["event"] for r in RunDir(run_dir).read_metrics()]
    assert "diverged" in events and "worker_died" not in events
    assert not (run_dir / "summary.json").exists()


def test_a_diverging_ddp_run_stops_once_with_the_reason(ray_session, cache, tmp_path):
    """DDP on Ray Train: every rank stops at the same epoch (the loss is all-reduced); the
    driver raises the reason rank 0 recorded instead of letting Ray Train retry."""
    from noprop_dist.trainers.ddp import train_ddp
    from noprop_dist.errors import TrainingDiverged

    cfg = config.resolve("tiny", {"data.cache_dir": cache, "variant": "backprop", "cluster.backend": "ddp",
                                  "cluster.workers": "2", "train.lr": "1e30", "train.threads": "1"})
    # The baselines share the unit loop's check now: it names the first non-finite step.
    with pytest.raises(TrainingDiverged, match=r"network: the loss became nan at step \d+ of epoch 1"):
        train_ddp(cfg, tmp_path / "run", show_progress=False)
    events = [r["event"] for r in RunDir(tmp_path / "run").read_metrics()]
    assert events.count("diverged") == 1 and "network" not in RunDir(tmp_path / "run").manifest()["units"]


@pytest.mark.parametrize("embedding", ["one_hot", "learned"])
def test_eval_every_on_the_coordinator_matches_the_in_process_trainer(ray_session, cache, tmp_path, embedding):
    """--eval.every on Ray: the coordinator fetches each unit's weights after the epoch and scores
    the chain itself; the records equal the in-process trainer's, and the checkpoints are those
    of --train.checkpoint_every only."""
    over = {"train.epochs": 3, "eval.every": 1, "model.embedding": embedding, "train.checkpoint_every": 3,
            "train.embed_sync_every": 3}
    train_ray(tiny(cache, **over), tmp_path / "ray", show_progress=False)
    train_local(tiny(cache, **{**over, "cluster.backend": "local"}), tmp_path / "local", show_progress=False)
    keys = ("epoch", "chain_accuracy_noise", "chain_accuracy_no_noise", "best_block_alone")
    scores = {kind: [{k: r[k] for k in keys} for r in RunDir(tmp_path / kind).read_metrics() if r.get("event") == "eval"]
              for kind in ("ray", "local")}
    assert [r["epoch"] for r in scores["ray"]] == [1, 2]
    assert scores["ray"] == scores["local"]
    assert max_weight_diff(tmp_path / "ray", tmp_path / "local") <= 1e-5


def test_summed_gradient_embedding_sync_on_ray_equals_in_process(ray_session, cache, tmp_path):
    """train.embed_sync=summed_gradient: workers hand their per-step W_embed gradients to the
    coordinator at each sync; the weights (owner state included) equal the in-process run's."""
    over = {"train.epochs": 3, "model.embedding": "learned", "train.embed_sync": "summed_gradient",
            "train.embed_sync_every": 2}
    ray_summary = train_ray(tiny(cache, **over), tmp_path / "ray", show_progress=False)
    local_summary = train_local(tiny(cache, **{**over, "cluster.backend": "local"}), tmp_path / "local",
                                show_progress=False)
    for name in RunDir(tmp_path / "local").manifest()["units"]:
        a, b = RunDir(tmp_path / "ray").load_unit(name), RunDir(tmp_path / "local").load_unit(name)
        assert a.keys() == b.keys() and "owner/weight" in a
        for key in a:
            if a[key].is_floating_point():
                assert float((a[key] - b[key]).abs().max()) <= 1e-5, (name, key)
    assert ray_summary["test_accuracy"] == local_summary["test_accuracy"]


@pytest.mark.parametrize("variant", ["ct", "fm"])
def test_time_partitioned_ct_fm_on_ray_equal_in_process(ray_session, cache, tmp_path, variant):
    """NoProp-CT/FM by time interval (K = 2 networks, one worker each, no traffic between them):
    the same weights in process and on Ray for the same seed, CT's learned schedule
    synchronised the same way, and nothing but recipes, metrics and checkpoints crossed. CT runs
    with the demo_ct preset's cosine learning rate (set per step on each worker)."""
    over = {"variant": variant, "continuous.intervals": "2", "continuous.steps": "8", "train.epochs": "2",
            "train.lr_schedule": "cosine" if variant == "ct" else "constant"}
    train_local(config.resolve("tiny", {"data.cache_dir": cache, "cluster.backend": "local",
                                        "train.threads": "1", **over}), tmp_path / "local", show_progress=False)
    summary = train_ray(tiny(cache, **over), tmp_path / "ray", show_progress=False)
    assert max_weight_diff(tmp_path / "local", tmp_path / "ray") <= 1e-5
    units = unit_tensors(tmp_path / "ray")
    assert set(units) == {"interval_01", "interval_02"} | ({"head"} if variant == "ct" else set())
    assert summary["workers"] == 2 and summary["head_workers"] == (1 if variant == "ct" else 0)
    if variant == "ct":   # every unit ends with the same (synchronised) schedule copy
        keys = [k for k in units["head"] if k.startswith("model/schedule.")]
        assert keys and all(torch.equal(units[n][k], units["head"][k]) for n in units for k in keys)
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["test_accuracy"] == local_summary["test_accuracy"]
    assert summary["bytes_to_workers"] < 100_000


# ---- NoProp-CT/FM data-parallel (DDP on Ray Train) ------------------------------------------
def test_fm_ddp_on_two_workers_equals_in_process(ray_session, cache, tmp_path):
    """Issue 9, item 4b: NoProp-FM data-parallel, each of K = 2 interval networks in turn with
    DDP over 2 workers (gloo), a learned W_embed (its gradient all-reduced by hand): with
    dropout off, the weights of the in-process trainer on the whole batch, up to float rounding."""
    over = {"variant": "fm", "continuous.intervals": 2, "continuous.steps": 8, "train.epochs": 2,
            "model.dropout": 0, "model.embedding": "learned", "model.embed_dim": 8}
    local_summary = train_local(tiny(cache, **{**over, "cluster.backend": "local"}), tmp_path / "local",
                                show_progress=False)
    summary = train_ddp_noprop(tiny(cache, **{**over, "cluster.backend": "ddp", "cluster.workers": 2}),
                               tmp_path / "ddp", show_progress=False)
    assert max_weight_diff(tmp_path / "local", tmp_path / "ddp") <= 1e-5
    emb = [RunDir(tmp_path / kind).load_tensors("embedding")["embedding"] for kind in ("local", "ddp")]
    assert float((emb[0] - emb[1]).abs().max()) <= 1e-5
    assert summary["test_accuracy"] == pytest.approx(local_summary["test_accuracy"], abs=0.01)
    assert summary["backend"] == "ddp" and summary["workers"] == 2 and summary["threads_per_worker"] == 1
    assert summary["device"] == "cpu" and len(summary["epoch_seconds"]) == 2
    # Counted in the communication hook: every step all-reduces the network's gradients.
    epochs = [r for r in RunDir(tmp_path / "ddp").read_metrics() if r.get("event") == "unit_epoch"]
    assert unit_epochs(tmp_path / "ddp") == unit_epochs(tmp_path / "local")   # one record per unit-epoch (rank 0)
    net_bytes = sum(v.numel() * 4 for k, v in unit_tensors(tmp_path / "ddp")["interval_01"].items()
                    if k.startswith("model/"))
    assert all(e["workers"] == 2 and e["allreduce_bytes"] > net_bytes for e in epochs)
    assert summary["allreduce_bytes_per_worker_per_epoch"] == sum(e["allreduce_bytes"] for e in epochs[-2:])


def test_ct_ddp_on_two_workers_trains_and_evaluates(ray_session, cache, tmp_path, capsys):
    """NoProp-CT data-parallel on 2 workers (K = 2 intervals, head in full on every rank,
    --eval.every on rank 0): the run finishes, every unit holds the synchronised schedule, and
    `eval` of the run directory gives the summary's accuracy."""
    from noprop_dist.cli import main

    over = {"variant": "ct", "continuous.intervals": 2, "continuous.steps": 8, "train.epochs": 2,
            "eval.every": 1, "cluster.backend": "ddp", "cluster.workers": 2}
    run_dir = tmp_path / "ct"
    summary = train_ddp_noprop(tiny(cache, **over), run_dir, show_progress=False)
    units = unit_tensors(run_dir)
    assert set(units) == {"interval_01", "interval_02", "head"}
    assert all(e["finished"] for e in RunDir(run_dir).manifest()["units"].values())
    keys = [k for k in units["head"] if k.startswith("model/schedule.")]
    assert keys and all(torch.equal(units[n][k], units["head"][k]) for n in units for k in keys)
    assert [r["epoch"] for r in RunDir(run_dir).read_metrics() if r.get("event") == "eval"] == [1]
    assert summary["backend"] == "ddp" and summary["workers"] == 2 and summary["test_accuracy"] > 0.1
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["test_accuracy"]


def train_ddp_noprop(cfg, run_dir, show_progress=False):
    from noprop_dist.trainers.ddp import train_ddp

    return train_ddp(cfg, run_dir, show_progress=show_progress)


# ---- block replicas (issue 16) ---------------------------------------------------------------
def test_more_workers_than_blocks_give_each_block_a_replica_group(ray_session, cache, tmp_path):
    """T = 4 on 8 logical workers: every block trains as a group of 2 replicas on disjoint shares
    of each batch, all-reducing its gradients inside the group only; it learns what 4 workers
    learn (the same seed; Adam turns in-group rounding into small differences); the bytes each
    replica all-reduces are its gradients once per step, and nothing else crosses between groups."""
    over = {"train.epochs": 3, "model.dropout": 0, "cluster.gpus_per_worker": 0}
    replicated = train_ray(tiny(cache, **over, **{"cluster.workers": 8}), tmp_path / "r8", show_progress=False)
    plain = train_ray(tiny(cache, **over, **{"cluster.workers": 4}), tmp_path / "r4", show_progress=False)
    assert replicated["workers"] == 8 and len(replicated["plan"]) == 8
    assert all("(1/2)" in line or "(2/2)" in line for line in replicated["plan"])
    assert replicated["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=0.05)
    data = load_dataset(tiny(cache).data)
    steps = -(-len(data.train) // tiny(cache).train.batch_size)
    tensors = unit_tensors(tmp_path / "r8")["block_01"]
    param_bytes = sum(v.numel() * 4 for k, v in tensors.items() if k.startswith("model/") and "running" not in k
                      and "num_batches" not in k)
    epochs = [r for r in RunDir(tmp_path / "r8").read_metrics() if r.get("event") == "unit_epoch"
              and r["unit"].startswith("block")]
    assert epochs and all(e["workers"] == 2 and e["allreduce_grad_bytes_per_worker"] == steps * param_bytes
                          for e in epochs)
    assert replicated["bytes_checkpoint_to_workers"] == 0   # the coordinator sent recipes, not tensors


def test_uneven_blocks_split_one_block_and_a_killed_replica_restarts_only_its_group(ray_session, cache, tmp_path):
    """T = 4 on 3 workers: three blocks whole and the fourth split into 3 replicas (loads 4/3
    each, not 2 on one worker as round-robin). SIGKILL a replica: its group restarts from the
    checkpoint and the run ends with the weights of the same layout uninterrupted."""
    cfg = tiny(cache, **{"train.epochs": 6, "model.dropout": 0, "cluster.workers": 3, "cluster.gpus_per_worker": 0})
    run_dir = tmp_path / "killed"
    result = _train_killing(cfg, run_dir, "block_04")
    assert len(result["plan"]) == 3 and all(f"block_04 ({k}/3)" in line for k, line in zip((1, 2, 3), result["plan"]))
    assert all(line.endswith("load 1.4") for line in result["plan"])   # 1 + replica_load(1, 3)
    assert len(result["restarts"]) == 1 and "block_04" in result["restarts"][0]["worker"]
    train_ray(cfg, tmp_path / "clean", show_progress=False)
    assert max_weight_diff(run_dir, tmp_path / "clean") <= 1e-5


# ---- checkpoints written by the workers (issue 18, item 1) -------------------------------------
def test_workers_that_see_the_run_directory_write_their_own_checkpoints(ray_session, cache, tmp_path, monkeypatch):
    """On a private Ray every worker sees the run directory: it writes its unit's checkpoint
    there and sends only the record, so nothing but control bytes comes back. Where a worker
    does not see it (here: the probe made invisible), its state crosses as before; the files
    are the same bytes either way."""
    from noprop_dist.trainers.ray import coordinator as coordinator_module

    cfg = tiny(cache, **{"train.epochs": 3, "cluster.workers": 2})
    direct = train_ray(cfg, tmp_path / "direct", show_progress=False)
    assert direct["workers_seeing_run_dir"] == 3                       # 2 block workers and the head's
    assert direct["checkpoints_by_workers"] == 5 * 3 and direct["checkpoints_by_coordinator"] == 0
    assert direct["bytes_checkpoint_from_workers"] == 0
    comm = [r for r in RunDir(tmp_path / "direct").read_metrics() if r.get("event") == "communication"]
    assert len(comm) == 3 and all(r["checkpoint_from_workers"] == 0 and 0 < r["control_from_workers"] < 5000
                                  for r in comm)
    assert not [p.name for p in (tmp_path / "direct").rglob(".*") if p.name != ".lock"]   # no probe, no staged file

    monkeypatch.setattr(coordinator_module, "PROBE_FILE", ".a-probe-no-worker-reads")
    shipped = train_ray(cfg, tmp_path / "shipped", show_progress=False)
    assert shipped["workers_seeing_run_dir"] == 0
    assert shipped["checkpoints_by_workers"] == 0 and shipped["checkpoints_by_coordinator"] == 5 * 3
    assert shipped["bytes_checkpoint_from_workers"] > 1000 * direct["bytes_control_from_workers"] / 3
    a, b = RunDir(tmp_path / "direct").manifest()["units"], RunDir(tmp_path / "shipped").manifest()["units"]
    assert {n: e["sha256"] for n, e in a.items()} == {n: e["sha256"] for n, e in b.items()}


# ---- chaos (issue 19, item 6) ----------------------------------------------------------------
def _current_pid(run_dir: Path, unit: str) -> int:
    """PID of the worker that hosts ``unit`` now: the last one the coordinator started."""
    started = [r for r in RunDir(run_dir).read_metrics() if r.get("event") == "worker_started" and unit in r["units"]]
    return started[-1]["pid"]


def _in_background(cfg: config.Config, run_dir: Path) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_ray(cfg, run_dir, show_progress=False)))
    thread.start()
    return thread, result


def test_chaos_five_kills_of_random_block_workers_end_on_the_uninterrupted_weights(ray_session, cache, tmp_path):
    """SIGKILL a random block's worker five times during one run, each once the last one's
    replacement has trained an epoch: the run completes, only the killed blocks restarted (each
    from its checkpoint), and the weights equal an uninterrupted run's."""
    import random

    cfg = tiny(cache, **{"train.epochs": 60, "cluster.max_restarts": 5})
    run_dir = tmp_path / "chaos"
    thread, result = _in_background(cfg, run_dir)
    rng = random.Random(19)
    killed = []
    for _ in range(5):
        unit = rng.choice(["block_01", "block_02", "block_03", "block_04"])
        seen = len(unit_epochs(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        # the previous kill's replacement is up and every unit moved on since
        _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(unit_epochs(run_dir)) >= seen + 5)
        assert thread.is_alive(), "the run ended before the fifth kill: give it more epochs"
        os.kill(_current_pid(run_dir, unit), signal.SIGKILL)
        killed.append(unit)
        _wait_for(lambda: sum(1 for r in RunDir(run_dir).read_metrics() if r.get("event") == "worker_died") == len(killed))
    thread.join(timeout=600)
    assert result, "the run did not complete after five kills"
    assert [r["worker"] for r in result["restarts"]] == killed
    clean = tmp_path / "clean"
    clean_summary = train_ray(cfg, clean, show_progress=False)
    assert max_weight_diff(run_dir, clean) <= 1e-5
    print(f"\nchaos: {len(killed)} kills {killed}; train seconds {result['train_seconds']:.1f} against "
          f"{clean_summary['train_seconds']:.1f} uninterrupted: "
          f"{(result['train_seconds'] - clean_summary['train_seconds']) / len(killed):.1f} s lost per kill")


def test_a_hung_worker_is_killed_after_the_epoch_timeout_and_the_run_completes(ray_session, cache, tmp_path):
    """SIGSTOP a block's worker (it hangs rather than dies): past --cluster.epoch_timeout its
    epoch is taken for hung, the worker killed and restarted from its checkpoint; the run ends
    on the uninterrupted weights."""
    cfg = tiny(cache, **{"train.epochs": 20, "cluster.epoch_timeout": 6})
    run_dir = tmp_path / "hung"
    thread, result = _in_background(cfg, run_dir)
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and ("block_02", 2) in unit_epochs(run_dir))
    pid = _current_pid(run_dir, "block_02")
    os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(timeout=300)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)   # never leave a stopped process behind
        except ProcessLookupError:
            pass
    assert result, "the run did not complete with a hung worker"
    assert len(result["restarts"]) == 1, result["restarts"]
    (restart,) = result["restarts"]
    assert restart["worker"] == "block_02" and "--cluster.epoch_timeout" in restart["reason"]
    train_ray(cfg, tmp_path / "clean", show_progress=False)
    assert max_weight_diff(run_dir, tmp_path / "clean") <= 1e-5


def test_epoch_timeout_auto_waits_for_a_first_epoch_then_allows_ten_times_the_slowest():
    coordinator = Coordinator.__new__(Coordinator)
    track = type("Track", (), {"slowest": 0.0})()
    for timeout, slowest, limit in [(-1, 0.0, None), (-1, 3.0, 120.0), (-1, 30.0, 300.0), (0, 30.0, None),
                                    (7.5, 0.0, 7.5)]:
        coordinator.cfg = tiny("/unused", **{"cluster.epoch_timeout": timeout})
        track.slowest = slowest
        assert coordinator.epoch_limit(track) == limit
