"""The back-propagation baselines: Eq. 17 semantics, data-parallel sharding, global BatchNorm,
DDP gradients equal to the full batch's, in-process training, eval and export, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from noprop_dist import config
from noprop_dist.trainers.local import train_local
from noprop_dist.training.data_parallel import DataParallel, shard, use_global_batchnorm
from noprop_dist.training.runner import UnitRunner
from noprop_dist.variants.backprop import NETWORK_UNIT, BackpropObjective, NetworkPredictor
from noprop_dist.variants.base import make_setup
from noprop_dist.rundir import RunDir
from noprop_dist.cli import main
from noprop_dist.data import normalize
from noprop_dist.run.lifecycle import load_data
from noprop_dist.nets.blocks import BLOCK_SIZES, BackpropChain, denoised_embedding
from gloo_ranks import join_gloo, leave_gloo


def _cfg(cache: str, variant: str, **overrides) -> config.Config:
    base = {"data.cache_dir": cache, "variant": variant, "cluster.backend": "local", "model.dropout": "0"}
    base.update({k: str(v) for k, v in overrides.items()})
    return config.resolve("tiny", base)


# ---- the networks -----------------------------------------------------------------------
def test_structure_matched_chain_follows_eq17():
    """alpha_t = tanh(w_t): with alpha = 0 every block is skipped (z_T = z_0); with alpha = 1
    z_T is the last block's denoised embedding; in between the convex mix of Eq. 17."""
    torch.manual_seed(0)
    emb = torch.eye(3)
    net = BackpropChain((1, 8, 8), emb, 3, BLOCK_SIZES["tiny"], T=2, dropout=0.0, learn_embedding=False).eval()
    x, z_0 = torch.randn(5, 1, 8, 8), torch.randn(5, 3)
    with torch.no_grad():
        net.w.fill_(0.0)
        assert torch.allclose(net(x, z_0), net.head(z_0))
        net.w.fill_(20.0)   # tanh(20) = 1 in float32
        u_1 = denoised_embedding(net.blocks[0](z_0, x), emb)
        u_2 = denoised_embedding(net.blocks[1](u_1, x), emb)
        assert torch.allclose(net(x, z_0), net.head(u_2), atol=1e-6)
        net.w.copy_(torch.tensor([0.3, -0.2]))
        a = torch.tanh(net.w)
        z_1 = (1 - a[0]) * z_0 + a[0] * denoised_embedding(net.blocks[0](z_0, x), emb)
        z_2 = (1 - a[1]) * z_1 + a[1] * denoised_embedding(net.blocks[1](z_1, x), emb)
        assert torch.allclose(net(x, z_0), net.head(z_2), atol=1e-6)


def test_network_init_is_seeded_and_independent_of_global_rng(tiny_config, digits):
    cfg = config.apply_overrides(tiny_config(), {"variant": "backprop"}, "test")
    setup = make_setup(cfg, digits)
    torch.manual_seed(123)
    a = BackpropObjective().build_module(NETWORK_UNIT, setup).state_dict()
    torch.manual_seed(456)
    b = BackpropObjective().build_module(NETWORK_UNIT, setup).state_dict()
    assert a.keys() == b.keys() and len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a)
    other = BackpropObjective().build_module(NETWORK_UNIT, make_setup(
        config.apply_overrides(cfg, {"train.seed": "1"}, "test"), digits)).state_dict()
    assert not torch.equal(a["head.linear.weight"], other["head.linear.weight"])   # the run seed decides


@pytest.mark.parametrize("n,world", [(128, 2), (127, 2), (10, 3), (5, 4)])
def test_shards_partition_each_global_batch(n, world):
    idx = torch.arange(n)
    parts = [shard(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), idx)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


