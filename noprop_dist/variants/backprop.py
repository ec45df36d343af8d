"""The back-propagation baselines, trained data-parallel: one plain worker loop, no Ray.

The same :func:`train_worker` runs

* in this process with no process group (``--cluster.backend=local``, the N = 1 point),
* on Ray Train workers, which open the process group (:mod:`noprop_dist.trainers.ddp`),
* under ``torchrun`` without Ray (:func:`torchrun_main`; the only place here that opens a
  process group itself)::

      torchrun --nproc-per-node 2 -m noprop_dist.variants.backprop --config demo --variant backprop --run-dir runs/bp

Data parallelism: every worker draws the same seeded permutation for an epoch and takes a
contiguous share of each global batch of ``train.batch_size`` (128 by default), so the
global batch stays fixed whatever the number of workers. Each worker's loss is scaled by
``local_size * world / global_size`` so that DDP's gradient average equals the gradient of
the global-batch mean, also when the shares are uneven.

BatchNorm: with ``cluster.sync_batchnorm`` (default) each BatchNorm layer normalises with
statistics of the global batch, all-reduced per layer (:class:`GlobalBatchNorm1d`; its
backward all-reduces the statistics' gradients, as torch's SyncBatchNorm does). Then N
workers compute what one worker computes on the whole batch, up to float rounding — which
the equivalence test checks. Without it each worker normalises with its own share's
statistics (the usual DDP default: cheaper, but a different function of the batch).

Rank 0 writes the run directory (metrics, checkpoints); on several nodes the run
directory must be on storage every node sees (for ``--resume``, every rank reads it).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from noprop_dist.core import schedule
from noprop_dist.run.rundir import RunDir
from noprop_dist.config import Config, EvalConfig, ModelConfig, TrainConfig
from noprop_dist.data import ArraySplit, Dataset, normalize
from noprop_dist.variants.dt import example_images
from noprop_dist.training.common import load_module_state
from noprop_dist.run.lifecycle import checkpoint_due, finish_run, finished_summary, load_data, open_run
from noprop_dist.nets.blocks import BLOCK_SIZES, BackpropChain, SingleTowerCNN
from noprop_dist.training.preflight import StepProbe, check_unit, device_memory_budget
from noprop_dist.variants.base import DROPOUT, INIT, NOISE, RANK_STREAM_STRIDE, SHUFFLE, derive_seed, make_embedding, resolve_device
from noprop_dist.training.data_parallel import ByteCounter, counting_allreduce, shard
from noprop_dist.training.meters import SavedTensorMeter, rss_bytes, training_state_bytes
from noprop_dist.training.optimizer_state import load_optimizer_state, optimizer_state_tensors
from noprop_dist.training.runner import diverged

# The differentiable all-reduce's deprecation names a private replacement; keep the public one.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")

NETWORK = "network"
"""The one unit of a back-propagation run (its checkpoint is units/network.safetensors)."""
NETWORK_SEED_UNIT = 1_000_000
"""Unit id of the network in derive_seed (far from any block index)."""


@dataclass(frozen=True)
class NetworkSetup:
    """What every worker of a back-propagation run needs (picklable, the same on every rank)."""

    variant: str
    model: ModelConfig
    train: TrainConfig
    T: int
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding: torch.Tensor     # initial W_embed (m, d); unused by backprop_cnn
    sync_batchnorm: bool


def make_network_setup(cfg: Config, data: Dataset) -> NetworkSetup:
    return NetworkSetup(variant=cfg.variant, model=cfg.model, train=cfg.train, T=cfg.schedule.T,
                        num_classes=data.num_classes, input_shape=data.input_shape,
                        mean=data.mean, std=data.std, embedding=make_embedding(cfg, data),
                        sync_batchnorm=cfg.cluster.sync_batchnorm)


def build_network(setup: NetworkSetup) -> nn.Module:
    """The baseline network, initialised from the run seed (identical on every rank)."""
    size = BLOCK_SIZES[setup.model.block]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(setup.train.seed, NETWORK_SEED_UNIT, 0, INIT))
        if setup.variant == "backprop_cnn":
            return SingleTowerCNN(setup.input_shape, setup.num_classes, size, setup.model.dropout)
        return BackpropChain(setup.input_shape, setup.embedding, setup.num_classes, size, setup.T,
                             setup.model.dropout, learn_embedding=setup.model.embedding != "one_hot")


def network_step_probe(setup: NetworkSetup) -> StepProbe:
    """The dry run of one training step of the whole network (:mod:`~noprop_dist.training.preflight`)."""
    d = setup.embedding.shape[1]

    def forward(net: nn.Module, batch: int) -> torch.Tensor:
        x = torch.zeros(batch, *setup.input_shape)                                # (B, C, H, W)
        return F.cross_entropy(net(x, torch.zeros(batch, d)), torch.zeros(batch, dtype=torch.long))

    return StepProbe(name=f"the {setup.variant} network ({setup.model.block} blocks)",
                     build=lambda: build_network(setup), forward=forward)


def manifest_fields(cfg: Config, data: Dataset, setup: NetworkSetup, net: nn.Module) -> dict[str, Any]:
    return {
        "T": setup.T if setup.variant == "backprop" else 0,
        "dataset": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "input_dtype": str(data.train.x.dtype), "embedding": cfg.model.embedding,
        "embedding_dim": int(setup.embedding.shape[1]), "block": cfg.model.block,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "parameters": sum(p.numel() for p in net.parameters()),
    }


MANIFEST_SCHEMA = {
    # What manifest_fields writes, checked on every read of the manifest (the vocabulary is
    # noprop_dist.run.rundir's; a check may read the keys above it).
    "T": "an integer >= 0",
    "dataset": "a string", "num_classes": "a positive integer", "input_shape": "3 positive integers (C, H, W)",
    "input_dtype": '"uint8" or "float32"', "embedding": "a string", "embedding_dim": "a positive integer",
    "block": "a string",
    "normalization": {"mean": "C numbers (C = input_shape[0])", "std": "C positive numbers (C = input_shape[0])"},
    "parameters": "a positive integer",
    "units": (lambda units, m: set(units) <= {NETWORK}, f"only the unit {NETWORK!r}"),
}


# ---------------------------------------------------------------------------------------
# BatchNorm over the global batch.
# ---------------------------------------------------------------------------------------
class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks.

    One differentiable all-reduce of (sum, sum of squares, count) per layer and step; the
    buffers and state-dict keys are those of BatchNorm1d, so checkpoints load into the
    plain network. ``payload_bytes`` counts what this layer all-reduces (forward+backward).
    """

    payload_bytes = 0
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        packed = torch.cat([x.sum(0), (x * x).sum(0), count])                   # (2C + 1,)
        packed = all_reduce(packed)                                              # sum over ranks
        GlobalBatchNorm1d.payload_bytes += 2 * packed.numel() * packed.element_size()
        GlobalBatchNorm1d.calls += 2                                             # forward and backward
        c = x.shape[1]
        total, n = packed[:c], packed[2 * c]
        mean = total / n                                                         # (C,)
        var = packed[c:2 * c] / n - mean * mean                                  # (C,) biased
        with torch.no_grad():
            # As BatchNorm1d: running variance is the unbiased one, momentum-averaged.
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach() * n / (n - 1))
        x_hat = (x - mean) / torch.sqrt(var + self.eps)                          # (B, C)
        return x_hat * self.weight + self.bias


