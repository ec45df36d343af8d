"""Bad input a new user meets first (issue 19): a GPU that is not there, channels-last images,
absurd or unknown manifest values, a schedule out of bounds, and ``--data.limit_train``; and
the README's example of calling an exported ``.pt2``.

The contract is :mod:`test_bad_input`'s: one ``noprop-dist: error:`` line (checked in full
here), the exit code of its kind, no traceback, and nothing written or changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_config_cli import one_error_line

from noprop_dist.cli import main
from noprop_dist.config import ClusterConfig, ConfigError, DataConfig, resolve, worker_request
from noprop_dist.data import load_dataset, load_file, normalize
from noprop_dist.errors import DeviceUnavailable
from noprop_dist.trainers.ray.placement import plan_layout
from noprop_dist.variants import base
from noprop_dist.variants.base import evaluation_device
from noprop_dist.variants.dt import block

NO_GPU_FIX = "pass --train.device=cpu (or auto: a GPU where there is one)"


def _train(run_dir: Path, data_cache: str, *extra: str) -> int:
    return main(["train", "--config", "tiny", "--run-dir", str(run_dir), f"--data.cache_dir={data_cache}",
                 "--cluster.backend=local", "--no-progress", *extra])


def _refused(tmp_path, capsys, data_cache, extra, code=2) -> str:
    """The line a refused ``train`` printed; its run directory was never created."""
    run_dir = tmp_path / "run"
    got = _train(run_dir, data_cache, *extra)
    line = one_error_line(capsys.readouterr().err)
    assert got == code, line
    assert not run_dir.exists(), "a refused run must not create its run directory"
    return line


# --------------------------------------------------------------- 1. a GPU that is not there

@pytest.mark.parametrize("device,gpus,message", [
    ("cuda", 0, f"train.device=cuda asks for a GPU but this machine has no GPU; {NO_GPU_FIX}"),
    ("cuda:3", 0, f"train.device=cuda:3 asks for GPU 3 but this machine has no GPU; {NO_GPU_FIX}"),
    ("cuda:3", 2, "train.device=cuda:3 asks for GPU 3 but this machine has 2 GPU(s), cuda:0..cuda:1; "
                  "pass --train.device=cuda:1 or lower (or auto)"),
])
def test_a_gpu_that_is_not_there_is_refused_before_the_run_exists(device, gpus, message, tmp_path, capsys,
                                                                   data_cache, monkeypatch):
    """Used to trace back (``Found no NVIDIA driver``) from the memory preflight. ``gpus``
    stands in for the machine's GPU count (the check only reads it)."""
    if gpus:
        monkeypatch.setattr(base, "local_gpus", lambda cluster=None: (gpus, "this machine"))
    elif torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = _refused(tmp_path, capsys, data_cache, [f"--train.device={device}"])
    assert line == f"noprop-dist: error: {message}"


