"""Training one unit, for every NoProp variant: the unit loop (:class:`UnitRunner`).

A *unit* is what one worker trains on its own: NoProp-DT's block t or its output head,
NoProp-CT/FM's network of one time interval (and CT's head). What a unit is and what a
variant tells this loop (its units, each unit's module, optimiser, per-epoch target noise
and loss, the shared tensors) live in :mod:`noprop_dist.variants.base` (``UnitSpec``,
``UnitSetup``, ``UnitObjective``); the variants in :mod:`noprop_dist.variants.dt` and
:mod:`noprop_dist.variants.continuous`. What runs
:class:`UnitRunner`, unchanged:

* the in-process trainer (:mod:`noprop_dist.trainers.local`): every unit, one after another;
* the Ray workers (:mod:`noprop_dist.trainers.ray.coordinator`): one or more units each;
* the ranks of a data-parallel run (:mod:`noprop_dist.trainers.ddp`, :mod:`noprop_dist.trainers.torchrun`;
  NoProp-CT/FM and the back-propagation baselines): every rank holds every unit, and an
  image-reading unit is trained on this rank's share of every global batch, with DDP applied
  from outside the loop (:mod:`noprop_dist.training.data_parallel`); a head runs in full on
  every rank.

A unit needs the training split, the run's :class:`UnitSetup` and its own state, nothing
from any other unit: its noisy inputs are sampled in closed form from the label.

Determinism: every random draw of a unit comes from a generator seeded by
``derive_seed(run seed, unit.seed_id, epoch, stream)``: never the global RNG (dropout runs
under a forked, reseeded RNG) and never the identity of the worker. Bit-level equality also
needs the same number of torch threads (reductions are split differently): the equivalence
tests run both trainers with one thread per unit. So the same seed gives the same weights
whether the units run in one process, on Ray workers, or after a restart. Data-parallel
units are the one exception to "never the worker": rank r draws its dropout masks from
stream ``DROPOUT + RANK_STREAM_STRIDE * r`` (rank 0 that of a run without data parallelism);
without dropout, N ranks give the weights of one up to float rounding (the gradient sums
are split differently).

Shared state: with a learned or prototype embedding each unit trains its own copy of W_embed
and CT's units each train a copy of the learned schedule (the module state under
``UnitObjective.shared_prefixes``); the trainer averages the copies every
``train.embed_sync_every`` epochs (``unit_spec.average_shared``), or, for W_embed with
``train.embed_sync=summed_gradient``, applies the units' summed gradients
(:mod:`noprop_dist.training.embedding_sync`). With a one-hot embedding and no learned schedule the
units are fully independent.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from noprop_dist.config import TrainConfig
from noprop_dist.data import ArraySplit, normalize
from noprop_dist.errors import TrainingDiverged
from noprop_dist.training.data_parallel import SERIAL, DataParallel
from noprop_dist.training.meters import SavedTensorMeter, rss_bytes, training_state_bytes
from noprop_dist.training.optimizer_state import load_optimizer_state, optimizer_state_tensors
from noprop_dist.variants.base import SHARED_EMBEDDING, UnitSetup, UnitSpec, derive_seed, epoch_order, shared_of

ProgressFn = Callable[[dict], None]


class UnitRunner:
    """Trains one unit epoch by epoch; holds its module, optimizer and embedding copy.

    ``parallel``: a :class:`~noprop_dist.training.data_parallel.DataParallel` layout when this
    process is one rank of a data-parallel run (a process group must be open); the runner
    then trains its share of every global batch through what ``parallel.attach`` returns.
    Without it (or for a unit without images) the plain loop runs, bit for bit.
    """

    def __init__(self, unit: UnitSpec, setup: UnitSetup, train: ArraySplit,
                 device: torch.device | str = "cpu", parallel: DataParallel | None = None):
        self.unit = unit
        self.name = unit.name
        self.setup = setup
        self.objective = setup.objective
        self.train = train
        self.device = torch.device(device)
        self.module = self.objective.build_module(unit, setup).to(self.device)
        self.embedding = nn.Parameter(setup.embedding.clone().to(self.device),
                                      requires_grad=setup.learnable_embedding)
        params = list(self.module.parameters())
        # summed_gradient: the unit records its W_embed gradients for the trainer's one
        # optimizer (noprop_dist.training.embedding_sync) instead of moving its own copy.
        self.records_embedding_grads = setup.learnable_embedding and setup.train.embed_sync == "summed_gradient"
        self._embedding_grads: list[torch.Tensor] = []
        if setup.learnable_embedding and not self.records_embedding_grads:
            params.append(self.embedding)
        self.optimizer = self.objective.optimizer(params, setup.train)
        self.epochs_done = 0
        self.peak_memory_bytes = 0
        self.first_step_at: float | None = None
        self.parallel = (parallel or DataParallel(0, 1)).attach(self)

    @property
    def data_parallel(self) -> bool:
        """Is this unit trained on a share of every global batch (a rank of a data-parallel run)?"""
        return self.parallel is not SERIAL

    # ---- state ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors-only state: weights, BN buffers, optimizer moments, embedding copy."""
        out = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        out.update(optimizer_state_tensors(self.optimizer))
        out[SHARED_EMBEDDING] = self.embedding.detach()
        out["epochs_done"] = torch.tensor(self.epochs_done)
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        self.module.load_state_dict(model)
        load_optimizer_state(self.optimizer, tensors)
        if SHARED_EMBEDDING in tensors:   # a baseline's checkpoints before 0.2 held none
            with torch.no_grad():
                self.embedding.copy_(tensors[SHARED_EMBEDDING].to(self.device))
        self.epochs_done = int(tensors["epochs_done"])

    def to(self, device: torch.device | str) -> "UnitRunner":
        """Move the unit (module, embedding copy, optimizer moments) to ``device``.

        A worker that hosts several blocks keeps only the one it trains on its GPU.
        """
        if self.parallel is not SERIAL and torch.device(device) != self.device:
            raise RuntimeError(f"{self.name}: a data-parallel unit stays on its device")
        self.device = torch.device(device)
        self.module.to(self.device)
        with torch.no_grad():
            self.embedding.data = self.embedding.data.to(self.device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = value.to(self.device)
        return self

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The unit's weights (``model/<key>``) and its W_embed copy, on the CPU: what a
        predictor reads, without the optimizer state of :meth:`state_tensors`."""
        out = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        out[SHARED_EMBEDDING] = self.embedding
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """This unit's copies of the run's shared tensors (CPU): W_embed when it is learned,
        and the module state under the variant's shared prefixes (as ``model/<key>``)."""
        return shared_of(self.model_tensors(), self.setup)

    def set_shared(self, shared: dict[str, torch.Tensor]) -> None:
        """Take the synchronised shared tensors (the optimizer's moments stay the unit's)."""
        with torch.no_grad():
            if SHARED_EMBEDDING in shared:
                self.embedding.copy_(shared[SHARED_EMBEDDING].to(self.device))
            params = dict(self.module.state_dict(keep_vars=True))
            for key, value in shared.items():
                if key.startswith("model/"):
                    params[key[len("model/"):]].copy_(value.to(self.device))

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

        ``noise`` is the epoch's target noise as made by the variant's ``epoch_noise``; when
        None the runner makes it itself (the same tensor: the "noise recipe").
        """
        if epoch != self.epochs_done + 1:
            raise RuntimeError(f"{self.name}: asked for epoch {epoch} after {self.epochs_done} epochs")
        n = len(self.train)
        start = time.perf_counter()
        if noise is None:
            noise = self.objective.epoch_noise(self.unit, self.setup, epoch, n)
        noise = noise.to(self.device)
        target_seconds = time.perf_counter() - start
        self.first_step_at = None
        self.module.train()
        self.parallel.begin_epoch()
        passes = self.objective.passes(self.unit, self.setup)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.setup.train.seed, self.unit.seed_id, epoch, self.parallel.dropout_stream))
            losses: list[torch.Tensor] = []
            for p in passes:
                losses += self._pass(epoch, p, len(passes), noise if p < 0 else noise[p], progress)
        # One host sync per epoch, not per step: the losses stay tensors until here.
        per_step = torch.stack(losses).double()
        self.parallel.reduce_losses(per_step)      # data-parallel: the global batches' means
        per_step = per_step.cpu()
        check_finite(self.name, epoch, per_step, self.setup.train)
        self.epochs_done = epoch
        seconds = time.perf_counter() - start
        samples = n * len(passes)
        metrics = {"unit": self.name, "epoch": epoch, "loss": float(per_step.mean()),
                   "seconds": seconds, "samples_per_s": samples / seconds,
                   "target_seconds": target_seconds, "first_step_at": self.first_step_at,
                   "peak_memory_bytes": self.peak_memory_bytes, "rss_bytes": rss_bytes()}
        return self.parallel.epoch_metrics(metrics)

    def _pass(self, epoch: int, p: int, passes: int, noise: torch.Tensor,
              progress: ProgressFn | None) -> list[torch.Tensor]:
        """One pass over the training split in the unit's seeded order."""
        order = epoch_order(self.setup, self.unit, epoch, len(self.train), stream=p)
        images = self.objective.needs_images(self.unit)
        losses: list[torch.Tensor] = []
        steps = math.ceil(len(order) / self.setup.train.batch_size)
        report = StepReport(progress, self.name, epoch, steps, self.setup.train.log_every, single_pass=passes == 1)
        for step, idx in enumerate(global_batches(order, self.setup.train.batch_size, self.parallel.min_batch), 1):
            self._set_lr(lr_factor(self.setup.train, epoch, max(p, 0), passes, step, steps))
            share = self.parallel.share(idx)          # this rank's examples (all of them when serial)
            x = None
            if images:
                x = normalize(np.asarray(self.train.x[share.numpy()]), self.setup.mean, self.setup.std).to(self.device)
            y = torch.from_numpy(np.asarray(self.train.y)[share.numpy()]).to(self.device)
            rows = noise[share.to(noise.device)]
            measure = step == 1 and p <= 0 and images
            with self._autocast(), SavedTensorMeter(measure, self.module) as meter:
                loss = self.parallel.loss(self, x, y, rows)
            # DDP averages over ranks: this weight makes the average the global batch's mean
            # gradient (exactly 1.0 when serial: the plain loop's bits).
            self._step(loss * (len(share) * self.parallel.world / len(idx)))
            losses.append(loss.detach() * (len(share) / len(idx)))
            if measure:
                self._record_memory(meter.bytes)
            report.step(step, loss, len(idx))
        report.end_of_pass(p, passes, losses)
        if not images:
            self._record_memory(0)
        return losses

    def _set_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.setup.train.lr * factor

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.after_backward()   # a replica group averages the module's gradients
        if self.embedding.grad is not None:
            # W_embed is the runner's, outside the DDP module: averaged by hand when data-parallel
            # (what is recorded for summed_gradient is this average, the global batch's).
            self.parallel.reduce_grad(self.embedding.grad)
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

    def _record_memory(self, activation_bytes: int) -> None:
        """Peak training memory: parameters + gradients + optimizer state + saved activations.

        On CUDA the allocator's own peak is reported when it is larger.
        """
        params = list(self.module.parameters()) + [self.embedding]
        total = training_state_bytes(params, self.optimizer) + activation_bytes
        if self.device.type == "cuda":
            total = max(total, torch.cuda.max_memory_allocated(self.device))
        self.peak_memory_bytes = max(self.peak_memory_bytes, total)


def lr_factor(train: TrainConfig, epoch: int, pass_index: int, passes: int, step: int, steps: int) -> float:
    """``train.lr_schedule``'s factor of ``train.lr`` at step ``step`` (1-based) of ``steps`` in
    pass ``pass_index`` (0-based) of ``passes`` in epoch ``epoch`` (1-based) of ``train.epochs``:
    1 (constant), or ``0.5 (1 + cos(pi f))`` (cosine) with f the fraction of the run done
    before the step. A function of these counters alone, so a restarted unit resumes on it."""
    if train.lr_schedule == "constant":
        return 1.0
    f = (epoch - 1 + (pass_index + (step - 1) / steps) / passes) / train.epochs
    return 0.5 * (1.0 + math.cos(math.pi * min(f, 1.0)))


def global_batches(order: torch.Tensor, batch_size: int, fewest: int):
    """The global batches of one pass (data-parallel: every rank walks the same ones); a last
    batch of fewer than ``fewest`` examples is skipped (BatchNorm needs two; every rank one)."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) >= fewest:
            yield idx


class StepReport:
    """Progress events of one pass: every ``log_every`` steps (a single-pass unit), or once
    per pass (a multi-pass head). The loss is read from the device only when reported."""

    def __init__(self, progress: ProgressFn | None, unit: str, epoch: int, steps: int, log_every: int,
                 single_pass: bool):
        self.progress, self.unit, self.epoch, self.steps = progress, unit, epoch, steps
        self.log_every, self.single_pass = log_every, single_pass
        self.tick = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor, batch: int) -> None:
        if self.progress and self.single_pass and (step % self.log_every == 0 or step == self.steps):
            now = time.perf_counter()
            self.progress({"unit": self.unit, "epoch": self.epoch, "step": step, "steps": self.steps,
                           "loss": loss.detach().item(),
                           "samples_per_s": batch * self.log_every / max(now - self.tick, 1e-9)})
            self.tick = now

    def end_of_pass(self, p: int, passes: int, losses: list[torch.Tensor]) -> None:
        if self.progress and not self.single_pass:
            self.progress({"unit": self.unit, "epoch": self.epoch, "step": p + 1, "steps": passes,
                           "loss": losses[-1].item(), "samples_per_s": 0.0})


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


def train_unit(unit: UnitSpec, setup: UnitSetup, train: ArraySplit, epochs: int,
               device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> UnitRunner:
    """Train one unit alone for ``epochs`` epochs from its seed (no other unit involved)."""
    runner = UnitRunner(unit, setup, train, device)
    for epoch in range(1, epochs + 1):
        runner.run_epoch(epoch, progress=progress)
    return runner