def use_global_batchnorm(net: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d of ``net`` for a :class:`GlobalBatchNorm1d` with the same state."""
    for name, child in net.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum,
                                            child.affine, child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(net, name, replacement.to(child.weight.device))
        else:
            use_global_batchnorm(child)
    return net


# ---------------------------------------------------------------------------------------
# The worker loop.
# ---------------------------------------------------------------------------------------
def state_bytes(net: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state of ``net``, in bytes."""
    return training_state_bytes(list(net.parameters()), optimizer)


def network_state_tensors(net: nn.Module, optimizer: torch.optim.Optimizer, epochs_done: int) -> dict:
    out = {f"model/{k}": v for k, v in net.state_dict().items()}
    out.update(optimizer_state_tensors(optimizer))
    out["epochs_done"] = torch.tensor(epochs_done)
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def _load_network_state(net: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, where: Path) -> int:
    load_module_state(net, tensors, NETWORK, where)
    load_optimizer_state(optimizer, tensors)
    return int(tensors["epochs_done"])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, z_0: torch.Tensor,
               y: torch.Tensor, weight: float) -> torch.Tensor:
    """One optimizer step on this rank's share; returns the share's mean cross-entropy.

    ``weight = local_size * world / global_size``: DDP averages the ranks' gradients, so
    the step follows the gradient of the global batch's mean loss. The gradients stay in
    ``.grad`` until the next step.
    """
    loss = F.cross_entropy(model(x, z_0), y)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    optimizer.step()
    return loss.detach()