# ---- two real processes over gloo ---------------------------------------------------------
def _bn_worker(rank: int, x: torch.Tensor, out: str) -> None:
    join_gloo(rank, 2, f"{out}.store")
    torch.manual_seed(0)
    bn = use_global_batchnorm(nn.Sequential(nn.BatchNorm1d(x.shape[1])))
    part = shard(torch.arange(len(x)), rank, 2)
    xr = x[part].clone().requires_grad_(True)
    y = bn(xr)
    (y * torch.arange(1.0, x.shape[1] + 1)).pow(2).sum().backward()
    torch.save({"y": y.detach(), "grad": xr.grad, "state": bn.state_dict()}, f"{out}.{rank}")
    leave_gloo()


def test_global_batchnorm_over_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Outputs, input gradients and running statistics of two ranks with GlobalBatchNorm1d
    are those of one BatchNorm1d on the concatenated batch (odd size: uneven shares)."""
    x = torch.randn(9, 4) * 3 + 1
    mp.spawn(_bn_worker, args=(x, str(tmp_path / "bn")), nprocs=2)
    parts = [torch.load(f"{tmp_path / 'bn'}.{r}") for r in range(2)]
    ref = nn.BatchNorm1d(4)
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * torch.arange(1.0, 5)).pow(2).sum().backward()
    assert torch.allclose(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([p["grad"] for p in parts]), xr.grad, atol=1e-5)
    for key in ("0.running_mean", "0.running_var", "0.num_batches_tracked"):
        assert torch.allclose(parts[0]["state"][key].float(), ref.state_dict()[key[2:]].float(), atol=1e-6), key


def _one_step_grads(cfg: config.Config, parallel: DataParallel | None) -> dict[str, torch.Tensor]:
    """The gradients of the network's one step of an epoch (a training split of one global
    batch), trained by the unit loop; with ``parallel``, this rank's DDP-averaged ones."""
    data = load_data(cfg)
    runner = UnitRunner(NETWORK_UNIT, make_setup(cfg, data), data.train, "cpu", parallel)
    runner.run_epoch(1)
    return {n: p.grad.clone() for n, p in runner.module.named_parameters()}