def test_torchrun_refuses_a_local_rank_beyond_the_gpus(tmp_path, capsys, monkeypatch, data_cache):
    """``torchrun --nproc-per-node 2`` on a one-GPU machine: rank 1 says so before the process
    group opens (nothing to wait for, nothing written)."""
    from noprop_dist.trainers import torchrun

    monkeypatch.setattr(base, "local_gpus", lambda cluster=None: (1, "this machine"))
    monkeypatch.setattr(torchrun, "local_gpus", lambda cluster=None: (1, "this machine"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    run_dir = tmp_path / "run"
    code = torchrun.main(["--config", "tiny", "--variant=backprop", "--run-dir", str(run_dir), "--train.device=cuda",
                          f"--data.cache_dir={data_cache}"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and not run_dir.exists()
    assert line == ("noprop-dist: error: train.device=cuda: the torchrun process of LOCAL_RANK=1 needs GPU 1 but "
                    "this machine has 1 GPU(s); start at most 1 per node (--nproc-per-node) or pass "
                    "--train.device=cpu")


GPU_WORKERS_FIX = ("pass --cluster.gpus_per_worker=0 (CPU workers) or -1 (GPUs where the cluster has them), "
                   "or join a cluster with GPUs (--address)")


@pytest.mark.parametrize("gpus_per_worker,workers", [(1.0, 0), (0.5, 4)])
def test_gpu_workers_on_a_cluster_without_gpus_are_refused_by_the_placement(gpus_per_worker, workers):
    """Used to say "lower --cluster.workers ... pack blocks with --cluster.gpus_per_worker=0.5",
    which cannot help where there is no GPU."""
    cluster = ClusterConfig(gpus_per_worker=gpus_per_worker, workers=workers)
    with pytest.raises(DeviceUnavailable) as caught:
        plan_layout([block(t) for t in range(1, 5)], cluster, {"CPU": 8.0})
    assert str(caught.value) == (f"cluster.gpus_per_worker={gpus_per_worker:g} asks for GPU workers but the Ray "
                                 f"cluster has no free GPU (8 CPU, 0 GPU); {GPU_WORKERS_FIX}")


@pytest.mark.parametrize("backend", ["ray", "ddp"])
@pytest.mark.parametrize("device,gpus,message", [
    ("cuda", "0", "train.device=cuda asks for GPU training but cluster.gpus_per_worker=0 gives the Ray workers no "
                  "GPU; pass --cluster.gpus_per_worker=-1 (a GPU each where the cluster has them) or --train.device=cpu"),
    ("cuda:1", "0", "train.device=cuda:1 asks for GPU training but cluster.gpus_per_worker=0"),
    ("cpu", "0.5", "train.device=cpu but cluster.gpus_per_worker=0.5 reserves GPUs the Ray workers would not use; "
                   "pass --cluster.gpus_per_worker=0 (or -1) or --train.device=auto"),
])
def test_a_device_the_ray_workers_cannot_use_is_refused(backend, device, gpus, message):
    """The Ray workers train on the device Ray gives them: a GPU device with CPU workers (they
    trained on the CPU, silently) or GPU workers told to use the CPU is one line, before anything."""
    variant = "fm" if backend == "ddp" else "dt"
    with pytest.raises(ConfigError) as caught:
        resolve("tiny", {"variant": variant, "cluster.backend": backend, "train.device": device,
                         "cluster.gpus_per_worker": gpus})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    resolve("tiny", {"train.device": device, "cluster.gpus_per_worker": gpus, "cluster.backend": "local"})


def test_train_device_cpu_makes_the_auto_request_cpu_workers():
    """train.device=cpu on a cluster with GPUs: CPU workers (the auto request took a GPU each,
    and the workers trained on it); auto and cuda keep a GPU each."""
    units = [block(t) for t in range(1, 5)]
    gpus = {"CPU": 8.0, "GPU": 4.0}
    assert plan_layout(units, worker_request(resolve("tiny", {"train.device": "cpu"})), gpus).gpus == 0
    for device in ("auto", "cuda"):
        assert plan_layout(units, worker_request(resolve("tiny", {"train.device": device})), gpus).gpus == 1
    explicit = resolve("tiny", {"train.device": "cpu", "cluster.gpus_per_worker": "0"})
    assert worker_request(explicit) is explicit.cluster


def test_a_ray_driver_without_the_gpu_evaluates_on_the_cpu():
    """On the Ray backends train.device is checked against the cluster's GPUs (its workers');
    the driver that evaluates the finished run uses the CPU where it has no such GPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert evaluation_device("cuda:1") == torch.device("cpu")
    assert evaluation_device("cpu") == torch.device("cpu")


@pytest.mark.slow   # starts a private Ray in a fresh process (10-20 s each)
@pytest.mark.parametrize("extra,message", [
    (["--cluster.backend=ray", "--train.device=cuda"],
     f"train.device=cuda asks for a GPU but the private local Ray has no GPU; {NO_GPU_FIX}"),
    (["--cluster.backend=ray", "--cluster.local_gpus=2", "--train.device=cuda:2"],
     "train.device=cuda:2 asks for GPU 2 but the private local Ray has 2 GPU(s), cuda:0..cuda:1; "
     "pass --train.device=cuda:1 or lower (or auto)"),
    (["--cluster.backend=ray", "--cluster.gpus_per_worker=1"],
     f"cluster.gpus_per_worker=1 asks for GPU workers but the Ray cluster has no free GPU (2 CPU, 0 GPU); "
     f"{GPU_WORKERS_FIX}"),
    (["--cluster.backend=ddp", "--variant=fm", "--cluster.gpus_per_worker=1"],
     f"cluster.gpus_per_worker=1 asks for GPU workers but the Ray cluster has no free GPU (2 CPU, 0 GPU); "
     f"{GPU_WORKERS_FIX}"),
])
def test_ray_backends_check_the_clusters_gpus_not_the_drivers(extra, message, tmp_path, data_cache):
    """The whole command in a fresh process (its own private Ray, 2 CPUs, no GPU unless
    ``--cluster.local_gpus``): one line, exit 2, no traceback, no run directory."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "noprop_dist.cli", "train", "--config", "tiny", "--run-dir",
                           str(run_dir), f"--data.cache_dir={data_cache}", "--cluster.local_cpus=2",
                           "--cluster.local_gpus=0", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("noprop-dist:")]
    assert lines == [f"noprop-dist: error: {message}"], proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


# --------------------------------------------------------------- 3. channels-last images

def _npz(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, y=y)
    return path


def _images(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % classes


@pytest.mark.parametrize("shape,layout", [((8, 8, 3), "auto"), ((8, 8, 1), "auto"), ((6, 10, 3), "auto"),
                                          ((3, 3, 3), "nhwc"), ((8, 8, 8), "nhwc")])
def test_channels_last_arrays_are_read_channels_first(shape, layout, tmp_path):
    """PIL/OpenCV order (N, H, W, C) used to be read as C = H ("do not fit the tiny DT block")."""
    x = _images(20, shape)
    split = load_file(_npz(tmp_path, "hwc", x, _labels(20)), layout)
    np.testing.assert_array_equal(split.x, np.moveaxis(x, 3, 1))


@pytest.mark.parametrize("shape,layout", [((3, 8, 8), "auto"), ((3, 4, 5), "auto"), ((3, 3, 3), "nchw")])
def test_channels_first_arrays_are_kept(shape, layout, tmp_path):
    x = _images(20, shape)
    np.testing.assert_array_equal(load_file(_npz(tmp_path, "chw", x, _labels(20)), layout).x, x)


def test_a_channels_last_table_with_its_shape_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = _images(12, (4, 5, 3))                                           # (N, H, W, C)
    table = pa.table({"x": pa.array(list(x.reshape(12, -1))), "y": pa.array(_labels(12))})
    pq.write_table(table.replace_schema_metadata({"shape": "[4, 5, 3]"}), tmp_path / "hwc.parquet")
    np.testing.assert_array_equal(load_file(tmp_path / "hwc.parquet", "nhwc").x, np.moveaxis(x, 3, 1))


@pytest.mark.parametrize("shape,first,last", [((3, 3, 3), "3 channel(s) of 3x3", "3 channel(s) of 3x3"),
                                              ((1, 28, 3), "1 channel(s) of 28x3", "3 channel(s) of 1x28"),
                                              ((8, 8, 8), "8 channel(s) of 8x8", "8 channel(s) of 8x8")])
def test_ambiguous_layouts_are_refused_with_the_fix(shape, first, last, tmp_path, capsys, data_cache):
    path = _npz(tmp_path, "ambiguous", _images(40, shape), _labels(40))
    line = _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}"], code=1)
    assert line == (f"noprop-dist: error: data file {path}: x of shape (40, {', '.join(map(str, shape))}) may be "
                    f"channels first ({first}) or channels last ({last}); say which with --data.layout=nchw or "
                    "--data.layout=nhwc")


def test_a_channels_last_file_trains_and_evaluates(tmp_path, capsys, data_cache, digits):
    """End to end: 8x8 digits stored (N, H, W, 1) train under the default layout, and ``eval
    --data`` reads a channels-last file as the run read its data."""
    x = np.moveaxis(np.asarray(digits.train.x[:200]), 1, 3)             # (N, 8, 8, 1)
    path = _npz(tmp_path, "digits_hwc", x, np.asarray(digits.train.y[:200]))
    run_dir = tmp_path / "run"
    assert _train(run_dir, data_cache, "--data.name=file", f"--data.path={path}", "--train.epochs=1") == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 200


# --------------------------------------------------------------- 9. --data.limit_train

def test_limit_train_is_a_stratified_seeded_sample(tiny_config):
    """mnist_subset and digits are stored by class: the first 1,000 examples of mnist_subset
    are digits 0-2 and used to score 0.100. The limit now keeps every class in proportion,
    the same examples each time, in file order."""
    cfg = tiny_config({"data.limit_train": "100"})
    data = load_dataset(cfg.data)
    full = load_dataset(tiny_config().data)
    counts = np.bincount(np.asarray(data.train.y), minlength=10)
    expected = np.bincount(np.asarray(full.train.y), minlength=10) * 100 / len(full.train)
    assert len(data.train) == 100 and np.all(np.abs(counts - expected) < 1), counts
    again = load_dataset(cfg.data)
    np.testing.assert_array_equal(again.train.x, data.train.x)
    rows = {bytes(r) for r in np.asarray(full.train.x).reshape(len(full.train), -1)}
    assert all(bytes(r) in rows for r in np.asarray(data.train.x).reshape(100, -1))
    assert len(data.test) == len(full.test)


def test_limit_train_keeps_a_rare_class_and_the_file_order(tmp_path):
    """A class of 2 in 200 still gets one example of 10; the sample keeps the file order."""
    y = np.concatenate([np.zeros(198, np.int64), np.ones(2, np.int64)])
    x = np.arange(200, dtype=np.uint8).reshape(200, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    path = _npz(tmp_path, "rare", x, y)
    cfg = DataConfig(name="file", path=str(path), test_path=str(path), cache_dir=str(tmp_path / "cache"),
                     limit_train=10)
    train = load_dataset(cfg).train
    assert list(np.bincount(np.asarray(train.y))) == [9, 1]
    assert np.all(np.diff(np.asarray(train.x)[:, 0, 0, 0].astype(int)) > 0)


# --------------------------------------------------------------- 10. calling an exported .pt2

def test_the_documented_three_line_example_runs_on_an_exported_run(trained_run, digits, tmp_path):
    """The example in noprop_dist.run.exported's docstring (the README's), run as written on
    an exported tiny run: logits (N, classes), and the predictions of the chain fed the same
    draws (those of `eval` for one batch of N with eval.seed = seed)."""
    from noprop_dist.nets.chain import predict
    from noprop_dist.run import exported
    from noprop_dist.run.results import export_run
    from noprop_dist.variants.dt import load_chain

    out = export_run(trained_run[0], tmp_path / "model.pt2")
    example = exported.__doc__.split("::\n\n")[1].split("\n\n")[0]
    assert len(example.strip().splitlines()) == 3
    images = torch.from_numpy(np.array(digits.test.x[:50]))                       # (50, 1, 8, 8) uint8
    scope = {"torch": torch, "inference_noise": exported.inference_noise, "images": images}
    exec(example.replace('"model.pt2"', repr(str(out))).replace("\n    ", "\n").strip(), scope)
    logits = scope["logits"]
    assert logits.shape == (50, digits.num_classes) and scope["noise"].shape == (5, 50, 10)
    chain, cfg, _ = load_chain(trained_run[0])
    x = normalize(images.numpy(), digits.mean, digits.std)
    assert torch.equal(logits.argmax(-1), predict(chain, x, seed=0))


def test_inference_noise_without_the_step_noise_keeps_z0(trained_run, tmp_path):
    from noprop_dist.run.exported import inference_noise
    from noprop_dist.run.results import export_run

    program = torch.export.load(str(export_run(trained_run[0], tmp_path / "model.pt2")))
    full, plain = inference_noise(program, 3, seed=7), inference_noise(program, 3, seed=7, with_noise=False)
    assert torch.equal(full[0], plain[0]) and not plain[1:].any()


# --------------------------------------------------------------- 5. manifest bounds, schedule bounds

DAMAGED = "the run directory is damaged — restore manifest.json from a backup or retrain with a new --run-dir"


def _set(key, value):
    def change(manifest):
        manifest[key] = value
    return change


def _bad_alpha_bar(manifest):
    manifest["schedule"]["alpha_bar"] = list(reversed(manifest["schedule"]["alpha_bar"]))


def _unit_entry_key(manifest):
    manifest["units"]["head"]["origin"] = "elsewhere"


@pytest.mark.parametrize("damage,problem", [
    (_set("num_classes", 10**9), "num_classes is 1000000000, expected a positive integer <= 65536"),
    (_set("embedding_dim", 10**9), "embedding_dim is 1000000000, expected a positive integer <= 4194304"),
    (_set("input_shape", [3, 100000, 100000]),
     "input_shape is [3, 100000, 100000], expected 3 positive integers (C, H, W), C*H*W <= 4194304"),
    (_set("T", 10**6), "T is 1000000, expected an integer in 1..1000"),
    (_bad_alpha_bar, "schedule.alpha_bar is a list of 5 items, expected T + 1 increasing numbers in (0, 1)"),
    (_set("surprise", 1), "unknown key 'surprise'"),
    (_unit_entry_key, "units.head has an unknown key 'origin'"),
], ids=["classes", "embedding_dim", "input_shape", "T", "alpha_bar", "unknown_key", "unknown_entry_key"])
def test_absurd_or_unknown_manifest_values_are_refused_by_eval_and_export(damage, problem, run_copy, tmp_path,
                                                                          capsys):
    """Each used to pass the manifest check; the sizes then allocated at export (a 10^9-class
    head), an unknown key was silently ignored. Nothing is read further, nothing written."""
    path = run_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    for command in (["eval", str(run_copy)], ["export", str(run_copy), str(tmp_path / "model.pt2")]):
        code = main(command)
        line = one_error_line(capsys.readouterr().err)
        assert code == 1 and line == f"noprop-dist: error: {path}: {problem}; {DAMAGED}", line
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize("override,message", [
    ("--schedule.T=1001", "schedule.T=1001 is above its limit of 1000; pass a smaller value"),
    ("--data.max_classes=1000000", "data.max_classes=1000000 is above its limit of 65536; pass a smaller value"),
    ("--data.layout=hwc", "data.layout='hwc' is not one of auto, nchw, nhwc"),
])
def test_schedule_and_class_bounds_are_config_errors(override, message, tmp_path, capsys, data_cache):
    line = _refused(tmp_path, capsys, data_cache, [override])
    assert line == f"noprop-dist: error: {message}"


def test_images_above_the_size_limit_are_refused(tmp_path, capsys, data_cache, monkeypatch):
    """The bound the manifest check uses holds for the data too (a smaller one stands in)."""
    from noprop_dist import data

    monkeypatch.setattr(data, "MAX_INPUT_VALUES", 100)
    path = _npz(tmp_path, "big", _images(40, (1, 8, 16)), _labels(40))
    line = _refused(tmp_path, capsys, data_cache, ["--data.name=file", f"--data.path={path}"], code=1)
    assert line == (f"noprop-dist: error: {path}: images of shape 1x8x16 hold 128 values, above the limit of 100; "
                    "downscale or crop them")
