"""NoProp-CT and NoProp-FM as variants: the registry, config, training in process, and the
run directory's read-back (``eval``, ``export``). Their math is tested in test_continuous.py;
DT's unchanged weights by the golden and equivalence tests of the other files.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from noprop_dist import config
from noprop_dist.rundir import RunDir
from noprop_dist.cli import main
from noprop_dist.core.continuous import LearnedSchedule
from noprop_dist.nets.time_conditioned import CTChain, FMChain
from noprop_dist.variants.continuous import CTObjective, FMObjective, interval
from noprop_dist.variants.base import HEAD
from noprop_dist.variants.dt import DTObjective
from noprop_dist.errors import ConfigError
from noprop_dist.trainers.local import train_local
from noprop_dist.variants.registry import find_trainer
from noprop_dist.variants.base import make_setup
from noprop_dist.training.data_parallel import DataParallel
from noprop_dist.training.runner import UnitRunner, train_unit
from noprop_dist.variants.registry import get_variant
from gloo_ranks import join_gloo, leave_gloo

FAST = {"continuous.steps": "16", "train.threads": "1"}


def test_registry_gives_each_noprop_variant_its_objective():
    assert isinstance(get_variant("dt").objective(), DTObjective)
    assert isinstance(get_variant("ct").objective(), CTObjective)
    assert isinstance(get_variant("fm").objective(), FMObjective)
    assert get_variant("ct").objective() is get_variant("ct").objective()   # one stateless instance


@pytest.mark.parametrize("variant, K, names", [
    ("dt", 1, ["block_01", "block_02", "block_03", "block_04", "head"]),
    ("ct", 3, ["interval_01", "interval_02", "interval_03", "head"]),
    ("fm", 2, ["interval_01", "interval_02"]),
])
def test_units_of_each_variant(tiny_config, digits, variant, K, names):
    setup = make_setup(tiny_config({"variant": variant, "continuous.intervals": str(K)}), digits)
    assert [u.name for u in setup.units] == names
    intervals = [u.t_range for u in setup.units if u.role == "interval"]
    if intervals:   # the intervals tile [0, 1] in order
        assert intervals[0][0] == 0.0 and intervals[-1][1] == 1.0
        assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))


def test_interval_units_draw_t_only_inside_their_interval(tiny_config, digits):
    """The time-partitioned mode: interval k's network is fed t in [(k-1)/K, k/K) only."""
    setup = make_setup(tiny_config({"variant": "fm", "continuous.intervals": "4", "data.limit_train": "128"}), digits)
    for k in (1, 4):
        runner = UnitRunner(interval(k, 4), setup, digits.train)
        seen: list[torch.Tensor] = []
        handle = runner.module.net.register_forward_pre_hook(lambda _, args: seen.append(args[2].detach().clone()))
        runner.run_epoch(1)
        handle.remove()
        t = torch.cat(seen)
        # One t per example of the epoch: every batch is seen except a last one of a single
        # example (BatchNorm needs two), which is dropped.
        n, bs = len(digits.train), setup.train.batch_size
        assert len(t) == n - (1 if n % bs == 1 else 0), (len(t), n, bs)
        assert float(t.min()) >= (k - 1) / 4 and float(t.max()) < k / 4
        assert float(t.max() - t.min()) > 0.2 / 4     # spread over the interval, not one point


def test_ct_units_start_from_one_schedule_and_different_networks(tiny_config, digits):
    setup = make_setup(tiny_config({"variant": "ct", "continuous.intervals": "2"}), digits)
    obj = setup.objective
    a, b = (obj.build_module(interval(k, 2), setup) for k in (1, 2))
    head = obj.build_module(setup.unit("head"), setup)
    for key, value in a.schedule.state_dict().items():
        assert torch.equal(value, b.schedule.state_dict()[key]) and torch.equal(value, head.schedule.state_dict()[key])
    first = next(iter(a.net.state_dict()))
    assert not torch.equal(a.net.state_dict()[first], b.net.state_dict()[first])
    ends = a.schedule.alpha_bar(torch.tensor([0.0, 1.0])).detach()
    cont = setup.continuous
    assert ends[0] == pytest.approx(cont.alpha_bar_0, rel=1e-5) and ends[1] == pytest.approx(cont.alpha_bar_1, rel=1e-5)
    old = make_setup(tiny_config({"variant": "ct", "continuous.alpha_bar_0": "0", "continuous.alpha_bar_1": "0"}), digits)
    ends = old.objective.build_module(interval(1, 1), old).schedule.alpha_bar(torch.tensor([0.0, 1.0])).detach()
    assert ends[0] == pytest.approx(old.alpha_bar[0], rel=1e-3) and ends[1] == pytest.approx(old.alpha_bar[-1], abs=1e-6)