def _grad_worker(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    join_gloo(rank, world, f"{out}.store")
    grads = _one_step_grads(config.from_dict(cfg_dict), DataParallel(rank, world, sync_batchnorm=True))
    if rank == 0:
        torch.save(grads, out)
    leave_gloo()


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
@pytest.mark.parametrize("variant", ["backprop", "backprop_cnn"])
def test_ddp_gradient_of_two_ranks_equals_the_full_batch_gradient(variant, data_cache, tmp_path):
    """What DDP + global BatchNorm computes in the unit loop: the all-reduced gradient of 2
    ranks (uneven shares of a batch of 63) is the gradient of the whole batch's mean loss on one."""
    cfg = _cfg(data_cache, variant, **{"train.batch_size": 63, "data.limit_train": 63})
    out = str(tmp_path / "grads.pt")
    load_data(cfg)   # the cache is converted here, not by two ranks at once
    mp.spawn(_grad_worker, args=(2, config.to_dict(cfg), out), nprocs=2)
    two = torch.load(out)
    torch.set_num_threads(1)
    one = _one_step_grads(cfg, None)
    # Rounding is relative to the gradient's overall scale: the biases in front of a
    # BatchNorm have a true gradient of exactly 0 and carry only rounding noise.
    scale = max(float(g.abs().max()) for g in one.values())
    assert scale > 1e-3
    for name, g in one.items():
        assert float((two[name] - g).abs().max()) <= 1e-5 * scale, name


# ---- training, eval, export ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_run(data_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bp") / "cnn"
    cfg = _cfg(data_cache, "backprop_cnn", **{"train.epochs": 3})
    train_local(cfg, run_dir, show_progress=False)
    return run_dir


def test_local_backprop_run_trains_and_writes_a_run_directory(cnn_run):
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert summary["variant"] == "backprop_cnn" and summary["workers"] == 1
    assert summary["test_accuracy"] > 0.8          # 10 classes: chance is 0.1
    losses = [r["loss"] for r in RunDir(cnn_run).read_metrics() if r.get("event") == "unit_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert summary["peak_memory_bytes"]["network"] > 0 and summary["rss_bytes"] > 0
    assert (cnn_run / "training.png").stat().st_size > 0


def test_eval_and_export_of_a_backprop_run(cnn_run, tmp_path, capsys):
    assert main(["eval", str(cnn_run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert scores["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["export", str(cnn_run), str(tmp_path / "cnn.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "cnn.pt2")).module()
    predictor = NetworkPredictor(RunDir(cnn_run))
    cfg = predictor.cfg
    data = load_data(cfg)
    images = torch.from_numpy(np.array(data.test.x[:7]))
    net = predictor.network
    z_0 = torch.randn(7, net.embedding_dim)
    with torch.no_grad():
        expected = net.net(normalize(np.asarray(data.test.x[:7]), net.mean, net.std), z_0)
        assert torch.allclose(program(images, z_0), expected, atol=1e-4)


def test_resume_of_a_backprop_run_continues_where_it_stopped(data_cache, tmp_path):
    """Two epochs, then --resume to four, gives the weights of four epochs in one go."""
    full = tmp_path / "full"
    train_local(_cfg(data_cache, "backprop_cnn", **{"train.epochs": 4}), full, show_progress=False)
    part = tmp_path / "part"
    train_local(_cfg(data_cache, "backprop_cnn", **{"train.epochs": 2}), part, show_progress=False)
    # Pretend the run was asked for 4 epochs and stopped (still "running") after 2.
    text = (part / "config.toml").read_text().replace("epochs = 2", "epochs = 4")
    (part / "config.toml").write_text(text)
    manifest = json.loads((part / "manifest.json").read_text())
    (part / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    a, b = RunDir(full).load_unit("network"), RunDir(part).load_unit("network")
    assert int(b["epochs_done"]) == 4
    model = [k for k in a if k.startswith("model/")]
    assert model and all(torch.equal(a[k], b[k]) for k in model)


def test_backprop_variant_on_the_ray_backend_is_a_one_line_config_error(capsys):
    assert main(["train", "--config", "tiny", "--variant", "backprop", "--cluster.backend=ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.backend=ray" in err[0] and "ddp" in err[0]


def test_unknown_variant_is_a_config_error(capsys):
    assert main(["train", "--config", "tiny", "--variant=nope"]) == 2
    assert "variant='nope' is not one of" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_without_ray(data_cache, tmp_path):
    run_dir = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",   # torchrun picks the port
         "-m", "noprop_dist.trainers.torchrun", "--config", "tiny", "--run-dir", str(run_dir), "--variant=backprop_cnn",
         f"--data.cache_dir={data_cache}", "--train.epochs=1"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # DDP is built with the keyword torch expects (issue 19, item 11: two broadcast_buffers warnings per run).
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "torchrun" and summary["workers"] == 2
    assert summary["allreduce_bytes_per_worker_per_epoch"] > 0
    assert main(["eval", str(run_dir), "--json"]) == 0


@pytest.mark.slow
def test_core_and_a_local_backprop_run_import_neither_ray_nor_open_a_process_group(tmp_path, data_cache):
    """Ray lives only in the trainer modules that need it; the registries, the lifecycle and
    the baselines' loop import it not, and the N = 1 run opens no process group."""
    code = (
        "import sys\n"
        "import torch.distributed as dist\n"
        "import noprop_dist.cli, noprop_dist.variants.registry, noprop_dist.run.lifecycle\n"
        "from noprop_dist.config import resolve\n"
        "from noprop_dist.trainers.local import train_local\n"
        f"cfg = resolve('tiny', {{'data.cache_dir': {data_cache!r}, 'train.epochs': '1', 'variant': 'backprop',"
        " 'cluster.backend': 'local'})\n"
        f"train_local(cfg, {str(tmp_path / 'run')!r}, show_progress=False)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "assert not dist.is_initialized(), 'a process group was opened'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