def train_worker(setup: NetworkSetup, train: ArraySplit, run_dir: str | Path, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu", show_progress: bool = False) -> dict:
    """Train the baseline on this rank's share of every global batch; rank 0 writes the run.

    The process group (world > 1) must already be open. Returns this run's figures
    (the same on every rank): per-epoch seconds, loss, bytes all-reduced, memory.
    """
    device = torch.device(device)
    run = RunDir(run_dir)
    net = build_network(setup).to(device)
    if world > 1 and setup.sync_batchnorm:
        use_global_batchnorm(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=setup.train.lr, weight_decay=setup.train.weight_decay)
    epochs_done = 0
    if NETWORK in run.manifest()["units"]:
        epochs_done = _load_network_state(net, optimizer, run.load_unit(NETWORK), run.path)
    model: nn.Module = net
    counter = ByteCounter()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # With global BatchNorm every rank holds the same running statistics: nothing to
        # broadcast. Without it DDP broadcasts rank 0's buffers at every forward (counted).
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=not setup.sync_batchnorm)
        model.register_comm_hook(counter, counting_allreduce)
        if not setup.sync_batchnorm:
            counter.per_step = sum(b.numel() * b.element_size() for b in net.buffers())
    n, batch, d = len(train), setup.train.batch_size, setup.embedding.shape[1]
    x_all, y_all = train.x, np.asarray(train.y)
    figures: dict[str, Any] = {"epochs": [], "peak_train_bytes": 0, "rss_bytes": 0}
    bar = _progress_bar(setup.train.epochs, epochs_done, show_progress and rank == 0)
    for epoch in range(epochs_done + 1, setup.train.epochs + 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed(setup.train.seed, NETWORK_SEED_UNIT, epoch, SHUFFLE)))
        # z_0 ~ N(0, I) per example, drawn for the whole epoch from the run seed: the same
        # rows whatever the number of workers (used by the structure-matched chain only).
        z_0_all = schedule.marginal_noise(n, d, derive_seed(setup.train.seed, NETWORK_SEED_UNIT, epoch, NOISE))
        counter.bytes = counter.calls = GlobalBatchNorm1d.payload_bytes = GlobalBatchNorm1d.calls = 0
        loss_total = torch.zeros((), dtype=torch.float64, device=device)   # sum of loss * share size
        examples = 0
        net.train()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(setup.train.seed, NETWORK_SEED_UNIT, epoch,
                                          DROPOUT + RANK_STREAM_STRIDE * rank))
            for step, start_i in enumerate(range(0, n, batch)):
                global_idx = order[start_i:start_i + batch]
                if len(global_idx) < max(2, world):
                    continue  # BatchNorm needs two examples; every rank needs one
                idx = shard(global_idx, rank, world).numpy()
                x = normalize(np.asarray(x_all[idx]), setup.mean, setup.std).to(device)   # (b, C, H, W)
                y = torch.from_numpy(y_all[idx]).to(device)                                 # (b,)
                z_0 = z_0_all[idx].to(device)                                                # (b, d)
                with SavedTensorMeter(step == 0, net) as meter:
                    loss = train_step(model, optimizer, x, z_0, y, len(idx) * world / len(global_idx))
                counter.bytes += counter.per_step
                if step == 0:
                    figures["peak_train_bytes"] = max(figures["peak_train_bytes"],
                                                      state_bytes(net, optimizer) + meter.bytes)
                loss_total += loss.double() * len(idx)   # stays on the device: no host sync per step
                examples += len(idx)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            figures["peak_train_bytes"] = max(figures["peak_train_bytes"], torch.cuda.max_memory_allocated(device))
        loss_sum = torch.stack([loss_total.cpu(), torch.tensor(float(examples), dtype=torch.float64)])
        record = _epoch_record(epoch, seconds, loss_sum, counter, n, world, figures, device)
        if not math.isfinite(record["loss"]):      # the same all-reduced value on every rank
            stop = diverged(NETWORK, epoch, record["loss"], setup.train)
            if rank == 0:
                run.append_metrics({"event": "diverged", "unit": NETWORK, "epoch": epoch, "reason": str(stop)})
            raise stop
        figures["epochs"].append(record)
        if rank == 0:
            run.append_metrics({"event": "unit_epoch", **record})
            if checkpoint_due(setup.train, epoch, shared_embedding=False):
                run.save_unit(NETWORK, network_state_tensors(net, optimizer, epoch), epoch,
                              finished=epoch == setup.train.epochs)
            bar.set_postfix_str(f"loss {record['loss']:.4g} {record['samples_per_s']:.0f} samples/s")
            bar.update(1)
        if world > 1:
            dist.barrier()  # no rank starts the next epoch (or leaves) before the checkpoint is on disk
    bar.close()
    return figures


