"""Bad input that must be refused before any work, or stop a run cleanly (issue 7).

Each case goes through the command a user runs (``noprop-dist train``) and checks the
contract: one ``noprop-dist: error:`` line, the exit code of its kind, no traceback, and no
run directory created (or, for a run that stops, nothing it already wrote changed).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_config_cli import one_error_line

from noprop_dist import config as config_mod
from noprop_dist.training import preflight
from noprop_dist.rundir import RunDir
from noprop_dist.cli import main
from noprop_dist.config import from_dict, resolve, to_toml
from noprop_dist.errors import ConfigError, NoPropError
from noprop_dist.variants.dt import DTObjective
from noprop_dist.variants.dt import block as dt_block
from noprop_dist.variants.base import make_setup
from noprop_dist.training.meters import SavedTensorMeter


def _train(run_dir: Path, data_cache: str, *extra: str) -> int:
    return main(["train", "--config", "tiny", "--run-dir", str(run_dir), f"--data.cache_dir={data_cache}",
                 "--cluster.backend=local", "--no-progress", *extra])


def _file(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _images(n: int, shape=(1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % classes


# --------------------------------------------------------------- refused before any work

def _refused(tmp_path, capsys, data_cache, extra, fragment, code):
    run_dir = tmp_path / "run"
    got = _train(run_dir, data_cache, *extra)
    line = one_error_line(capsys.readouterr().err)
    assert got == code, line
    assert fragment in line, line
    assert not run_dir.exists(), "a refused run must not create its run directory"
    return line


def test_a_label_of_a_million_is_refused_by_the_class_cap(tmp_path, capsys, data_cache):
    """Item 6: labels up to 1,000,000 would make a 4 TB one-hot embedding."""
    y = _labels(40)
    y[7] = 1_000_000
    path = _file(tmp_path, "huge_label", _images(40), y)
    _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}"],
             "more than data.max_classes=1000", 1)


def test_the_class_cap_is_a_config_value(tmp_path, capsys, data_cache):
    path = _file(tmp_path, "five", _images(40), _labels(40, 5))
    _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}", "--data.max_classes=4"],
             "5 classes, more than data.max_classes=4", 1)


@pytest.mark.parametrize("shape", [(3, 3, 3), (1, 2, 28), (1, 28, 3)])
def test_images_too_small_for_the_block_are_refused_before_the_run_exists(shape, tmp_path, capsys, data_cache):
    """Item 7: used to trace back after the run directory was created (and again on --resume).
    (3x3x3 and 1x28x3 could be channels last too: the layout is given.)"""
    path = _file(tmp_path, "small", _images(40, shape), _labels(40))
    _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}", "--data.layout=nchw"],
             "do not fit the tiny DT block", 1)


@pytest.mark.parametrize("variant", ["backprop", "backprop_cnn"])
def test_images_too_small_for_the_baselines_are_refused_too(variant, tmp_path, capsys, data_cache):
    path = _file(tmp_path, "small", _images(40, (3, 3, 3)), _labels(40))
    _refused(tmp_path, capsys, data_cache, [f"--variant={variant}", "--data.name=file", f"--data.path={path}",
                                            "--data.layout=nchw"], f"do not fit the {variant} network", 1)


def test_single_class_data_is_refused(tmp_path, capsys, data_cache):
    """Item 10: used to train silently and report accuracy 1.000."""
    path = _file(tmp_path, "one_class", _images(40), np.full(40, 4, np.int64))
    _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}"], "one class only", 1)


@pytest.mark.parametrize("limit", ["1", "2"])
def test_limit_train_that_leaves_nothing_to_learn_is_refused(limit, tmp_path, capsys, data_cache):
    """Item 10: a limit below one step used to give zero optimiser steps and NaN losses. The
    limit is a stratified sample (issue 19): fewer examples than classes is refused as such."""
    path = _file(tmp_path, "sorted", _images(40), np.sort(_labels(40)))
    _refused(tmp_path, capsys, data_cache,
             ["--data.name=file", f"--data.path={path}", f"--data.limit_train={limit}"],
             f"data.limit_train={limit} keeps fewer examples than the 3 classes of the train split of {path}; "
             "pass --data.limit_train=3 or more (0: all)", 1)


@pytest.mark.parametrize("override,fragment", [
    ("--model.embed_dim=100000000", "model.embed_dim=100000000 is above its limit of 65536"),
    ("--train.head_passes=100000000", "train.head_passes=100000000 is above its limit of 1000"),
])
def test_sizes_that_would_exhaust_memory_before_any_check_are_capped(override, fragment, tmp_path, capsys,
                                                                      data_cache):
    """Found while trying more bad input: both used to allocate gigabytes (the embedding, the
    head's per-epoch noise) before anything could refuse them."""
    _refused(tmp_path, capsys, data_cache, [override, "--model.embedding=learned"], fragment, 2)


def test_batch_size_of_one_is_refused(tmp_path, capsys, data_cache):
    """A batch of one is skipped by every BatchNorm step: zero steps, NaN losses."""
    _refused(tmp_path, capsys, data_cache, ["--train.batch_size=1"], "train.batch_size=1", 2)


def test_a_step_larger_than_the_worker_memory_is_refused_with_the_estimate(tmp_path, capsys, data_cache,
                                                                          monkeypatch):
    """Item 8: 40 images of 3x512x512 (32 after the held-out test share) with the paper block, on
    a worker with 2 GiB. The paper
    block flattens without pooling (a 0.5 G-parameter layer at this size): no batch fits."""
    monkeypatch.setattr(preflight, "host_memory_budget", lambda: 2 * 2**30)
    path = _file(tmp_path, "big", _images(40, (3, 512, 512)), _labels(40))
    line = _refused(tmp_path, capsys, data_cache,
                    ["--data.name=file", f"--data.path={path}", "--model.block=paper"],
                    "one training step needs about", 2)
    assert "(batch 32: activations" in line and "use smaller images, --model.block=small/tiny" in line


def test_when_a_smaller_batch_fits_the_message_says_which(tmp_path, capsys, data_cache, monkeypatch, tiny_config):
    path = _file(tmp_path, "big", _images(40, (1, 256, 256)), _labels(40))
    cfg = tiny_config({"data.name": "file", "data.path": path})
    from noprop_dist.run.lifecycle import load_data

    data = load_data(cfg)
    setup = make_setup(cfg, data)
    estimate = preflight.estimate_step(DTObjective().step_probe(setup, len(data.train)), 32, "images")
    room = (setup.T - 1) * estimate.state_bytes + estimate.total - 21.5 * estimate.per_example_bytes
    monkeypatch.setattr(preflight, "host_memory_budget", lambda: int(room / preflight.MEMORY_HEADROOM))
    line = _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}"],
                    "one training step needs about", 2)
    assert "lower --train.batch_size (about 10 fits)" in line