@pytest.mark.parametrize("variant", ["ct", "fm"])
def test_unit_training_is_deterministic_and_the_loss_falls(tiny_config, digits, variant):
    """Each interval unit is a pure function of (seed, unit, epochs), and it learns."""
    setup = make_setup(tiny_config({"variant": variant, "train.threads": "1"}), digits)
    unit = interval(1, 1)
    first = train_unit(unit, setup, digits.train, epochs=1)
    second = train_unit(unit, setup, digits.train, epochs=1).state_tensors()
    for key, value in first.state_tensors().items():
        assert torch.equal(value, second[key]), key
    losses = [first.run_epoch(e)["loss"] for e in (2, 3, 4)]
    assert losses[-1] < losses[0]


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
@pytest.mark.parametrize("variant, K", [("ct", 4), ("fm", 2)])
def test_each_variant_trains_end_to_end_and_reads_back(tiny_config, tmp_path, capsys, variant, K):
    """The tiny preset trains CT and FM (K intervals) in process; the run directory evaluates
    and exports like a DT run, and the exported program gives the chain's own predictions.

    Five tiny epochs teach CT/FM little (measured 0.29-0.40 for CT with K = 4 and 0.21-0.23
    for FM with K = 2 over seeds 0-1; DT reaches 0.85): the bar is well above chance (0.1,
    sd 0.016 on 364 images), not a target."""
    cfg = tiny_config({"variant": variant, "continuous.intervals": str(K), **FAST})
    run_dir = tmp_path / variant
    summary = train_local(cfg, run_dir, show_progress=False)
    assert summary["variant"] == variant and summary["steps"] == 16
    assert summary["test_accuracy"] > 0.16
    assert set(RunDir(run_dir).manifest()["units"]) == {u.name for u in make_setup(cfg, _data(cfg)).units}

    assert main(["eval", str(run_dir), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["test_accuracy"] == summary["test_accuracy"]

    out = tmp_path / f"{variant}.pt2"
    assert main(["export", str(run_dir), str(out)]) == 0
    program = torch.export.load(str(out))
    from noprop_dist.run.results import load_predictor

    predictor = load_predictor(run_dir)
    chain = predictor.chain
    assert isinstance(chain, CTChain if variant == "ct" else FMChain)
    data = _data(cfg)
    images = torch.from_numpy(data.test.x[:7].copy())
    from noprop_dist.nets.time_conditioned import chain_noise
    from noprop_dist.nets.chain import RawImageChain

    noise = chain_noise(chain, 7, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = RawImageChain(chain)(images, noise)
    assert torch.allclose(program.module()(images, noise), expected, atol=1e-5)


def _data(cfg):
    from noprop_dist.data import load_dataset

    return load_dataset(cfg.data)


def test_ct_learned_schedule_stays_monotone_and_is_synchronised(tiny_config, tmp_path):
    """After training, every CT unit holds the same schedule copy (synchronised at each epoch)
    and it is still strictly monotone (by construction, no clamp involved)."""
    cfg = tiny_config({"variant": "ct", "continuous.intervals": "2", "train.epochs": "2", **FAST})
    train_local(cfg, tmp_path / "ct", show_progress=False)
    run = RunDir(tmp_path / "ct")
    states = {name: run.load_unit(name) for name in run.manifest()["units"]}
    keys = [k for k in states["head"] if k.startswith("model/schedule.")]
    assert keys
    for name in states:
        for key in keys:
            assert torch.equal(states[name][key], states["head"][key]), (name, key)
    setup = make_setup(cfg, _data(cfg))
    sched = LearnedSchedule(0.5, 0.6)
    sched.load_state_dict({k[len("model/schedule."):]: v for k, v in states["head"].items() if k in keys})
    initial = setup.objective.learned_schedule(setup).state_dict()
    # The defaults: endpoints fixed, the shape learned (by the estimator's variance).
    assert all(torch.equal(sched.state_dict()[k], initial[k]) for k in ("gamma_0", "raw_gap"))
    assert any(not torch.equal(sched.state_dict()[k], initial[k]) for k in ("raw_w1", "b1", "raw_w2", "b2", "raw_w3"))
    gamma = sched.gamma(torch.linspace(0, 1, 2001)).detach()
    assert torch.all(gamma[1:] < gamma[:-1])
    syncs = [r["epoch"] for r in run.read_metrics() if r.get("event") == "embedding_sync"]
    assert syncs == [1, 2]


def test_fm_with_a_learned_embedding_moves_it_and_stays_apart(tiny_config, tmp_path):
    """FM with a learned embedding trains it (anchor loss on) and the class embeddings do not collapse."""
    cfg = tiny_config({"variant": "fm", "model.embedding": "learned", "model.embed_dim": "8", **FAST})
    summary = train_local(cfg, tmp_path / "fm", show_progress=False)
    final = RunDir(tmp_path / "fm").load_tensors("embedding")["embedding"]
    initial = make_setup(cfg, _data(cfg)).embedding
    assert float((final - initial).abs().max()) > 1e-3
    dist = torch.cdist(final, final) + torch.eye(len(final)) * 1e9
    assert float(dist.min()) > 0.1
    assert summary["test_accuracy"] > 0.13


@pytest.mark.parametrize("overrides, message", [
    ({"variant": "ct", "continuous.intervals": "4", "continuous.steps": "2"}, "continuous.steps=2 is fewer than"),
    ({"variant": "fm", "continuous.intervals": "0"}, "continuous.intervals=0 must be positive"),
    ({"variant": "ct", "continuous.time_dim": "63"}, "continuous.time_dim=63 must be even"),
    ({"variant": "dt", "cluster.backend": "ddp"},
     r"variant dt cannot train with cluster.backend=ddp: NoProp-DT is distributed by block.*BatchNorm.*"
     r"use --cluster.backend=ray"),
])
def test_bad_continuous_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        config.resolve("tiny", overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant, target", [("ct", "noprop_dist.trainers.ddp:train_ddp"),
                                             ("fm", "noprop_dist.trainers.ddp:train_ddp"),
                                             ("backprop", "noprop_dist.trainers.ddp:train_ddp")])
def test_ct_and_fm_may_train_data_parallel_with_ddp(variant, target):
    """Issue 9, item 4b: CT/FM (any K) take the data-parallel trainer, as the baselines do; DT does not (above)."""
    cfg = config.resolve("tiny", {"variant": variant, "cluster.backend": "ddp", "continuous.intervals": "2"})
    assert find_trainer(cfg.cluster.backend, cfg.variant).target == target


def _data_parallel_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    join_gloo(rank, world, f"{out}.store")
    cfg = config.from_dict(cfg_dict)
    data = _data(cfg)
    setup = make_setup(cfg, data)
    result = {}
    for unit in setup.units:
        runner = UnitRunner(unit, setup, data.train, "cpu", DataParallel(rank, world))
        metrics = runner.run_epoch(1)
        result[unit.name] = {"state": runner.state_tensors(), "grads": runner.take_embedding_grads(),
                             "data_parallel": runner.data_parallel, "metrics": metrics}
    torch.save(result, f"{out}.{rank}")
    leave_gloo()


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
def test_data_parallel_ct_runners_stay_in_lockstep_over_two_ranks(tiny_config, tmp_path):
    """UnitRunner(rank, world=2) over gloo, CT with a learned W_embed (summed_gradient) and
    dropout on: the interval network is data-parallel (each rank its share, its own dropout
    masks) yet both ranks end with the same weights and record the same (all-reduced) W_embed
    gradients; the head (labels only) runs in full on each rank and equals the plain runner's."""
    cfg = tiny_config({"variant": "ct", "data.limit_train": "200", "model.embedding": "learned",
                       "model.embed_dim": "8", "train.embed_sync": "summed_gradient", "train.head_passes": "2"})
    data = _data(cfg)   # the cache is converted here, not by two ranks at once
    mp.spawn(_data_parallel_worker, args=(2, config.to_dict(cfg), str(tmp_path / "dp")), nprocs=2)
    ranks = [torch.load(f"{tmp_path / 'dp'}.{r}") for r in range(2)]
    assert ranks[0]["interval_01"]["data_parallel"] and not ranks[0]["head"]["data_parallel"]
    for name in ("interval_01", "head"):
        a, b = ranks[0][name], ranks[1][name]
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (name, key)
        assert torch.equal(a["grads"], b["grads"]) and len(a["grads"]) > 0
        assert a["metrics"]["loss"] == b["metrics"]["loss"]   # the global batches' mean on every rank
    interval_figures = ranks[0]["interval_01"]["metrics"]
    assert interval_figures["workers"] == 2 and interval_figures["allreduce_bytes"] > 0
    assert "allreduce_bytes" not in ranks[0]["head"]["metrics"]
    torch.set_num_threads(1)
    plain = UnitRunner(HEAD, make_setup(cfg, data), data.train)
    plain.run_epoch(1)
    for key, value in plain.state_tensors().items():
        assert torch.equal(value, ranks[1]["head"]["state"][key]), key


@pytest.mark.parametrize("variant, unit", [("fm", interval(1, 2)), ("ct", HEAD)], ids=["fm-interval", "ct-head"])
def test_a_world_of_one_is_the_plain_runner(tiny_config, variant, unit):
    """UnitRunner(rank=0, world=1): no process group, no DDP, the plain loop bit for bit
    (same dropout stream, batches, loss and metrics)."""
    torch.set_num_threads(1)
    cfg = tiny_config({"variant": variant, "continuous.intervals": "2", "data.limit_train": "200",
                       "train.head_passes": "2"})
    data = _data(cfg)
    setup = make_setup(cfg, data)
    plain, one = UnitRunner(unit, setup, data.train), UnitRunner(unit, setup, data.train, "cpu", DataParallel(0, 1))
    assert not one.data_parallel
    a, b = plain.run_epoch(1), one.run_epoch(1)
    assert a["loss"] == b["loss"] and a.keys() == b.keys()
    for key, value in plain.state_tensors().items():
        assert torch.equal(value, one.state_tensors()[key]), key


def test_variant_on_the_command_line(tmp_path, capsys, data_cache):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--variant=fm", "--continuous.steps=4", "--train.epochs=1",
                 f"--data.cache_dir={data_cache}", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert RunDir(run_dir).manifest()["variant"] == "fm"
    assert main(["train", "--config", "tiny", "--variant", "nope"]) == 2
    assert "variant='nope' is not one of" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 17: CT's and FM's settings

def test_fm_sigma_zero_draws_what_it_drew_before_and_sigma_adds_path_noise(tiny_config, digits):
    """continuous.fm_sigma = 0 (the default) keeps FM's epoch noise and loss bit for bit; a
    positive sigma adds d columns of path noise from their own stream and changes the loss."""
    from noprop_dist.variants.continuous import time_noise

    plain = make_setup(tiny_config({"variant": "fm"}), digits)
    noisy = make_setup(tiny_config({"variant": "fm", "continuous.fm_sigma": "0.1"}), digits)
    unit, obj, d = interval(1, 1), plain.objective, plain.embedding.shape[1]
    rows = obj.epoch_noise(unit, plain, 1, 64)
    assert torch.equal(rows, time_noise(unit, plain, 1, 64))
    wide = obj.epoch_noise(unit, noisy, 1, 64)
    assert wide.shape == (64, 2 * d + 1)
    assert torch.equal(wide[:, :d], rows[:, :d]) and torch.equal(wide[:, -1], rows[:, -1])
    assert not torch.equal(wide[:, d:2 * d], rows[:, :d])
    torch.manual_seed(0)
    runner = UnitRunner(unit, plain, digits.train)
    x = torch.randn(64, *digits.input_shape)
    y = torch.from_numpy(digits.train.y[:64].astype("int64"))
    runner.module.eval()
    with torch.no_grad():
        base = obj.batch_loss(runner, x, y, rows)
        runner.setup = noisy
        assert float(obj.batch_loss(runner, x, y, wide)) != float(base)
        runner.setup = plain
        assert float(obj.batch_loss(runner, x, y, wide[:, list(range(d)) + [2 * d]])) == float(base)


@pytest.mark.parametrize("shape, endpoints", [("fixed", "fixed"), ("fixed", "loss"), ("variance", "fixed")])
def test_ct_schedule_parts_marked_fixed_do_not_move(tiny_config, digits, shape, endpoints):
    cfg = tiny_config({"variant": "ct", "continuous.schedule_shape": shape, "continuous.schedule_endpoints": endpoints,
                       "data.limit_train": "200", "train.head_passes": "2"})
    setup = make_setup(cfg, digits)
    for unit in setup.units:
        runner = UnitRunner(unit, setup, digits.train)
        before = {k: v.clone() for k, v in runner.module.schedule.state_dict().items()}
        runner.run_epoch(1)
        after = runner.module.schedule.state_dict()
        ends = {"gamma_0", "raw_gap"}
        trained = {k for k in before if (endpoints != "fixed" if k in ends else shape != "fixed")}
        for key in set(before) - trained:
            assert torch.equal(before[key], after[key]), (unit.name, key)
        if unit.role == "interval":   # the interval's loss reaches every trained part
            assert all(not torch.equal(before[k], after[k]) for k in trained), unit.name


def test_ct_schedule_weight_decay_off_puts_the_schedule_in_its_own_group(tiny_config, digits):
    setup = make_setup(tiny_config({"variant": "ct", "continuous.schedule_weight_decay": "false"}), digits)
    runner = UnitRunner(interval(1, 1), setup, digits.train)
    groups = runner.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == setup.train.weight_decay
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in runner.module.schedule.parameters()}
    default = UnitRunner(interval(1, 1), make_setup(tiny_config({"variant": "ct"}), digits), digits.train)
    assert len(default.optimizer.param_groups) == 1


def test_ct_initial_endpoints_follow_the_continuous_settings(tiny_config, digits):
    setup = make_setup(tiny_config({"variant": "ct", "continuous.alpha_bar_0": "0.05",
                                    "continuous.alpha_bar_1": "0.95"}), digits)
    sched = setup.objective.build_module(interval(1, 1), setup).schedule
    ends = sched.alpha_bar(torch.tensor([0.0, 1.0])).detach()
    assert float(ends[0]) == pytest.approx(0.05, rel=1e-5) and float(ends[1]) == pytest.approx(0.95, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"continuous.alpha_bar_0": "0.9", "continuous.alpha_bar_1": "0.5"}, r"alpha_bar\(0\)=0.9 must be below"),
    ({"continuous.alpha_bar_1": "1.0"}, "continuous.alpha_bar_1=1.0 must be in"),
    ({"continuous.time_sampling": "sobol"}, "continuous.time_sampling='sobol' is not one of"),
    ({"continuous.fm_sigma": "-0.1"}, "continuous.fm_sigma=-0.1 must not be negative"),
])
def test_bad_ct_fm_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        config.resolve("tiny", {"variant": "ct", **overrides})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sampling", ["antithetic", "snr_importance"])
def test_ct_time_sampling_stays_inside_the_interval_and_is_deterministic(tiny_config, digits, sampling):
    setup = make_setup(tiny_config({"variant": "ct", "continuous.intervals": "2", "continuous.time_sampling": sampling,
                                    "data.limit_train": "128", "train.threads": "1"}), digits)
    unit = interval(2, 2)
    runner = UnitRunner(unit, setup, digits.train)
    seen: list[torch.Tensor] = []
    handle = runner.module.net.register_forward_pre_hook(lambda _, args: seen.append(args[2].detach().clone()))
    runner.run_epoch(1)
    handle.remove()
    t = torch.cat(seen)
    assert float(t.min()) >= 0.5 and float(t.max()) <= 1.0 and float(t.max() - t.min()) > 0.1
    again = train_unit(unit, setup, digits.train, epochs=1).state_tensors()
    for key, value in runner.state_tensors().items():
        assert torch.equal(value, again[key]), key


def test_ct_diagnostic_reads_a_ct_run(tiny_config, tmp_path):
    """benchmarks/ct_diagnostic.py on a one-epoch tiny CT run: one row per asked t, the schedule's
    ends as configured, accuracies in [0, 1], loss-weight shares summing to 1."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_config({"variant": "ct", "train.epochs": "1", **FAST})
    train_local(cfg, tmp_path / "ct", show_progress=False)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "ct_diagnostic.py"), str(tmp_path / "ct"),
                           "--t", "0", "0.5", "1", "--json", str(out)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["t"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert result["rows"][0]["alpha_bar"] == pytest.approx(cfg.continuous.alpha_bar_0, rel=1e-4)
    assert result["rows"][-1]["alpha_bar"] == pytest.approx(cfg.continuous.alpha_bar_1, rel=1e-4)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["snr_prime"] > 0 for r in result["rows"])
    assert sum(b["weight_share"] for b in result["bands"]) == pytest.approx(1.0)
    assert "| t | net |" in proc.stdout
