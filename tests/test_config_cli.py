"""Tests of the typed config (noprop_dist.config) and the `noprop-dist` command (noprop_dist.cli).

Guards: presets resolve, overrides are typed, every bad value is refused before any work with
one clear line, and every command runs (in process and through the installed script).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from noprop_dist import config as config_mod
from noprop_dist.cli import main, parse_overrides
from noprop_dist.config import Config, from_dict, preset_names, resolve, to_toml
from noprop_dist.errors import ConfigError

SCRIPT = Path(sys.executable).parent / "noprop-dist"


def one_error_line(err: str) -> str:
    """The CLI's contract for user errors: exactly one stderr line, prefixed."""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("noprop-dist: error:"), err
    return lines[0]


# ------------------------------------------------------------------ config

def test_presets_are_found():
    assert {"tiny", "demo", "mnist", "cifar10", "cifar100"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_round_trips(name):
    """Each preset validates, and to_toml -> tomllib -> from_dict gives the same Config."""
    cfg = resolve(name)
    assert isinstance(cfg, Config)
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_paper_presets_follow_table_3():
    for name, epochs in (("mnist", 100), ("cifar10", 150), ("cifar100", 150)):
        cfg = resolve(name)
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay,
                cfg.train.eta, cfg.schedule.T, cfg.model.block) == (epochs, 128, 1e-3, 1e-3, 0.1, 10, "paper")


def test_ct_fm_presets_follow_the_paper():
    """CT/FM presets: the variant, one network, 1000 integration steps, CT's eta = 1, Table 3's
    batch/lr/weight decay/epochs; the demo sizes train on the embedded data."""
    for name, variant, epochs in (("mnist_ct", "ct", 100), ("mnist_fm", "fm", 100),
                                  ("cifar10_ct", "ct", 150), ("cifar10_fm", "fm", 150)):
        cfg = resolve(name)
        assert (cfg.variant, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay,
                cfg.continuous.steps, cfg.continuous.intervals, cfg.continuous.eta, cfg.model.block) == (
                    variant, epochs, 128, 1e-3, 1e-3, 1000, 1, 1.0, "paper"), name
        assert cfg.train.lr_schedule == "constant", name          # the paper's rate
    assert resolve("demo_ct").train.lr_schedule == "cosine"       # issue 17: docs/ct.md, table 3
    assert resolve("tiny_ct").train.lr_schedule == "constant"
    for name in ("demo_ct", "demo_fm"):
        assert resolve(name).data.name == "mnist_subset" and resolve(name).variant == name[-2:]


def test_round_trip_of_non_default_values():
    """Every type, awkward strings (quotes, backslashes) and tiny floats survive to_toml."""
    cfg = resolve("tiny", {
        "data.path": 'C:\\data\\my "digits".npz', "data.name": "file", "train.lr": "1.5e-05",
        "train.bf16": "true", "train.epochs": "7", "schedule.kind": "linear",
        "cluster.gpus_per_worker": "0.5", "model.embedding": "learned", "eval.noise": "false",
    })
    back = from_dict(tomllib.loads(to_toml(cfg)))
    assert back == cfg
    assert back.data.path == 'C:\\data\\my "digits".npz' and back.train.lr == 1.5e-05


def test_overrides_are_typed():
    """Command-line strings become the field's type (--train.lr=3e-4 -> float)."""
    cfg = resolve("tiny", {"train.lr": "3e-4", "train.epochs": "7", "train.bf16": "yes",
                           "model.block": "small", "variant": "dt", "train.weight_decay": "0"})
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float
    assert cfg.train.epochs == 7 and type(cfg.train.epochs) is int
    assert cfg.train.bf16 is True and cfg.model.block == "small"
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float
    # untouched fields keep the preset's values
    assert cfg.schedule.T == resolve("tiny").schedule.T