def _epoch_record(epoch: int, seconds: float, loss_sum: torch.Tensor, counter: ByteCounter, n: int,
                  world: int, figures: dict, device: torch.device) -> dict:
    """One epoch's figures, gathered over ranks (outside the timed loop; on ``device``, since
    nccl reduces only CUDA tensors)."""
    bn_bytes = GlobalBatchNorm1d.payload_bytes
    calls = counter.calls + GlobalBatchNorm1d.calls
    local = torch.tensor([float(counter.bytes), float(bn_bytes), float(figures["peak_train_bytes"]),
                          float(rss_bytes()), seconds], dtype=torch.float64)
    if world > 1:
        loss_sum, local = loss_sum.to(device), local.to(device)
        dist.all_reduce(loss_sum)                              # global mean loss
        dist.all_reduce(local, op=dist.ReduceOp.MAX)           # the worst worker
        loss_sum, local = loss_sum.cpu(), local.cpu()
    loss = float(loss_sum[0] / max(loss_sum[1], 1.0))
    figures["peak_train_bytes"] = int(local[2])
    figures["rss_bytes"] = max(figures["rss_bytes"], int(local[3]))
    return {"unit": NETWORK, "epoch": epoch, "loss": loss, "seconds": float(local[4]),
            "samples_per_s": n / float(local[4]), "workers": world,
            "allreduce_grad_bytes_per_worker": int(local[0]),
            "allreduce_batchnorm_bytes_per_worker": int(local[1]),
            "allreduce_calls_per_worker": calls,
            "peak_memory_bytes": figures["peak_train_bytes"], "rss_bytes": int(local[3])}


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="epoch", disable=not enabled)


def ddp_summary(figures: dict, workers: int, threads: int, device: str, launcher: str) -> dict:
    """The trainer-specific part of summary.json for a back-propagation run."""
    epochs = figures["epochs"]
    return {"backend": launcher, "workers": workers, "threads_per_worker": threads, "device": device,
            "epoch_seconds": [e["seconds"] for e in epochs],
            "allreduce_bytes_per_worker_per_epoch": (
                epochs[-1]["allreduce_grad_bytes_per_worker"] + epochs[-1]["allreduce_batchnorm_bytes_per_worker"]
                if epochs else 0),
            "peak_memory_bytes": {NETWORK: figures["peak_train_bytes"]}, "rss_bytes": figures["rss_bytes"]}


def train_backprop_local(cfg: Config, run_dir: str | Path, resume: bool = False,
                         show_progress: bool = True) -> dict[str, Any]:
    """Train a back-propagation baseline in this process (no process group); returns the summary."""
    data = load_data(cfg)
    setup = make_network_setup(cfg, data)
    device = resolve_device(cfg.train.device)
    step = check_unit(network_step_probe(setup), min(cfg.train.batch_size, len(data.train)), data.input_shape,
                      device_memory_budget(device), 1, f"this machine ({device})")
    with open_run(cfg, run_dir, resume, manifest_fields(cfg, data, setup, build_network(setup))) as run:
        if (done := finished_summary(run)) is not None:
            return done
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        start = time.perf_counter()
        figures = train_worker(setup, data.train, run.path, 0, 1, device, show_progress)
        train_seconds = time.perf_counter() - start
        extra = ddp_summary(figures, 1, torch.get_num_threads(), str(device), "local")
        return finish_run(run, cfg, data, train_seconds, extra, step)


