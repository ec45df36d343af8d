"""Training one unit: a NoProp-DT block t (t = 1..T) or the output head (unit 0).

This is the only training code; the in-process trainer (:mod:`noprop_dist.local`) and the
Ray workers (:mod:`noprop_dist.coordinator`) both run :class:`UnitRunner` unchanged. A unit
needs the training split, the run's :class:`UnitSetup` and its own state, nothing from any
other unit: block t's input ``z_{t-1}`` is sampled in closed form from ``q(z_{t-1} | y)``.

Determinism: every random draw of a unit comes from a generator seeded by
``derive_seed(run seed, unit, epoch, stream)``: never the global RNG (dropout runs under a
forked, reseeded RNG) and never the identity of the worker. Bit-level equality also needs
the same number of torch threads (reductions are split differently): the equivalence
tests run both trainers with one thread per unit. So the same seed gives the same
weights whether the units run in one process, on Ray workers, or after a restart.

Shared state: with a learned or prototype embedding each unit trains its own copy of W_embed
(blocks through their L2 term, the head through cross-entropy and the KL term); the trainer
averages the copies every ``train.embed_sync_every`` epochs (:func:`average_embeddings`).
With a one-hot embedding the units are fully independent.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import schedule
from .config import Config, ModelConfig, TrainConfig
from .data import ArraySplit, Dataset, normalize
from .errors import TrainingDiverged
from .models import (BLOCK_SIZES, DTBlock, OutputHead, class_medoids, denoised_embedding,
                     embedding_dim, initial_embedding)
from .preflight import StepProbe

HEAD = 0
# Streams of derive_seed; head pass p uses HEAD_PASS_STRIDE * (p + 1) + stream.
SHUFFLE, NOISE, DROPOUT, INIT = 0, 1, 2, 3
HEAD_PASS_STRIDE = 10
EMBED_SEED_UNIT = -1
PROTOTYPE_MAX_PER_CLASS = 1000  # medoid search is quadratic in the class size

ProgressFn = Callable[[dict], None]


def unit_name(unit: int) -> str:
    return "head" if unit == HEAD else f"block_{unit:02d}"


def derive_seed(run_seed: int, unit: int, epoch: int, stream: int) -> int:
    """A 63-bit seed that depends only on (run seed, unit, epoch, stream)."""
    seq = np.random.SeedSequence([run_seed, unit + 1, epoch, stream])
    return int(seq.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class UnitSetup:
    """What all units of a run share; identical on every worker (the coordinator ships it)."""

    model: ModelConfig
    train: TrainConfig
    alpha_bar: tuple[float, ...]          # t = 0..T, float64 values
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedding: torch.Tensor               # initial W_embed (m, d)

    @property
    def T(self) -> int:
        return len(self.alpha_bar) - 1

    @property
    def learnable_embedding(self) -> bool:
        return self.model.embedding != "one_hot"


def make_setup(cfg: Config, data: Dataset) -> UnitSetup:
    """Schedule and initial embedding for a run."""
    ab = schedule.alpha_bar_from_config(cfg.schedule)
    embedding = make_embedding(cfg, data)
    return UnitSetup(model=cfg.model, train=cfg.train, alpha_bar=tuple(float(v) for v in ab),
                     num_classes=data.num_classes, input_shape=data.input_shape,
                     mean=data.mean, std=data.std, embedding=embedding)


def make_embedding(cfg: Config, data: Dataset) -> torch.Tensor:
    """The run's initial W_embed (m, d), seeded (prototype: per-class medoids of the train set)."""
    d = embedding_dim(cfg.model.embedding, data.num_classes, data.input_shape, cfg.model.embed_dim)
    prototypes = None
    if cfg.model.embedding == "prototype":
        x = normalize(np.asarray(data.train.x), data.mean, data.std)
        y = torch.from_numpy(np.array(data.train.y))
        prototypes = class_medoids(x, y, data.num_classes, PROTOTYPE_MAX_PER_CLASS,
                                   derive_seed(cfg.train.seed, EMBED_SEED_UNIT, 0, INIT))
    return initial_embedding(cfg.model.embedding, data.num_classes, d,
                             derive_seed(cfg.train.seed, EMBED_SEED_UNIT, 0, INIT), prototypes)


def build_module(unit: int, setup: UnitSetup) -> nn.Module:
    """The network of one unit, initialised from its own seed."""
    d = setup.embedding.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(setup.train.seed, unit, 0, INIT))
        if unit == HEAD:
            return OutputHead(d, setup.num_classes)
        return DTBlock(setup.input_shape, d, setup.num_classes, BLOCK_SIZES[setup.model.block],
                       setup.model.dropout)