def test_toml_file_as_config(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[train]\nepochs = 3\nlr = 1\n[schedule]\nT = 6\n')
    cfg = resolve(str(path), {"train.epochs": "4"})
    assert (cfg.train.epochs, cfg.train.lr, cfg.schedule.T) == (4, 1.0, 6)


@pytest.mark.parametrize("key,value,message", [
    ("train.lrr", "1e-3", "unknown config key"),
    ("trian.lr", "1e-3", "unknown config key"),
    ("lr", "1e-3", "unknown config key"),
    ("train.lr.x", "1e-3", "unknown config key"),
    ("train", "1", "unknown config key"),
    ("train.epochs", "abc", "not a valid int"),
    ("train.epochs", "2.5", "not a valid int"),
    ("train.lr", "fast", "not a valid float"),
    ("train.bf16", "maybe", "not a valid bool"),
    ("train.lr", "nan", "finite"),
    ("train.eta", "inf", "finite"),
    ("train.epochs", "0", "must be positive"),
    ("train.batch_size", "-1", "must be positive"),
    ("schedule.T", "0", "must be positive"),
    ("train.lr", "-1e-3", "must not be negative"),
    ("train.lr", "0", "must be positive"),
    ("train.seed", "-1", "must not be negative"),
    ("model.dropout", "1.5", "model.dropout"),
    ("data.test_fraction", "1", "data.test_fraction"),
    ("schedule.alpha_bar_min", "0", "alpha_bar_min"),
    ("schedule.alpha_bar_max", "1.0", "alpha_bar_max"),
    ("schedule.alpha_bar_max", "0.5", "not strictly increasing"),
    ("schedule.cosine_offset", "-0.5", "must not be negative"),
    ("model.block", "huge", "not one of"),
    ("data.name", "imagenet", "not one of"),
    ("schedule.kind", "quadratic", "not one of"),
    ("cluster.backend", "slurm", "not one of"),
    ("variant", "nope", "not one of"),
    ("train.device", "tpu", "train.device"),
    ("cluster.gpus_per_worker", "-2", "gpus_per_worker"),
    ("cluster.epoch_timeout", "-5", "cluster.epoch_timeout=-5.0 must be seconds > 0, 0 .never. or -1"),
    ("cluster.queue_timeout", "-5", "cluster.queue_timeout=-5.0 must be seconds >= 0 .0: no wait. or -1"),
    ("train.lr_schedule", "linear", "train.lr_schedule='linear' is not one of constant, cosine"),
])
def test_bad_values_are_config_errors(key, value, message):
    """Unknown keys, wrong types, out-of-range values and bad choices: one-line ConfigError
    naming the key."""
    with pytest.raises(ConfigError, match=message) as exc:
        resolve("tiny", {key: value})
    assert "\n" not in str(exc.value)
    assert key.split(".")[-1] in str(exc.value) or key in str(exc.value)


def test_bad_preset_and_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("no_such_preset")
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="train.epoch.*unknown.toml"):
        resolve(str(unknown))
    typed = tmp_path / "typed.toml"
    typed.write_text('[train]\nepochs = "three"\n')
    with pytest.raises(ConfigError, match="train.epochs"):
        resolve(str(typed))


def test_describe_keys_lists_every_field():
    lines = config_mod.describe_keys()
    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        if dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                assert any(line.startswith(f"{section.name}.{f.name} = ") for line in lines), f.name
    # every field has its one-line doc
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines if "." in line.split("=")[0])


def test_parse_overrides_forms():
    assert parse_overrides(["--train.lr=3e-4", "--train.epochs", "7"]) == {"train.lr": "3e-4", "train.epochs": "7"}
    for bad in (["--epochs=3"], ["train.lr=1"], ["--train.lr"]):
        with pytest.raises(ConfigError):
            parse_overrides(bad)


# ------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("bad", [
    ["--train.lrr=1"], ["--train.epochs=abc"], ["--model.block=huge"], ["--bogus"],
    ["--train.lr"], ["--schedule.alpha_bar_max=0.5"],
])
def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(bad, tmp_path, capsys, data_cache):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--run-dir", str(run_dir),
                 f"--data.cache_dir={data_cache}", "--no-progress", *bad])
    captured = capsys.readouterr()
    assert code == 2
    one_error_line(captured.err)
    assert captured.out == ""
    assert not run_dir.exists()


