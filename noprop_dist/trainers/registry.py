"""The registry of trainers: which backend trains which variant family, found by name.

The CLI looks a trainer up here instead of branching; a new trainer registers one line.
A variant may narrow its family's trainers (``Variant.backends`` in :mod:`noprop_dist.variants.registry`:
NoProp-DT does not take the ``ddp`` trainer, which only CT/FM use).

What runs where:

* ``ray`` / noprop: a driver-side coordinator and Ray actors, one per unit (DT block, CT/FM
  interval, head); units never talk to each other (:mod:`~noprop_dist.trainers.ray.coordinator`).
* ``local`` / noprop: every unit in this process, one after another (:mod:`~noprop_dist.trainers.local`).
* ``ddp`` / noprop (CT/FM only): N Ray Train workers each run the in-process loop as one rank;
  interval networks train with DDP, the head in full on every rank; the driver evaluates
  (:mod:`~noprop_dist.trainers.ddp`).
* ``ddp`` / backprop: N Ray Train workers each run the baseline's DDP loop (:mod:`~noprop_dist.trainers.ddp`).
* ``local`` / backprop: that loop in this process, without a process group (:mod:`~noprop_dist.variants.backprop`).
Targets are ``"module:function"`` strings imported only when used, so that looking a
trainer up imports neither Ray nor torch.distributed. Ray is imported only by the trainer
modules that need it (:mod:`~noprop_dist.trainers.ray.coordinator`, :mod:`~noprop_dist.trainers.ddp`).

Every trainer function has the signature
``train(cfg, run_dir, resume=False, show_progress=True) -> summary dict``
and uses :mod:`noprop_dist.run.lifecycle` for data, run directory, checkpoint policy and the
final evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from noprop_dist.errors import ConfigError


@dataclass(frozen=True)
class Trainer:
    backend: str
    family: str
    target: str
    doc: str

    def function(self) -> Callable:
        from noprop_dist.variants.registry import load_target

        return load_target(self.target)


TRAINERS: tuple[Trainer, ...] = (
    Trainer("ray", "noprop", "noprop_dist.trainers.ray.coordinator:train_ray",
            "Ray coordinator, one worker per block, no traffic between workers"),
    Trainer("local", "noprop", "noprop_dist.trainers.local:train_local",
            "every unit in this process, one after another"),
    Trainer("ddp", "noprop", "noprop_dist.trainers.ddp:train_noprop_ddp",
            "NoProp-CT/FM data-parallel: each interval network with DDP across Ray Train workers (not DT)"),
    Trainer("ddp", "backprop", "noprop_dist.trainers.ddp:train_ddp",
            "PyTorch DDP across Ray Train workers (TorchTrainer); gloo on CPU, nccl on GPU"),
    Trainer("local", "backprop", "noprop_dist.variants.backprop:train_backprop_local",
            "one process, no process group (the N = 1 point of DDP)"),
)


def find_trainer(backend: str, variant: str) -> Trainer:
    """The trainer of ``variant`` on ``backend``, or a ConfigError naming the ones that exist."""
    from noprop_dist.variants.registry import get_variant

    entry = get_variant(variant)
    usable = [t for t in TRAINERS if t.family == entry.family and (not entry.backends or t.backend in entry.backends)]
    for trainer in usable:
        if trainer.backend == backend:
            return trainer
    if entry.backend_note and any(t.backend == backend and t.family == entry.family for t in TRAINERS):
        raise ConfigError(f"variant {variant} cannot train with cluster.backend={backend}: {entry.backend_note}")
    raise ConfigError(f"variant {variant} cannot train with cluster.backend={backend}; "
                      f"use --cluster.backend= one of {', '.join(t.backend for t in usable)}")