def block_step_probe(setup: UnitSetup, n_train: int) -> StepProbe:
    """The dry run of one block's training step (every block has the same shapes), for
    :mod:`~noprop_dist.preflight`. Per-epoch tensors: the target noise, ``n_train x d`` for a
    block and ``head_passes`` times that for the head; the larger is counted."""
    d = setup.embedding.shape[1]

    def forward(module: nn.Module, batch: int) -> torch.Tensor:
        z = torch.zeros(batch, d)                                                 # (B, d)
        x = torch.zeros(batch, *setup.input_shape)                                # (B, C, H, W)
        return dt_block_loss(module(z, x), torch.zeros(setup.num_classes, d), z, 1.0)

    return StepProbe(name=f"the {setup.model.block} DT block", build=lambda: build_module(1, setup),
                     forward=forward, fixed_bytes=n_train * d * 4 * max(1, setup.train.head_passes))


def epoch_noise(setup: UnitSetup, unit: int, epoch: int, n: int) -> torch.Tensor:
    """The standard-normal noise of one unit's closed-form targets for one epoch.

    Blocks: (n, d), row i is the noise of training example i's z_{t-1}.
    Head: (head_passes, n, d), the noise of z_T for each pass over the labels.
    The coordinator either ships this tensor or lets the worker call this same function.
    """
    d = setup.embedding.shape[1]
    seed = setup.train.seed
    if unit == HEAD:
        return torch.stack([
            schedule.marginal_noise(n, d, derive_seed(seed, unit, epoch, HEAD_PASS_STRIDE * (p + 1) + NOISE))
            for p in range(setup.train.head_passes)])
    return schedule.marginal_noise(n, d, derive_seed(seed, unit, epoch, NOISE))


def epoch_order(setup: UnitSetup, unit: int, epoch: int, n: int, head_pass: int = -1) -> torch.Tensor:
    stream = SHUFFLE if head_pass < 0 else HEAD_PASS_STRIDE * (head_pass + 1) + SHUFFLE
    gen = torch.Generator().manual_seed(derive_seed(setup.train.seed, unit, epoch, stream))
    return torch.randperm(n, generator=gen)