def test_cli_unknown_preset_and_extra_eval_args(tmp_path, capsys, trained_run):
    assert main(["train", "--config", "nope", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown preset" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(trained_run[0]), "--train.lr=1"]) == 2
    one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["train.lr=1e-2", "train.epochs=60", "train.lr_schedule=cosine"])
def test_cli_resume_refuses_to_change_what_is_computed(run_copy, capsys, override):
    """--resume keeps the run's config: only how it runs (cluster.*, device, threads) may change.
    train.epochs included: the cosine rate's horizon, so a resumed run stays on its own decay."""
    before = (run_copy / "manifest.json").read_bytes()
    assert main(["train", "--resume", str(run_copy), f"--{override}", "--no-progress"]) == 2
    assert override.split("=")[0] in one_error_line(capsys.readouterr().err)
    assert (run_copy / "manifest.json").read_bytes() == before


# ------------------------------------------------------------------ CLI commands

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_cache):
    """One `noprop-dist train --config tiny` in process: (run_dir, exit code, stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["train", "--config", "tiny", "--run-dir", str(run_dir), "--cluster.backend=local",
                     f"--data.cache_dir={data_cache}", "--no-progress"])
    return run_dir, code, out.getvalue()


def test_cli_train(cli_run, trained_run):
    """`train` exits 0, prints the test accuracy, and computes what train_local computes."""
    run_dir, code, out = cli_run
    assert code == 0
    assert "test accuracy" in out and str(run_dir) in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"test accuracy: {summary['test_accuracy']:.4f}" in out
    assert summary["test_accuracy"] == trained_run[1]["test_accuracy"]
    assert summary["block_alone_accuracy"] == trained_run[1]["block_alone_accuracy"]


def test_cli_eval_json(cli_run, capsys):
    run_dir = cli_run[0]
    assert main(["eval", str(run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    scores = json.loads(lines[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scores["test_accuracy"] == summary["test_accuracy"]
    assert 0.0 <= scores["test_accuracy"] <= 1.0


def test_cli_eval_text(trained_run, capsys):
    assert main(["eval", str(trained_run[0])]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy: {trained_run[1]['test_accuracy']:.4f}" in out
    assert "block_01 alone" in out


def test_cli_eval_on_a_data_file(trained_run, digits, tmp_path, capsys):
    """`eval --data FILE.npz` with the digits test split scores exactly like the run's own split."""
    path = tmp_path / "digits_test.npz"
    np.savez(path, x=np.asarray(digits.test.x), y=np.asarray(digits.test.y))
    assert main(["eval", str(trained_run[0]), "--data", str(path), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == len(digits.test)
    assert scores["test_accuracy"] == trained_run[1]["test_accuracy"]


def test_cli_eval_on_wrong_image_shape(trained_run, tmp_path, capsys):
    path = tmp_path / "mnist_like.npz"
    np.savez(path, x=np.zeros((5, 1, 28, 28), np.uint8), y=np.zeros(5, np.int64))
    assert main(["eval", str(trained_run[0]), "--data", str(path)]) == 1
    captured = capsys.readouterr()
    assert "shape" in one_error_line(captured.err)
    assert captured.out == ""


def test_cli_eval_on_labels_the_run_cannot_predict(trained_run, digits, tmp_path, capsys):
    """Labels outside 0..m-1 are refused with one line (they would silently lower accuracy)."""
    path = tmp_path / "labels.npz"
    y = np.asarray(digits.test.y).copy()
    y[0] = digits.num_classes
    np.savez(path, x=np.asarray(digits.test.x), y=y)
    assert main(["eval", str(trained_run[0]), "--data", str(path)]) == 1
    assert "label" in one_error_line(capsys.readouterr().err)


def test_cli_eval_on_a_corrupt_or_missing_run(run_copy, tmp_path, capsys):
    path = run_copy / "units" / "head.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    assert main(["eval", str(run_copy)]) == 1
    assert "head.safetensors" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(tmp_path / "nothing_here"), "--json"]) == 1
    one_error_line(capsys.readouterr().err)