# ---------------------------------------------------------------------------------------
# Reading a finished run back.
# ---------------------------------------------------------------------------------------
class RawImageClassifier(nn.Module):
    """The exported predictor: raw images (uint8 0..255 or float) in, class logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return self.net((x - self.mean) / self.std, z_0)


class NetworkPredictor:
    """A finished back-propagation run as a predictor (see :mod:`noprop_dist.variants.registry`)."""

    def __init__(self, run: RunDir):
        from noprop_dist.run.results import load_run_config

        self.manifest = run.manifest()
        self.cfg = load_run_config(run)
        m = self.manifest
        setup = NetworkSetup(variant=self.cfg.variant, model=self.cfg.model, train=self.cfg.train,
                             T=self.cfg.schedule.T, num_classes=m["num_classes"],
                             input_shape=tuple(m["input_shape"]), mean=tuple(m["normalization"]["mean"]),
                             std=tuple(m["normalization"]["std"]),
                             embedding=torch.zeros(m["num_classes"], m["embedding_dim"]),
                             sync_batchnorm=False)
        net = build_network(setup)
        self.net = load_module_state(net, run.load_unit(NETWORK), NETWORK, run.path).eval()
        self.mean, self.std = setup.mean, setup.std
        self.embedding_dim = m["embedding_dim"]

    @torch.no_grad()
    def evaluate(self, split: ArraySplit, eval_cfg: EvalConfig, device: torch.device | str = "cpu",
                 max_batch: int | None = None) -> dict:
        """Test accuracy; z_0 is drawn per ``eval.batch_size`` examples and each batch runs in
        forward passes of at most ``max_batch`` (the draws do not depend on it)."""
        net = self.net.to(device).eval()
        gen = torch.Generator().manual_seed(eval_cfg.seed)
        batch = eval_cfg.batch_size
        step = min(batch, max_batch or batch)
        correct = 0
        for start in range(0, len(split), batch):
            z_0 = torch.randn(min(batch, len(split) - start), self.embedding_dim, generator=gen)   # (B, d)
            for lo in range(0, len(z_0), step):
                sel = slice(start + lo, start + min(len(z_0), lo + step))
                x = normalize(np.asarray(split.x[sel]), self.mean, self.std).to(device)
                y = torch.from_numpy(np.array(split.y[sel])).to(device)
                correct += int((net(x, z_0[lo:lo + step].to(device)).argmax(-1) == y).sum())
        return {"test_accuracy": correct / max(len(split), 1)}

    def export_program(self):
        """A torch.export program ``(images, z_0) -> logits``; images raw (N, C, H, W) of the
        training data's dtype, normalised inside; ``z_0`` (N, d) standard normal noise
        (the structure-matched chain starts from it; the CNN ignores it)."""
        model = RawImageClassifier(self.net.cpu().eval(), self.mean, self.std).eval()
        batch = torch.export.Dim("batch", min=1)
        z_0 = torch.randn(4, self.embedding_dim, generator=torch.Generator().manual_seed(0))
        return torch.export.export(model, (example_images(self.manifest), z_0),
                                   dynamic_shapes=({0: batch}, {0: batch}))


# ---------------------------------------------------------------------------------------
# torchrun, without Ray.
# ---------------------------------------------------------------------------------------
def torchrun_main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m noprop_dist.variants.backprop [train options]``.

    Rank 0 checks the config and creates the run directory; every rank then trains its
    share; rank 0 evaluates and writes the summary.
    """
    import argparse
    import sys

    from noprop_dist import config as config_mod
    from noprop_dist.cli import parse_overrides
    from noprop_dist.errors import NoPropError

    parser = argparse.ArgumentParser(prog="torchrun ... -m noprop_dist.variants.backprop")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--run-dir", required=True)
    args, extra = parser.parse_known_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        overrides = {"cluster.backend": "local", **parse_overrides(extra)}
        cfg = config_mod.resolve(args.config, overrides)
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.set_num_threads(cfg.cluster.threads_per_worker)
        data = load_data(cfg)
        setup = make_network_setup(cfg, data)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        step = check_unit(network_step_probe(setup), -(-min(cfg.train.batch_size, len(data.train)) // world),
                          data.input_shape,
                          device_memory_budget(device), 1 if device.type == "cuda" else local_world,
                          f"this machine ({device})")
        with contextlib.ExitStack() as held:
            refused: NoPropError | None = None
            if rank == 0:   # rank 0 creates the run and holds its lock until the end
                try:
                    held.enter_context(open_run(cfg, args.run_dir, False,
                                                manifest_fields(cfg, data, setup, build_network(setup))))
                except NoPropError as exc:
                    refused = exc
            flag = torch.tensor([float(refused is not None)], device=device)
            dist.all_reduce(flag)          # every rank learns whether rank 0 could open the run
            if refused is not None:
                raise refused
            if flag.item():
                dist.destroy_process_group()
                return 1
            start = time.perf_counter()
            figures = train_worker(setup, data.train, args.run_dir, rank, world, device, show_progress=rank == 0)
            train_seconds = time.perf_counter() - start
            if rank == 0:
                summary = finish_run(RunDir(args.run_dir), cfg, data, train_seconds,
                                     ddp_summary(figures, world, cfg.cluster.threads_per_worker, str(device),
                                                 "torchrun"), step)
                print(f"test accuracy: {summary['test_accuracy']:.4f}")
            dist.barrier()
        dist.destroy_process_group()
        return 0
    except NoPropError as exc:
        print(f"noprop-dist: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(torchrun_main())