class UnitRunner:
    """Trains one unit epoch by epoch; holds its module, optimizer and embedding copy."""

    def __init__(self, unit: int, setup: UnitSetup, train: ArraySplit,
                 device: torch.device | str = "cpu"):
        self.unit = unit
        self.name = unit_name(unit)
        self.setup = setup
        self.train = train
        self.device = torch.device(device)
        self.module = build_module(unit, setup).to(self.device)
        self.embedding = nn.Parameter(setup.embedding.clone().to(self.device),
                                      requires_grad=setup.learnable_embedding)
        params = list(self.module.parameters())
        # summed_gradient: the unit records its W_embed gradients for the trainer's one
        # optimizer (noprop_dist.embedding_sync) instead of moving its own copy.
        self.records_embedding_grads = setup.learnable_embedding and setup.train.embed_sync == "summed_gradient"
        self._embedding_grads: list[torch.Tensor] = []
        if setup.learnable_embedding and not self.records_embedding_grads:
            params.append(self.embedding)
        self.optimizer = torch.optim.AdamW(params, lr=setup.train.lr,
                                           weight_decay=setup.train.weight_decay)
        self.epochs_done = 0
        self.peak_memory_bytes = 0
        self.first_step_at: float | None = None
        ab = setup.alpha_bar
        if unit != HEAD:
            # Block t is fed z_{t-1} ~ q(z_{t-1} | y) and weighted by (T/2) eta (SNR(t) - SNR(t-1)).
            self.input_alpha_bar = ab[unit - 1]
            self.loss_weight = float(schedule.dt_loss_weights(np.array(ab), setup.train.eta)[unit])
            assert self.loss_weight > 0

    # ---- state ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors-only state: weights, BN buffers, optimizer moments, embedding copy."""
        out = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        out.update(optimizer_state_tensors(self.optimizer))
        out["embedding"] = self.embedding.detach()
        out["epochs_done"] = torch.tensor(self.epochs_done)
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        self.module.load_state_dict(model)
        load_optimizer_state(self.optimizer, tensors)
        with torch.no_grad():
            self.embedding.copy_(tensors["embedding"].to(self.device))
        self.epochs_done = int(tensors["epochs_done"])

    def to(self, device: torch.device | str) -> "UnitRunner":
        """Move the unit (module, embedding copy, optimizer moments) to ``device``.

        A worker that hosts several blocks keeps only the one it trains on its GPU.
        """
        self.device = torch.device(device)
        self.module.to(self.device)
        with torch.no_grad():
            self.embedding.data = self.embedding.data.to(self.device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = value.to(self.device)
        return self

    def take_embedding_grads(self) -> torch.Tensor:
        """The W_embed gradients recorded since the last call, one per optimiser step (S, m, d)."""
        grads = torch.stack(self._embedding_grads).cpu() if self._embedding_grads else torch.zeros(0)
        self._embedding_grads = []
        return grads

    def set_embedding(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.copy_(weight.to(self.device))

    # ---- training -------------------------------------------------------------------
    def run_epoch(self, epoch: int, noise: torch.Tensor | None = None,
                  progress: ProgressFn | None = None) -> dict:
        """Train one epoch (1-based) and return its metrics.

        ``noise`` is the epoch's target noise as made by :func:`epoch_noise`; when None the
        runner makes it itself (the same tensor: the "noise recipe").
        """
        if epoch != self.epochs_done + 1:
            raise RuntimeError(f"{self.name}: asked for epoch {epoch} after {self.epochs_done} epochs")
        n = len(self.train)
        start = time.perf_counter()
        if noise is None:
            noise = epoch_noise(self.setup, self.unit, epoch, n)
        noise = noise.to(self.device)
        target_seconds = time.perf_counter() - start
        self.first_step_at = None
        self.module.train()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.setup.train.seed, self.unit, epoch, DROPOUT))
            if self.unit == HEAD:
                losses = self._head_epoch(epoch, noise, progress)
            else:
                losses = self._block_epoch(epoch, noise, progress)
        # One host sync per epoch, not per step: the losses stay tensors until here.
        per_step = torch.stack(losses).double().cpu()
        check_finite(self.name, epoch, per_step, self.setup.train)
        self.epochs_done = epoch
        seconds = time.perf_counter() - start
        samples = n * (self.setup.train.head_passes if self.unit == HEAD else 1)
        return {"unit": self.name, "epoch": epoch, "loss": float(per_step.mean()),
                "seconds": seconds, "samples_per_s": samples / seconds,
                "target_seconds": target_seconds, "first_step_at": self.first_step_at,
                "peak_memory_bytes": self.peak_memory_bytes, "rss_bytes": rss_bytes()}

    def _batches(self, order: torch.Tensor):
        bs = self.setup.train.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            if len(idx) < 2:
                continue  # BatchNorm needs at least two examples
            yield idx

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.train.y)[idx.numpy()]).to(self.device)

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.records_embedding_grads:
            self._embedding_grads.append(self.embedding.grad.detach().clone())
            self.embedding.grad = None
        if self.first_step_at is None:
            self.first_step_at = time.time()  # wall clock: compared with the launch time

    def _autocast(self):
        if not (self.setup.train.bf16 and self.device.type == "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _block_epoch(self, epoch: int, noise: torch.Tensor, progress: ProgressFn | None) -> list[torch.Tensor]:
        order = epoch_order(self.setup, self.unit, epoch, len(self.train))
        x_all = self.train.x
        losses: list[torch.Tensor] = []
        steps = math.ceil(len(order) / self.setup.train.batch_size)
        tick = time.perf_counter()
        for step, idx in enumerate(self._batches(order), start=1):
            x = normalize(np.asarray(x_all[idx.numpy()]), self.setup.mean, self.setup.std).to(self.device)
            y = self._labels(idx)
            u_y = self.embedding[y]                                               # (B, d)
            z_prev = schedule.sample_marginal(u_y, self.input_alpha_bar, noise[idx.to(noise.device)])  # (B, d)
            measure = step == 1
            with self._autocast(), SavedTensorMeter(measure, self.module) as meter:
                logits = self.module(z_prev, x)                                   # (B, m)
                loss = dt_block_loss(logits, self.embedding, u_y, self.loss_weight)
            self._step(loss)
            if measure:
                self._record_memory(meter.bytes)
            losses.append(loss.detach())
            if progress and (step % self.setup.train.log_every == 0 or step == steps):
                now = time.perf_counter()
                progress({"unit": self.name, "epoch": epoch, "step": step, "steps": steps,
                          "loss": losses[-1].item(), "samples_per_s": len(idx) * self.setup.train.log_every / max(now - tick, 1e-9)})
                tick = now
        return losses

    def _head_epoch(self, epoch: int, noise: torch.Tensor, progress: ProgressFn | None) -> list[torch.Tensor]:
        """Cross-entropy of p_out(y | z_T) on z_T ~ q(z_T | y), plus the KL term (Eq. 8).

        The head sees labels only (never a block output), so it trains in its own unit.
        """
        ab_T, ab_0 = self.setup.alpha_bar[-1], self.setup.alpha_bar[0]
        losses: list[torch.Tensor] = []
        passes = self.setup.train.head_passes
        for p in range(passes):
            order = epoch_order(self.setup, self.unit, epoch, len(self.train), head_pass=p)
            for idx in self._batches(order):
                y = self._labels(idx)
                u_y = self.embedding[y]                                           # (B, d)
                z_T = schedule.sample_marginal(u_y, ab_T, noise[p][idx.to(noise.device)])  # (B, d)
                loss = F.cross_entropy(self.module(z_T), y)
                if self.setup.learnable_embedding:
                    loss = loss + schedule.kl_prior(u_y, ab_0).mean()
                self._step(loss)
                losses.append(loss.detach())
            if progress:
                progress({"unit": self.name, "epoch": epoch, "step": p + 1, "steps": passes,
                          "loss": losses[-1].item(), "samples_per_s": 0.0})
        self._record_memory(0)
        return losses

    def _record_memory(self, activation_bytes: int) -> None:
        """Peak training memory: parameters + gradients + optimizer state + saved activations.

        On CUDA the allocator's own peak is reported when it is larger.
        """
        params = list(self.module.parameters()) + [self.embedding]
        total = training_state_bytes(params, self.optimizer) + activation_bytes
        if self.device.type == "cuda":
            total = max(total, torch.cuda.max_memory_allocated(self.device))
        self.peak_memory_bytes = max(self.peak_memory_bytes, total)


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (activations), excluding parameters."""

    def __init__(self, enabled: bool, module: nn.Module):
        self.enabled = enabled
        self.bytes = 0
        self._seen: set[int] = set()
        self._module = module
        self._param_ptrs: set[int] = set()
        self._ctx = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self._seen and ptr not in self._param_ptrs:
            self._seen.add(ptr)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        if self.enabled:
            self._param_ptrs = {p.untyped_storage().data_ptr() for p in self._module.parameters()}
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def dt_block_loss(logits: torch.Tensor, embedding: torch.Tensor, u_y: torch.Tensor, weight: float) -> torch.Tensor:
    """Block t's term of Eq. 8: ``weight * ||u_hat_t - u_y||^2`` averaged over the batch, with
    ``u_hat_t = softmax(logits) @ W_embed`` and ``weight = (T/2) eta (SNR(t) - SNR(t-1))``."""
    u_hat = denoised_embedding(logits.float(), embedding)                        # (B, d)
    return weight * ((u_hat - u_y) ** 2).sum(-1).mean()


def check_finite(name: str, epoch: int, per_step: torch.Tensor, train: TrainConfig) -> None:
    """Stop the run when a unit's loss is no longer finite (checked once per epoch, on the
    per-step losses): the epoch's weights are not checkpointed, the last finite ones stay."""
    bad = (~torch.isfinite(per_step)).nonzero()
    if len(bad):
        step = int(bad[0]) + 1
        raise diverged(name, epoch, float(per_step[step - 1]), train, f"step {step} of epoch {epoch}")