def test_cli_export(trained_run, tmp_path, capsys, digits):
    out = tmp_path / "exported" / "chain.pt2"
    assert main(["export", str(trained_run[0]), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    program = torch.export.load(str(out)).module()
    raw = torch.from_numpy(np.array(digits.test.x[:5]))
    noise = torch.zeros(trained_run[1]["T"] + 1, 5, digits.num_classes)
    assert program(raw, noise).shape == (5, digits.num_classes)


def test_cli_keys(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.001" in out and "schedule.alpha_bar_max" in out


@pytest.mark.slow
def test_console_script(tmp_path, data_cache, trained_run):
    """The installed `noprop-dist` entry point runs a tiny training in a fresh process (same
    result as in process: determinism does not depend on the process)."""
    assert SCRIPT.exists(), SCRIPT
    run_dir = tmp_path / "script_run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [str(SCRIPT), "train", "--config", "tiny", "--run-dir", str(run_dir),
         f"--data.cache_dir={data_cache}", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == trained_run[1]["test_accuracy"]
    bad = subprocess.run([str(SCRIPT), "train", "--config", "tiny", "--train.epochs=abc"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2
    one_error_line(bad.stderr)
    assert not (tmp_path / "runs").exists()


def test_cli_resume_of_a_missing_run_and_reuse_of_a_run_dir_fail_before_work(tmp_path, capsys, trained_run):
    """`--resume` of a directory that holds no run, and `train --run-dir` on an existing run,
    stop with one line (exit 1) and leave the directories as they were."""
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a noprop_dist run directory" in err[0]
    assert not (tmp_path / "nope").exists()
    run_dir, _ = trained_run
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert main(["train", "--config", "tiny", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]
    assert sorted(p.name for p in run_dir.rglob("*")) == before


# ---- run directories and export targets that must be refused before any work (issue 7) ----
def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_refuses_a_non_empty_directory_that_is_not_a_run_and_touches_nothing(tmp_path, capsys, data_cache):
    user = tmp_path / "mine"
    (user / "units").mkdir(parents=True)
    (user / "config.toml").write_text("my own config\n")
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    (user / "units" / "block_01.safetensors").write_bytes(b"not yours")
    before = _snapshot(user)
    code = main(["train", "--config", "tiny", "--run-dir", str(user), f"--data.cache_dir={data_cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not empty" in err[0]
    assert _snapshot(user) == before


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable"])
def test_train_refuses_a_run_dir_it_cannot_create_before_loading_data(kind, tmp_path, capsys, monkeypatch):
    import noprop_dist.run.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "load_data", lambda cfg: pytest.fail("data loaded before the check"))
    if kind == "file":
        target = tmp_path / "a_file"
        target.write_text("x")
    elif kind == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        target = tmp_path / "a_file" / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "run"
        if os.access(locked, os.W_OK):   # root ignores permission bits
            monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)
    code = main(["train", "--config", "tiny", "--run-dir", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "run-dir" in err[0], err
    assert "Traceback" not in "".join(err)


def test_export_never_writes_into_the_runs_own_files(trained_run, run_copy, tmp_path, capsys):
    before = _snapshot(run_copy)
    for own in ("manifest.json", "config.toml", "summary.json", "units/head.safetensors"):
        for force in ([], ["--force"]):
            assert main(["export", str(run_copy), str(run_copy / own), *force]) == 1
            assert "own files" in capsys.readouterr().err
    assert _snapshot(run_copy) == before


def test_export_refuses_existing_files_unless_forced_and_bad_targets_leave_nothing(run_copy, tmp_path, capsys):
    existing = tmp_path / "model.pt2"
    existing.write_bytes(b"someone's model")
    assert main(["export", str(run_copy), str(existing)]) == 1
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"someone's model"
    assert main(["export", str(run_copy), str(existing), "--force"]) == 0
    assert existing.read_bytes() != b"someone's model"
    capsys.readouterr()
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path, tmp_path / "a_file" / "m.pt2"):
        assert main(["export", str(run_copy), str(bad)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_saved_config_without_a_later_setting_keeps_what_it_trained_with():
    """A CT run written before issue 17 has no schedule_* keys in its config.toml: reading it
    back (for --resume, eval, export) gives the behaviour it trained with, not today's
    defaults; a config that has the keys reads back as itself."""
    from noprop_dist import config as config_mod

    cfg = config_mod.resolve("demo_ct", {})
    table = config_mod.to_dict(cfg)
    assert config_mod.from_dict(table) == cfg
    for section, key in config_mod.SAVED_BEFORE:
        del table[section][key]
    old = config_mod.from_dict(table).continuous
    assert (old.alpha_bar_0, old.alpha_bar_1, old.schedule_endpoints, old.schedule_shape) == (0.0, 0.0, "loss", "loss")
    assert cfg.continuous.schedule_shape == "variance"      # today's default, untouched by the read