# --------------------------------------------------------------- the memory estimate

@pytest.mark.parametrize("block,shape", [("tiny", (1, 8, 8)), ("small", (1, 28, 28)), ("paper", (3, 32, 32))])
def test_the_dry_run_estimate_bounds_the_measured_activations(block, shape, tiny_config, digits):
    """The meta-device estimate counts what SavedTensorMeter measures in a real step, from
    shapes only: never below it, and at most 25% above it."""
    cfg = tiny_config({"model.block": block})
    data = dataclasses.replace(digits, input_shape=shape, mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    setup = make_setup(cfg, data)
    batch = 64
    estimate = preflight.estimate_step(DTObjective().step_probe(setup, 1000), batch, "test images")
    module = DTObjective().build_module(dt_block(1), setup).train()
    z = torch.randn(batch, setup.embedding.shape[1])
    x = torch.randn(batch, *shape)
    with SavedTensorMeter(True, module) as meter:
        module(z, x).sum()
    assert meter.bytes <= estimate.activation_bytes <= 1.25 * meter.bytes
    params = sum(p.numel() * 4 for p in module.parameters())
    assert estimate.state_bytes >= 4 * params


def test_evaluation_in_small_forward_passes_gives_the_same_scores(trained_run):
    """Item 8: the final evaluation runs in passes that fit; the noise is drawn per eval batch,
    so the scores do not depend on the pass size."""
    from noprop_dist.variants.dt import ChainPredictor
    from noprop_dist.run.lifecycle import load_data

    run_dir, summary = trained_run
    predictor = ChainPredictor(RunDir(run_dir))
    data = load_data(predictor.cfg)
    whole = predictor.evaluate(data.test, predictor.cfg.eval)
    small = predictor.evaluate(data.test, predictor.cfg.eval, max_batch=7)
    assert small == whole
    assert whole["test_accuracy"] == summary["test_accuracy"]


def test_a_tight_memory_budget_shrinks_the_evaluation_passes(tmp_path, data_cache, monkeypatch):
    from noprop_dist.run import lifecycle

    asked = []

    def tight(estimate, budget, wanted):
        asked.append(wanted)
        return 9

    monkeypatch.setattr(lifecycle, "fitting_batch", tight)
    run_dir = tmp_path / "run"
    assert _train(run_dir, data_cache, "--train.epochs=1") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert asked == [resolve("tiny").eval.batch_size]
    assert summary["eval_forward_batch"] == 9


# --------------------------------------------------------------- a run that diverges

@pytest.mark.parametrize("variant", ["dt", "backprop"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(variant, tmp_path, capsys,
                                                                            data_cache):
    """Item 11: lr=1e30 used to write bare NaN tokens to metrics.jsonl and 'succeed' at chance.
    Now the run stops in epoch 1, names the unit, checkpoints nothing of that epoch, writes no
    summary, and every line of metrics.jsonl is strict JSON."""
    run_dir = tmp_path / "run"
    code = _train(run_dir, data_cache, f"--variant={variant}", "--train.lr=1e30", "--train.epochs=2")
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "the loss became nan" in line and "epoch 1" in line and "lower --train.lr" in line
    unit = "network" if variant == "backprop" else line.split("error: ")[1].split(":")[0]
    assert unit in ("network", "head") or unit.startswith("block_")
    manifest = RunDir(run_dir).manifest()
    assert unit not in manifest["units"], "a diverged epoch must not be checkpointed"
    assert not (run_dir / "summary.json").exists()
    records = [json.loads(text, parse_constant=_refuse_constant)
               for text in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged" and records[-1]["unit"] == unit


def _refuse_constant(token: str):
    raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")


def test_divergence_after_a_finite_epoch_keeps_that_epochs_checkpoint(tmp_path, capsys, data_cache, monkeypatch):
    """The last finite checkpoint stays: epoch 1 is finite and saved, epoch 2 turns NaN."""
    from noprop_dist.training import runner as units

    real = units.UnitRunner._pass

    def poisoned(self, epoch, *args):
        losses = real(self, epoch, *args)
        if epoch == 2 and self.unit == dt_block(2):
            losses[-1] = torch.tensor(float("inf"))
        return losses

    monkeypatch.setattr(units.UnitRunner, "_pass", poisoned)
    run_dir = tmp_path / "run"
    code = _train(run_dir, data_cache, "--train.epochs=3")
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("noprop-dist: error: block_02: the loss became inf") and "epoch 2" in line
    entry = RunDir(run_dir).manifest()["units"]["block_02"]
    assert entry["epochs_done"] == 1 and not entry["finished"]
    assert RunDir(run_dir).load_unit("block_02")["epochs_done"].item() == 1


def test_metrics_lines_are_strict_json_even_for_non_finite_values(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("", {"variant": "dt"})
    run.append_metrics({"event": "x", "loss": float("nan"), "nested": {"v": float("-inf")}, "ok": 1.5})
    text = (run.path / "metrics.jsonl").read_text()
    record = json.loads(text, parse_constant=_refuse_constant)
    assert record["loss"] is None and record["nested"]["v"] is None and record["ok"] == 1.5


# --------------------------------------------------------------- config.toml round trip

ODD_STRINGS = ["a\nb", "tab\there", "quote\"and\\backslash", "nul\x00byte", "bell\x07", "del\x7f",
               "unicode é 数据 🙂", "line\r\nend", "  spaces  ", "'single'", "#not a comment", "[section]",
               "trailing\\", "\u2028separator", "\x1b[31mescape"]


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_config_toml_reads_back_any_string(text):
    """Item 5: a newline in data.path used to write an invalid config.toml."""
    cfg = resolve("tiny", {"data.path": text, "data.cache_dir": text, "data.root": text})
    back = from_dict(tomllib.loads(to_toml(cfg)))
    assert back == cfg


def test_a_path_with_a_newline_trains_and_reads_back(tmp_path, data_cache):
    weird = tmp_path / "odd\nroot"
    run_dir = tmp_path / "run"
    assert _train(run_dir, data_cache, f"--data.root={weird}", "--train.epochs=1") == 0
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert config_mod.from_dict(tomllib.loads((run_dir / "config.toml").read_text())).data.root == str(weird)


@pytest.mark.parametrize("override,fragment", [
    ({"data.path": "bad\udcffbytes"}, "not UTF-8"),
    ({"train.seed": str(2**64)}, "does not fit a 64-bit integer"),
])
def test_values_that_cannot_be_written_back_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve("tiny", override)


# --------------------------------------------------------------- one process per run directory

def _open_and_hold(cfg, run_dir, resume, start, hold_s, results):
    """Child process: wait for the start signal, open the run, hold it, report the outcome."""
    from noprop_dist.run.lifecycle import open_run

    start.wait()
    try:
        with open_run(cfg, run_dir, resume, {}):
            results.put(("ok", os.getpid()))
            time.sleep(hold_s)
    except NoPropError as exc:
        results.put(("refused", str(exc)))


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
def test_two_processes_creating_the_same_run_at_once_one_is_refused(tmp_path, tiny_cfg):
    """Item 3: both used to succeed (20 of 20 tries). Ten races of two processes: exactly one
    creates the run each time, the other gets one line."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(10):
        run_dir = tmp_path / f"race{attempt}"
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_and_hold, args=(tiny_cfg, run_dir, False, start, 0.3, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert [o[0] for o in outcomes] == ["ok", "refused"], outcomes
        assert "\n" not in outcomes[1][1]
        assert "in use by process" in outcomes[1][1] or "already holds a run" in outcomes[1][1]


@pytest.mark.parametrize("other_finished", [False, True], ids=["still-creating", "created"])
def test_a_run_created_between_the_two_checks_is_in_use_not_foreign(tmp_path, tiny_cfg, monkeypatch, other_finished):
    """The window the race above found under load: another process makes the lock file and
    config.toml after this one's first look and before its first check. That used to read as
    "not empty and holds no noprop_dist run"; it is "in use" while the other holds the lock,
    and "already holds a run" once it has written the manifest."""
    import fcntl

    from noprop_dist.run.lifecycle import LOCK_FILE, open_run

    run_dir = tmp_path / "run"
    original = RunDir.refuse_existing
    other: list[int] = []

    def other_process_creates_it(self):
        if not other:          # the first look: the other process gets there first
            self.path.mkdir()
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"4242\n")
            other.append(fd)
            (self.path / "config.toml").write_text("variant = 'dt'\n")
            if other_finished:
                (self.path / "manifest.json").write_text("{}")
                os.close(fd)   # released
        return original(self)

    monkeypatch.setattr(RunDir, "refuse_existing", other_process_creates_it)
    before = None
    with pytest.raises(NoPropError) as caught:
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()} if run_dir.exists() else None
        with open_run(tiny_cfg, run_dir, False, {}):
            pytest.fail("a second process opened the run")
    message = str(caught.value)
    assert "holds no noprop_dist run" not in message and "\n" not in message
    assert ("already holds a run" if other_finished else "in use by process 4242") in message
    assert before is None
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [LOCK_FILE, "config.toml"] + (["manifest.json"] if other_finished else []))
    assert (run_dir / "config.toml").read_text() == "variant = 'dt'\n"
    if not other_finished:
        os.close(other[0])


def test_resume_while_another_process_trains_in_the_run_names_its_pid(run_copy, tmp_path, capsys, tiny_cfg):
    """Item 3: a --resume beside a running trainer used to train unit-epochs twice."""
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_open_and_hold, args=(tiny_cfg, run_copy, True, start, 30, results))
    holder.start()
    try:
        start.set()
        assert results.get(timeout=60) == ("ok", holder.pid)
        before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
        code = main(["train", "--resume", str(run_copy), "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 1 and f"in use by process {holder.pid}" in line and f"kill {holder.pid}" in line
        assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.join()
    # The kernel released the killed holder's lock: the resume now goes through.
    assert main(["train", "--resume", str(run_copy), "--no-progress"]) == 0


# --------------------------------------------------------------- more of the same kinds (found here)

@pytest.mark.parametrize("damage,fragment", [
    (lambda run: (run / "config.toml").write_bytes(bytes(range(128, 256))), "config.toml is not UTF-8 text"),
    (lambda run: (run / "config.toml").write_text("a = " + "[" * 100000 + "]" * 100000 + "\n"),
     "config.toml is not a valid config"),
    (lambda run: (run / "manifest.json").write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
])
def test_damaged_run_files_that_used_to_trace_back(damage, fragment, run_copy, capsys):
    damage(run_copy)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    for command in (["eval", str(run_copy)], ["train", "--resume", str(run_copy), "--no-progress"]):
        code = main(command)
        line = one_error_line(capsys.readouterr().err)
        assert code == 1 and fragment in line, line
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before


def test_export_never_replaces_something_that_is_not_a_file(trained_run, tmp_path, capsys):
    """``export RUN /dev/full --force`` used to replace the device node with the program (as
    root). A FIFO stands in for the device here."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = main(["export", str(trained_run[0]), str(fifo), "--force"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "is not a regular file" in line
    assert fifo.is_fifo() and not list(tmp_path.glob(".pipe*"))