def diverged(name: str, epoch: int, value: float, train: TrainConfig, when: str = "") -> TrainingDiverged:
    """The one message of a run stopped by a non-finite loss."""
    return TrainingDiverged(
        f"{name}: the loss became {value} at {when or f'epoch {epoch}'}; the likely cause is a learning rate "
        f"too high for this data (train.lr={train.lr:g}) or unscaled inputs; the run stopped with its last "
        "finite checkpoints kept; start again with a lower --train.lr")


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``optim/<param index>/<name>`` tensors."""
    return {f"optim/{idx}/{key}": torch.as_tensor(value)
            for idx, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_state_tensors` flattened (hyperparameters stay the optimizer's)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def training_state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Parameters + their gradients + optimizer state, in bytes."""
    total = sum(t.numel() * t.element_size() for t in params)
    total += sum(t.numel() * t.element_size() for t in params if t.requires_grad)
    return total + sum(v.numel() * v.element_size() for st in optimizer.state.values()
                       for v in st.values() if torch.is_tensor(v))


def rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def average_embeddings(copies: list[torch.Tensor]) -> torch.Tensor:
    """The synchronised embedding: the mean of the units' copies (same order everywhere)."""
    return torch.stack([c.detach().cpu().float() for c in copies]).mean(0)


def train_unit(unit: int, setup: UnitSetup, train: ArraySplit, epochs: int,
               device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> UnitRunner:
    """Train one unit alone for ``epochs`` epochs from its seed (no other unit involved)."""
    runner = UnitRunner(unit, setup, train, device)
    for epoch in range(1, epochs + 1):
        runner.run_epoch(epoch, progress=progress)
    return runner
